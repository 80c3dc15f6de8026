"""Every combination of {HMSA or explicit attention, MCIBI, DSRL} on every host it applies to trains
through the Lightning task, logs each method's loss terms, updates the MCIBI memory, round-trips
through a checkpoint and evaluates with scales and flip; composed forwards equal their parts chained
by hand; the memory update inside HMSA and DSRL uses the documented scale and labels."""
from __future__ import annotations

import csv
import itertools
import json

import pytest
import torch
import torch.nn.functional as F

from scaleseg.config import load_config
from scaleseg.engine.checkpoint import load_model_weights, read_state_dict
from scaleseg.engine.evaluate import evaluate
from scaleseg.engine.train import train
from scaleseg.models.contract import Run
from scaleseg.models.factory import create_model
from scaleseg.types import StepInfo

TINY = ["data.dataset=scalescenes", "data.num_images=6", "data.image_size=[32,64]", "data.crop_size=[32,64]",
        "data.scale_range=[1.0,1.0]", "train.epochs=1", "train.batch_size=2", "train.num_workers=0",
        "train.accelerator=cpu", "train.progress=false", "train.log_every_n_steps=1", "eval.num_workers=0",
        "eval.batch_size=2", "model.head_channels=16", "model.hmsa.attn_channels=8", "model.mcibi.channels=16",
        "model.mcibi.consistency_start_epoch=0", "model.dsrl.fa_subsample=4", "model.hmsa.explicit_scales=[0.5,1.0]"]
HOSTS = {
    "deeplabv3plus": ["model.arch=deeplabv3plus", "model.backbone=test_resnet", "model.output_stride=8",
                      "model.aux_head=true"],
    "hrnet_ocr": ["model.arch=hrnet_ocr", "model.backbone=hrnet_w18_small"],
    "espnetv2": ["model.arch=espnetv2", "model.width=0.5"],
}
METHOD_TERMS = {  # loss terms each part adds (host-specific MCIBI side terms are added below)
    "hierarchical": {"main", "pred_0.5x", "pred_1.0x"},
    "explicit": {"main", "pred_0.5x", "pred_1.0x"},
    "mcibi": {"memory_ce", "consistency"},
    "dsrl": {"sr", "fa"},
}


def _combos() -> list[tuple[str, str, bool, bool]]:
    out = []
    for host, hmsa, mcibi, dsrl in itertools.product(HOSTS, ("none", "hierarchical", "explicit"), (False, True), (False, True)):
        if mcibi and host == "espnetv2":
            continue  # MCIBI needs a host head with a context module (a one-line ConfigError, tested in test_config)
        if hmsa == "explicit" and host != "deeplabv3plus":
            continue  # the explicit baseline shares the wrapper plumbing with HMSA; one host covers it
        out.append((host, hmsa, mcibi, dsrl))
    return out


def _args(tmp_path, host: str, hmsa: str, mcibi: bool, dsrl: bool) -> list[str]:
    return [*TINY, *HOSTS[host], f"model.hmsa.mode={hmsa}", f"model.mcibi.enabled={str(mcibi).lower()}",
            f"model.dsrl.enabled={str(dsrl).lower()}", f"output_dir={tmp_path / 'run'}"]


def _expected_terms(host: str, hmsa: str, mcibi: bool, dsrl: bool) -> set[str]:
    terms = set(METHOD_TERMS[hmsa]) if hmsa != "none" else {"ce"}
    if mcibi:
        terms |= METHOD_TERMS["mcibi"] | ({"stride8_ce"} if host == "deeplabv3plus" else {"ocr_aux"})
    if dsrl:
        terms |= METHOD_TERMS["dsrl"]
    if host == "deeplabv3plus" or (host == "hrnet_ocr" and not mcibi):
        terms.add("aux")  # DeepLabV3+'s aux head / OCR's soft regions (MCIBI's OCR host: ocr_aux)
    return terms


@pytest.mark.parametrize("host,hmsa,mcibi,dsrl", _combos(),
                         ids=lambda v: v if isinstance(v, str) else ("M" if v else "-"))
