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
from torch import Tensor, nn

from scaleseg.errors import ConfigError
from scaleseg.models.backbone import Backbone

__all__ = ["HRNetV2", "concat_branches"]


def concat_branches(branches: list[Tensor]) -> Tensor:
    """HRNetV2 representation: every branch resized (bilinear, ``align_corners=False``) to the
    first one's size and concatenated: ``[B×C_i×h_i×w_i] → B×ΣC_i×h_0×w_0``."""
    size = branches[0].shape[-2:]
    ups = [b if b.shape[-2:] == size else F.interpolate(b, size=size, mode="bilinear", align_corners=False)
           for b in branches]
    return torch.cat(ups, dim=1)


class HRNetV2(nn.Module):
    """HRNetV2 trunk: ``B×3×H×W → [B×C×ceil(H/4)×ceil(W/4)]`` with ``C`` = sum of branch widths.

    Args: ``name`` a timm ``hrnet_*`` model; ``pretrained``/``pretrained_file`` as for ``Backbone``.

    timm's HRNet fuses branches with fixed ×2 upsampling, so it only accepts sizes divisible by 32.
    This trunk zero-pads the input (bottom/right) to a multiple of 32 and crops the stride-4 output
    back to ``ceil(H/4)×ceil(W/4)``; the public ``strides`` is therefore ``[4]`` and models pad
    their input to a multiple of 4 only.

    ``fuse_upsample``: how the exchange units upsample lower-resolution branches. timm (from the
    HRNet classification code) uses ``"nearest"``; HRNet-Semantic-Segmentation and NVIDIA's
    ``network/hrnetv2.py`` use ``"bilinear"`` (``align_corners=False``), which a model loaded from
    NVIDIA's checkpoints needs to reproduce their output. Both have the same weights.
    """

    _BRANCH_STRIDE = 32

    def __init__(
        self, name: str = "hrnet_w48", *, pretrained: bool = False, pretrained_file: str | None = None,
        fuse_upsample: str = "nearest",
    ) -> None:
        super().__init__()
        if not name.split(".")[0].startswith("hrnet_"):
            raise ConfigError(f"HRNetV2 backbone '{name}': expected a timm 'hrnet_*' model (e.g. hrnet_w48)")
        if fuse_upsample not in ("nearest", "bilinear"):
            raise ConfigError(f"HRNetV2 fuse_upsample={fuse_upsample!r}: expected 'nearest' or 'bilinear'")
        self.body = Backbone(name, out_indices=(1, 2, 3, 4), pretrained=pretrained, pretrained_file=pretrained_file)
        if self.body.strides != [4, 8, 16, 32]:
            raise ConfigError(
                f"HRNetV2 backbone '{name}' has branch strides {self.body.strides}; expected [4, 8, 16, 32]"
            )
        self.fuse_upsample = fuse_upsample
        if fuse_upsample == "bilinear":
            for module in self.body.modules():
                if isinstance(module, nn.Upsample):  # only the exchange units' ×2^k upsampling
                    module.mode, module.align_corners = "bilinear", False
        self.name = name
        self.channels: list[int] = [sum(self.body.channels)]
        self.strides: list[int] = [4]
        self.mean, self.std = self.body.mean, self.body.std

    def forward(self, x: Tensor) -> list[Tensor]:
        """``B×3×H×W`` → one-element list ``[B×channels[0]×ceil(H/4)×ceil(W/4)]``."""
        h, w = x.shape[-2:]
        m = self._BRANCH_STRIDE
        pad_h, pad_w = -h % m, -w % m
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        feats = concat_branches(self.body(x))
        return [feats[..., : math.ceil(h / 4), : math.ceil(w / 4)]]

    def extra_repr(self) -> str:
        return f"name={self.name!r}, channels={self.channels}, strides={self.strides}, fuse_upsample={self.fuse_upsample!r}"
