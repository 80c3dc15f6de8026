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