def test_every_combination_trains_logs_its_terms_roundtrips_and_evaluates(tmp_path, host, hmsa, mcibi, dsrl):
    cfg = load_config(None, _args(tmp_path, host, hmsa, mcibi, dsrl))
    train(cfg)  # 6 images, batch 2: 3 optimiser steps
    run = tmp_path / "run"
    rows = list(csv.DictReader(open(next((run / "csv").rglob("metrics.csv")))))
    logged = {k.removeprefix("train/") for row in rows for k, v in row.items() if k.startswith("train/") and v}
    assert _expected_terms(host, hmsa, mcibi, dsrl) <= logged, sorted(logged)
    steps = {int(r["step"]) for r in rows if r.get("train/loss")}
    assert steps == {0, 1, 2}

    # the checkpoint round-trips: last.ckpt and model.safetensors load into a fresh model identically
    ckpt_state, _ = read_state_dict(run / "checkpoints" / "last.ckpt")
    fresh = create_model(cfg, 8)
    load_model_weights(fresh, run / "checkpoints" / "last.ckpt")
    weights, _ = read_state_dict(run / "model.safetensors")
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, ckpt_state[key]) and torch.equal(value, weights[key]), key
    memory = [k for k in weights if k.endswith("memory.memory")]
    assert bool(memory) == mcibi
    if mcibi:  # the memory was updated (it starts at zero with no class initialised)
        assert weights[memory[0]].abs().sum() > 0
        assert weights[memory[0].replace("memory.memory", "memory.initialized")].any()

    # evaluation with scales (0.5, 1, 2) and flip, through `scaleseg eval`'s code path
    eval_cfg = load_config(None, [*_args(tmp_path, host, hmsa, mcibi, dsrl), "eval.scales=[0.5,1.0,2.0]", "eval.flip=true"])
    metrics = evaluate(eval_cfg, run / "model.safetensors", tmp_path / "eval")
    assert 0 <= metrics["mIoU"] <= 100
    total = sum(map(sum, metrics["confusion_matrix"]))
    assert total > 0.5 * 6 * 32 * 64  # scored at the label resolution (DSRL: its 2× output)
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["mIoU"] == metrics["mIoU"]


# ----------------------------------------------------------------------------- composed = parts by hand
K = 5


def _model(*extra: str):
    cfg = load_config(None, ["model.backbone=test_resnet", "model.output_stride=8", "model.head_channels=16",
                             "model.mcibi.enabled=true", "model.mcibi.channels=16", "model.hmsa.attn_channels=8",
                             *extra])
    torch.manual_seed(0)
    return create_model(cfg, K)


def _warm_memory(model, x: torch.Tensor) -> None:
    """Give the memory non-trivial content (and the BN statistics), so the aggregation matters."""
    mcibi = model
    while not hasattr(mcibi, "feature_memory"):
        mcibi = mcibi.base
    g = torch.Generator().manual_seed(3)
    mem = mcibi.feature_memory
    mem.memory.copy_(torch.randn(mem.memory.shape, generator=g))
    mem.initialized.fill_(True)


def _up(t, size):
    return F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)


def test_hmsa_over_mcibi_equals_the_hierarchical_formula_on_the_mcibi_outputs():
    model = _model("model.hmsa.mode=hierarchical").eval()
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    _warm_memory(model, x)
    mcibi = model.base
    with torch.no_grad():
        fused = model(x)  # eval mode: the default inference scales (0.5, 1, 2)
        outs = {s: mcibi.forward_features(x if s == 1 else _up(x, (int(64 * s), int(96 * s)))) for s in (0.5, 1.0, 2.0)}

        def gate(o):
            return _up(model.scale_attn(o["feats"]), o["logits"].shape[-2:])  # 64×96 multiples of 8: no crop

        p2, p1, p05 = outs[2.0]["logits"], outs[1.0]["logits"], outs[0.5]["logits"]
        a1, a05 = gate(outs[1.0]), gate(outs[0.5])
        expected = a1 * p1 + (1 - a1) * _up(p2, p1.shape[-2:])
        expected = _up(a05 * p05, p1.shape[-2:]) + (1 - _up(a05, p1.shape[-2:])) * expected
    assert model.infer_scales == (0.5, 1.0, 2.0)
    torch.testing.assert_close(fused, expected, atol=1e-6, rtol=0)
    # and differs from the single-scale MCIBI model, so the comparison can fail
    assert (fused - p1).abs().max() > 1e-3


