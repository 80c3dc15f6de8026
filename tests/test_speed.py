"""Speed switches leave the results unchanged: train.channels_last, train.compile / eval.compile
(torch.compile of the blocks, in place) and train.precision=bf16-mixed on the CPU."""
from __future__ import annotations

import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import nn

import scaleseg
from scaleseg.config import load_config
from scaleseg.engine.speed import batch_to_channels_last, compile_blocks
from scaleseg.engine.task import SegTask
from scaleseg.types import StepInfo

TINY = ["model.backbone=test_resnet", "model.head_channels=16", "model.decoder_channels=16",
        "model.output_stride=8", "data.dataset=scalescenes"]
K = 7


def _model(*extra: str) -> tuple[nn.Module, object]:
    cfg = load_config(None, TINY + list(extra))
    torch.manual_seed(0)
    return scaleseg.create_model(cfg, K), cfg


def _batch(size=(48, 64), seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(2, 3, *size, generator=g), "mask": torch.randint(0, K, (2, *size), generator=g)}


def _no_dropout(model: nn.Module) -> nn.Module:
    """Dropout masks come from different RNG streams in eager and compiled code; switch them off
    so the comparison is about the network's arithmetic."""
    for m in model.modules():
        if isinstance(m, (nn.Dropout, nn.Dropout2d)):
            m.p = 0.0
    return model


def _loss_and_grads(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = sum(model.training_losses(batch, StepInfo(0, 1)).values())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_step(a: nn.Module, b: nn.Module, batch_a: dict, batch_b: dict, rtol: float, atol: float) -> None:
    loss_a, grads_a = _loss_and_grads(a, batch_a)
    loss_b, grads_b = _loss_and_grads(b, batch_b)
    torch.testing.assert_close(loss_b, loss_a, rtol=rtol, atol=atol)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=rtol, atol=atol, msg=name)


def test_channels_last_task_converts_model_and_batches_with_the_same_step():
    eager, _ = _model()
    model, cfg = _model("train.channels_last=true")
    task = SegTask(model, cfg, [str(i) for i in range(K)])
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    batch = _batch()
    moved = task.prepare_batch(batch)
    assert moved["image"].is_contiguous(memory_format=torch.channels_last)
    assert moved["mask"] is batch["mask"]
    _no_dropout(eager).train(), _no_dropout(model).train()
    _assert_same_step(eager, model, batch, moved, rtol=1e-4, atol=1e-5)
    # off: batches untouched
    plain = SegTask(eager, load_config(None, TINY + ["train.channels_last=false"]), [str(i) for i in range(K)])
    assert plain.prepare_batch(batch) is batch
    assert batch_to_channels_last(["not", "a", "dict"]) == ["not", "a", "dict"]


def test_compile_blocks_names_and_keeps_the_state_dict():
    model, _ = _model("model.hmsa.mode=hierarchical", "model.hmsa.attn_channels=8", "model.aux_head=true")
    keys = list(model.state_dict())
    assert compile_blocks(model) == ["base.backbone", "base.head", "base.aux_head", "scale_attn"]
    assert list(model.state_dict()) == keys  # checkpoints of compiled and eager runs are interchangeable
    assert model.base.backbone._compiled_call_impl is not None
    assert model.base.criterion._compiled_call_impl is None  # no parameters: left eager


def test_compiled_training_step_and_inference_equal_eager():
    """Autograd and dynamic shapes through the in-place compiled blocks. The backend is aot_eager
    (dynamo + AOTAutograd, no C++ codegen): inductor's kernels take minutes to build on 2 cores;
    its numerics are checked by benchmarks/speed_switches.py on the real networks."""
    eager, _ = _model()
    compiled, _ = _model()
    compiled.load_state_dict(eager.state_dict())
    _no_dropout(eager), _no_dropout(compiled)
    compile_blocks(compiled, backend="aot_eager")
    eager.train(), compiled.train()
    batch = _batch()
    _assert_same_step(eager, compiled, batch, batch, rtol=1e-4, atol=1e-5)
    eager.eval(), compiled.eval()
    with torch.inference_mode():
        for size in ((48, 64), (37, 53)):  # a second, odd size: padded and cropped inside the model
            x = _batch(size, seed=1)["image"]
            torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-4)


