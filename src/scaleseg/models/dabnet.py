"""DABNet (Li & Kim, BMVC 2019, "DABNet: Depth-wise Asymmetric Bottleneck for Real-time Semantic
Segmentation"), written from the paper; layer details the paper's figures leave open (BN epsilon, the
pre-activation of each module) follow the authors' release (``Reagan1311/DABNet``, ``model/DABNet.py``).

It plugs into the model contract as a backbone + head pair::

    model = dabnet(num_classes=19)          # SegmentationModel(DABNetBackbone, DABNetHead)

Network (the paper's architecture section and figure), trained from scratch:

* initial block: three 3×3 conv-BN-PReLU (32 channels; the first with stride 2) → 1/2;
* **input injection**: the image average-pooled (3×3, stride 2) to 1/2, 1/4 and 1/8 is concatenated with
  the output of each stage: ``[init 32 | image 3]`` = 35 channels at 1/2;
* downsampling block (ENet-style: a 3×3 stride-2 conv, concatenated with a 2×2 max-pool of the input
  when the output is wider) → 64 at 1/4; **DAB block 1**: 3 DAB modules, dilation 2;
  ``[block 64 | downsampled 64 | image 3]`` = 131 at 1/4;
* downsampling block → 128 at 1/8; **DAB block 2**: 6 DAB modules, dilations 4, 4, 8, 8, 16, 16;
  ``[block 128 | downsampled 128 | image 3]`` = 259 at 1/8 (each concatenation followed by BN-PReLU);
* 1×1 classifier → logits at 1/8, bilinearly upsampled to the input (by ``SegmentationModel``).

**DAB module** (``B×C×h×w → B×C×h×w``): BN-PReLU → 3×3 conv to C/2 → two depth-wise asymmetric
branches, ``3×1 → 1×3`` and the same with dilation d (each conv followed by BN-PReLU) → sum → BN-PReLU →
1×1 conv to C → + input.

Published size and cost (``tests/test_dabnet.py``): 0.76 M parameters and 10.46 GFLOPs at 512×1024 for
19 classes (paper abstract and its comparison table). This implementation: 756,643 parameters (the release's network has
exactly as many) and 10.22 G multiply-adds at 512×1024 (``torch.utils.flop_counter``, convolutions
only); the paper's figure is 2.3 % higher, consistent with a counter that also counts the BN/PReLU
element-wise operations (0.077 G elements each).

Backbone levels ``[35 @ 1/2, 131 @ 1/4, 259 @ 1/8]`` (the three concatenations); the head's ``feats`` is
the 259-channel map the classifier reads (``feat_channels``, used by HMSA attention and the DSRL SISR
branch). Deliberate difference: normalisation constants are ImageNet's (the release uses per-dataset
means); the resize to the input uses ``align_corners=False`` as the release does.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from scaleseg.errors import ConfigError
from scaleseg.models.segmentor import SegmentationModel

__all__ = [
    "BLOCK1_DILATIONS",
    "BLOCK2_DILATIONS",
    "DABModule",
    "DABNetBackbone",
    "DABNetHead",
    "DownsamplingBlock",
    "dabnet",
]

BLOCK1_DILATIONS = (2, 2, 2)
BLOCK2_DILATIONS = (4, 4, 8, 8, 16, 16)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BN_EPS = 1e-3  # the release's BatchNorm epsilon


class BNPReLU(nn.Sequential):
    """BatchNorm (eps 1e-3) → PReLU (one slope per channel)."""

    def __init__(self, channels: int) -> None:
        super().__init__(nn.BatchNorm2d(channels, eps=BN_EPS), nn.PReLU(channels))


def _conv_bn_prelu(
    in_ch: int, out_ch: int, kernel: tuple[int, int], *, stride: int = 1, dilation: tuple[int, int] = (1, 1), groups: int = 1
) -> nn.Sequential:
    """Conv (no bias, "same" padding for stride 1) → BN → PReLU."""
    padding = (dilation[0] * (kernel[0] // 2), dilation[1] * (kernel[1] // 2))
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=False)
    return nn.Sequential(conv, BNPReLU(out_ch))


class DABModule(nn.Module):
    """Depth-wise asymmetric bottleneck with dilation ``dilation``: ``B×C×h×w → B×C×h×w`` (C even)."""

    def __init__(self, channels: int, dilation: int) -> None:
        super().__init__()
        if channels % 2:
            raise ConfigError(f"DABModule: channels={channels}; expected an even number")
        half = channels // 2
        d = dilation
        self.pre = BNPReLU(channels)
        self.reduce = _conv_bn_prelu(channels, half, (3, 3))
        self.branch = nn.Sequential(
            _conv_bn_prelu(half, half, (3, 1), groups=half), _conv_bn_prelu(half, half, (1, 3), groups=half)
        )
        self.dilated_branch = nn.Sequential(
            _conv_bn_prelu(half, half, (3, 1), dilation=(d, 1), groups=half),
            _conv_bn_prelu(half, half, (1, 3), dilation=(1, d), groups=half),
        )
        self.post = BNPReLU(half)
        self.expand = nn.Conv2d(half, channels, 1, bias=False)
        self.dilation = dilation

    def forward(self, x: Tensor) -> Tensor:
        y = self.reduce(self.pre(x))
        return x + self.expand(self.post(self.branch(y) + self.dilated_branch(y)))

    def extra_repr(self) -> str:
        return f"dilation={self.dilation}"


class DownsamplingBlock(nn.Module):
    """``B×in×h×w → B×out×h/2×w/2``: 3×3 stride-2 conv to ``out − in`` channels concatenated with a 2×2
    max-pool of the input when ``out > in``, else a 3×3 stride-2 conv to ``out``; then BN-PReLU.
    h and w must be even (the model pads its input to a multiple of 8)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.pool = out_ch > in_ch
        self.conv = nn.Conv2d(in_ch, out_ch - in_ch if self.pool else out_ch, 3, stride=2, padding=1, bias=False)
        self.act = BNPReLU(out_ch)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        if self.pool:
            y = torch.cat([y, nn.functional.max_pool2d(x, 2)], dim=1)
        return self.act(y)