def test_dsrl_over_mcibi_equals_sssr_on_the_mcibi_logits():
    model = _model("model.dsrl.enabled=true").eval()
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(2))
    _warm_memory(model, x)
    with torch.no_grad():
        out = model(x)
        # DeepLabV3+ logits are at stride 4, so SSSR starts from the MCIBI model's logits at the input
        # size (stride 2 of the 2× output) and adds one deconvolution
        expected = model.sssr(model.base(x))
    assert out.shape == (2, K, 64, 96) and model.sssr.steps == 1
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def _batch(h=64, w=96, hr=False, seed=4):
    g = torch.Generator().manual_seed(seed)
    mask = torch.randint(0, K, (2, h, w), generator=g)
    mask[:, :4] = 255
    if hr:
        image_hr = torch.randn(2, 3, h, w, generator=g)
        return {"image": _up(image_hr, (h // 2, w // 2)), "image_hr": image_hr, "mask": mask}
    return {"image": torch.randn(2, 3, h, w, generator=g), "mask": mask}


def test_inside_hmsa_the_memory_updates_from_the_one_scale_run_and_memory_terms_average_the_scales():
    model = _model("model.hmsa.mode=hierarchical", "model.mcibi.consistency_start_epoch=0").train()
    batch = _batch()
    _warm_memory(model, batch["image"])
    mcibi = model.base
    before = mcibi.feature_memory.memory.clone()
    step = StepInfo(3, 10, 1)
    torch.manual_seed(7)
    out = model.training_forward(batch)
    losses = model.losses(out, batch, step)
    lo, hi = out["runs"]
    assert (lo.scale, hi.scale) == (0.5, 1.0)
    # by hand: the same update applied to a copy of the memory, with the 1.0 run's R only
    expected = type(mcibi.feature_memory)(K, 16, momentum=mcibi.feature_memory.base_momentum,
                                          min_ratio=mcibi.feature_memory.min_ratio)
    expected.load_state_dict(mcibi.feature_memory.state_dict())
    expected.update(hi.out["R"].detach(), batch["mask"], step)
    model.update_state([Run(out)], batch, step)
    torch.testing.assert_close(mcibi.feature_memory.memory, expected.memory, atol=0, rtol=0)
    assert not torch.equal(mcibi.feature_memory.memory, before)
    # memory_ce = α · mean over the two scales of the side criterion on H1's logits at label size
    crit = mcibi.aux_criterion
    by_hand = 0.4 * 0.5 * (crit(_up(lo.out["memory_logits"], (64, 96)), batch["mask"])
                           + crit(hi.out["memory_logits"], batch["mask"]))
    torch.testing.assert_close(losses["memory_ce"], by_hand)
    assert {"main", "pred_0.5x", "pred_1.0x", "memory_ce", "stride8_ce", "consistency"} <= set(losses)


def test_inside_dsrl_the_memory_labels_are_the_hr_mask_on_the_feature_grid():
    model = _model("model.dsrl.enabled=true", "model.mcibi.consistency_start_epoch=0").train()
    batch = _batch(hr=True)  # LR input 32×48, HR mask 64×96
    _warm_memory(model, batch["image"])
    mcibi = model.base
    step = StepInfo(2, 10, 1)
    out = model.training_forward(batch)
    inner = out["runs"][0].out
    assert inner["R"].shape[-2:] == (4, 6)  # stride 8 of the 32×48 LR input
    assert inner["memory_logits"].shape[-2:] == (64, 96)  # on the HR label grid
    expected = type(mcibi.feature_memory)(K, 16, momentum=mcibi.feature_memory.base_momentum,
                                          min_ratio=mcibi.feature_memory.min_ratio)
    expected.load_state_dict(mcibi.feature_memory.state_dict())
    expected.update(inner["R"].detach(), batch["mask"], step)  # HR mask → 4×6 feature grid inside update
    model.update_state([Run(out)], batch, step)
    torch.testing.assert_close(mcibi.feature_memory.memory, expected.memory, atol=0, rtol=0)
    losses = model.losses(out, batch, step)
    assert {"ce", "sr", "fa", "memory_ce", "stride8_ce", "consistency"} <= set(losses)
    torch.testing.assert_close(losses["memory_ce"], 0.4 * mcibi.aux_criterion(inner["memory_logits"], batch["mask"]))


# ----------------------------------------------------------------------------- inference uses the method
def test_hierarchical_predict_uses_its_inference_scales_and_equals_eval(tmp_path):
    args = [*TINY, *HOSTS["deeplabv3plus"], "model.hmsa.mode=hierarchical", f"output_dir={tmp_path / 'run'}",
            "data.num_images=2", "data.image_size=[64,96]", "data.crop_size=[64,96]"]
    cfg = load_config(None, args)
    train(cfg)
    import scaleseg
    from scaleseg.data.scalescenes import ScaleScenes
    from scaleseg.engine.datamodule import SegDataModule
    from scaleseg.engine.task import make_predictor

    model = scaleseg.from_pretrained(tmp_path / "run")
    assert model.infer_scales == (0.5, 1.0, 2.0)
    image, _ = ScaleScenes("val", num_images=2, size=(64, 96)).load_raw(0)
    labels = model.predict(image)
    single = model.predict(image, scales=[1.0])
    assert labels.shape == (64, 96) and (labels != single).any()
    # equal to `scaleseg eval`'s three-scale logits on the same image
    dm = SegDataModule(cfg)
    dm.set_normalization(model.mean, model.std)
    dm.setup("validate")
    x = dm.val_set[0]["image"][None]
    with torch.no_grad():
        eval_logits = make_predictor(model, load_config(None, [*args, "eval.scales=[0.5,1.0,2.0]"]))(x)
        default_logits = make_predictor(model, cfg)(x)
    torch.testing.assert_close(default_logits, eval_logits, atol=0, rtol=0)
    assert torch.equal(eval_logits.argmax(1)[0], labels)


def test_the_composed_recipes_build_in_the_documented_order():
    from pathlib import Path

    from scaleseg.models.dsrl import DSRL
    from scaleseg.models.hmsa import HierarchicalAttention
    from scaleseg.models.mcibi import MCIBIModel

    root = Path(__file__).resolve().parents[1] / "configs"
    for path, extra in ((root / "camvid/deeplabv3plus_r18_all_cpu.yaml", []),
                        (root / "cityscapes/hrnet_ocr_hmsa_mcibi_dsrl.yaml", ["model.backbone=hrnet_w18_small"])):
        cfg = load_config(path, ["model.pretrained=false", *extra])
        model = create_model(cfg, 11)
        assert isinstance(model, HierarchicalAttention) and isinstance(model.base, DSRL)
        assert isinstance(model.base.base, MCIBIModel) and model.output_scale == 2
