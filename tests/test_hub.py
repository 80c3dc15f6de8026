"""save_pretrained / from_pretrained round trips (config, safetensors weights, MCIBI memory, model card), offline."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import scaleseg
from scaleseg.config import load_config, to_dict, to_yaml
from scaleseg.engine.checkpoint import save_weights
from scaleseg.errors import CheckpointError

TINY = ["model.backbone=test_resnet", "model.head_channels=16", "data.dataset=scalescenes"]
HMSA = TINY + ["model.output_stride=8", "model.hmsa.mode=hierarchical", "model.hmsa.attn_channels=8",
               "eval.scales=[0.5,1.0,2.0]", "name=tiny_hmsa"]
METRICS = {"mIoU": 61.25, "mAcc": 70.5, "aAcc": 91.0, "fwIoU": 84.0, "mDice": 72.0, "split": "val",
           "per_class": {"sky": 97.5, "building": 80.25, "vegetation": 70.0, "road": 90.0, "sidewalk": 40.0,
                         "car": 55.0, "pole": 12.5, "wire": None}}


def _logits(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    x = torch.rand(1, 3, 48, 72, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


def test_save_and_load_round_trip_hmsa(tmp_path: Path) -> None:
    cfg = load_config(None, HMSA)
    torch.manual_seed(0)
    model = scaleseg.create_model(cfg)
    assert model.scaleseg_config is cfg
    out = model.save_pretrained(tmp_path / "hub", metrics=METRICS, training_command="scaleseg train tiny.yaml")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.yaml", "metrics.json", "model.safetensors"]
    loaded = scaleseg.from_pretrained(out)
    assert not loaded.training
    assert to_dict(loaded.scaleseg_config) == to_dict(cfg)
    assert loaded.scaleseg_metrics == METRICS
    assert torch.equal(_logits(loaded), _logits(model))
    # a second save from the loaded model keeps the metrics and gives identical files
    again = loaded.save_pretrained(tmp_path / "again", training_command="scaleseg train tiny.yaml")
    for name in ("config.yaml", "metrics.json", "README.md", "model.safetensors"):
        assert (again / name).read_bytes() == (out / name).read_bytes(), name


def test_model_card_contents(tmp_path: Path) -> None:
    cfg = load_config(None, HMSA)
    model = scaleseg.create_model(cfg)
    card = (model.save_pretrained(tmp_path, metrics=METRICS, training_command="scaleseg train tiny.yaml") / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: scaleseg" in front and "- hmsa" in front
    assert "# tiny_hmsa" in card
    assert "`deeplabv3plus/test_resnet/K=8/hmsa=hierarchical`" in card  # architecture signature
    params = sum(p.numel() for p in model.parameters())
    assert f"{params / 1e6:.2f} M parameters" in card
    assert "Hierarchical Multi-Scale Attention" in card and "inference scales [0.5, 1.0, 2.0]" in card
    assert "`scalescenes`" in card
    for i, name in enumerate(["sky", "building", "vegetation", "road", "sidewalk", "car", "pole", "wire"]):
        assert f"| {i} | {name} |" in card
    assert "```bash\nscaleseg train tiny.yaml\n```" in card
    assert "| 61.25 | 70.50 | 91.00 | 84.00 | 72.00 |" in card
    assert "| pole | 12.50 |" in card and "| wire | – |" in card
    assert f"Written by scaleseg {scaleseg.__version__}" in card


def test_run_folder_mcibi_memory_and_metrics(tmp_path: Path) -> None:
    """A `scaleseg train` run folder (config.yaml + model.safetensors + metrics.json) loads, keeps the
    MCIBI memory (a buffer) and its card reports the run's metrics."""
    cfg = load_config(None, TINY + ["model.mcibi.enabled=true", "model.mcibi.channels=16", "name=tiny_mcibi"])
    model = scaleseg.create_model(cfg)
    memory = model.feature_memory
    memory.memory.copy_(torch.randn(memory.memory.shape, generator=torch.Generator().manual_seed(3)))
    memory.initialized.fill_(True)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(cfg))
    save_weights(model, run / "model.safetensors")
    (run / "metrics.json").write_text(json.dumps(METRICS))
    loaded = scaleseg.from_pretrained(run)
    assert torch.equal(loaded.feature_memory.memory, memory.memory)
    assert bool(loaded.feature_memory.initialized.all())
    assert torch.equal(_logits(loaded), _logits(model))
    card = (loaded.save_pretrained(tmp_path / "hub") / "README.md").read_text()
    assert "MCIBI dataset-level memory" in card and "| 61.25 |" in card
    assert "scaleseg train config.yaml" in card  # default command: the folder's resolved config
    # the checkpoint file form still works
    assert torch.equal(_logits(scaleseg.from_pretrained(run / "model.safetensors")), _logits(model))


def test_card_without_metrics_and_dsrl_resolution(tmp_path: Path) -> None:
    cfg = load_config(None, ["model.arch=espnetv2", "model.width=0.5", "model.dsrl.enabled=true"])
    card = (scaleseg.create_model(cfg).save_pretrained(tmp_path) / "README.md").read_text()
    assert "DSRL dual super-resolution learning" in card
    assert "output resolution: 2× the input" in card
    assert "No evaluation recorded" in card
    assert not (tmp_path / "metrics.json").exists()


def test_save_needs_a_config(tmp_path: Path) -> None:
    from scaleseg.models.factory import create_model as bare

    model = bare(load_config(None, TINY), 8)  # built without scaleseg.create_model: no config attached
    with pytest.raises(CheckpointError, match="save_pretrained needs the model's config"):
        model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path, config=load_config(None, TINY))
    assert (tmp_path / "config.yaml").is_file()


def test_hub_id_offline_is_one_line_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as info:
        scaleseg.from_pretrained("scaleseg-test/definitely-not-cached")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("'scaleseg-test/definitely-not-cached' is not a local path")
    assert "HF_HUB_OFFLINE" in message
    with pytest.raises(CheckpointError, match="does not exist"):
        scaleseg.from_pretrained(tmp_path / "no" / "such" / "folder")
