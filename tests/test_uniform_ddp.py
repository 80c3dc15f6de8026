"""Centroid index under 2 processes: rank 0 builds, rank 1 waits for the cache file (no collective
call), and both get exactly the index a single process builds — with a gloo process group and with
plain RANK/LOCAL_RANK environment variables (torchrun / Lightning's launcher)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datetime
import multiprocessing as mp
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scaleseg.data.base import SegDataset
from scaleseg.data.spec import DatasetSpec
from scaleseg.data.uniform import CentroidIndex, load_or_build_index

WORLD = 2
TIMEOUT_S = 120
SPEC = DatasetSpec("toy", ("a", "b", "c", "d"), ((0, 0, 0), (1, 1, 1), (2, 2, 2), (3, 3, 3)))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _make_pairs(root: Path, n: int = 6) -> list[tuple[Path, Path]]:
    rng = np.random.default_rng(7)
    pairs = []
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        lab = rng.integers(0, 4, (20, 36)).astype(np.uint8)
        lab[rng.random(lab.shape) < 0.1] = 255
        Image.fromarray(lab).save(root / f"lab{i}.png")
        Image.fromarray(np.zeros((20, 36, 3), np.uint8)).save(root / f"img{i}.png")
        pairs.append((root / f"img{i}.png", root / f"lab{i}.png"))
    return pairs


def _worker(rank: int, mode: str, port: int, pairs: list, cache: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if mode == "gloo":
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=TIMEOUT_S))
    else:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    try:
        from scaleseg.data import uniform

        calls = []
        real = uniform.tile_centroids
        uniform.tile_centroids = lambda *a: calls.append(1) or real(*a)  # count label maps processed here
        ds = SegDataset(pairs, SPEC)
        index = load_or_build_index(ds, tile=16, cache_dir=cache, workers=0, progress=False, timeout=TIMEOUT_S, poll=0.05)
        np.savez(Path(out) / f"{mode}_rank{rank}.npz", image=index.image, cls=index.cls, x=index.x, y=index.y,
                 calls=len(calls))
    finally:
        if mode == "gloo":
            dist.destroy_process_group()


def _run(mode: str, pairs: list, cache: Path, out: Path) -> None:
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, mode, port, pairs, str(cache), str(out))) for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(TIMEOUT_S)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
    codes = [p.exitcode for p in procs]
    assert codes == [0, 0], f"{mode}: worker exit codes {codes} (None = timed out)"


@pytest.mark.parametrize("mode", ["gloo", "env"])
def test_two_process_build_equals_one_process_build(tmp_path, mode):
    pairs = _make_pairs(tmp_path / "data")
    single: CentroidIndex = load_or_build_index(SegDataset(pairs, SPEC), tile=16, cache_dir=tmp_path / "single",
                                                workers=0, progress=False, rank=0)
    cache = tmp_path / "cache"
    _run(mode, pairs, cache, tmp_path)
    assert len(list(cache.glob("*.npz"))) == 1  # built once, by rank 0
    assert len(single) > 0
    for rank in range(WORLD):
        with np.load(tmp_path / f"{mode}_rank{rank}.npz") as got:
            for name in ("image", "cls", "x", "y"):
                assert np.array_equal(got[name], getattr(single, name)), (rank, name)
            assert int(got["calls"]) == (len(pairs) if rank == 0 else 0)  # rank 1 waited, did not build