def test_eval_compile_compiles_the_loaded_model(tmp_path):
    from scaleseg.engine.checkpoint import save_weights
    from scaleseg.engine.evaluate import load_trained

    from scaleseg.data.scalescenes import SCALESCENES

    cfg = load_config(None, TINY + ["eval.compile=true", "data.num_images=2"])
    model = scaleseg.create_model(cfg, SCALESCENES.num_classes)
    save_weights(model, tmp_path / "m.safetensors")
    loaded, _ = load_trained(cfg, tmp_path / "m.safetensors")
    assert loaded.backbone._compiled_call_impl is not None and loaded.head._compiled_call_impl is not None
    eager, _ = load_trained(load_config(None, TINY + ["data.num_images=2"]), tmp_path / "m.safetensors")
    assert eager.backbone._compiled_call_impl is None


def test_bf16_mixed_on_cpu_gives_the_fp32_step_within_bf16_precision():
    from lightning.pytorch.plugins.precision import MixedPrecision

    model, _ = _model()
    _no_dropout(model).train()
    batch = _batch()
    loss32, grads32 = _loss_and_grads(model, batch)
    plugin = MixedPrecision("bf16-mixed", "cpu")  # what Lightning uses for train.precision=bf16-mixed on CPU
    with plugin.forward_context():
        model.zero_grad(set_to_none=True)
        losses = model.training_losses(batch, StepInfo(0, 1))
        assert model.backbone(batch["image"])[0].dtype == torch.bfloat16  # autocast really is on
    loss16 = sum(losses.values())
    assert loss16.dtype == torch.float32  # the criterion runs in float32
    loss16.backward()
    torch.testing.assert_close(loss16.detach(), loss32, rtol=2e-2, atol=0)
    # gradients agree in direction (bf16 keeps 8 bits of mantissa through ~20 layers): cosine
    # similarity of the whole gradient vector
    g32 = torch.cat([g.flatten() for g in grads32.values()])
    g16 = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if n in grads32])
    assert torch.nn.functional.cosine_similarity(g32, g16, dim=0) > 0.95


def test_bf16_on_a_cpu_without_native_bf16_is_announced(caplog, monkeypatch):
    from scaleseg.engine.speed import warn_emulated_bf16

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with caplog.at_level("WARNING", logger="scaleseg.train"):
        assert warn_emulated_bf16("bf16-mixed", "cpu")
        assert not warn_emulated_bf16("32", "cpu")
    assert "without native bf16" in caplog.text
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert not warn_emulated_bf16("bf16-mixed", "cpu")


@pytest.mark.parametrize(("capability", "accelerator", "expected"), [
    ("AVX512", "cpu", True), ("AVX512", "auto", True), ("AVX2", "cpu", False), ("DEFAULT", "cpu", False),
    ("AVX512", "gpu", False)])
def test_channels_last_auto_is_on_for_cpu_runs_on_avx512_cpus_only(monkeypatch, capability, accelerator, expected):
    from scaleseg.engine import speed

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert speed.use_channels_last("auto", accelerator) is expected
    assert speed.use_channels_last(True, "gpu") is True and speed.use_channels_last(False, "cpu") is False
    cfg = load_config(None, TINY)
    assert cfg.train.channels_last == "auto" and cfg.eval.channels_last == "auto"
    model, _ = _model(f"train.accelerator={accelerator}")
    task = SegTask(model, load_config(None, TINY + [f"train.accelerator={accelerator}"]), [str(i) for i in range(K)])
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
    assert task.channels_last is expected
    assert conv.weight.is_contiguous() is not expected  # NHWC weights are not NCHW-contiguous


