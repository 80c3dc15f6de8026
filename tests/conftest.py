"""Shared test setup: offline hub, threads per worker, and the CamVid fixture."""
from __future__ import annotations

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
# check-data verdicts of this session go to a temporary folder, not ~/.cache/scaleseg
os.environ.setdefault("SCALESEG_CACHE_DIR", tempfile.mkdtemp(prefix="scaleseg-cache-"))
# OpenMP threads that busy-wait make small-tensor ops 10-100x slower when cores are shared
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# under pytest-xdist (two workers) each worker, and every process it starts, gets one core: a CLI
# subprocess must use the thread count of the in-process run it is compared with bit for bit
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

CAMVID_ROOT = Path(__file__).resolve().parents[2] / "shared/data/camvid"


@pytest.fixture
def camvid_root() -> Path:
    """The SegNet CamVid copy in ../shared/data/camvid; skips the test when it is absent."""
    if not CAMVID_ROOT.is_dir():
        pytest.skip("needs ../shared/data/camvid (CamVid SegNet copy)")
    return CAMVID_ROOT
