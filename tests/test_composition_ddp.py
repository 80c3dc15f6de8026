"""HMSA + MCIBI + DSRL under 2-process DDP (CPU, gloo).

1. The composed model's memory update on two halves of a batch equals a 1-process update on the
   whole batch, on both ranks (the per-class sums are all-reduced inside FeatureMemory).
2. A real Lightning DDP training run (torchrun-style environment, two processes) trains and
   validates; the MCIBI memory is identical on both ranks at the end, and the DDP validation's
   confusion matrix equals a 1-process `scaleseg eval` of the saved weights.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from scaleseg.config import load_config
from scaleseg.models.contract import Run
from scaleseg.models.factory import create_model
from scaleseg.types import StepInfo

WORLD = 2
K = 5
TIMEOUT_S = 300
COMPOSED = ["model.backbone=test_resnet", "model.output_stride=8", "model.head_channels=16",
            "model.hmsa.mode=hierarchical", "model.hmsa.attn_channels=8", "model.mcibi.enabled=true",
            "model.mcibi.channels=16", "model.mcibi.consistency_start_epoch=0", "model.dsrl.enabled=true",
            "model.dsrl.fa_subsample=4"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _model():
    torch.manual_seed(0)
    return create_model(load_config(None, COMPOSED), K)


def _batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for step in range(2):
        hr = torch.randn(2 * WORLD, 3, 64, 96, generator=g)
        mask = torch.randint(0, 4, (2 * WORLD, 64, 96), generator=g)
        mask[torch.rand(mask.shape, generator=g) < 0.1] = 255
        if step == 0:
            mask[0, :16, :16] = 4  # a class only rank 0 sees
        image = F.interpolate(hr, size=(32, 48), mode="bilinear", antialias=True)
        out.append({"image": image, "image_hr": hr, "mask": mask})
    return out


def _steps(model, batches, part: slice) -> list[torch.Tensor]:
    """Composed forward (HMSA's two-scale training fusion over DSRL over MCIBI), losses, then the
    state update. The wrappers train; BN and dropout are in eval mode, so both set-ups see identical
    per-image features (CPU has no SyncBatchNorm)."""
    model.train()
    for module in model.modules():
        if isinstance(module, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.dropout._DropoutNd)):
            module.eval()
    memories = []
    for step, batch in enumerate(batches):
        half = {k: v[part] for k, v in batch.items()}
        out = model.training_forward(half)
        model.losses(out, half, StepInfo(step, 10, 1))
        model.update_state([Run(out)], half, StepInfo(step, 10, 1))
        memories.append(model.base.base.feature_memory.memory.clone())
    return memories


def _init(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))


def _update_worker(rank: int, port: int, out_dir: str) -> None:
    _init(rank, port)
    try:
        with torch.no_grad():
            memories = _steps(_model(), _batches(), slice(2 * rank, 2 * rank + 2))
        torch.save(memories, Path(out_dir) / f"update{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(target, args_of) -> None:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=args_of(rank)) for rank in range(WORLD)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=TIMEOUT_S)
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    assert [p.exitcode for p in procs] == [0] * WORLD, f"worker exit codes {[p.exitcode for p in procs]}"


def test_composed_memory_update_under_ddp_equals_one_process_on_the_whole_batch(tmp_path):
    port = _free_port()
    _spawn(_update_worker, lambda rank: (rank, port, str(tmp_path)))
    ranks = [torch.load(tmp_path / f"update{r}.pt", weights_only=True) for r in range(WORLD)]
    with torch.no_grad():
        single = _steps(_model(), _batches(), slice(None))
    for step in range(2):
        assert torch.equal(ranks[0][step], ranks[1][step])
        torch.testing.assert_close(ranks[0][step], single[step], atol=1e-5, rtol=0)
    assert single[0][4].abs().sum() > 0  # the class only rank 0 saw is in both ranks' memory


# ----------------------------------------------------------------------------- a Lightning DDP run
TRAIN = ["data.dataset=scalescenes", "data.num_images=8", "data.image_size=[64,96]", "data.crop_size=[64,96]",
         "data.scale_range=[1.0,1.0]", "train.epochs=1", "train.batch_size=2", "train.num_workers=0",
         "train.accelerator=cpu", "train.progress=false", "eval.num_workers=0", "eval.batch_size=2",
         "model.aux_head=true"]


def _train_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(WORLD),
                       "RANK": str(rank), "LOCAL_RANK": str(rank), "NODE_RANK": "0", "HF_HUB_OFFLINE": "1"})
    torch.set_num_threads(1)
    import scaleseg.engine.train as engine_train

    built = []
    create = engine_train.create_model
    engine_train.create_model = lambda *a, **k: built.append(create(*a, **k)) or built[-1]
    cfg = load_config(None, [*COMPOSED, *TRAIN, f"output_dir={out_dir}/run", "train.devices=2", "train.strategy=ddp"])
    engine_train.train(cfg)
    memory = built[0].base.base.feature_memory
    torch.save({"memory": memory.memory.clone(), "initialized": memory.initialized.clone()},
               Path(out_dir) / f"memory{rank}.pt")


def test_lightning_ddp_run_of_the_composed_model_keeps_one_memory_and_matches_single_process_eval(tmp_path):
    port = _free_port()
    _spawn(_train_worker, lambda rank: (rank, port, str(tmp_path)))
    mem = [torch.load(tmp_path / f"memory{r}.pt", weights_only=True) for r in range(WORLD)]
    assert torch.equal(mem[0]["memory"], mem[1]["memory"]) and torch.equal(mem[0]["initialized"], mem[1]["initialized"])
    assert mem[0]["initialized"].any() and mem[0]["memory"].abs().sum() > 0
    run = tmp_path / "run"
    ddp = json.loads((run / "metrics.json").read_text())
    from safetensors.torch import load_file

    saved = load_file(str(run / "model.safetensors"))
    assert torch.equal(saved["base.base.head.memory_context.memory.memory"], mem[0]["memory"])
    from scaleseg.engine.evaluate import evaluate

    cfg = load_config(None, [*COMPOSED, *TRAIN, f"output_dir={run}"])
    single = evaluate(cfg, run / "model.safetensors", tmp_path / "eval")
    assert single["confusion_matrix"] == ddp["confusion_matrix"]
