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

        return RMICriterion(num_classes, loss_weight_lambda=loss.rmi_lambda, lambda_way=loss.rmi_lambda_way,
                            aux_rmi=loss.ocr_aux_rmi)
    raise ConfigError(f"config key 'loss.name' = {loss.name!r}: expected 'ce', 'ohem' or 'rmi'")


def _head(arch: str, channels: list[int], num_classes: int, cfg: Config) -> nn.Module:
    m = cfg.model
    if arch == "deeplabv3plus":
        return DeepLabV3PlusHead(channels, num_classes, output_stride=m.output_stride, aspp_channels=m.head_channels,
                                 decoder_channels=m.decoder_channels, decoder_convs=m.decoder_convs,
                                 separable=m.separable)
    if arch == "deeplabv3":
        return DeepLabV3Head(channels, num_classes, output_stride=m.output_stride, aspp_channels=m.head_channels,
                             separable=m.separable)
    if arch == "fcn":
        return FCNHead(channels, num_classes, channels=m.head_channels)
    if arch == "pspnet":
        return PSPHead(channels, num_classes, channels=m.head_channels)
    raise ConfigError(f"config key 'model.arch' = {arch!r} has no plain head")


def build_backbone(cfg: Config) -> Backbone:
    m = cfg.model
    return Backbone(m.backbone, output_stride=m.output_stride, pretrained=m.pretrained, pretrained_file=m.pretrained_file)


DEFAULT_INFER_SCALES = (0.5, 1.0, 2.0)
"""Inference scales of a hierarchical model when ``eval.scales`` is not set (NVIDIA's evaluation)."""

MCIBI_HOSTS = {"deeplabv3plus": "deeplabv3plus", "deeplabv3": "deeplabv3", "pspnet": "pspnet", "fcn": "fcn",
               "hrnet_ocr": "ocr"}


def build_mcibi_model(cfg: Config, num_classes: int, criterion: nn.Module) -> nn.Module:
    """MCIBI: the dataset-level memory context inside the host head named by ``model.arch``."""
    from .mcibi import MCIBIModel

    m, mc = cfg.model, cfg.model.mcibi
    if m.arch not in MCIBI_HOSTS:
        raise ConfigError(f"model.mcibi.enabled needs model.arch in {sorted(MCIBI_HOSTS)}; got {m.arch!r}")
    if m.arch == "hrnet_ocr":
        from .hrnet import HRNetV2

        backbone: nn.Module = HRNetV2(m.backbone, pretrained=m.pretrained, pretrained_file=m.pretrained_file)
    else:
        backbone = build_backbone(cfg)
    return MCIBIModel(
        backbone, num_classes, host=MCIBI_HOSTS[m.arch], channels=mc.channels, criterion=criterion,
        aux_head=m.aux_head, aux_weight=m.aux_weight, memory_loss_weight=mc.memory_loss_weight,
        consistency_weight=mc.consistency_weight, consistency_start_epoch=mc.consistency_start_epoch,
        stride8_weight=mc.stride8_weight, momentum=mc.momentum, momentum_min_ratio=mc.momentum_min_ratio,
        memory_init=mc.init, full_resolution=mc.full_resolution, label_downsample=mc.label_downsample,
        aspp_project_kernel=mc.aspp_project_kernel, aspp_dropout=mc.aspp_dropout, input_fit=m.input_fit,
        decoder_channels=m.decoder_channels, decoder_convs=m.decoder_convs, separable=m.separable,
    )


