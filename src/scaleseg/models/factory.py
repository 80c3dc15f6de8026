"""``create_model(config)``: plain constructors composed from the config, backbone → head → wrappers.

The only name tables in scaleseg are here (architecture and loss names used by configs).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..config import Config, LossConfig
from ..errors import ConfigError
from ..losses.ce import CrossEntropyLoss
from .backbone import Backbone
from .heads import AuxFCNHead, DeepLabV3Head, DeepLabV3PlusHead, FCNHead, PSPHead
from .segmentor import SegmentationModel


def build_criterion(loss: LossConfig, num_classes: int) -> nn.Module:
    """The main segmentation loss named by ``loss.name``."""
    weights = loss.class_weights
    if weights is not None and len(weights) != num_classes:
        raise ConfigError(f"config key 'loss.class_weights' has {len(weights)} values; expected {num_classes} (one per class)")
    if loss.name == "ce":
        return CrossEntropyLoss(class_weights=weights)
    if loss.name == "ohem":
        return CrossEntropyLoss(class_weights=weights, ohem_thresh=loss.ohem_thresh, ohem_min_kept=loss.ohem_min_kept)
    if loss.name == "rmi":
        from ..losses.rmi import RMICriterion

        return RMICriterion(num_classes)
    raise ConfigError(f"config key 'loss.name' = {loss.name!r}: expected 'ce', 'ohem' or 'rmi'")


def _head(arch: str, channels: list[int], num_classes: int, cfg: Config) -> nn.Module:
    m = cfg.model
    if arch == "deeplabv3plus":
        return DeepLabV3PlusHead(channels, num_classes, output_stride=m.output_stride, aspp_channels=m.head_channels)
    if arch == "deeplabv3":
        return DeepLabV3Head(channels, num_classes, output_stride=m.output_stride, aspp_channels=m.head_channels)
    if arch == "fcn":
        return FCNHead(channels, num_classes, channels=m.head_channels)
    if arch == "pspnet":
        return PSPHead(channels, num_classes, channels=m.head_channels)
    raise ConfigError(f"config key 'model.arch' = {arch!r} has no plain head")


def build_backbone(cfg: Config) -> Backbone:
    m = cfg.model
    return Backbone(m.backbone, output_stride=m.output_stride, pretrained=m.pretrained, pretrained_file=m.pretrained_file)


def build_segmentation_model(cfg: Config, num_classes: int) -> nn.Module:
    """Backbone + head (+ aux head) + criterion, before any method wrapper."""
    m = cfg.model
    criterion = build_criterion(cfg.loss, num_classes)
    if m.arch == "espnetv2":
        from .espnetv2 import espnetv2_seg

        return espnetv2_seg(num_classes, s=m.width, criterion=criterion)
    backbone = build_backbone(cfg)
    aux = AuxFCNHead(backbone.channels[-2], num_classes, m.head_channels) if m.aux_head else None
    head = _head(m.arch, backbone.channels, num_classes, cfg)
    return SegmentationModel(backbone, head, num_classes, criterion=criterion, aux_head=aux, aux_weight=m.aux_weight)


def create_model(cfg: Config, num_classes: int) -> nn.Module:
    """The model the config describes, for ``num_classes`` classes."""
    model: Any = build_segmentation_model(cfg, num_classes)
    if cfg.model.dsrl.enabled:
        model = wrap_dsrl(model, cfg)
    return model


def wrap_dsrl(base: nn.Module, cfg: Config) -> nn.Module:
    """Dual super-resolution learning around a plain model: SSSR (or the bilinear baseline), and with
    ``dsrl.sisr`` the SISR branch and the FA loss (training-only)."""
    from .dsrl import DSRL

    d = cfg.model.dsrl
    return DSRL(
        base, lr_scale=d.lr_scale, upsample=d.upsample,
        sr_weight=d.sr_weight if d.sisr else 0.0, fa_weight=d.fa_weight if d.sisr else 0.0,
        fa_subsample=d.fa_subsample, fa_max_block_bytes=int(d.fa_max_block_mib * 2**20),
    )
