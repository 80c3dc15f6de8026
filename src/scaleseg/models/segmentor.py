"""SegmentationModel: backbone + head (+ auxiliary head) + criterion."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scaleseg.errors import ConfigError, DataError
from scaleseg.losses.ce import CrossEntropyLoss
from scaleseg.models.backbone import Backbone
from scaleseg.models.contract import ContractModel, Grid, padded_size, supervise
from scaleseg.types import StepInfo

__all__ = ["INPUT_FITS", "SegmentationModel", "image_to_tensor", "predict_labels", "side_criterion"]

INPUT_FITS = ("pad", "stretch")


def side_criterion(criterion: nn.Module) -> nn.Module:
    """The criterion of side terms (aux heads, OCR regions, per-scale and MCIBI side logits): the BCE
    part only when the main criterion is RMI (``bce_only()``, NVIDIA's recipe), else ``criterion``."""
    bce_only = getattr(criterion, "bce_only", None)
    return bce_only() if bce_only is not None else criterion


class SegmentationModel(ContractModel):
    """Plain segmentation network following the model contract of ``docs/architecture.md``.

    Args:
        backbone: feature extractor (its ``mean``/``std`` become the model's).
        head: maps the feature list to ``{"logits", "feats"}`` (see ``scaleseg.models.heads``).
        num_classes: K.
        criterion: ``(B×K×H×W logits, B×H×W target) → scalar``; default ``CrossEntropyLoss()``.
        aux_head: optional module ``features[aux_index] → B×K×h×w`` logits (``AuxFCNHead``).
        aux_weight: weight of the auxiliary loss term.
        aux_index: backbone level fed to ``aux_head`` (default the second-to-last).
        input_fit: how an input that is not a multiple of ``stride`` is handled. ``"pad"`` (default):
            zero-pad bottom/right, upsample maps to the padded size and crop, so every output pixel
            sits where the input pixel is. ``"stretch"`` (NVIDIA's HMSA code): run the unpadded input
            and stretch the ceil(h/s)-sized maps over the h input pixels, which shifts them by up to
            (s − 1)/2 px; use it to reproduce NVIDIA's inference.

    Attributes: ``num_classes``, ``mean``, ``std``, ``stride`` (inputs are padded to a multiple of
    it), ``feat_channels`` (channels of ``feats``), ``output_scale`` = 1.
    """

    def __init__(
        self,
        backbone: Backbone,
        head: nn.Module,
        num_classes: int,
        *,
        criterion: nn.Module | None = None,
        aux_head: nn.Module | None = None,
        aux_weight: float = 0.4,
        aux_index: int = -2,
        input_fit: str = "pad",
    ) -> None:
        super().__init__()
        if input_fit not in INPUT_FITS:
            raise ConfigError(f"input_fit={input_fit!r}: expected one of {', '.join(INPUT_FITS)}")
        self.backbone = backbone
        self.head = head
        self.aux_head = aux_head
        self.criterion = criterion if criterion is not None else CrossEntropyLoss()
        self.aux_criterion = side_criterion(self.criterion)
        self.num_classes = num_classes
        self.aux_weight = aux_weight
        self.aux_index = aux_index
        self.input_fit = input_fit
        self.mean: tuple[float, ...] = tuple(backbone.mean)
        self.std: tuple[float, ...] = tuple(backbone.std)
        self.stride: int = max(backbone.strides)

    @property
    def feat_channels(self) -> int:
        """Channels of ``forward_features(x)["feats"]`` (what an attention head reads)."""
        return int(self.head.feat_channels)

    def grid(self, x: Tensor, scale: int = 1) -> Grid:
        """The :class:`Grid` of an input ``x``: padded to the stride (``input_fit="pad"``) or not."""
        size = (int(x.shape[-2]), int(x.shape[-1]))
        padded = padded_size(size, self.stride) if self.input_fit == "pad" else size
        return Grid(size, padded, scale)

    def forward_features(
        self,
        x: Tensor,
        *,
        scale: int = 1,
        size: tuple[int, int] | None = None,
        with_aux: bool = True,
        with_logits: bool = True,
    ) -> dict[str, Any]:
        """``B×3×H×W`` normalised image, any H, W → output dict with

        ``logits`` ``B×K×sH×sW`` and ``aux`` (if the model has an aux head) on the output grid
        (``s = scale``, cropped to ``size`` when given; a DSRL wrapper asks for its label grid),
        ``feats`` ``B×C×h×w`` and ``head_logits`` ``B×K×h×w`` at head resolution of the padded
        input, and ``grid`` (:class:`Grid`). ``with_logits=False`` skips upsampling the logits.
        """
        return self._outputs(x, scale=scale, size=size, with_aux=with_aux, with_logits=with_logits)

    def forward(self, x: Tensor) -> Tensor:
        """``B×3×H×W`` normalised image → ``B×K×H×W`` logits (the aux head is skipped)."""
        return self._outputs(x, with_aux=False)["logits"]

    def supervision_losses(self, out: dict[str, Any], batch: dict[str, Any], step: StepInfo) -> dict[str, Tensor]:
        """``{"ce": criterion(logits, mask), "aux": aux_weight · aux_criterion(aux, mask)}``.

        ``batch["mask"]`` is ``B×H×W`` int64 (255 = ignore); logits of another size are upsampled to
        it. ``"aux"`` is present only with an aux head. The aux criterion is the BCE part only when
        the main loss is RMI (the reference recipe), else the main criterion.
        """
        mask = batch["mask"]
        losses = {"ce": supervise(self.criterion, out["logits"], mask)}
        if "aux" in out:
            losses["aux"] = self.aux_weight * supervise(self.aux_criterion, out["aux"], mask)
        return losses

    def run_head(self, x: Tensor, scale: int = 1) -> tuple[list[Tensor], dict[str, Tensor], Grid]:
        """Pad ``x`` to its grid, run backbone and head → (features, head outputs, grid)."""
        grid = self.grid(x, scale)
        padded = pad_to_size(x, grid.padded_size)
        features = self.backbone(padded)
        return features, self.head(features), grid

    def _outputs(
        self,
        x: Tensor,
        *,
        scale: int = 1,
        size: tuple[int, int] | None = None,
        with_aux: bool,
        with_logits: bool = True,
    ) -> dict[str, Any]:
        features, out, grid = self.run_head(x, scale)
        result: dict[str, Any] = {"feats": out["feats"], "head_logits": out["logits"], "grid": grid}
        if with_logits:
            result["logits"] = grid.to_output(out["logits"], size)
        if with_aux and "aux" in out:  # heads with their own aux logits (OCR's soft object regions)
            result["aux"] = grid.to_output(out["aux"], size)
        elif with_aux and self.aux_head is not None:
            result["aux"] = grid.to_output(self.aux_head(features[self.aux_index]), size)
        return result


def predict_labels(model: nn.Module, image: Any, **kwargs: Any) -> Tensor:
    """Eval-mode argmax labels of any contract model (``forward`` → logits, ``mean``/``std``).

    ``image``: ``3×H×W`` / ``B×3×H×W`` uint8 (0–255) or float (0–1) tensor, a PIL image, or an
    ``H×W×3`` numpy array. Returns ``H×W`` / ``B×H×W`` int64 labels on the model's device.
    Runs under ``torch.inference_mode()``; the training mode is restored afterwards. ``kwargs`` go to
    ``model.forward_features`` (e.g. ``scales=[1.0]`` for a hierarchical model).
    """
    device = next(model.parameters()).device
    x = image_to_tensor(image).to(device)
    single = x.ndim == 3
    if single:
        x = x.unsqueeze(0)
    mean = torch.tensor(model.mean, device=device, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(model.std, device=device, dtype=x.dtype).view(1, -1, 1, 1)
    x = (x - mean) / std
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            logits = model.forward_features(x, **kwargs)["logits"] if kwargs else model(x)
            labels = logits.argmax(dim=1)
    finally:
        model.train(was_training)
    return labels[0] if single else labels


def image_to_tensor(image: Any) -> Tensor:
    """PIL image / ``H×W×3`` numpy array / ``(B×)3×H×W`` tensor → float32 tensor in [0, 1].

    uint8 input is divided by 255; float input must already lie in [0, 1].
    """
    if not isinstance(image, (Tensor, np.ndarray)):
        if not hasattr(image, "convert"):
            raise DataError(
                f"predict() got {type(image).__name__}; expected a PIL image, an H×W×3 numpy array "
                "or a (B×)3×H×W tensor"
            )
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise DataError(f"predict() got a numpy array of shape {image.shape}; expected H×W×3")
        image = torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1)
    if image.ndim not in (3, 4) or image.shape[-3] != 3:
        raise DataError(
            f"predict() got a tensor of shape {tuple(image.shape)}; expected 3×H×W or B×3×H×W"
        )
    if image.dtype == torch.uint8:
        return image.float() / 255.0
    if not image.is_floating_point():
        raise DataError(f"predict() got a {image.dtype} tensor; expected uint8 (0-255) or float (0-1)")
    image = image.float()
    if image.numel() and (image.min() < 0 or image.max() > 1):
        raise DataError(
            f"predict() got float values in [{image.min():.3g}, {image.max():.3g}]; expected [0, 1] "
            "(pass uint8 for 0-255 images; predict() normalises itself)"
        )
    return image


def pad_to_size(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Zero-pad ``B×C×H×W`` on the right/bottom to ``size`` (no-op when equal)."""
    pad_h, pad_w = size[0] - x.shape[-2], size[1] - x.shape[-1]
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (0, pad_w, 0, pad_h))