def build_segmentation_model(cfg: Config, num_classes: int) -> nn.Module:
    """Backbone + head (+ aux head) + criterion, before any method wrapper."""
    m = cfg.model
    criterion = build_criterion(cfg.loss, num_classes)
    if m.mcibi.enabled:
        return build_mcibi_model(cfg, num_classes, criterion)
    if m.arch == "espnetv2":
        from .espnetv2 import espnetv2_seg

        if m.input_fit != "pad":
            raise ConfigError(f"config key 'model.input_fit' = {m.input_fit!r} is not supported by model.arch 'espnetv2'; use 'pad'")
        if m.pretrained_file is None:
            return espnetv2_seg(num_classes, s=m.width, criterion=criterion, proj_planes=m.espnetv2.proj_planes,
                                align_corners=m.espnetv2.align_corners)
        from .espnetv2_finetune import checkpoint_proj_planes, load_edgenets_pretrained, read_edgenets_state

        state = read_edgenets_state(m.pretrained_file)
        model = espnetv2_seg(num_classes, s=m.width, criterion=criterion,
                             proj_planes=checkpoint_proj_planes(state, m.pretrained_file),
                             align_corners=m.espnetv2.align_corners)
        load_edgenets_pretrained(model, state, m.pretrained_file)
        return model
    if m.arch == "hrnet_ocr":
        from .ocr import hrnet_ocr

        mid = m.head_channels * 2  # OCR mid channels 512 with the default head_channels 256
        return hrnet_ocr(num_classes, m.backbone, pretrained=m.pretrained, pretrained_file=m.pretrained_file,
                         criterion=criterion, aux_weight=m.aux_weight, mid_channels=mid, key_channels=mid // 2,
                         input_fit=m.input_fit)
    if m.arch == "bisenet":  # context path on model.backbone; two aux heads weighted by aux_weight (α)
        from .bisenet import bisenet

        return bisenet(num_classes, m.backbone, output_stride=m.output_stride, pretrained=m.pretrained,
                       pretrained_file=m.pretrained_file, criterion=criterion, aux_weight=m.aux_weight,
                       aux_channels=m.head_channels)
    if m.arch == "dabnet":
        from .dabnet import dabnet

        return dabnet(num_classes, criterion=criterion)
    backbone = build_backbone(cfg)
    aux = AuxFCNHead(backbone.channels[-2], num_classes, m.head_channels) if m.aux_head else None
    head = _head(m.arch, backbone.channels, num_classes, cfg)
    return SegmentationModel(backbone, head, num_classes, criterion=criterion, aux_head=aux, aux_weight=m.aux_weight,
                             input_fit=m.input_fit)


def create_model(cfg: Config, num_classes: int) -> nn.Module:
    """The model the config describes, for ``num_classes`` classes: the base (plain, ESPNetv2,
    HRNet-OCR or an MCIBI host), wrapped by DSRL (``model.dsrl.enabled``), then by hierarchical or
    explicit attention (``model.hmsa.mode``). Any combination composes: each wrapper hands its runs'
    outputs back to the model inside it for that model's losses and state updates."""
    model: Any = build_segmentation_model(cfg, num_classes)
    if cfg.model.dsrl.enabled:
        model = wrap_dsrl(model, cfg)
    if cfg.model.hmsa.mode != "none":
        model = wrap_multiscale(model, cfg)
    return model


def wrap_multiscale(base: nn.Module, cfg: Config) -> nn.Module:
    """Hierarchical multi-scale attention, or Chen et al.'s explicit attention, around ``base``.
    The attention head reads the base's ``feats`` (the tensor its classifier sees)."""
    from .hmsa import ExplicitAttention, HierarchicalAttention

    h, m = cfg.model.hmsa, cfg.model
    attn_in = getattr(base, "feat_channels", None)
    if attn_in is None:
        raise ConfigError(f"model.hmsa.mode={h.mode!r} needs a model whose head reports feat_channels ({m.arch} does not)")
    if h.mode == "hierarchical":
        infer = cfg.eval.scales if cfg.eval.scales and cfg.eval.scale_mode in ("auto", "hierarchical") else DEFAULT_INFER_SCALES
        return HierarchicalAttention(base, attn_in, train_scales=h.train_scales, infer_scales=infer,
                                     per_scale_weight=h.per_scale_weight, aux_weight=m.aux_weight,
                                     attn_bottleneck=h.attn_channels)
    return ExplicitAttention(base, attn_in, h.explicit_scales, per_scale_weight=h.per_scale_weight,
                             aux_weight=m.aux_weight, head_layout=h.explicit_head,
                             attn_bottleneck=h.explicit_channels)


def wrap_dsrl(base: nn.Module, cfg: Config) -> nn.Module:
    """Dual super-resolution learning around a base model (plain or an MCIBI host): SSSR (or the
    bilinear baseline), and with ``dsrl.sisr`` the SISR branch and the FA loss (training-only)."""
    from .dsrl import DSRL

    d = cfg.model.dsrl
    return DSRL(
        base, lr_scale=d.lr_scale, upsample=d.upsample,
        sr_weight=d.sr_weight if d.sisr else 0.0, fa_weight=d.fa_weight if d.sisr else 0.0,
        fa_subsample=d.fa_subsample, fa_max_block_bytes=int(d.fa_max_block_mib * 2**20),
    )
