"""eval.num_images: an evenly spaced, fixed subset of the evaluated split."""
from __future__ import annotations

import pytest

from scaleseg.config import load_config
from scaleseg.engine.datamodule import SegDataModule, eval_loader
from scaleseg.errors import ConfigError


def test_eval_num_images_takes_evenly_spaced_images():
    cfg = load_config(None, ["data.dataset=scalescenes", "data.num_images=10", "data.image_size=[32,32]",
                             "eval.num_images=4", "eval.num_workers=0", "eval.batch_size=1"])
    dm = SegDataModule(cfg)
    dm.setup("validate")
    names = [b["name"][0] for b in eval_loader(dm.val_set, cfg)]
    assert names == [dm.val_set[i]["name"] for i in (0, 2, 5, 7)]  # ⌊i·10/4⌋
    cfg.eval.num_images = 50  # more than the split holds: all of it
    assert len(list(eval_loader(dm.val_set, cfg))) == len(dm.val_set)
    with pytest.raises(ConfigError, match="eval.num_images"):
        load_config(None, ["eval.num_images=0"])