class DABNetBackbone(nn.Module):
    """DABNet encoder: ``B×3×H×W`` → ``[B×35×H/2×W/2, B×131×H/4×W/4, B×259×H/8×W/8]``.

    Attributes as a backbone: ``channels``, ``strides`` ([2, 4, 8]), ``mean``/``std`` (ImageNet), ``name``.
    """

    def __init__(
        self,
        *,
        widths: tuple[int, int, int] = (32, 64, 128),
        block1_dilations: Sequence[int] = BLOCK1_DILATIONS,
        block2_dilations: Sequence[int] = BLOCK2_DILATIONS,
    ) -> None:
        super().__init__()
        w0, w1, w2 = widths
        self.init_block = nn.Sequential(
            _conv_bn_prelu(3, w0, (3, 3), stride=2), _conv_bn_prelu(w0, w0, (3, 3)), _conv_bn_prelu(w0, w0, (3, 3))
        )
        c0 = w0 + 3
        self.act0 = BNPReLU(c0)
        self.down1 = DownsamplingBlock(c0, w1)
        self.block1 = nn.Sequential(*(DABModule(w1, d) for d in block1_dilations))
        c1 = 2 * w1 + 3
        self.act1 = BNPReLU(c1)
        self.down2 = DownsamplingBlock(c1, w2)
        self.block2 = nn.Sequential(*(DABModule(w2, d) for d in block2_dilations))
        c2 = 2 * w2 + 3
        self.act2 = BNPReLU(c2)
        self.channels: list[int] = [c0, c1, c2]
        self.strides: list[int] = [2, 4, 8]
        self.mean: tuple[float, ...] = IMAGENET_MEAN
        self.std: tuple[float, ...] = IMAGENET_STD
        self.name = "dabnet"

    def forward(self, x: Tensor) -> list[Tensor]:
        image2 = nn.functional.avg_pool2d(x, 3, stride=2, padding=1)  # input injection: 1/2, 1/4, 1/8
        image4 = nn.functional.avg_pool2d(image2, 3, stride=2, padding=1)
        image8 = nn.functional.avg_pool2d(image4, 3, stride=2, padding=1)
        level0 = self.act0(torch.cat([self.init_block(x), image2], dim=1))
        down1 = self.down1(level0)
        level1 = self.act1(torch.cat([self.block1(down1), down1, image4], dim=1))
        down2 = self.down2(level1)
        level2 = self.act2(torch.cat([self.block2(down2), down2, image8], dim=1))
        return [level0, level1, level2]

    def extra_repr(self) -> str:
        return f"channels={self.channels}, strides={self.strides}"


class DABNetHead(nn.Module):
    """1×1 classifier (no bias, as released) on the last level: ``{"logits": B×K×h8×w8, "feats": that level}``.

    Attributes: ``num_classes``, ``feature_index`` (last level), ``feat_channels``, ``context_channels``."""

    def __init__(self, in_channels: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.feature_index = len(in_channels) - 1
        self.feat_channels = self.context_channels = in_channels[-1]
        self.classifier = nn.Conv2d(in_channels[-1], num_classes, 1, bias=False)

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        feats = features[self.feature_index]
        return {"logits": self.classifier(feats), "feats": feats}


def dabnet(num_classes: int, *, criterion: nn.Module | None = None) -> SegmentationModel:
    """DABNet for ``num_classes`` classes as ``SegmentationModel(DABNetBackbone(), DABNetHead)`` (stride 8)."""
    backbone = DABNetBackbone()
    return SegmentationModel(backbone, DABNetHead(backbone.channels, num_classes), num_classes, criterion=criterion)
