"""eval.fold_bn: BatchNorm folded into the conv before it, by dataflow, with the same logits."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import nn

import scaleseg
from scaleseg.config import load_config
from scaleseg.models import fold_bn
from scaleseg.models.fold_bn import fold_batchnorm, probe_input

TINY = ["model.backbone=test_resnet", "model.head_channels=16", "model.decoder_channels=16",
        "model.output_stride=8", "data.dataset=scalescenes"]


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters (fresh ones fold to the identity)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g))
            m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.1)
            m.weight.data.copy_(torch.randn(c, generator=g))
            m.bias.data.copy_(torch.randn(c, generator=g))
    return model


def _bns(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) is nn.BatchNorm2d]


@pytest.mark.parametrize("extra", [[], ["model.separable=true"], ["model.hmsa.mode=hierarchical", "model.hmsa.attn_channels=8", "model.mcibi.enabled=true"]])
def test_folding_a_deeplabv3plus_keeps_the_logits_and_removes_the_conv_fed_bns(extra):
    cfg = load_config(None, TINY + extra)
    torch.manual_seed(0)
    model = _randomise_bn(scaleseg.create_model(cfg, 7)).eval()
    x = torch.randn(2, 3, 45, 70, generator=torch.Generator().manual_seed(1))  # not the probe's size
    with torch.no_grad():
        ref = model(x)
    before = _bns(model)
    folded = fold_batchnorm(model, probe_input(model))
    # every BN is fed by a conv except the ASPP image-pool BN, which reads the conv's output broadcast
    assert sorted(folded) == sorted(n for n in before if not n.endswith("pool_bn"))
    assert len(folded) > 10 and _bns(model) == [n for n in before if n.endswith("pool_bn")]
    assert all(isinstance(model.get_submodule(n), nn.Identity) for n in folded)
    with torch.no_grad():
        out = model(x)
    for a, b in zip(torch.utils._pytree.tree_leaves(out), torch.utils._pytree.tree_leaves(ref)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert max(t.abs().max() for t in torch.utils._pytree.tree_leaves(ref)) > 1e-2  # not a vanishing output


class _SharedConv(nn.Module):
    """conv → BN, but the conv's output is also added back: folding it would change the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn2(self.conv2(self.bn(y) + y))


def test_a_conv_output_read_twice_is_not_folded_and_the_result_is_unchanged():
    torch.manual_seed(0)
    model = _randomise_bn(_SharedConv()).eval()
    x = torch.randn(1, 3, 16, 16)
    ref = model(x).detach()
    assert fold_batchnorm(model, torch.randn(1, 3, 8, 8)) == ["bn2"]
    assert type(model.bn) is nn.BatchNorm2d and isinstance(model.bn2, nn.Identity)
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)
    # hand-computed fold of bn2 into conv2 (no bias): w' = w·γ/√(σ²+ε), b' = β − μ·γ/√(σ²+ε)
    torch.manual_seed(0)
    fresh = _randomise_bn(_SharedConv())
    scale = fresh.bn2.weight / torch.sqrt(fresh.bn2.running_var + fresh.bn2.eps)
    torch.testing.assert_close(model.conv2.weight, fresh.conv2.weight * scale.view(-1, 1, 1, 1))
    torch.testing.assert_close(model.conv2.bias, fresh.bn2.bias - fresh.bn2.running_mean * scale)


def test_timm_norm_act_layers_are_left_alone():
    from timm.layers import BatchNormAct2d

    model = nn.Sequential(nn.Conv2d(3, 4, 3), _randomise_bn(BatchNormAct2d(4, act_layer=nn.ReLU))).eval()
    x = torch.randn(1, 3, 9, 9)
    ref = model(x).detach()
    assert fold_batchnorm(model, x) == []
    torch.testing.assert_close(model(x), ref)


def test_a_fold_that_moves_the_outputs_is_undone(monkeypatch):
    model = _randomise_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())).eval()
    monkeypatch.setattr(fold_bn, "_close", lambda a, b, rtol: False)
    assert fold_batchnorm(model, torch.randn(1, 3, 8, 8)) == []
    assert type(model[1]) is nn.BatchNorm2d and model[0].bias is not None


def test_training_mode_is_refused():
    with pytest.raises(ValueError, match="eval-mode"):
        fold_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("fold", [True, False])
def test_load_trained_folds_as_eval_fold_bn_says_with_the_same_logits(tmp_path, fold):
    from scaleseg.data.scalescenes import SCALESCENES
    from scaleseg.engine.checkpoint import save_weights
    from scaleseg.engine.evaluate import load_trained

    cfg = load_config(None, TINY + ["data.num_images=2"])
    torch.manual_seed(0)
    trained = _randomise_bn(scaleseg.create_model(cfg, SCALESCENES.num_classes)).eval()
    save_weights(trained, tmp_path / "m.safetensors")
    loaded, _ = load_trained(load_config(None, TINY + ["data.num_images=2", f"eval.fold_bn={str(fold).lower()}"]),
                             tmp_path / "m.safetensors")
    assert not loaded.training
    assert (len(_bns(loaded)) < len(_bns(trained))) is fold
    x = torch.randn(1, 3, 40, 56)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), trained(x), rtol=1e-4, atol=1e-5)
