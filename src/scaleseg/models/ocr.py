"""Object-Contextual Representations head (Yuan et al. 2020), as used by HMSA's HRNet-OCR.

Layout and module names follow NVIDIA/semantic-segmentation ``network/ocrnet.py::OCR_block`` and
``network/ocr_utils.py`` (MID_CHANNELS 512, KEY_CHANNELS 256, dropout 0.05, scale 1). Differences
from the reference: the class count is an argument (the reference reads the global cfg), and the
ReLUs are in-place.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from scaleseg.models.hrnet import HRNetV2
from scaleseg.models.segmentor import SegmentationModel

__all__ = ["SpatialGather", "ObjectAttention", "SpatialOCR", "OCRHead", "hrnet_ocr"]


def _bn_relu(ch: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(ch), nn.ReLU(inplace=True))


def _conv1x1_bn_relu(in_ch: int, out_ch: int) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, 1, bias=False), _bn_relu(out_ch)]


class SpatialGather(nn.Module):
    """Soft object regions: ``feats B×C×h×w``, ``logits B×K×h×w`` → region features ``B×C×K×1``.

    ``region[b, :, k] = Σ_p softmax_p(logits[b, k])·feats[b, :, p]`` (softmax over the h·w pixels).
    """

    def forward(self, feats: Tensor, logits: Tensor) -> Tensor:
        probs = torch.softmax(logits.flatten(2), dim=2)  # B×K×HW
        regions = probs @ feats.flatten(2).transpose(1, 2)  # B×K×C
        return regions.transpose(1, 2).unsqueeze(3)


class ObjectAttention(nn.Module):
    """Pixel-region attention: ``x B×C×h×w``, ``proxy B×C×K×1`` → context ``B×C×h×w``.

    ``query = f_pixel(x)``, ``key = f_object(proxy)``, ``value = f_down(proxy)`` (``key_channels``
    wide), ``sim = softmax_K(queryᵀ·key · key_channels^-0.5)``, ``context = f_up(sim·value)``.
    """

    def __init__(self, in_channels: int, key_channels: int) -> None:
        super().__init__()
        self.key_channels = key_channels
        self.f_pixel = nn.Sequential(*_conv1x1_bn_relu(in_channels, key_channels),
                                     *_conv1x1_bn_relu(key_channels, key_channels))
        self.f_object = nn.Sequential(*_conv1x1_bn_relu(in_channels, key_channels),
                                      *_conv1x1_bn_relu(key_channels, key_channels))
        self.f_down = nn.Sequential(*_conv1x1_bn_relu(in_channels, key_channels))
        self.f_up = nn.Sequential(*_conv1x1_bn_relu(key_channels, in_channels))

    def forward(self, x: Tensor, proxy: Tensor) -> Tensor:
        b, _, h, w = x.shape
        query = self.f_pixel(x).flatten(2).transpose(1, 2)  # B×HW×Ck
        key = self.f_object(proxy).flatten(2)  # B×Ck×K
        value = self.f_down(proxy).flatten(2).transpose(1, 2)  # B×K×Ck
        sim = torch.softmax((query @ key) * self.key_channels**-0.5, dim=-1)  # B×HW×K
        context = (sim @ value).transpose(1, 2).reshape(b, self.key_channels, h, w)
        return self.f_up(context)


class SpatialOCR(nn.Module):
    """Object context + fusion: ``cat([context, feats])`` → 1×1 (2C → ``out_channels``) + BN + ReLU
    + Dropout2d. ``feats B×C×h×w``, ``proxy B×C×K×1`` → ``B×out_channels×h×w``."""

    def __init__(self, in_channels: int, key_channels: int, out_channels: int, dropout: float = 0.05) -> None:
        super().__init__()
        self.object_context_block = ObjectAttention(in_channels, key_channels)
        self.conv_bn_dropout = nn.Sequential(
            nn.Conv2d(2 * in_channels, out_channels, 1, bias=False), _bn_relu(out_channels), nn.Dropout2d(dropout)
        )

    def forward(self, feats: Tensor, proxy: Tensor) -> Tensor:
        context = self.object_context_block(feats, proxy)
        return self.conv_bn_dropout(torch.cat([context, feats], dim=1))


class OCRHead(nn.Module):
    """OCR head on the last backbone level: features → ``{"logits", "aux", "feats"}`` at its stride.

    ``conv3x3_ocr``: 3×3 in → ``mid_channels`` + BN + ReLU; ``aux_head``: 1×1 in → in + BN + ReLU +
    1×1 → K (the soft object regions, also supervised as aux logits); :class:`SpatialGather`;
    :class:`SpatialOCR` with ``key_channels``; ``cls_head``: 1×1 ``mid_channels`` → K.
    ``feats`` is the ``B×mid_channels×h×w`` OCR representation, which HMSA's attention head reads.

    Follows the head protocol of ``scaleseg.models.heads``: ``context(features)`` is the last level
    unchanged, ``decode(context, features)`` does the rest; ``feature_index`` = last level.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        *,
        mid_channels: int = 512,
        key_channels: int = 256,
        dropout: float = 0.05,
    ) -> None:
        super().__init__()
        high = in_channels[-1]
        self.num_classes = num_classes
        self.feature_index = len(in_channels) - 1
        self.context_channels = high
        self.feat_channels = mid_channels
        self.conv3x3_ocr = nn.Sequential(nn.Conv2d(high, mid_channels, 3, padding=1), _bn_relu(mid_channels))
        self.ocr_gather_head = SpatialGather()
        self.ocr_distri_head = SpatialOCR(mid_channels, key_channels, mid_channels, dropout)
        self.cls_head = nn.Conv2d(mid_channels, num_classes, 1)
        self.aux_head = nn.Sequential(nn.Conv2d(high, high, 1), _bn_relu(high), nn.Conv2d(high, num_classes, 1))

    def context(self, features: list[Tensor]) -> Tensor:
        """The last backbone level (``B×in_channels[-1]×h×w``), unchanged."""
        return features[self.feature_index]

    def decode(self, context: Tensor, features: list[Tensor]) -> dict[str, Tensor]:
        """→ ``logits`` ``B×K×h×w``, ``aux`` ``B×K×h×w``, ``feats`` ``B×mid_channels×h×w``."""
        feats = self.conv3x3_ocr(context)
        aux = self.aux_head(context)
        regions = self.ocr_gather_head(feats, aux)
        ocr_feats = self.ocr_distri_head(feats, regions)
        return {"logits": self.cls_head(ocr_feats), "aux": aux, "feats": ocr_feats}

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        return self.decode(self.context(features), features)


def hrnet_ocr(
    num_classes: int,
    backbone: str = "hrnet_w48",
    *,
    pretrained: bool = False,
    pretrained_file: str | None = None,
    criterion: nn.Module | None = None,
    aux_weight: float = 0.4,
    mid_channels: int = 512,
    key_channels: int = 256,
    input_fit: str = "pad",
) -> SegmentationModel:
    """HRNetV2 + OCR segmentation model (HMSA's trunk; wrap it in ``HierarchicalAttention(model,
    mid_channels)`` for ``HRNet_Mscale``). The OCR head's own aux logits are weighted ``aux_weight``."""
    trunk = HRNetV2(backbone, pretrained=pretrained, pretrained_file=pretrained_file)
    head = OCRHead(trunk.channels, num_classes, mid_channels=mid_channels, key_channels=key_channels)
    return SegmentationModel(trunk, head, num_classes, criterion=criterion, aux_weight=aux_weight, input_fit=input_fit)
