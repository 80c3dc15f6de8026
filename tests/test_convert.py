"""``scaleseg convert``: official EdgeNets / NVIDIA / sssegmentation checkpoints into run folders.

EdgeNets: the real checkpoints in ``../shared/weights/edgenets`` against logits that EdgeNets' own
model produced on a fixed input (``fixtures/edgenets_espnetv2_city_reference.json``, recorded once
outside the repository). NVIDIA and sssegmentation: no checkpoint is on this machine, so state dicts
are built from the reference models' exact key names and shapes (``fixtures/official_keys.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
from collections import OrderedDict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

import scaleseg
from scaleseg.cli import main as cli_main
from scaleseg.config import load_config
from scaleseg.convert import OpaqueObject, convert, convert_state, find_state_dict, read_official_checkpoint
from scaleseg.errors import CheckpointError, ConfigError

sys.path.insert(0, str(Path(__file__).parent))
from convert_fixtures import PIXELS, street_input  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
EDGENETS = ROOT / ".." / "shared" / "weights" / "edgenets"
CKPTS = ("espnetv2_s_2.0_city_512x256.pth", "espnetv2_s_2.0_city_1024x512.pth")
KEYS = json.loads((FIXTURES / "official_keys.json").read_text())
needs_edgenets = pytest.mark.skipif(not (EDGENETS / CKPTS[0]).is_file(), reason="needs ../shared/weights/edgenets")


def synthetic_state(name: str, k: int, *, device: str = "meta", seed: int = 0) -> "OrderedDict[str, torch.Tensor]":
    """A state dict with the reference's exact key names and shapes ('K' = classes)."""
    g = torch.Generator().manual_seed(seed)
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, shape in KEYS[name]["keys"]:
        size = [k if s == "K" else s for s in shape]
        if device == "meta":
            out[key] = torch.empty(size, device="meta")
        elif key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            out[key] = torch.rand(size, generator=g) + 0.5
        else:
            out[key] = 0.05 * torch.randn(size, generator=g)
    return out


# --------------------------------------------------------------------------------------------
# EdgeNets: real weights, logits equal to EdgeNets' own
# --------------------------------------------------------------------------------------------
@needs_edgenets
@pytest.mark.parametrize("ckpt", CKPTS)
def test_edgenets_convert_reproduces_the_official_logits(tmp_path, ckpt):
    ref = json.loads((FIXTURES / "edgenets_espnetv2_city_reference.json").read_text())["checkpoints"][ckpt]
    out = convert("edgenets", EDGENETS / ckpt, ROOT / "configs/cityscapes/espnetv2_edgenets.yaml", tmp_path / "run")
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "convert.json", "model.safetensors"]
    info = json.loads((out / "convert.json").read_text())
    assert info["tensors"] == 526 and info["notes"]["dropped_output"]["index"] == 19
    model = scaleseg.from_pretrained(out)
    assert model.num_classes == 19 and model.head.proj_planes == 10 and model.head.upsample_align_corners
    with torch.no_grad():
        logits = model(street_input())[0]
    got = torch.tensor([[float(v) for v in logits[:, i, j]] for i, j in PIXELS])
    want = torch.tensor(ref["logits_at_pixels"])[:, :19]  # the 20th output (background) is dropped
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)  # fixture rounded to 5 decimals
    torch.testing.assert_close(logits.mean((1, 2)), torch.tensor(ref["class_mean_logit"][:19]), atol=2e-5, rtol=0)
    assert torch.bincount(logits.argmax(0).flatten(), minlength=19).tolist() == ref["argmax19_histogram"]
    # scaleseg's own convention (align_corners=False) is what moved the official output
    model.head.upsample_align_corners = False
    with torch.no_grad():
        moved = model(street_input())[0]
    assert (moved - logits).abs().max() > 0.3
    assert (moved.argmax(0) != logits.argmax(0)).float().mean() > 0.002


@needs_edgenets
def test_edgenets_key_map_covers_the_official_checkpoint_and_keeps_the_20th_output():
    """All 526 tensors map onto ``espnetv2_seg(20)`` with equal shapes, and the 20-output model (the
    background row included) gives EdgeNets' logits for all 20 classes."""
    from scaleseg.models.espnetv2 import edgenets_key_map, espnetv2_seg

    ref = json.loads((FIXTURES / "edgenets_espnetv2_city_reference.json").read_text())["checkpoints"][CKPTS[0]]
    state = find_state_dict(read_official_checkpoint(EDGENETS / CKPTS[0]), ("state_dict",))
    model = espnetv2_seg(20, 2.0, align_corners=True).eval()
    mapped = {edgenets_key_map(k): v for k, v in state.items()}
    assert len(mapped) == len(state) == 526 == len(model.state_dict())
    model.load_state_dict(mapped, strict=True)
    with torch.no_grad():
        logits = model(street_input())[0]
    got = torch.tensor([[float(v) for v in logits[:, i, j]] for i, j in PIXELS])
    torch.testing.assert_close(got, torch.tensor(ref["logits_at_pixels"]), atol=2e-5, rtol=0)
    assert torch.bincount(logits.argmax(0).flatten(), minlength=20).tolist() == ref["argmax20_histogram"]


