"""ESPNetv2 started from an EdgeNets checkpoint via model.pretrained_file: all but the classifier reused."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scaleseg.config import load_config
from scaleseg.errors import CheckpointError
from scaleseg.models.espnetv2 import espnetv2_seg
from scaleseg.models.espnetv2_finetune import CLASSIFIER_PREFIX
from scaleseg.models.factory import create_model

SHARED = Path(__file__).resolve().parents[2] / "shared/weights/edgenets/espnetv2_s_2.0_city_512x256.pth"


def _edgenets_file(tmp_path: Path, s: float = 0.5, classes: int = 20) -> tuple[Path, dict]:
    """An EdgeNets-named state dict (``base_net.`` encoder, bare decoder names), wrapped as DataParallel."""
    torch.manual_seed(1)
    src = espnetv2_seg(classes, s).state_dict()
    named = {("module.base_net." + k[len("backbone."):]) if k.startswith("backbone.") else "module." + k[len("head."):]: v
             for k, v in src.items()}
    path = tmp_path / "city.pth"
    torch.save(named, path)
    return path, src


def _cfg(path: Path, width: float = 0.5):
    return load_config(None, ["model.arch=espnetv2", f"model.width={width}", f"model.pretrained_file={path}"])


def test_everything_but_the_classifier_is_loaded(tmp_path):
    path, src = _edgenets_file(tmp_path)
    model = create_model(_cfg(path), 11)
    own = model.state_dict()
    assert own[CLASSIFIER_PREFIX + "weight"].shape == (11, 10, 1, 1)  # new K, the checkpoint's width 10
    reused = [k for k in own if not k.startswith(CLASSIFIER_PREFIX)]
    assert len(reused) == len(src) - 2
    for key in reused:
        assert torch.equal(own[key], src[key]), key
    assert model(torch.randn(1, 3, 64, 96)).shape == (1, 11, 64, 96)


def test_wrong_width_or_file_is_a_one_line_error(tmp_path):
    path, _ = _edgenets_file(tmp_path)
    with pytest.raises(CheckpointError, match="check model.width") as err:
        create_model(_cfg(path, width=1.0), 11)
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        create_model(_cfg(tmp_path / "none.pth"), 11)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot load"):
        create_model(_cfg(tmp_path / "junk.pth"), 11)


def test_official_cityscapes_checkpoint_loads_for_camvid():
    if not SHARED.is_file():
        pytest.skip("needs ../shared/weights/edgenets (official ESPNetv2 s=2.0 Cityscapes checkpoints)")
    model = create_model(_cfg(SHARED, width=2.0), 11)
    official = torch.load(SHARED, map_location="cpu", weights_only=True)
    assert torch.equal(model.state_dict()["backbone.level1.conv.weight"], official["base_net.level1.conv.weight"])
    assert torch.equal(model.state_dict()["head.bu_dec_l4.stages.0.weight"], official["bu_dec_l4.stages.0.weight"])
