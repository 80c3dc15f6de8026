"""Export parity against PyTorch eager, as smp tests it, plus ONNX: for every architecture and method.

For each model the inference graph (normalisation + fused multi-scale inference + logits) is exported
once with ``torch.export.export(strict=True)`` and dynamic batch/height/width; the program is checked
against eager on three inputs (different batch sizes, one size no stride divides), then converted to
ONNX and run with onnxruntime on the same inputs; ``torch.compile(fullgraph=True, dynamic=True)``
is checked the same way (backend "eager", as smp does: it proves whole-graph capture with dynamic
shapes; ``benchmarks/export_parity.py`` also runs inductor). Thresholds: onnxruntime max |Δ logits|
≤ 1e-4 and argmax agreement ≥ 99.99 %; torch.export and torch.compile max |Δ| ≤ 1e-5.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import scaleseg
from scaleseg.config import load_config
from scaleseg.engine.checkpoint import save_weights
from scaleseg.engine.task import make_predictor
from scaleseg.export import (
    ExportError,
    InferenceGraph,
    build_inference_graph,
    export_onnx,
    export_program,
    export_pt2,
    graph_for_config,
    inference_model,
)

ort = pytest.importorskip("onnxruntime")

TINY = ["model.backbone=test_resnet", "model.head_channels=16", "data.dataset=scalescenes"]
HMSA = ["model.output_stride=8", "model.hmsa.mode=hierarchical", "model.hmsa.attn_channels=8"]
MODELS = {  # name → (config overrides, scales inside the graph)
    "deeplabv3plus": (TINY + ["model.arch=deeplabv3plus"], (1.0,)),
    "pspnet": (TINY + ["model.arch=pspnet"], (1.0,)),
    "fcn": (TINY + ["model.arch=fcn"], (1.0,)),
    "hrnet_ocr": (["model.arch=hrnet_ocr", "model.backbone=hrnet_w18_small", "model.head_channels=16"], (1.0,)),
    "espnetv2": (["model.arch=espnetv2", "model.width=0.5"], (1.0,)),
    "dsrl": (TINY + ["model.arch=deeplabv3plus", "model.dsrl.enabled=true"], (1.0,)),
    "hmsa": (TINY + ["model.arch=deeplabv3plus", *HMSA], (0.5, 1.0, 2.0)),
    "mcibi": (TINY + ["model.arch=deeplabv3plus", "model.mcibi.enabled=true", "model.mcibi.channels=16"], (1.0,)),
    "hmsa_dsrl_mcibi": (TINY + ["model.arch=deeplabv3plus", *HMSA, "model.dsrl.enabled=true",
                                "model.mcibi.enabled=true", "model.mcibi.channels=16"], (0.5, 1.0, 2.0)),
    "bisenet": (TINY + ["model.arch=bisenet", "model.output_stride=32"], (1.0,)),
    "bisenet_hmsa": (TINY + ["model.arch=bisenet", "model.output_stride=32", "model.hmsa.mode=hierarchical",
                             "model.hmsa.attn_channels=8"], (0.5, 1.0, 2.0)),
    "dabnet": (["model.arch=dabnet", "data.dataset=scalescenes"], (1.0,)),
    "dabnet_dsrl": (["model.arch=dabnet", "data.dataset=scalescenes", "model.dsrl.enabled=true"], (1.0,)),
}
# in the default run: the plain path (fcn), SSSR on DeepLabV3+ (dsrl), the memory attention (mcibi) and the
# hierarchical chain in one graph (hmsa); the rest of the matrix is `slow` (python -m pytest -q -m slow)
FAST = {"fcn", "dsrl", "mcibi", "hmsa"}
INPUTS = [(1, 64, 96), (2, 77, 101), (3, 96, 128)]  # 77×101: a multiple of no stride


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = scaleseg.create_model(load_config(None, MODELS[name][0]))
    _randomize_state(model)
    return model.eval()


def _randomize_state(model: nn.Module) -> None:
    """Non-trivial BN statistics and, for MCIBI, a filled memory: the graph must carry both."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
        memory = getattr(m, "memory", None)
        if isinstance(memory, torch.Tensor) and hasattr(m, "initialized"):
            memory.copy_(torch.randn(memory.shape, generator=g))
            m.initialized.fill_(True)


def _inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return [torch.rand(b, 3, h, w, generator=g) for b, h, w in INPUTS]


def _params(name: str) -> list:
    return [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in MODELS if n.startswith(name)]