@needs_edgenets
def test_edgenets_convert_refuses_a_config_of_another_model(tmp_path):
    cfg = ROOT / "configs/cityscapes/espnetv2_edgenets.yaml"
    with pytest.raises(ConfigError, match="model.width' = 1.0; the checkpoint is s=2.0"):
        convert("edgenets", EDGENETS / CKPTS[0], cfg, tmp_path / "a", ["model.width=1.0"])
    with pytest.raises(ConfigError, match="expected model.dsrl"):
        convert("edgenets", EDGENETS / CKPTS[0], cfg, tmp_path / "b", ["model.dsrl.enabled=true"])
    with pytest.raises(ConfigError, match="11 classes"):  # CamVid: neither 20 nor 19 classes
        convert("edgenets", EDGENETS / CKPTS[0], cfg, tmp_path / "c", ["data.dataset=camvid"])
    assert not (tmp_path / "a").exists()


@needs_edgenets
def test_convert_cli_then_eval_and_predict_accept_the_run(tmp_path, capsys):
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as code:
        cli_main(["convert", "--from", "edgenets", str(EDGENETS / CKPTS[0]), "--config",
                  str(ROOT / "configs/cityscapes/espnetv2_edgenets.yaml"), "--out", str(run), "--quiet"])
    assert code.value.code == 0
    assert "wrote" in capsys.readouterr().out
    cfg = load_config(run / "config.yaml")
    assert cfg.model.espnetv2.align_corners and cfg.model.espnetv2.proj_planes == 10 and cfg.output_dir == str(run)
    # predict on a street-like PNG with the run's own files
    from PIL import Image

    image = street_input(64, 96)[0] * torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1) \
        + torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1)
    Image.fromarray((image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()).save(tmp_path / "street.png")
    with pytest.raises(SystemExit) as code:
        cli_main(["predict", str(run / "config.yaml"), "--checkpoint", str(run / "model.safetensors"),
                  str(tmp_path / "street.png"), "--out", str(tmp_path / "pred"), "--quiet"])
    assert code.value.code == 0
    label = np.array(Image.open(tmp_path / "pred" / "street_label.png"))
    with torch.no_grad():
        want = scaleseg.from_pretrained(run)((torch.from_numpy(np.array(Image.open(tmp_path / "street.png"))).permute(2, 0, 1)[None] / 255
                                               - torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1))
                                              / torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)).argmax(1)[0]
    assert label.shape == (64, 96) and (torch.from_numpy(label.astype(np.int64)) == want).all()
    # eval on a one-image Cityscapes layout whose ground truth is the converted model's own labels,
    # half of them replaced by "road": mIoU is then computable by hand from the confusion matrix
    from scaleseg.data.cityscapes import TRAIN_ID_TO_LABEL_ID

    city = tmp_path / "cs"
    (city / "leftImg8bit/val/x").mkdir(parents=True)
    (city / "gtFine/val/x").mkdir(parents=True)
    Image.open(tmp_path / "street.png").save(city / "leftImg8bit/val/x/x_000000_000000_leftImg8bit.png")
    gt = want.clone()
    gt[:, :48] = 0
    Image.fromarray(TRAIN_ID_TO_LABEL_ID[gt.numpy()]).save(city / "gtFine/val/x/x_000000_000000_gtFine_labelIds.png")
    with pytest.raises(SystemExit) as code:
        cli_main(["eval", str(run / "config.yaml"), "--checkpoint", str(run / "model.safetensors"), f"data.root={city}",
                  "eval.base_size=null", "eval.num_workers=0", "train.accelerator=cpu", "--out", str(tmp_path / "ev"), "--quiet"])
    assert code.value.code == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    conf = torch.zeros(19, 19, dtype=torch.long).index_put_((gt.flatten(), want.flatten()), torch.tensor(1), accumulate=True)
    tp, rows, cols = conf.diag().double(), conf.sum(1).double(), conf.sum(0).double()
    present = (rows + cols) > 0
    assert metrics["mIoU"] == pytest.approx(100 * float((tp / (rows + cols - tp))[present].mean()), abs=1e-6)
    capsys.readouterr()
    # a bad key is one line naming it
    bad = tmp_path / "bad.pth"
    state = torch.load(EDGENETS / CKPTS[0], map_location="cpu", weights_only=True)
    state["bu_dec_l9.weight"] = torch.zeros(1)
    torch.save(state, bad)
    with pytest.raises(SystemExit) as code:
        cli_main(["convert", "--from", "edgenets", str(bad), "--config",
                  str(ROOT / "configs/cityscapes/espnetv2_edgenets.yaml"), "--out", str(tmp_path / "bad"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code.value.code == 2 and len(err) == 1 and "head.bu_dec_l9.weight" in err[0]


# --------------------------------------------------------------------------------------------
# NVIDIA HRNet-OCR + HMSA and sssegmentation MCIBI: the reference key lists
# --------------------------------------------------------------------------------------------
NVIDIA_CFG = ["model.arch=hrnet_ocr", "model.backbone=hrnet_w48", "model.hmsa.mode=hierarchical"]


@pytest.mark.parametrize(("dataset", "k"), [("cityscapes", 19), ("mapillary", 65)])
def test_nvidia_key_list_is_fully_accounted_for(dataset, k):
    state = synthetic_state("nvidia_hrnet_mscale", k)
    state = OrderedDict(("module." + key, v) for key, v in state.items())  # as saved under DDP
    cfg = load_config(ROOT / f"configs/{dataset}/hrnet_ocr_hmsa.yaml", ["model.pretrained=false"])
    converted, cfg, _ = convert_state("nvidia", find_state_dict({"state_dict": state, "epoch": 3}, ("state_dict",)), cfg)
    assert len(converted) == 1903
    assert converted["base.head.cls_head.weight"].shape == (k, 512, 1, 1)
    assert converted["base.backbone.body.model.stage4.2.fuse_layers.3.2.0.1.num_batches_tracked"] is \
        state["module.backbone.stage4.2.fuse_layers.3.2.0.1.num_batches_tracked"]
    assert converted["scale_attn.conv2.weight"] is state["module.scale_attn.conv2.weight"]


def test_nvidia_bad_keys_are_single_line_errors():
    base = synthetic_state("nvidia_hrnet_mscale", 19)
    cfg = lambda: load_config(None, ["data.dataset=cityscapes", *NVIDIA_CFG])  # noqa: E731
    missing = OrderedDict(base)
    del missing["ocr.aux_head.0.bias"]
    with pytest.raises(CheckpointError, match=r"lacks 1 key\(s\).*'base.head.aux_head.0.bias'"):
        convert_state("nvidia", missing, cfg())
    extra = OrderedDict(base)
    extra["mscale_attn.weight"] = torch.empty(1, device="meta")
    with pytest.raises(CheckpointError, match="key 'mscale_attn.weight' has no counterpart"):
        convert_state("nvidia", extra, cfg())
    with pytest.raises(CheckpointError, match=r"'base.head.cls_head.weight' has shape \(19, 512, 1, 1\).*\(65, 512, 1, 1\)"):
        convert_state("nvidia", base, load_config(None, ["data.dataset=mapillary", *NVIDIA_CFG]))
    with pytest.raises(ConfigError, match="model.hmsa.mode' = 'none'"):
        convert_state("nvidia", base, load_config(None, ["data.dataset=cityscapes", "model.arch=hrnet_ocr"]))


@pytest.mark.parametrize(("name", "recipe", "k"), [
    ("ssseg_mcibi_deeplabv3_resnet50", "configs/ade20k/deeplabv3_mcibi.yaml", 150),
    ("ssseg_mcibi_deeplabv3_resnet101", "configs/cityscapes/deeplabv3_mcibi.yaml", 19),
])
def test_ssseg_key_list_is_fully_accounted_for(name, recipe, k):
    state = synthetic_state(name, k)
    cfg = load_config(ROOT / recipe, ["model.pretrained=false", "model.mcibi.aspp_project_kernel=1"])
    converted, cfg, _ = convert_state("ssseg", find_state_dict({"model": state, "model_ema": {}}, ("model",)), cfg)
    assert len(converted) == len(state) + 1  # + the `initialized` flags derived from the memory
    assert cfg.model.mcibi.aspp_project_kernel == 3 and cfg.model.mcibi.aspp_dropout == 0.0  # the reference ASPP
    assert converted["head.memory_context.memory.memory"].shape == (k, 512)
    assert converted["head.context_module.project.0.0.weight"].shape == (512, 2560, 3, 3)
    with pytest.raises(ConfigError, match="resnet50c or resnet101c"):
        convert_state("ssseg", state, load_config(ROOT / recipe, ["model.backbone=resnet50"]))


def test_ssseg_end_to_end_memory_and_weights(tmp_path):
    """Real tensors through convert → from_pretrained: every weight lands where the rules say, the
    K×1×C memory becomes K×C, and classes whose memory row is all zero stay uninitialised."""
    state = synthetic_state("ssseg_mcibi_deeplabv3_resnet50", 150, device="cpu")
    state["memory_module.memory"][140:] = 0.0  # 10 classes never seen
    ckpt = tmp_path / "mcibi.pth"
    torch.save({"model": state, "optimizer": {"lr": 0.01}, "epoch": 130, "mean_iu": np.float64(0.4439)}, ckpt)
    out = convert("ssseg", ckpt, ROOT / "configs/ade20k/deeplabv3_mcibi.yaml", tmp_path / "run")
    model = scaleseg.from_pretrained(out)
    own = model.state_dict()
    torch.testing.assert_close(own["backbone.model.conv1.3.weight"], state["backbone_net.stem.3.weight"], atol=0, rtol=0)
    torch.testing.assert_close(own["backbone.model.bn1.running_var"], state["backbone_net.stem.7.running_var"], atol=0, rtol=0)
    torch.testing.assert_close(own["head.context_module.pool_conv.weight"],
                               state["context_within_image_module.global_branch.1.weight"], atol=0, rtol=0)
    torch.testing.assert_close(own["head.memory_context.context_fuse.0.weight"],
                               state["memory_module.bottleneck_ms.0.weight"], atol=0, rtol=0)
    torch.testing.assert_close(own["aux_head.classifier.bias"], state["auxiliary_decoder.4.bias"], atol=0, rtol=0)
    torch.testing.assert_close(own["head.memory_context.memory.memory"], state["memory_module.memory"][:, 0], atol=0, rtol=0)
    assert model.feature_memory.initialized.sum() == 140 and not model.feature_memory.initialized[140:].any()
    assert json.loads((out / "convert.json").read_text())["notes"]["memory_initialized_classes"] == 140
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 150, 32, 32)


# --------------------------------------------------------------------------------------------
# reading without running pickle code
# --------------------------------------------------------------------------------------------
MARKER: list[Path] = []


def _boom(path: str) -> str:
    Path(path).write_text("code from the checkpoint ran")
    return "boom"


class _Trap:
    """Unpickling this (normally) calls ``_boom``, i.e. runs code named by the checkpoint."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (_boom, (self.path,))


class _Wrapper:
    def __init__(self, state):
        self.weights = state
        self.tag = "wrapped"


@pytest.mark.parametrize("zipfile", [True, False])
def test_wrapped_checkpoints_are_read_without_running_their_code(tmp_path, zipfile):
    marker = tmp_path / "ran.txt"
    state = OrderedDict(a=torch.arange(3.0), b=torch.ones(2, 2))
    payload = {"state_dict": state, "args": argparse.Namespace(lr=0.01, arch="ocrnet.HRNet_Mscale"),
               "mean_iu": np.float64(0.8692), "trap": _Trap(str(marker)), "wrapped": _Wrapper(state)}
    path = tmp_path / "ckpt.pth"
    torch.save(payload, path, _use_new_zipfile_serialization=zipfile)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # plain weights_only refuses these globals
    obj = read_official_checkpoint(path)
    assert not marker.exists()  # _boom was never called
    assert isinstance(obj["trap"], OpaqueObject) and obj["trap"].qualname.endswith("_boom")
    assert isinstance(obj["args"], OpaqueObject) and obj["args"].qualname == "argparse.Namespace"
    assert torch.equal(find_state_dict(obj, ("state_dict",))["b"], torch.ones(2, 2))
    assert torch.equal(find_state_dict({"x": obj["wrapped"]}, ("x",))["a"], torch.arange(3.0))  # state inside an object
    # loading it the unsafe way would have run the code: the test can fail
    torch.load(path, weights_only=False)
    assert marker.read_text() == "code from the checkpoint ran"


def test_unreadable_and_stateless_checkpoints_are_single_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_official_checkpoint(tmp_path / "none.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="weights_only=True") as err:
        read_official_checkpoint(junk)
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="no state dict found"):
        find_state_dict({"epoch": 3, "optimizer": {"lr": 0.1}}, ("state_dict",))
