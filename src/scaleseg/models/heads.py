"""Segmentation heads and their building blocks (ASPP, PPM).

Every head maps the backbone's feature list to ``{"logits": B×K×h×w, "feats": B×C×h×w}`` at
its own stride, in two steps so that a context module (e.g. the MCIBI memory) can sit between
them::

    ctx = head.context(features)          # B×context_channels×h'×w'
    out = head.decode(ctx, features)      # {"logits", "feats"}; forward = decode(context(f), f)

Attributes on every head: ``context_channels`` (channels of ``context()``), ``feat_channels``
(channels of ``feats``, the tensor fed to the classifier), ``num_classes`` and ``feature_index``:
the index of the backbone level whose resolution the logits have, so the head's stride is
``backbone.strides[head.feature_index]``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scaleseg.errors import ConfigError

__all__ = [
    "ASPP",
    "AuxFCNHead",
    "ConvBNReLU",
    "DeepLabV3Head",
    "DeepLabV3PlusHead",
    "FCNHead",
    "PPM",
    "PSPHead",
    "SeparableConvBNReLU",
    "aspp_dilations",
]


class ConvBNReLU(nn.Sequential):
    """Conv (no bias) → BatchNorm → ReLU with "same" padding: ``B×in×H×W → B×out×H×W``."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, *, dilation: int = 1) -> None:
        padding = dilation * (kernel_size // 2)
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size, padding=padding, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class SeparableConvBNReLU(nn.Sequential):
    """Atrous depthwise-separable conv: ``B×in×H×W → B×out×H×W`` with "same" padding.

    Depthwise ``kernel_size``×``kernel_size`` conv (dilated, no bias) → BN → ReLU → pointwise 1×1
    (no bias) → BN → ReLU: the DeepLabV3+ paper's "atrous separable convolution" as its TF
    reference builds it (``split_separable_conv2d``: BN and ReLU after both convolutions; mmseg's
    ``DepthwiseSeparableConvModule`` does the same). smp omits the inner BN + ReLU.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, *, dilation: int = 1) -> None:
        padding = dilation * (kernel_size // 2)
        super().__init__(
            nn.Conv2d(in_ch, in_ch, kernel_size, padding=padding, dilation=dilation, groups=in_ch, bias=False),
            nn.BatchNorm2d(in_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_ch, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


def _conv3x3(in_ch: int, out_ch: int, *, dilation: int = 1, separable: bool = False) -> nn.Sequential:
    """3×3 ConvBNReLU, or its depthwise-separable form (``SeparableConvBNReLU``)."""
    block = SeparableConvBNReLU if separable else ConvBNReLU
    return block(in_ch, out_ch, 3, dilation=dilation)


def aspp_dilations(output_stride: int, base: Sequence[int] = (6, 12, 18)) -> tuple[int, ...]:
    """ASPP rates for a backbone ``output_stride``: OS16 → (6, 12, 18), OS8 → (12, 24, 36).

    OS32 gives (3, 6, 9) (same receptive field in pixels; the references only define OS8/16).
    """
    if output_stride not in (8, 16, 32):
        raise ConfigError(f"output_stride={output_stride} is invalid for ASPP; expected 8, 16 or 32")
    return tuple(d * 16 // output_stride for d in base)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: ``B×in_ch×h×w → B×out_ch×h×w``.

    Branches: 1×1, three 3×3 atrous convs (``dilations``) and image pooling, each ``out_ch``
    wide with BN + ReLU; concatenated, projected by a 1×1 conv + BN + ReLU, then Dropout(0.1).
    The projection plays the role of the NVIDIA reference's ``bot_aspp``. ``separable=True`` makes
    the three atrous branches depthwise-separable (:class:`SeparableConvBNReLU`, DeepLabV3+).

    Deliberate difference: the pooling branch's BatchNorm runs on the broadcast map instead of the
    ``B×C×1×1`` pooled tensor. The normalising batch mean and variance are identical (every pixel
    holds the same value; only the unbiased running-variance update differs by n/(n-1)), and
    batch size 1 in training no longer raises "Expected more than 1 value per channel".
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int = 256,
        dilations: Sequence[int] = (6, 12, 18),
        *,
        dropout: float = 0.1,
        separable: bool = False,
    ) -> None:
        super().__init__()
        self.dilations = tuple(dilations)
        self.separable = separable
        self.branches = nn.ModuleList(
            [ConvBNReLU(in_ch, out_ch, 1)]
            + [_conv3x3(in_ch, out_ch, dilation=d, separable=separable) for d in self.dilations]
        )
        self.pool_conv = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.pool_bn = nn.BatchNorm2d(out_ch)
        n = len(self.branches) + 1
        self.project = nn.Sequential(ConvBNReLU(n * out_ch, out_ch, 1), nn.Dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        outs = [branch(x) for branch in self.branches]
        pooled = self.pool_conv(x.mean(dim=(2, 3), keepdim=True))
        outs.append(F.relu(self.pool_bn(pooled.expand(-1, -1, *x.shape[2:]))))
        return self.project(torch.cat(outs, dim=1))


class PPM(nn.Module):
    """PSPNet pyramid pooling + 3×3 bottleneck: ``B×in_ch×h×w → B×out_ch×h×w``.

    For each bin size b: adaptive average pool to b×b → 1×1 conv (``out_ch``) + BN + ReLU →
    bilinear upsample (``align_corners=False``, mmseg); concat with the input → 3×3 ConvBNReLU.
    """

    def __init__(self, in_ch: int, out_ch: int, bins: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.bins = tuple(bins)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), ConvBNReLU(in_ch, out_ch, 1)) for b in self.bins
        )
        self.bottleneck = ConvBNReLU(in_ch + len(self.bins) * out_ch, out_ch, 3)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[2:]
        pooled = [_resize(stage(x), size) for stage in self.stages]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class _Head(nn.Module):
    """Shared ``forward = decode(context(features), features)``."""

    context_channels: int
    feat_channels: int
    feature_index: int
    num_classes: int

    def context(self, features: list[Tensor]) -> Tensor:
        raise NotImplementedError

    def decode(self, context: Tensor, features: list[Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        """Backbone feature list → ``{"logits": B×K×h×w, "feats": B×feat_channels×h×w}``."""
        return self.decode(self.context(features), features)


class DeepLabV3PlusHead(_Head):
    """DeepLabV3+ decoder (the NVIDIA HMSA ``DeepV3Plus`` head), logits at the low-level stride (4).

    ``context``: ASPP (rates scaled by ``output_stride``) on the last level → ``aspp_channels``.
    ``decode``: upsample to the level ``low_level_index``, concat with its 1×1 projection to
    ``low_level_channels`` (256 + 48 = 304 channels = ``feats``), then ``decoder_convs`` × (3×3 →
    ``decoder_channels``, BN, ReLU) (default 2 × 256, as the paper's Table 2 found best and the
    NVIDIA reference uses), 1×1 → K (no bias, as in the reference).

    ``separable=True``: the DeepLabV3+ paper's atrous depthwise-separable convolutions in the ASPP
    branches and the decoder's 3×3 convs (:class:`SeparableConvBNReLU`); on ResNet-18 at OS16 this
    cuts the head's FLOPs 7× (50.7 → 6.8 GFLOPs at 512×512, where the backbone takes 31.8). The
    full-conv head is the default because the HMSA reference recipe uses it.

    Deliberate difference: the low-level 1×1 projection has BN + ReLU (original DeepLabV3+);
    NVIDIA's ``bot_fine`` is a bare conv.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        *,
        output_stride: int,
        aspp_channels: int = 256,
        low_level_channels: int = 48,
        low_level_index: int = 0,
        decoder_channels: int = 256,
        decoder_convs: int = 2,
        separable: bool = False,
    ) -> None:
        super().__init__()
        if decoder_convs < 1 or decoder_channels < 1:
            raise ConfigError(
                f"decoder_convs={decoder_convs}, decoder_channels={decoder_channels}: expected both >= 1"
            )
        self.num_classes = num_classes
        self.separable = separable
        self.feature_index = _level(in_channels, low_level_index, "low_level_index")
        self.aspp = ASPP(in_channels[-1], aspp_channels, aspp_dilations(output_stride), separable=separable)
        self.low_level = ConvBNReLU(in_channels[low_level_index], low_level_channels, 1)
        self.context_channels = aspp_channels
        self.feat_channels = aspp_channels + low_level_channels
        widths = [self.feat_channels] + [decoder_channels] * decoder_convs
        self.final = nn.Sequential(
            *(_conv3x3(a, b, separable=separable) for a, b in zip(widths, widths[1:])),
            nn.Conv2d(decoder_channels, num_classes, 1, bias=False),
        )

    def context(self, features: list[Tensor]) -> Tensor:
        """ASPP on the last level: ``B×aspp_channels×h32×w32`` (at the backbone's output stride)."""
        return self.aspp(features[-1])

    def decode(self, context: Tensor, features: list[Tensor]) -> dict[str, Tensor]:
        low = features[self.feature_index]
        feats = torch.cat([self.low_level(low), _resize(context, low.shape[2:])], dim=1)
        return {"logits": self.final(feats), "feats": feats}