@pytest.mark.parametrize("name", _params(""))
def test_torch_export_and_onnxruntime_parity(name: str, tmp_path: Path, parity_table: dict) -> None:
    graph = build_inference_graph(_model(name), MODELS[name][1])
    program = export_program(graph, strict=True)
    path = export_onnx(graph, tmp_path / f"{name}.onnx", program=program)
    if name == "espnetv2":  # EESP pools at ceil(0.1·h): a float ceil on a size, which torch.export cannot save
        with pytest.raises(ExportError, match=r"^pt2 export failed at operator math.ceil"):
            export_pt2(graph, tmp_path / f"{name}.pt2", program=program)
    else:
        program = torch.export.load(export_pt2(graph, tmp_path / f"{name}.pt2", program=program))  # the saved file
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert session.get_inputs()[0].shape[0] != 1 and not isinstance(session.get_inputs()[0].shape[2], int)
    worst_pt2 = worst_ort = 0.0
    agree = []
    with torch.no_grad():
        for x in _inputs():
            ref = graph(x)
            scale = graph.output_scale
            assert ref.shape == (x.shape[0], 8, x.shape[2] * scale, x.shape[3] * scale)
            worst_pt2 = max(worst_pt2, (program.module()(x) - ref).abs().max().item())
            out = session.run(None, {"image": x.numpy()})[0]
            worst_ort = max(worst_ort, float(np.abs(out - ref.numpy()).max()))
            agree.append(out.argmax(1) == ref.numpy().argmax(1))
    agreement = float(np.concatenate([a.ravel() for a in agree]).mean())
    parity_table[(name, "torch.export")] = (worst_pt2, None)
    parity_table[(name, "onnxruntime")] = (worst_ort, agreement)
    assert worst_pt2 <= 1e-5
    assert worst_ort <= 1e-4
    assert agreement >= 0.9999


@pytest.mark.parametrize("name", _params(""))
def test_torch_compile_fullgraph_dynamic_parity(name: str, parity_table: dict) -> None:
    import torch.fx.experimental._config as fx_config

    graph = build_inference_graph(_model(name), MODELS[name][1])
    torch._dynamo.reset()
    compiled = torch.compile(graph, fullgraph=True, dynamic=True, backend="eager")
    worst = 0.0
    with torch.no_grad(), fx_config.patch(backed_size_oblivious=True):
        for x in _inputs():
            worst = max(worst, (compiled(x) - graph(x)).abs().max().item())
    parity_table[(name, "torch.compile")] = (worst, None)
    assert worst <= 1e-5


@pytest.fixture(scope="module")
def parity_table() -> dict:
    """Collects (model, backend) → (max |Δ|, argmax agreement); printed at the end of the module."""
    table: dict = {}
    yield table
    if table:
        print("\nexport parity (max |Δ logits|, argmax agreement):")
        for (name, backend), (delta, agreement) in sorted(table.items()):
            print(f"  {name:16s} {backend:14s} {delta:.2e}" + (f"  {100 * agreement:.3f} %" if agreement is not None else ""))


# ------------------------------------------------------------------ the graph is the configured inference
def _eager_predictor(model: nn.Module, overrides: list[str]) -> tuple:
    cfg = load_config(None, overrides)
    return make_predictor(model, cfg), graph_for_config(model, cfg)


def test_graph_equals_make_predictor() -> None:
    """The graph computes what `scaleseg eval/predict` computes: hierarchical chain (+ flip around it),
    avg / max pooling over scales for other models, the pooled baseline for an HMSA model."""
    x = torch.rand(2, 3, 50, 70, generator=torch.Generator().manual_seed(3))
    mean = torch.tensor((0.5, 0.5, 0.5)).view(1, 3, 1, 1)
    normalised = (x - mean) / 0.5
    hmsa = _model("hmsa")
    plain = _model("deeplabv3plus")
    cases = [
        (hmsa, TINY + HMSA + ["eval.scales=[0.5,1.0,2.0]", "eval.flip=true"], "hierarchical"),
        (hmsa, TINY + HMSA, "hierarchical"),  # no eval.scales: the model's infer_scales
        (hmsa, TINY + HMSA + ["eval.scales=[0.5,1.0]", "eval.scale_mode=avg"], "avg"),
        (plain, TINY + ["eval.scales=[0.75,1.0,1.25]", "eval.flip=true"], "avg"),
        (plain, TINY + ["eval.scales=[0.5,1.0]", "eval.scale_mode=max"], "max"),
        (plain, TINY, "single"),
    ]
    with torch.no_grad():
        for model, overrides, fusion in cases:
            predictor, graph = _eager_predictor(model, overrides)
            assert graph.fusion == fusion, overrides
            torch.testing.assert_close(graph(x), predictor(normalised), atol=1e-6, rtol=1e-6)


