"""Config loading: strict keys, typed values, overrides, printable resolved YAML."""
from __future__ import annotations

import pytest
import yaml

from scaleseg.config import Config, from_dict, load_config, to_yaml
from scaleseg.errors import ConfigError


def test_defaults_round_trip_through_yaml():
    cfg = load_config(None)
    again = from_dict(yaml.safe_load(to_yaml(cfg)))
    assert again == cfg


def test_unknown_key_names_the_key_and_suggests(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  backbon: resnet50\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert "model.backbon" in msg and "model.backbone" in msg and "\n" not in msg


def test_wrong_type_and_literal_are_errors():
    with pytest.raises(ConfigError, match="train.epochs"):
        from_dict({"train": {"epochs": "ten"}})
    with pytest.raises(ConfigError, match="model.arch"):
        from_dict({"model": {"arch": "unet3000"}})
    with pytest.raises(ConfigError, match="data.crop_size"):
        from_dict({"data": {"crop_size": [512]}})


def test_ints_accepted_for_floats_and_lists_typed():
    cfg = from_dict({"optim": {"lr": 1}, "eval": {"scales": [1, 0.5]}})
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.eval.scales == [1.0, 0.5]


def test_overrides_apply_parse_yaml_and_reject_typos(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  backbone: resnet18\ntrain:\n  epochs: 3\n")
    cfg = load_config(path, ["model.backbone=resnet50", "train.epochs=7", "eval.scales=[0.5,1.0]", "data.root=/x"])
    assert (cfg.model.backbone, cfg.train.epochs, cfg.eval.scales, cfg.data.root) == ("resnet50", 7, [0.5, 1.0], "/x")
    with pytest.raises(ConfigError, match="model.backbonee"):
        load_config(path, ["model.backbonee=resnet50"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(path, ["model.backbone"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(path, ["seed.x=1"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_every_shipped_config_validates():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.rglob("*.yaml"))
    assert len(files) >= 5
    for f in files:
        assert isinstance(load_config(f), Config), f


def test_a_combination_that_cannot_apply_is_a_one_line_config_error():
    import scaleseg

    # MCIBI needs a host head with a context module; ESPNetv2 has none, with or without DSRL/HMSA
    for extra in ([], ["model.dsrl.enabled=true"], ["model.hmsa.mode=hierarchical", "model.dsrl.enabled=true"]):
        cfg = load_config(None, ["model.arch=espnetv2", "model.width=0.5", "model.mcibi.enabled=true", *extra])
        with pytest.raises(ConfigError, match="model.mcibi.enabled needs model.arch in .*got 'espnetv2'") as err:
            scaleseg.create_model(cfg)
        assert "\n" not in str(err.value)


def test_yaml_12_floats_parse_in_files_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  weight_decay: 5E-4\n  momentum: 9e-1\n")
    cfg = load_config(path, ["optim.poly_power=2e+0"])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.momentum, cfg.optim.poly_power) == (0.001, 0.0005, 0.9, 2.0)
    cfg = load_config(None, ["optim.lr=1e-3", "optim.weight_decay=-0e0", "name=1e5x"])
    assert cfg.optim.lr == 0.001 and isinstance(cfg.optim.lr, float)
    assert cfg.name == "1e5x"  # not a number: stays a string
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(None, ["train.epochs=1e3"])  # a float where an int is expected


def test_precision_32_as_an_int_is_the_literal():
    assert load_config(None, ["train.precision=32"]).train.precision == "32"
    assert from_dict({"train": {"precision": 32}}).train.precision == "32"
    with pytest.raises(ConfigError, match="train.precision"):
        load_config(None, ["train.precision=15"])


@pytest.mark.parametrize("override, key, expected", [
    ("optim.lr=-1", "optim.lr", "> 0"),
    ("optim.lr=0", "optim.lr", "> 0"),
    ("optim.lr=.nan", "optim.lr", "> 0"),
    ("train.epochs=0", "train.epochs", ">= 1"),
    ("train.batch_size=0", "train.batch_size", ">= 1"),
    ("eval.batch_size=-2", "eval.batch_size", ">= 1"),
    ("data.crop_size=[0,64]", "data.crop_size", ">= 1"),
    ("eval.crop_size=[64]", "eval.crop_size", "[height, width]"),
    ("data.scale_range=[2.0,0.5]", "data.scale_range", "min <= max"),
    ("data.class_uniform_pct=1.5", "data.class_uniform_pct", "[0, 1]"),
    ("data.autolabel.threshold=-0.1", "data.autolabel.threshold", "[0, 1]"),
    ("optim.momentum=1.2", "optim.momentum", "[0, 1]"),
    ("model.dsrl.lr_scale=0", "model.dsrl.lr_scale", "(0, 1]"),
    ("eval.scales=[1.0,-0.5]", "eval.scales", "> 0"),
    ("seed=-1", "seed", ">= 0"),
])
def test_ranges_are_one_line_errors_naming_the_key(override, key, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert f"'{key}'" in msg and expected in msg and "\n" not in msg


def test_every_range_rule_names_an_existing_numeric_key():
    from scaleseg.config import RANGES, lookup

    cfg = load_config(None)
    for key in RANGES:
        value = lookup(cfg, key)  # AttributeError if a rule names a key that does not exist
        assert value is None or isinstance(value, (int, float, list)), key


def test_separable_head_from_config():
    import scaleseg

    base = ["model.backbone=test_resnet", "model.head_channels=16", "model.output_stride=16"]
    full = scaleseg.create_model(load_config(None, base))
    sep = scaleseg.create_model(load_config(None, base + ["model.separable=true", "model.decoder_convs=1",
                                                          "model.decoder_channels=32"]))
    assert sep.head.separable and not full.head.separable
    assert sep.head.aspp.branches[1][0].groups == sep.backbone.channels[-1]
    assert len(sep.head.final) == 2 and sep.head.final[0][1].out_channels == 32
    assert sum(p.numel() for p in sep.parameters()) < sum(p.numel() for p in full.parameters())
    with pytest.raises(ConfigError, match="model.separable"):
        load_config(None, ["model.arch=pspnet", "model.separable=true"])
    with pytest.raises(ConfigError, match="model.separable"):  # MCIBI's deeplabv3 host ASPP is not separable
        load_config(None, ["model.arch=deeplabv3", "model.mcibi.enabled=true", "model.separable=true"])
    assert load_config(None, ["model.arch=deeplabv3plus", "model.mcibi.enabled=true", "model.separable=true"]).model.separable
    with pytest.raises(ConfigError, match="model.decoder_convs"):
        load_config(None, ["model.decoder_convs=0"])
