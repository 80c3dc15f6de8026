"""BiSeNet V1 (Yu et al., ECCV 2018, "BiSeNet: Bilateral Segmentation Network for Real-time Semantic
Segmentation"), written from the paper, with the widths the paper leaves open taken from the authors'
release (``yu-changqian/TorchSeg``, ``model/bisenet/cityscapes.bisenet.R18``).

It plugs into the model contract as a backbone + head pair::

    model = bisenet(num_classes=19, context="resnet18")   # BiSeNet(BilateralBackbone, BiSeNetHead)

* :class:`BilateralBackbone` runs both paths on the image and returns three levels
  ``[spatial 1/8, context 1/16, context 1/32]`` (``strides`` = [8, 16, 32]):
  the **spatial path** (three stride-2 conv-BN-ReLU layers → 1/8) and the **context path**, the last
  two levels of any timm trunk through :class:`~scaleseg.models.backbone.Backbone` (ResNet-18 in the
  paper; undilated, so ``output_stride`` must be 32).
* :class:`BiSeNetHead`: the global-average-pooling tail on the 1/32 level, an **attention refinement
  module** (ARM) on the 1/32 and on the 1/16 level, the **feature fusion module** (FFM) of spatial and
  context features at 1/8, and the classifier → logits at 1/8 (``feature_index`` 0). In training mode it
  also returns the two **auxiliary heads**' logits on the context path outputs: ``aux`` (the 1/8 context
  output, the one the FFM fuses) and ``aux16`` (the 1/16 context output).
* :class:`BiSeNet` (a :class:`~scaleseg.models.segmentor.SegmentationModel`) upsamples all logits to the
  input and returns the loss terms ``{"ce", "aux", "aux16"}``: the paper's joint loss
  ``L = l_p + α·Σ_i l_i`` (its "Loss function" paragraph; all softmax cross-entropy) with
  ``α = aux_weight``. The paper uses α = 1, and so does the release
  (``loss = main_loss + aux_loss0 + aux_loss1``); configs set ``model.aux_weight: 1.0``.

Published size and cost, and what they mean (tests in ``tests/test_bisenet.py`` pin them):

* The paper's baseline-analysis table (640×360 input) lists BiSeNet-Res18 with "10.8G FLOPS" and
  "49.0M parameters", BiSeNet-Xception39 with "5.8M". The parameter column is the float32 **model size
  in MiB**, not a count: the release's Res18 network has 12.89 M parameters without the aux heads
  = 49.19 MiB, and users count 1.54 M parameters (= 5.9 MiB) for the Xception39 model
  (yu-changqian/TorchSeg issue #30, where this reading was first suggested).
* This implementation: 12.92 M inference parameters (49.3 MiB) for 19 classes on timm ``resnet18``,
  11.68 G multiply-adds at 640×360 (``torch.utils.flop_counter``, convolutions only); the release's
  network counted the same way has 11.58 G. The paper's 10.8 G is 6.7 % below the release's count and
  7.5 % below ours (the counter the paper used is not known).

Deliberate differences from the release (the paper does not fix these):

* the spatial path is the paper's three layers (7×7/2 → 64, 3×3/2 → 64, 3×3/2 → 128); the release
  adds a fourth, 1×1 layer after a 64-wide third layer to reach the same 128 channels;
* bilinear resizing uses ``align_corners=False`` (project convention; the release uses ``True``);
* the BatchNorm after the 1×1 convs on globally pooled vectors (pooling tail, ARM attention) runs on the
  broadcast map, as in :class:`~scaleseg.models.heads.ASPP`: identical normalisation, and batch size 1
  trains;
* resizes target the next level's size rather than a fixed ×2, so any input size works.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from scaleseg.errors import ConfigError
from scaleseg.models.backbone import Backbone
from scaleseg.models.contract import resize
from scaleseg.models.heads import ConvBNReLU
from scaleseg.models.segmentor import SegmentationModel

__all__ = [
    "AttentionRefinement",
    "BiSeNet",
    "BiSeNetHead",
    "BilateralBackbone",
    "FeatureFusion",
    "SpatialPath",
    "bisenet",
]

class SpatialPath(nn.Module):
    """Three conv (stride 2) → BN → ReLU layers: ``B×3×H×W → B×channels[-1]×H/8×W/8``.

    Kernels 7, 3, 3 (the first as in the release's spatial path and the ResNet stem)."""

    def __init__(self, in_ch: int = 3, channels: Sequence[int] = (64, 64, 128), kernels: Sequence[int] = (7, 3, 3)) -> None:
        super().__init__()
        if len(channels) != 3 or len(kernels) != 3:
            raise ConfigError(f"SpatialPath: channels={list(channels)}, kernels={list(kernels)}; expected three of each")
        widths = [in_ch, *channels]
        self.layers = nn.Sequential(*(
            nn.Sequential(
                nn.Conv2d(a, b, k, stride=2, padding=k // 2, bias=False), nn.BatchNorm2d(b), nn.ReLU(inplace=True)
            )
            for a, b, k in zip(widths, widths[1:], kernels)
        ))
        self.out_channels = widths[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class BilateralBackbone(nn.Module):
    """Spatial path + context path: ``B×3×H×W`` → ``[B×C_s×H/8×W/8, B×C16×H/16×W/16, B×C32×H/32×W/32]``.

    ``context`` is a :class:`Backbone` at output stride 32 (its levels at reductions 16 and 32 are used;
    the last level of each). Attributes as a backbone: ``channels``, ``strides`` ([8, 16, 32]),
    ``mean``/``std`` (the context trunk's pretrained normalisation), ``name``.
    """

    def __init__(self, context: Backbone, spatial_channels: Sequence[int] = (64, 64, 128)) -> None:
        super().__init__()
        strides = list(context.strides)
        if 16 not in strides or 32 not in strides:
            raise ConfigError(
                f"BiSeNet context path '{context.name}' has feature strides {strides}; it needs levels at 16 and 32 "
                "(an undilated trunk: set model.output_stride=32)"
            )
        self.level16 = len(strides) - 1 - strides[::-1].index(16)
        self.level32 = len(strides) - 1 - strides[::-1].index(32)
        self.spatial = SpatialPath(3, spatial_channels)
        self.context = context
        self.channels: list[int] = [self.spatial.out_channels, context.channels[self.level16], context.channels[self.level32]]
        self.strides: list[int] = [8, 16, 32]
        self.mean: tuple[float, ...] = tuple(context.mean)
        self.std: tuple[float, ...] = tuple(context.std)
        self.name = f"bisenet[{context.name}]"

    def forward(self, x: Tensor) -> list[Tensor]:
        levels = self.context(x)
        return [self.spatial(x), levels[self.level16], levels[self.level32]]

    def extra_repr(self) -> str:
        return f"channels={self.channels}, strides={self.strides}"


class _PooledConvBN(nn.Module):
    """Global average pool → 1×1 conv (no bias) → BN (on the broadcast map) → ``act``: ``B×in×h×w → B×out×h×w``.

    The output is constant over the map (a broadcast of the pooled vector); see the module docstring
    for why BN runs after broadcasting."""

    def __init__(self, in_ch: int, out_ch: int, act: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.conv(x.mean(dim=(2, 3), keepdim=True))
        return self.act(self.bn(pooled.expand(-1, -1, x.shape[2], x.shape[3])))


class AttentionRefinement(nn.Module):
    """ARM: ``B×in×h×w → B×out×h×w``; 3×3 conv-BN-ReLU to ``out`` (release), then channel attention
    ``x · σ(BN(conv1×1(GAP(x))))`` (paper Fig. 2b)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_ch, out_ch, 3)
        self.attention = _PooledConvBN(out_ch, out_ch, nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        return x * self.attention(x)


class FeatureFusion(nn.Module):
    """FFM (paper Fig. 2c): ``concat(spatial, context)`` → 1×1 conv-BN-ReLU → ``u``; ``u + u·w`` with
    ``w = σ(conv1×1(ReLU(conv1×1(GAP(u)))))``. ``B×(C_s+C_c)×h×w → B×out×h×w``."""

    def __init__(self, in_ch: int, out_ch: int, reduction: int = 1) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_ch, out_ch, 1)
        mid = out_ch // reduction
        self.attention = nn.Sequential(
            nn.Conv2d(out_ch, mid, 1, bias=False), nn.ReLU(inplace=True), nn.Conv2d(mid, out_ch, 1, bias=False), nn.Sigmoid()
        )

    def forward(self, spatial: Tensor, context: Tensor) -> Tensor:
        u = self.conv(torch.cat([spatial, context], dim=1))
        return u + u * self.attention(u.mean(dim=(2, 3), keepdim=True))


class _ClassifierHead(nn.Sequential):
    """3×3 conv-BN-ReLU → 1×1 conv (with bias) to K: the release's ``BiSeNetHead`` (64 wide for the
    main output, 256 for the aux outputs)."""

    def __init__(self, in_ch: int, mid: int, num_classes: int) -> None:
        super().__init__(ConvBNReLU(in_ch, mid, 3), nn.Conv2d(mid, num_classes, 1))


class BiSeNetHead(nn.Module):
    """Pooling tail, ARMs, FFM and classifiers on ``[spatial 1/8, context 1/16, context 1/32]``.

    Returns ``{"logits": B×K×h8×w8, "feats": B×fuse_channels×h8×w8 (the FFM output)}`` and in training
    mode also ``aux`` (``B×K×h8×w8``, on the 1/8 context output) and ``aux16`` (``B×K×h16×w16``).
    Attributes: ``num_classes``, ``feature_index`` = 0 (logits at the spatial level's stride 8),
    ``feat_channels`` = ``fuse_channels``, ``context_channels`` = ``channels`` (context path width).

    Context path: ``g = tail(f32)``; ``c16 = refine32(Up(ARM32(f32) + g))`` at 1/16;
    ``c8 = refine16(Up(ARM16(f16) + c16))`` at 1/8; ``feats = FFM(spatial, c8)``.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        *,
        channels: int = 128,
        fuse_channels: int = 256,
        head_channels: int = 64,
        aux_channels: int = 256,
    ) -> None:
        super().__init__()
        if len(in_channels) != 3:
            raise ConfigError(f"BiSeNetHead: in_channels={list(in_channels)}; expected [spatial, context16, context32]")
        c_spatial, c16, c32 = in_channels
        self.num_classes = num_classes
        self.feature_index = 0
        self.context_channels = channels
        self.feat_channels = fuse_channels
        self.tail = _PooledConvBN(c32, channels, nn.ReLU(inplace=True))
        self.arm32 = AttentionRefinement(c32, channels)
        self.arm16 = AttentionRefinement(c16, channels)
        self.refine32 = ConvBNReLU(channels, channels, 3)
        self.refine16 = ConvBNReLU(channels, channels, 3)
        self.ffm = FeatureFusion(c_spatial + channels, fuse_channels)
        self.classifier = _ClassifierHead(fuse_channels, head_channels, num_classes)
        self.aux_head = _ClassifierHead(channels, aux_channels, num_classes)
        self.aux16_head = _ClassifierHead(channels, aux_channels, num_classes)

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        spatial, f16, f32 = features
        c16 = self.refine32(resize(self.arm32(f32) + self.tail(f32), f16.shape[2:]))
        c8 = self.refine16(resize(self.arm16(f16) + c16, spatial.shape[2:]))
        feats = self.ffm(spatial, c8)
        out = {"logits": self.classifier(feats), "feats": feats}
        if self.training:
            out["aux"] = self.aux_head(c8)
            out["aux16"] = self.aux16_head(c16)
        return out


class BiSeNet(SegmentationModel):
    """BiSeNet as a :class:`SegmentationModel` with two auxiliary outputs.

    ``forward_features(x)`` → ``logits`` (``B×K×H×W``), ``feats`` (FFM output at 1/8) and, in training
    mode, ``aux`` / ``aux16`` (``B×K×H×W``). ``supervision_losses`` (the contract's, as for any
    head that makes aux logits) → ``{"ce", "aux", "aux16"}`` with both aux terms weighted by ``aux_weight``
    (the paper's α = 1), so HMSA, MCIBI and DSRL wrap it like any other base. ``forward(x)`` never computes the aux heads.
    """

    def __init__(
        self,
        backbone: BilateralBackbone,
        head: BiSeNetHead,
        num_classes: int,
        *,
        criterion: nn.Module | None = None,
        aux_weight: float = 1.0,
    ) -> None:
        super().__init__(backbone, head, num_classes, criterion=criterion, aux_weight=aux_weight)


def bisenet(
    num_classes: int,
    context: str = "resnet18",
    *,
    output_stride: int = 32,
    pretrained: bool = False,
    pretrained_file: str | None = None,
    criterion: nn.Module | None = None,
    aux_weight: float = 1.0,
    aux_channels: int = 256,
) -> BiSeNet:
    """BiSeNet V1 on the timm trunk ``context`` (ResNet-18 in the paper) for ``num_classes`` classes.

    ``output_stride`` must be 32 (ConfigError otherwise): the context path is the undilated trunk."""
    trunk = Backbone(context, output_stride=output_stride, pretrained=pretrained, pretrained_file=pretrained_file)
    backbone = BilateralBackbone(trunk)
    head = BiSeNetHead(backbone.channels, num_classes, aux_channels=aux_channels)
    return BiSeNet(backbone, head, num_classes, criterion=criterion, aux_weight=aux_weight)
