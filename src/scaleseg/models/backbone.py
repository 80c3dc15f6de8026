"""Backbone: a thin wrapper over ``timm.create_model(..., features_only=True)``.

Any timm model that supports ``features_only`` can be used. Channels, strides and the
normalisation constants come from timm (``feature_info`` and the pretrained config), so no
per-family tables are needed.
"""
from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import timm
from torch import Tensor, nn

from scaleseg.errors import CheckpointError, ConfigError
from scaleseg.models.same_padding import make_exportable

__all__ = ["Backbone"]

_VALID_OUTPUT_STRIDES = (8, 16, 32)
_DILATING_FAMILIES = (
    "ResNet/ResNeXt, RegNet, MobileNet, EfficientNet, aligned Xception, ConvNeXt, ..."
)
_MISSING_KEYS = re.compile(r"Missing keys \((.*)\) discovered")


class Backbone(nn.Module):
    """Multi-level feature extractor over any timm model.

    Args:
        name: timm model name, optionally with a pretrained tag (``"resnet50.a1_in1k"``).
        out_indices: timm feature levels to return. Default: every level with reduction ≥ 4
            (ResNet: ``(1, 2, 3, 4)``).
        output_stride: 8, 16 or 32; 8/16 dilate the last stages (families that support it).
        pretrained: load timm's pretrained weights (downloads unless cached).
        pretrained_file: local ``.safetensors``/``.pth`` weights; implies ``pretrained=True``.
        in_chans: number of input channels.

    Attributes:
        channels: channels per returned level; strides: reduction per returned level (reflects
        ``output_stride``); mean, std: normalisation constants of the pretrained config; name.

    ``hrnet_*`` models are built with ``feature_location=''`` so the levels are the HRNetV2 branches
    (``hrnet_w18`` → channels [18, 36, 72, 144] at strides [4, 8, 16, 32]) rather than timm's
    default classification "incre" features.
    """

    def __init__(
        self,
        name: str,
        *,
        out_indices: Sequence[int] | None = None,
        output_stride: int = 32,
        pretrained: bool = False,
        pretrained_file: str | None = None,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        _check_name(name)
        if output_stride not in _VALID_OUTPUT_STRIDES:
            raise ConfigError(
                f"output_stride={output_stride} for backbone '{name}' is invalid; expected 8, 16 or 32"
            )
        kwargs: dict = {"features_only": True, "in_chans": in_chans}
        if _is_hrnet(name):
            kwargs["feature_location"] = ""
            if out_indices is None:
                out_indices = (1, 2, 3, 4)
        if out_indices is not None:
            kwargs["out_indices"] = tuple(out_indices)
        if output_stride != 32:
            kwargs["output_stride"] = output_stride
        if pretrained_file is not None:
            if not Path(pretrained_file).is_file():
                raise ConfigError(
                    f"pretrained_file '{pretrained_file}' for backbone '{name}' does not exist; "
                    "expected a .safetensors or .pth file"
                )
            pretrained = True
            kwargs["pretrained_cfg_overlay"] = {"file": str(pretrained_file)}

        # timm's SAME padding computes math.ceil on sizes, which torch.export cannot save
        self.model = make_exportable(_create(name, pretrained, pretrained_file, output_stride, kwargs))
        info = self.model.feature_info
        channels, strides = list(info.channels()), list(info.reduction())
        # Without explicit out_indices keep only levels at stride >= 4; the dropped stride-1/2
        # levels are computed on the way anyway, so filtering the outputs costs nothing.
        if out_indices is None:
            self._keep = [i for i, s in enumerate(strides) if s >= 4] or list(range(len(strides)))
        else:
            self._keep = list(range(len(strides)))
        self.channels: list[int] = [channels[i] for i in self._keep]
        self.strides: list[int] = [strides[i] for i in self._keep]
        self.out_indices: tuple[int, ...] = tuple(info.get_dicts()[i]["index"] for i in self._keep)
        data_cfg = timm.data.resolve_data_config({}, model=self.model)
        self.mean: tuple[float, ...] = tuple(float(v) for v in data_cfg["mean"])
        self.std: tuple[float, ...] = tuple(float(v) for v in data_cfg["std"])
        self.name = name
        self._nhwc = getattr(self.model, "output_fmt", "NCHW") == "NHWC"

    def forward(self, x: Tensor) -> list[Tensor]:
        """``B×in_chans×H×W`` image → list of ``B×channels[i]×(H/strides[i])×(W/strides[i])``."""
        feats = self.model(x)
        feats = [feats[i] for i in self._keep]
        if self._nhwc:
            feats = [f.permute(0, 3, 1, 2).contiguous() for f in feats]
        return feats

    def extra_repr(self) -> str:
        return f"name={self.name!r}, channels={self.channels}, strides={self.strides}"


def _is_hrnet(name: str) -> bool:
    return name.split(".")[0].startswith("hrnet_")


def _check_name(name: str) -> None:
    if timm.is_model(name):
        return
    arch = name.split(".")[0]
    close = difflib.get_close_matches(arch, timm.list_models(), n=5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
    raise ConfigError(f"unknown backbone '{name}'{hint}")


def _create(
    name: str, pretrained: bool, pretrained_file: str | None, output_stride: int, kwargs: dict
) -> nn.Module:
    """``timm.create_model`` with timm's errors turned into single-line scaleseg errors."""
    try:
        with _capture_missing_keys() as missing:
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except (AssertionError, TypeError) as err:
        if output_stride == 32:
            raise
        raise ConfigError(
            f"backbone '{name}' does not support output_stride={output_stride}; supported: 32 "
            f"(families that can dilate: {_DILATING_FAMILIES})"
        ) from err
    except Exception as err:
        if pretrained_file is not None:
            msg = " ".join(str(err).split())[:300]
            raise CheckpointError(
                f"cannot load pretrained_file '{pretrained_file}' into backbone '{name}': {msg}"
            ) from err
        if pretrained and isinstance(err, OSError):
            raise ConfigError(
                f"cannot fetch pretrained weights for backbone '{name}' (offline?); download them "
                "and pass pretrained_file=<path to .safetensors/.pth>"
            ) from err
        raise
    if pretrained_file is not None:
        _check_all_loaded(model, missing, name, pretrained_file)
    return model


@contextmanager
def _capture_missing_keys() -> Iterator[list[str]]:
    """Collect the keys timm reports as missing when it loads pretrained weights.

    timm loads ``features_only`` weights non-strictly and only *logs* the missing keys, so a
    checkpoint with foreign key names (e.g. a ``backbone.`` prefix) would silently give a random
    backbone. We read timm's INFO record to catch that, without letting records below the
    logger's configured level through. If timm's wording ever changes, nothing is captured and
    the check is skipped (it fails open).
    """
    logger = logging.getLogger("timm.models._builder")
    capture = _MissingKeysFilter(logger.getEffectiveLevel())
    old_level = logger.level
    logger.addFilter(capture)
    logger.setLevel(min(logging.INFO, logger.getEffectiveLevel()))
    try:
        yield capture.missing
    finally:
        logger.removeFilter(capture)
        logger.setLevel(old_level)


class _MissingKeysFilter(logging.Filter):
    def __init__(self, pass_level: int) -> None:
        super().__init__()
        self.pass_level = pass_level
        self.missing: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        match = _MISSING_KEYS.search(record.getMessage())
        if match:
            self.missing.extend(k.strip() for k in match.group(1).split(","))
        return record.levelno >= self.pass_level


def _check_all_loaded(model: nn.Module, missing: list[str], name: str, file: str) -> None:
    """Raise if timm reported any weight of the feature extractor as missing from ``file``."""

    def norm(key: str) -> str:  # FeatureListNet may flatten "stages.0" to "stages_0"
        return key.replace("_", ".")

    used = {norm(k) for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    lost = [k for k in missing if norm(k) in used]
    if lost:
        raise CheckpointError(
            f"pretrained_file '{file}' lacks {len(lost)} of {len(used)} weights of backbone '{name}' "
            f"(e.g. {', '.join(lost[:3])}); expected timm key names for '{name}'"
        )