def test_eval_channels_last_converts_the_loaded_model_with_the_same_logits(tmp_path):
    from scaleseg.data.scalescenes import SCALESCENES
    from scaleseg.engine.checkpoint import save_weights
    from scaleseg.engine.evaluate import load_trained

    cfg = load_config(None, TINY + ["data.num_images=2", "eval.channels_last=false"])
    save_weights(scaleseg.create_model(cfg, SCALESCENES.num_classes), tmp_path / "m.safetensors")
    nhwc, _ = load_trained(load_config(None, TINY + ["data.num_images=2", "eval.channels_last=true"]), tmp_path / "m.safetensors")
    nchw, _ = load_trained(cfg, tmp_path / "m.safetensors")
    conv = next(m for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and conv.weight.stride()[1] == 1
    nhwc.eval(), nchw.eval()
    with torch.inference_mode():
        for size in ((48, 64), (37, 53)):
            x = _batch(size, seed=2)["image"]  # NCHW input, as the loaders give it
            seen = []
            hook = conv.register_forward_hook(lambda m, i, o: seen.append(o.is_contiguous(memory_format=torch.channels_last)))
            out = nhwc(x)
            hook.remove()
            assert seen == [True]  # the convs run in NHWC although the input is NCHW
            torch.testing.assert_close(out, nchw(x), rtol=1e-4, atol=1e-4)


# Page faults of a 64 MiB tensor made, touched and freed, 24 times over. glibc serves PyTorch's
# 64-byte-aligned blocks by over-asking (block + 80 bytes), and small chunks carved after a freed
# block pin it, so with reuse on the first few blocks may not fit a freed one yet; the heap settles
# within about 6 rounds here, so only the last 4 are asserted on.
_FAULT_ROUNDS = """
import resource, torch
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 << 20)  # 64 MiB, touched, freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
def rounds():
    return [faults() for _ in range(24)]
"""

_FAULTS = _FAULT_ROUNDS + """
import sys
from scaleseg.engine.speed import reuse_freed_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_memory()
print(*rounds())
"""


def _settled(stdout: str) -> list[int]:
    """The last 4 rounds' page faults, from a snippet that printed all 24."""
    return [int(n) for n in stdout.split()[-4:]]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc and getrusage page-fault counts: Linux")
def test_reuse_freed_memory_serves_a_freed_large_tensor_without_page_faults():
    """With glibc's defaults a 64 MiB tensor is mmapped afresh, and each of its 16384 pages faults
    on first touch; with ``eval.reuse_memory``, once the heap has settled, each reuses a freed one's
    heap pages."""
    counts = {}
    for mode in ("default", "reuse"):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
        counts[mode] = _settled(out.stdout)
    assert min(counts["default"]) > 8000, counts  # every round: ~16384 pages of 4 KiB
    assert max(counts["reuse"]) < 500, counts


_SCOPED = _FAULT_ROUNDS + """
from scaleseg.config import load_config
from scaleseg.engine.speed import with_eval_memory
print(*with_eval_memory(lambda cfg: rounds())(load_config(None, [])))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc and getrusage page-fault counts: Linux")
def test_eval_commands_reuse_freed_memory_while_they_run_and_restore_glibc_after(monkeypatch):
    """``eval.reuse_memory`` (the default) holds for an inference command's duration only: inside,
    a re-allocated 64 MiB tensor faults no pages (a fresh process with glibc's defaults: all 16384,
    the test above); on exit glibc's defaults are set again and the kept memory is given back."""
    from scaleseg.engine import speed

    out = subprocess.run([sys.executable, "-c", _SCOPED], capture_output=True, text=True, check=True)
    assert max(_settled(out.stdout)) < 500, out.stdout
    assert load_config(None, []).eval.reuse_memory is True
    calls: list = []
    monkeypatch.setattr(speed, "reuse_freed_memory", lambda enable=True: calls.append(("reuse", enable)) or True)
    monkeypatch.setattr(speed, "release_freed_memory", lambda: calls.append(("release",)) or True)
    command = speed.with_eval_memory(lambda cfg: calls.append(("run",)) or "done")
    assert command(load_config(None, [])) == "done"
    assert calls == [("reuse", True), ("run",), ("reuse", False), ("release",)]
    calls.clear()
    with pytest.raises(ZeroDivisionError):  # restored when the command fails, too
        speed.with_eval_memory(lambda cfg: 1 / 0)(load_config(None, []))
    assert calls == [("reuse", True), ("reuse", False), ("release",)]
    calls.clear()
    assert command(load_config(None, ["eval.reuse_memory=false"])) == "done" and calls == [("run",)]


def test_predict_applies_eval_channels_last(tmp_path, monkeypatch):
    import numpy as np

    from scaleseg.data.scalescenes import SCALESCENES
    from scaleseg.engine import evaluate as ev
    from scaleseg.engine.checkpoint import save_weights
    from scaleseg.visualize import save_png

    cfg = load_config(None, TINY + ["data.num_images=2", "eval.channels_last=true"])
    save_weights(scaleseg.create_model(cfg, SCALESCENES.num_classes), tmp_path / "m.safetensors")
    save_png(tmp_path / "a.png", np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8))
    made = []
    monkeypatch.setattr(ev, "create_model", lambda *a, **k: made.append(scaleseg.create_model(*a, **k)) or made[-1])
    result = ev.predict(cfg, tmp_path / "m.safetensors", [tmp_path / "a.png"], tmp_path / "out")
    conv = next(m for m in made[0].modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and conv.weight.stride()[1] == 1
    assert [p.name for p in result.written] == ["a_label.png"]
