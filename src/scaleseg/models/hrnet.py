"""HRNetV2 trunk: timm HRNet branches upsampled to stride 4 and concatenated (Wang et al. 2019).

``hrnet_w48`` gives 48 + 96 + 192 + 384 = 720 channels (the HMSA / HRNet-OCR trunk), ``hrnet_w18``
18 + 36 + 72 + 144 = 270. The module follows the :class:`~scaleseg.models.backbone.Backbone`
interface (``forward -> list``, ``channels``, ``strides``, ``mean``, ``std``) with a single level
at stride 4, so any head and :class:`~scaleseg.models.segmentor.SegmentationModel` can use it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.models.hrnet import HighResolutionModule
from torch import Tensor, nn

from scaleseg.errors import ConfigError
from scaleseg.models.backbone import Backbone

__all__ = ["FUSE_MODES", "HRNetV2", "concat_branches"]

FUSE_MODES = ("bilinear", "nearest")


def concat_branches(branches: list[Tensor]) -> Tensor:
    """HRNetV2 representation: every branch resized (bilinear, ``align_corners=False``) to the
    first one's size and concatenated: ``[B×C_i×h_i×w_i] → B×ΣC_i×h_0×w_0``."""
    size = branches[0].shape[-2:]
    ups = [b if b.shape[-2:] == size else F.interpolate(b, size=size, mode="bilinear", align_corners=False)
           for b in branches]
    return torch.cat(ups, dim=1)


class HRNetV2(nn.Module):
    """HRNetV2 trunk: ``B×3×H×W → [B×C×ceil(H/4)×ceil(W/4)]`` with ``C`` = sum of branch widths.

    Args: ``name`` a timm ``hrnet_*`` model; ``pretrained``/``pretrained_file`` as for ``Backbone``;
    ``fuse`` how a lower-resolution branch is upsampled in the multi-resolution fusion.

    ``fuse="bilinear"`` (default): bilinear (``align_corners=False``) resize to the target branch's
    size, as HRNet-Semantic-Segmentation and NVIDIA's HMSA code (``network/hrnetv2.py``) do; any input
    size works and branch sizes follow the convolutions (ceil halving), so a converted NVIDIA
    checkpoint computes what NVIDIA's trunk computes. timm's own HRNet (the ImageNet classifier)
    fuses with fixed ×2 nearest upsampling (``fuse="nearest"``), which only accepts sizes divisible by
    32: that mode zero-pads the input (bottom/right) to a multiple of 32 and crops the stride-4 output
    back to ``ceil(H/4)×ceil(W/4)``. Either way the public ``strides`` is ``[4]``.
    """

    _BRANCH_STRIDE = 32

    def __init__(
        self, name: str = "hrnet_w48", *, pretrained: bool = False, pretrained_file: str | None = None,
        fuse: str = "bilinear",
    ) -> None:
        super().__init__()
        if fuse not in FUSE_MODES:
            raise ConfigError(f"HRNetV2 fuse={fuse!r}: expected one of {', '.join(FUSE_MODES)}")
        if not name.split(".")[0].startswith("hrnet_"):
            raise ConfigError(f"HRNetV2 backbone '{name}': expected a timm 'hrnet_*' model (e.g. hrnet_w48)")
        self.body = Backbone(name, out_indices=(1, 2, 3, 4), pretrained=pretrained, pretrained_file=pretrained_file)
        if self.body.strides != [4, 8, 16, 32]:
            raise ConfigError(
                f"HRNetV2 backbone '{name}' has branch strides {self.body.strides}; expected [4, 8, 16, 32]"
            )
        self.name = name
        self.fuse = fuse
        if fuse == "bilinear":
            for module in self.body.modules():
                if isinstance(module, HighResolutionModule):
                    _use_bilinear_fuse(module)
        self.channels: list[int] = [sum(self.body.channels)]
        self.strides: list[int] = [4]
        self.mean, self.std = self.body.mean, self.body.std

    def forward(self, x: Tensor) -> list[Tensor]:
        """``B×3×H×W`` → one-element list ``[B×channels[0]×ceil(H/4)×ceil(W/4)]``."""
        h, w = x.shape[-2:]
        if self.fuse == "bilinear":
            return [concat_branches(self.body(x))]
        m = self._BRANCH_STRIDE
        pad_h, pad_w = -h % m, -w % m
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        feats = concat_branches(self.body(x))
        return [feats[..., : math.ceil(h / 4), : math.ceil(w / 4)]]

    def extra_repr(self) -> str:
        return f"name={self.name!r}, fuse={self.fuse!r}, channels={self.channels}, strides={self.strides}"


def _use_bilinear_fuse(module: HighResolutionModule) -> None:
    """Make one timm HRNet stage fuse by bilinear resize to the target size (HRNet-Seg / NVIDIA).

    timm builds each upsampling fuse path as ``Sequential(conv1x1, BN, Upsample(×2^k, nearest))``;
    the ``Upsample`` is replaced by an identity and the stage's ``forward`` resizes to the target
    branch's size instead. Parameters and their names are unchanged, so timm weights still load.
    """
    for i, fuse_outer in enumerate(module.fuse_layers if module.num_branches > 1 else []):
        for j, path in enumerate(fuse_outer):
            if j > i and isinstance(path, nn.Sequential) and isinstance(path[-1], nn.Upsample):
                path[-1] = nn.Identity()
    module.__class__ = BilinearFuseModule


class BilinearFuseModule(HighResolutionModule):
    """timm's ``HighResolutionModule`` with the bilinear, size-matched fusion (see ``_use_bilinear_fuse``)."""

    def forward(self, x: list[Tensor]) -> list[Tensor]:
        return _bilinear_fuse_forward(self, x)


def _bilinear_fuse_forward(self: HighResolutionModule, x: list[Tensor]) -> list[Tensor]:
    if self.num_branches == 1:
        return [self.branches[0](x[0])]
    x = [branch(t) for branch, t in zip(self.branches, x)]
    fused = []
    for i, fuse_outer in enumerate(self.fuse_layers):
        y: Tensor | None = None
        for j, path in enumerate(fuse_outer):
            t = path(x[j])
            if j > i:
                t = F.interpolate(t, size=x[i].shape[-2:], mode="bilinear", align_corners=False)
            y = t if y is None else y + t
        fused.append(self.fuse_act(y))
    return fused