class DeepLabV3Head(_Head):
    """DeepLabV3 (torchvision ``DeepLabHead`` layout): ASPP → 3×3 ConvBNReLU → 1×1 classifier.

    Logits and ``feats`` (the 3×3 output) are at the last level's stride. ``separable=True`` makes
    the ASPP's atrous branches and the 3×3 bottleneck depthwise-separable.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        *,
        output_stride: int,
        aspp_channels: int = 256,
        separable: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.feature_index = len(in_channels) - 1
        self.aspp = ASPP(in_channels[-1], aspp_channels, aspp_dilations(output_stride), separable=separable)
        self.bottleneck = _conv3x3(aspp_channels, aspp_channels, separable=separable)
        self.classifier = nn.Conv2d(aspp_channels, num_classes, 1)
        self.context_channels = self.feat_channels = aspp_channels

    def context(self, features: list[Tensor]) -> Tensor:
        return self.aspp(features[-1])

    def decode(self, context: Tensor, features: list[Tensor]) -> dict[str, Tensor]:
        feats = self.bottleneck(context)
        return {"logits": self.classifier(feats), "feats": feats}


class FCNHead(_Head):
    """FCN head (mmseg ``FCNHead`` with ``concat_input=False``): ``num_convs`` × 3×3 ConvBNReLU →
    Dropout2d → 1×1 classifier on the level ``in_index``. ``context`` is that level unchanged."""

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        *,
        channels: int = 512,
        num_convs: int = 2,
        dropout: float = 0.1,
        in_index: int = -1,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.feature_index = _level(in_channels, in_index, "in_index")
        self.context_channels = in_channels[in_index]
        self.feat_channels = channels
        widths = [self.context_channels] + [channels] * num_convs
        self.convs = nn.Sequential(*(ConvBNReLU(a, b, 3) for a, b in zip(widths, widths[1:])))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(widths[-1], num_classes, 1)
        if num_convs == 0:
            self.feat_channels = self.context_channels

    def context(self, features: list[Tensor]) -> Tensor:
        return features[self.feature_index]

    def decode(self, context: Tensor, features: list[Tensor]) -> dict[str, Tensor]:
        feats = self.convs(context)
        return {"logits": self.classifier(self.dropout(feats)), "feats": feats}


class PSPHead(_Head):
    """PSPNet head: PPM (pyramid pooling + 3×3 bottleneck to ``channels``) → Dropout2d → 1×1.

    ``context`` is the PPM output, which is also ``feats``; logits at the last level's stride.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        *,
        channels: int = 512,
        bins: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.feature_index = len(in_channels) - 1
        self.ppm = PPM(in_channels[-1], channels, bins)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.context_channels = self.feat_channels = channels

    def context(self, features: list[Tensor]) -> Tensor:
        return self.ppm(features[-1])

    def decode(self, context: Tensor, features: list[Tensor]) -> dict[str, Tensor]:
        return {"logits": self.classifier(self.dropout(context)), "feats": context}


class AuxFCNHead(nn.Module):
    """Auxiliary FCN head: ``B×in_ch×h×w`` feature map → ``B×K×h×w`` logits.

    3×3 ConvBNReLU → Dropout2d(0.1) → 1×1 (mmseg auxiliary head, ``num_convs=1``).
    ``SegmentationModel`` feeds it ``features[aux_index]`` (default the second-to-last level) and
    weights its loss by ``aux_weight`` (0.4).
    """

    def __init__(self, in_ch: int, num_classes: int, channels: int = 256, *, dropout: float = 0.1) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.conv = ConvBNReLU(in_ch, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.conv(x)))


def _resize(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize with ``align_corners=False`` (no-op when the size already matches)."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _level(in_channels: Sequence[int], index: int, key: str) -> int:
    """Normalise a (possibly negative) feature-level index; ConfigError when out of range."""
    n = len(in_channels)
    if not -n <= index < n:
        raise ConfigError(f"{key}={index} is out of range for a backbone with {n} feature levels")
    return index % n
