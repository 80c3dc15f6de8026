"""`scaleseg demo` on a tiny budget: every variant is reported, and its numbers equal `scaleseg eval`
run on the same weights with the matching eval.scales / eval.scale_mode."""
from __future__ import annotations

import json

import pytest

from scaleseg.config import load_config
from scaleseg.engine.demo import COMPOSED, composed_config_args, demo, demo_config_path
from scaleseg.engine.evaluate import evaluate

TINY = ["train.epochs=1", "data.num_images=8", "data.image_size=[64,128]", "data.crop_size=[64,128]",
        "train.batch_size=4", "train.num_workers=0", "train.progress=false", "model.head_channels=16",
        "model.hmsa.attn_channels=16"]


def test_demo_reports_all_variants_consistently_with_eval(tmp_path, capsys):
    out = tmp_path / "demo"
    summary = demo(out, TINY, quiet=True)
    results = summary["results"]
    assert list(results) == [
        "single scale 1.0", "avg pooling {0.5, 1, 2}", "hierarchical {0.5, 1, 2}",
        "avg pooling {0.25, 0.5, 1, 2}", "hierarchical {0.25, 0.5, 1, 2}", COMPOSED,
    ]
    printed = capsys.readouterr().out
    assert "hierarchical {0.25, 0.5, 1, 2}" in printed
    assert json.loads((out / "demo_results.json").read_text())["results"] == results
    page = (out / "pictures" / "index.html").read_text()
    assert "attn_0.25x" in page and "pred_2x" in page

    cfg_args = [f"output_dir={out}", *TINY]
    checks = {
        "single scale 1.0": ["eval.scales=[1.0]"],
        "avg pooling {0.5, 1, 2}": ["eval.scales=[0.5,1.0,2.0]", "eval.scale_mode=avg"],
        # a subset's fusion, derived from the demo's one run over the union of the scale sets
        "hierarchical {0.5, 1, 2}": ["eval.scales=[0.5,1.0,2.0]", "eval.scale_mode=hierarchical"],
        "hierarchical {0.25, 0.5, 1, 2}": ["eval.scales=[0.25,0.5,1.0,2.0]", "eval.scale_mode=hierarchical"],
    }
    for name, extra in checks.items():
        cfg = load_config(demo_config_path(), cfg_args + extra)
        metrics = evaluate(cfg, out / "model.safetensors", tmp_path / name.replace(" ", "_"))
        assert metrics["mIoU"] == pytest.approx(results[name]["mIoU"], abs=1e-9), name
    # the composed row: the HMSA + MCIBI run of the same budget, scored by eval's default inference
    # (a hierarchical model without eval.scales chains (0.5, 1, 2)); its memory was trained
    cfg = load_config(demo_config_path(), composed_config_args(out, TINY))
    assert cfg.model.mcibi.enabled and cfg.model.hmsa.mode == "hierarchical" and cfg.eval.scales is None
    metrics = evaluate(cfg, out / "hmsa_mcibi" / "model.safetensors", tmp_path / "composed")
    assert metrics["mIoU"] == pytest.approx(results[COMPOSED]["mIoU"], abs=1e-9)
    from safetensors.torch import load_file

    state = load_file(str(out / "hmsa_mcibi" / "model.safetensors"))
    assert state["base.head.memory_context.memory.initialized"].any()


@pytest.mark.parametrize("native", [True, False])
def test_demo_trains_in_bf16_channels_last_only_on_native_bf16_cpus(monkeypatch, native):
    import scaleseg.engine.demo as demo_mod

    monkeypatch.setattr(demo_mod, "cpu_has_native_bf16", lambda: native)
    speed = ["train.precision=bf16-mixed", "train.channels_last=true"]
    assert demo_mod.native_speed_overrides(["train.epochs=2"]) == ["train.epochs=2", *(speed if native else [])]
    # the user's key wins, key by key
    got = demo_mod.native_speed_overrides(["train.precision=32"])
    assert got == ["train.precision=32", *(["train.channels_last=true"] if native else [])]
    cfg = load_config(demo_config_path(), got)
    assert cfg.train.precision == "32" and cfg.train.channels_last == (True if native else "auto")
    # a GPU run gets nothing (it is not this CPU's choice)
    monkeypatch.setattr(demo_mod, "runs_on_cpu", lambda accelerator: accelerator == "cpu")
    assert demo_mod.native_speed_overrides(["train.accelerator=gpu"]) == ["train.accelerator=gpu"]
