"""FeatureMemory under 2-process DDP (CPU, gloo): the memory equals a 1-process update on the
concatenated batch, on both ranks — including a class that only one rank sees (the reference's
memory averaging would give mean/2 there)."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datetime
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from scaleseg.models.mcibi import FeatureMemory
from scaleseg.types import StepInfo

WORLD = 2
NUM_CLASSES, CHANNELS = 6, 8
IGNORE = 255
TIMEOUT_S = 90


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two steps of a 4-image batch (8×8 features, 32×32 labels). Class 5 appears only in image 0
    (rank 0's half) at step 0; class 4 never appears at step 0."""
    g = torch.Generator().manual_seed(0)
    out = []
    for step in range(2):
        feats = torch.randn(2 * WORLD, CHANNELS, 8, 8, generator=g).relu() + 0.05
        labels = torch.randint(0, 4, (2 * WORLD, 32, 32), generator=g)
        labels[torch.rand(labels.shape, generator=g) < 0.15] = IGNORE
        if step == 0:
            labels[0, :8, :8] = 5
        else:
            labels[3, 8:, 8:] = 4
        out.append((feats, labels))
    return out


def _memory(init: str) -> FeatureMemory:
    mem = FeatureMemory(NUM_CLASSES, CHANNELS, init=init)  # type: ignore[arg-type]
    mem.memory[:2] = torch.linspace(0.1, 1.0, 2 * CHANNELS).view(2, CHANNELS)
    mem.initialized[:2] = True
    return mem


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )
    try:
        result = {}
        for init in ("mean", "random_pixel"):
            mem = _memory(init)
            for step, (feats, labels) in enumerate(_batches()):
                half = slice(2 * rank, 2 * rank + 2)
                mem.update(feats[half], labels[half], StepInfo(step, 10))
                result[f"{init}_{step}"] = mem.memory.clone()
            result[f"{init}_initialized"] = mem.initialized.clone()
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run_two_ranks(out_dir: Path) -> list[dict[str, torch.Tensor]]:
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, port, str(out_dir))) for rank in range(WORLD)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=TIMEOUT_S)
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    assert [p.exitcode for p in procs] == [0] * WORLD, f"worker exit codes {[p.exitcode for p in procs]}"
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_ddp_update_equals_single_process_update(tmp_path):
    ranks = _run_two_ranks(tmp_path)

    single = _memory("mean")
    for step, (feats, labels) in enumerate(_batches()):
        single.update(feats, labels, StepInfo(step, 10))
        for r in range(WORLD):
            torch.testing.assert_close(ranks[r][f"mean_{step}"], single.memory, atol=1e-6, rtol=0)
        if step == 0:
            # class 5, seen on rank 0 only, holds its full mean (not mean / world size)
            feats0 = feats[0, :, :2, :2].mean((1, 2))
            torch.testing.assert_close(single.memory[5], feats0)
            assert ranks[1]["mean_0"][5].abs().sum() > 0
    assert torch.equal(ranks[0]["mean_initialized"], single.initialized)
    assert torch.equal(ranks[1]["mean_initialized"], single.initialized)
    assert single.initialized.tolist() == [True] * NUM_CLASSES

    # random-pixel init: identical on both ranks, EMA classes equal the 1-process update, and each
    # newly seen class holds one pixel of that class from the global batch
    for step in range(2):
        assert torch.equal(ranks[0][f"random_pixel_{step}"], ranks[1][f"random_pixel_{step}"])
    mem_step0 = ranks[0]["random_pixel_0"]
    torch.testing.assert_close(mem_step0[:2], ranks[0]["mean_0"][:2], atol=1e-6, rtol=0)
    feats, labels = _batches()[0]
    pixels = feats.permute(0, 2, 3, 1).reshape(-1, CHANNELS)
    # feature pixels whose 4×4 label cell holds class k (soft label downsampling, the default)
    onehot = torch.nn.functional.one_hot(torch.where(labels == IGNORE, NUM_CLASSES, labels), NUM_CLASSES + 1)
    has = onehot.view(2 * WORLD, 8, 4, 8, 4, NUM_CLASSES + 1).amax(dim=(2, 4)).reshape(-1, NUM_CLASSES + 1)
    for k in (2, 3, 5):
        assert (pixels[has[:, k] > 0] - mem_step0[k]).abs().sum(1).min() == 0
