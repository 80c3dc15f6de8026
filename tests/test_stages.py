"""Staged training (``stages:``): parts, freezing, per-stage LR, resume inside and across stages."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scaleseg.config import load_config
from scaleseg.engine.stages import apply_stage, plan_stage, stage_at_epoch, stage_lr_factor
from scaleseg.errors import ConfigError
from scaleseg.models.factory import create_model
from scaleseg.models.parts import part_of, part_sizes
from scaleseg.types import StepInfo

from test_faults import TINY, cli


def write_config(folder: Path) -> Path:
    path = folder / "tiny.yaml"
    path.write_text("name: tiny\nseed: 3\n")  # no train.epochs: the stages give them
    return path

HMSA = ["model.hmsa.mode=hierarchical", "model.hmsa.attn_channels=8"]
# 8 images, batch 4: 2 steps per epoch. Stage 1: steps 0-3, stage 2: 4-7, stage 3: 8-9.
STAGES = (
    "stages=[{name: trunk, train: [backbone, head], fuse_scales: false, epochs: 2, lr: 0.05, "
    "schedule: exponential, gamma: 0.8}, {name: attention, train: [attention], epochs: 2, lr: 0.02}, "
    "{name: finetune, freeze: [attention], epochs: 1, lr: 0.01, schedule: constant}]"
)


def tiny_model(*overrides: str):
    cfg = load_config(None, ["model.backbone=test_resnet", "model.pretrained=false", "model.head_channels=8", *overrides])
    return cfg, create_model(cfg, 3)


# ---------------------------------------------------------------------------------------------- parts


def test_parts_name_every_part_of_composed_and_light_models():
    _, composed = tiny_model(*HMSA, "model.mcibi.enabled=true", "model.mcibi.channels=16", "model.dsrl.enabled=true")
    sizes = part_sizes(composed)
    assert set(sizes) == {"backbone", "head", "attention", "mcibi", "sisr"}
    assert sum(sizes.values()) == sum(p.numel() for p in composed.parameters())
    assert part_of("base.base.backbone.model.layer1.0.conv1.weight") == "backbone"
    assert part_of("scale_attn.conv0.weight") == "attention"
    assert part_of("base.base.head.memory_context.memory_fuse.0.weight") == "mcibi"
    assert part_of("base.sisr.conv1.weight") == part_of("base.fa_transform.0.weight") == "sisr"
    assert part_of("base.sssr.blocks.0.weight") == "head"  # SSSR is the segmentation upsampler
    _, bisenet = tiny_model("model.arch=bisenet", "model.backbone=resnet18", "model.output_stride=32")
    assert set(part_sizes(bisenet)) == {"backbone", "head", "aux"}
    assert part_of("head.aux16_head.0.weight") == "aux" and part_of("backbone.spatial.layers.0.weight") == "backbone"


def test_stage_config_and_plan_errors_are_one_line():
    cfg = load_config(None, [STAGES, *HMSA])
    assert cfg.train.epochs == 5  # resolved: the sum of the stages
    assert load_config(None, [STAGES, *HMSA, "train.epochs=5"]).train.epochs == 5
    with pytest.raises(ConfigError, match="'train.epochs' = 7 but the stages sum to 5 epochs"):
        load_config(None, [STAGES, *HMSA, "train.epochs=7"])
    assert [stage_at_epoch(cfg.stages, e) for e in range(6)] == [0, 0, 1, 1, 2, 2]
    bad = {
        "stages=[{name: a, train: [head], freeze: [backbone]}]": "both set",
        "stages=[{name: a}, {name: a}]": "unique",
        "stages=[{name: a, fuse_scales: false}]": "needs model.hmsa.mode=hierarchical",
        "stages=[{name: a, epochs: 0}]": "expected >= 1",
        "stages=[{name: a, colour: red}]": "unknown config key 'stages[0].colour'",
        "stages=[{name: a, train: []}]": "nothing would train",
    }
    for override, text in bad.items():
        with pytest.raises(ConfigError, match=text.replace("[", r"\[")) as err:
            load_config(None, [override])
        assert "\n" not in str(err.value)
    cfg, model = tiny_model("stages=[{name: a, train: [attention]}]")
    with pytest.raises(ConfigError, match=r"stages\[0\]\.train.*'attention' matches no parameter.*backbone, head"):
        plan_stage(model, cfg.stages, 0)
    cfg, model = tiny_model("stages=[{name: a, freeze: [backbone, head]}]")
    with pytest.raises(ConfigError, match="freezes every parameter"):
        plan_stage(model, cfg.stages, 0)
    cfg, model = tiny_model("stages=[{name: a, freeze: [backbone.model.layer1]}]")  # a prefix
    plan = plan_stage(model, cfg.stages, 0)
    assert plan.frozen and all(n.startswith("backbone.model.layer1.") for n in plan.frozen)


def test_stage_lr_schedules():
    cfg = load_config(None, ["stages=[{name: a, epochs: 3, schedule: exponential, gamma: 0.8}, "
                             "{name: b, epochs: 2, warmup_steps: 2}, {name: c, schedule: constant}]"])
    a, b, c = cfg.stages
    assert [stage_lr_factor(a, s, 4, 0.9, 0.1) for s in (0, 3, 4, 8, 11)] == pytest.approx([1, 1, 0.8, 0.64, 0.64])
    assert stage_lr_factor(b, 1, 4, 0.9, 0.1) == pytest.approx(0.55)  # linear warm-up from 0.1
    assert stage_lr_factor(b, 4, 4, 0.9, 0.1) == pytest.approx(0.5 ** 0.9)  # poly over the stage's 8 steps
    assert stage_lr_factor(c, 100, 4, 0.9, 0.1) == 1.0


def test_a_frozen_mcibi_memory_is_not_updated_and_frozen_bn_stays_in_eval():
    cfg, model = tiny_model("model.arch=deeplabv3", "model.mcibi.enabled=true", "model.mcibi.channels=16",
                            "stages=[{name: a, freeze: [mcibi, backbone]}, {name: b}]")
    torch.manual_seed(0)
    batch = {"image": torch.randn(2, 3, 32, 48), "mask": torch.randint(0, 3, (2, 32, 48))}
    memory = model.head.memory_context.memory
    for index, updates in ((0, False), (1, True)):
        plan = plan_stage(model, cfg.stages, index)
        model.train()
        apply_stage(model, plan)
        before = memory.memory.clone()
        bn = model.backbone.model.bn1
        stats = bn.running_mean.clone()
        model.training_losses(batch, StepInfo(0, 10, 0))
        assert (not torch.equal(memory.memory, before)) is updates
        assert (not torch.equal(bn.running_mean, stats)) is updates
        assert bn.weight.requires_grad is updates and bn.training is updates


# ---------------------------------------------------------------------------------------------- runs


def run_args(config: Path, run: Path, *extra: str) -> list[str]:
    return ["train", str(config), *TINY, *HMSA, STAGES, f"output_dir={run}", "--quiet", *extra]


def csv_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "csv" / "version_0" / "metrics.csv", newline="") as fh:
        return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("staged")
    config = write_config(root)
    from scaleseg.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(run_args(config, root / "run"))
    assert exit_info.value.code == 0
    return config, root / "run"


def _split(state: dict[str, torch.Tensor], part_names: set[str]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if part_of(k) in part_names}


def test_stages_freeze_exactly_and_train_what_they_name(staged):
    _, run = staged
    s1, s2, s3 = (load_file(str(run / "stages" / f"{i}-{n}.safetensors"))
                  for i, n in ((1, "trunk"), (2, "attention"), (3, "finetune")))
    assert all(torch.equal(s3[k], v) for k, v in load_file(str(run / "model.safetensors")).items())
    trunk = {"backbone", "head"}
    # stage 2 froze backbone and head: weights AND BatchNorm running statistics bit-identical
    frozen = _split(s1, trunk)
    assert any("running_mean" in k for k in frozen) and any("running_var" in k for k in frozen)
    assert all(torch.equal(s2[k], v) for k, v in frozen.items())
    # ... and trained the attention
    assert any(not torch.equal(s2[k], v) for k, v in _split(s1, {"attention"}).items() if v.is_floating_point())
    # stage 3 froze the attention (its BN included) and trained the rest
    assert all(torch.equal(s3[k], v) for k, v in _split(s2, {"attention"}).items())
    changed = [k for k, v in _split(s2, trunk).items() if k.endswith("weight") and not torch.equal(s3[k], v)]
    assert len(changed) > 10
    # the last checkpoint's optimiser holds exactly stage 3's trainable tensors
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["scaleseg"]["stage"] == 2
    n_trainable = sum(1 for k in s3 if part_of(k) != "attention" and "running" not in k and "num_batches" not in k)
    assert len(ckpt["optimizer_states"][0]["param_groups"][0]["params"]) == n_trainable
    # the logs say which stage ran, with its LR schedule: exponential 0.05·0.8^epoch, poly from 0.02, constant 0.01
    rows = [r for r in csv_rows(run) if r.get("train/lr")]
    assert [float(r["stage"]) for r in rows] == [1, 1, 1, 1, 2, 2, 2, 2, 3, 3]
    lrs = [float(r["train/lr"]) for r in rows]
    assert lrs[:4] == pytest.approx([0.05, 0.05, 0.04, 0.04])
    assert lrs[4] == pytest.approx(0.02) and lrs[5] == pytest.approx(0.02 * (1 - 1 / 4) ** 0.9)
    assert lrs[8:] == pytest.approx([0.01, 0.01])
    # stage 1 trained the scales separately (the base's own terms), later stages the fusion
    assert all(r.get("train/ce") for r in rows[:4]) and all(r.get("train/main") for r in rows[4:])


@pytest.mark.parametrize("when", ["mid stage 2", "stage boundary", "stage boundary with EMA"])
def test_resume_inside_and_across_stages_equals_the_uninterrupted_run(staged, tmp_path, capsys, monkeypatch, when):
    from scaleseg.engine import guards

    config, reference = staged
    extra = ["train.ema_decay=0.9"] if "EMA" in when else []
    if extra:  # its own uninterrupted reference
        reference = tmp_path / "reference"
        code, _, err = cli(capsys, *run_args(config, reference, *extra))
        assert code == 0, err
    at = 5 if when == "mid stage 2" else 4  # step 4: stage 1's last batch, before its validation
    run = tmp_path / "run"
    monkeypatch.setattr(guards.RunGuard, "_interrupted", lambda self, trainer: trainer.global_step == at)
    code, _, err = cli(capsys, *run_args(config, run, *extra))
    assert code == 130, err
    ckpt = torch.load(run / "checkpoints" / "last_step.ckpt", weights_only=True)
    assert ckpt["global_step"] == at and ckpt["scaleseg"]["stage"] == (1 if at == 5 else 0)
    monkeypatch.undo()
    code, _, err = cli(capsys, "train", config, f"output_dir={run}", "--resume", "auto", "--quiet")
    assert code == 0, err
    assert "stage 2/3 'attention'" in err and "stage 3/3 'finetune'" in err
    assert csv_rows(run) == csv_rows(reference)
    mine = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    theirs = torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True)
    assert mine["global_step"] == theirs["global_step"] == 10
    assert all(torch.equal(mine["state_dict"][k], v) for k, v in theirs["state_dict"].items())
    for name in ("2-attention", "3-finetune"):
        a, b = (load_file(str(r / "stages" / f"{name}.safetensors")) for r in (run, reference))
        assert all(torch.equal(a[k], v) for k, v in b.items()), name


@pytest.mark.parametrize("recipe", ["cityscapes/mobilenetv2_deeplabv3plus_hmsa_staged.yaml",
                                    "camvid/mobilenetv2_deeplabv3plus_hmsa_staged_cpu.yaml"])
def test_shipped_staged_recipes_plan_every_stage_on_their_model(recipe):
    from scaleseg.engine.task import SegTask

    path = Path(__file__).resolve().parents[1] / "configs" / recipe
    cfg = load_config(path, ["model.pretrained=false"])
    assert cfg.train.epochs == sum(s.epochs for s in cfg.stages) and len(cfg.stages) == 3
    model = create_model(cfg, 19)
    task = SegTask(model, cfg, [str(k) for k in range(19)])
    plans = [plan_stage(model, cfg.stages, i) for i in range(3)]
    assert all(part_of(n) in ("backbone", "head") for n in plans[0].trainable)
    assert all(part_of(n) == "attention" for n in plans[1].trainable) and plans[1].trainable
    assert set(plans[2].frozen) == set(plans[1].trainable)
    opt = task.configure_optimizers()["optimizer"]  # stage 1's optimiser, over stage 1's tensors only
    assert type(opt).__name__ == ("AdamW" if cfg.optim.name == "adamw" else "SGD")
    assert opt.param_groups[0]["lr"] == cfg.stages[0].lr
    assert len(opt.param_groups[0]["params"]) == len(plans[0].trainable)


def test_a_resume_that_changes_a_stage_is_refused_naming_the_stage_key(staged, capsys):
    config, run = staged
    changed = STAGES.replace("lr: 0.02}", "lr: 0.03}")
    code, _, err = cli(capsys, "train", config, *TINY, *HMSA, changed, f"output_dir={run}", "--resume", "auto", "--quiet")
    assert code == 2 and "stages[1].lr 0.02 -> 0.03" in err and len(err.strip().splitlines()) == 1, err