def test_raw_input_graph_and_normalisation_inside() -> None:
    model = _model("fcn")
    float_graph = build_inference_graph(model)
    raw_graph = build_inference_graph(model, raw_input=True)
    x = raw_graph.example_input(2, 40, 60)
    assert x.dtype == torch.uint8
    with torch.no_grad():
        torch.testing.assert_close(raw_graph(x), float_graph(x.float() / 255), atol=1e-6, rtol=0)
        normalised = (x.float() / 255 - torch.tensor(model.mean).view(1, 3, 1, 1)) / torch.tensor(model.std).view(1, 3, 1, 1)
        torch.testing.assert_close(float_graph(x.float() / 255), model(normalised), atol=1e-6, rtol=0)


def test_dsrl_exports_its_inference_model_only() -> None:
    model = _model("hmsa_dsrl_mcibi")
    inner = inference_model(model)
    names = {type(m).__name__ for m in inner.modules()}
    assert "DSRLInferenceModel" in names and "DSRL" not in names and "SISRBranch" not in names
    assert "SISRBranch" in {type(m).__name__ for m in model.modules()}  # the trained model is untouched
    graph = InferenceGraph(_model("dsrl"))
    assert graph.output_scale == 2 and "SISRBranch" not in {type(m).__name__ for m in graph.modules()}


def test_operator_that_cannot_export_is_named_in_one_line(tmp_path: Path) -> None:
    class Bessel(nn.Module):  # an operator the ONNX exporter has no function for
        num_classes, mean, std = 2, (0.5,) * 3, (0.5,) * 3

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.special.bessel_j0(self.conv(x))

    with pytest.raises(ExportError) as info:
        export_onnx(InferenceGraph(Bessel()), tmp_path / "bessel.onnx")
    message = str(info.value)
    assert message.startswith("ONNX export failed at operator prims.bessel_j0: No ONNX function found")
    assert "\n" not in message and not (tmp_path / "bessel.onnx").exists()


# ------------------------------------------------------------------ the CLI
def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(scaleseg.__file__).parents[1]), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "scaleseg.cli", *args], capture_output=True, text=True, env=env,
                          timeout=1800)


def test_cli_export_onnx_with_sidecar(tmp_path: Path) -> None:
    """`scaleseg export` of a checkpoint: raw uint8 input, two scales pooled and a flip in the graph."""
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text("model:\n  arch: fcn\n  backbone: test_resnet\n  head_channels: 16\n")
    model = _model("fcn")
    save_weights(model, tmp_path / "w.safetensors")
    out = tmp_path / "deploy" / "fcn.onnx"
    result = _cli("export", str(cfg_file), "--checkpoint", str(tmp_path / "w.safetensors"), "--format", "onnx",
                  "--out", str(out), "--scales", "0.75,1.0", "--flip", "--raw-input", "--quiet")
    assert result.returncode == 0, result.stderr
    meta = json.loads(out.with_name("fcn.onnx.json").read_text())
    assert meta["classes"][:2] == ["sky", "building"] and meta["palette"][0] == [70, 130, 180]
    assert meta["ignore_index"] == 255 and meta["scales"] == [0.75, 1.0] and meta["fusion"] == "avg"
    assert meta["flip"] is True and meta["input"]["dtype"] == "uint8" and meta["output"]["output_scale"] == 1
    assert meta["mean"] == list(model.mean) and meta["output"]["resolution"] == "same as input"
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    graph = build_inference_graph(model, (0.75, 1.0), flip=True, raw_input=True)
    for b, h, w in INPUTS:
        x = graph.example_input(b, h, w)
        with torch.no_grad():
            ref = graph(x).numpy()
        assert np.abs(session.run(None, {"image": x.numpy()})[0] - ref).max() <= 1e-4


def test_cli_export_errors_are_one_line(tmp_path: Path) -> None:
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text("model:\n  arch: fcn\n  backbone: test_resnet\n  head_channels: 16\n")
    save_weights(_model("fcn"), tmp_path / "w.safetensors")
    slide = _cli("export", str(cfg_file), "eval.mode=slide", "eval.crop_size=[64,64]", "--checkpoint",
                 str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "m.onnx"), "--quiet")
    assert slide.returncode == 2
    assert slide.stderr.strip() == ("scaleseg: error: config key 'eval.mode' = 'slide' cannot be exported: the graph "
                                    "runs whole-image inference (set eval.mode=whole; tile large images outside the graph)")
    missing = _cli("export", str(cfg_file), "--checkpoint", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "m.pt2"),
                   "--format", "pt2", "--quiet")
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0
    assert "checkpoint not found" in missing.stderr
