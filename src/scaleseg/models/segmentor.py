"""SegmentationModel: backbone + head (+ auxiliary head) + criterion."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scaleseg.errors import DataError
from scaleseg.losses.ce import CrossEntropyLoss
from scaleseg.losses.rmi import side_criteria
from scaleseg.models.backbone import Backbone
from scaleseg.types import StepInfo

__all__ = ["SegmentationModel", "image_to_tensor", "predict_labels"]


class SegmentationModel(nn.Module):
    """Plain segmentation network following the model contract of ``docs/architecture.md``.

    Args:
        backbone: feature extractor (its ``mean``/``std`` become the model's).
        head: maps the feature list to ``{"logits", "feats"}`` (see ``scaleseg.models.heads``).
        num_classes: K.
        criterion: ``(B×K×H×W logits, B×H×W target) → scalar``; default ``CrossEntropyLoss()``.
        aux_head: optional module ``features[aux_index] → B×K×h×w`` logits (``AuxFCNHead``).
        aux_weight: weight of the auxiliary loss term.
        aux_index: backbone level fed to ``aux_head`` (default the second-to-last).

    Attributes: ``num_classes``, ``mean``, ``std``, ``stride`` (inputs are padded to a multiple of it).
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
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.aux_head = aux_head
        self.criterion = criterion if criterion is not None else CrossEntropyLoss()
        # the reference supervises aux logits with the BCE part only when the main loss is RMI
        # (BCE + RMI with loss.ocr_aux_rmi, NVIDIA's --ocr_aux_loss_rmi)
        self.aux_criterion = side_criteria(self.criterion)[0]
        self.num_classes = num_classes
        self.aux_weight = aux_weight
        self.aux_index = aux_index
        self.mean: tuple[float, ...] = tuple(backbone.mean)
        self.std: tuple[float, ...] = tuple(backbone.std)
        self.stride: int = max(backbone.strides)

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """``B×3×H×W`` normalised image, any H, W → dict with

        ``logits`` ``B×K×H×W`` (input resolution), ``aux`` ``B×K×H×W`` (if the model has an aux
        head) and ``feats`` ``B×C×h×w`` (head resolution of the input padded to ``stride``).
        """
        return self._run(x, with_aux=True)

    def forward(self, x: Tensor) -> Tensor:
        """``B×3×H×W`` normalised image → ``B×K×H×W`` logits (the aux head is skipped)."""
        return self._run(x, with_aux=False)["logits"]

    def training_losses(self, batch: dict[str, Any], step: StepInfo) -> dict[str, Tensor]:
        """``{"ce": criterion(logits, mask), "aux": aux_weight · criterion(aux, mask)}``.

        ``batch["image"]`` is ``B×3×H×W``, ``batch["mask"]`` ``B×H×W`` int64 (255 = ignore).
        ``"aux"`` is present only with an aux head. ``step`` is unused by the plain model.
        """
        out = self.forward_features(batch["image"])
        mask = batch["mask"]
        losses = {"ce": self.criterion(out["logits"], mask)}
        if "aux" in out:
            losses["aux"] = self.aux_weight * self.aux_criterion(out["aux"], mask)
        return losses

    def predict(self, image: Any) -> Tensor:
        """Label map(s) for raw image(s), in eval mode: see ``predict_labels``."""
        return predict_labels(self, image)

    def run_head(self, x: Tensor) -> tuple[list[Tensor], dict[str, Tensor], Callable[[Tensor], Tensor]]:
        """Pad ``x`` to the stride, run backbone and head → (features, head outputs, ``to_input``),
        where ``to_input`` upsamples a head-resolution map to the padded size and crops to ``x``'s
        (``align_corners`` = the head's ``upsample_align_corners``, default False)."""
        height, width = x.shape[-2:]
        padded = pad_to_multiple(x, self.stride)
        features = self.backbone(padded)
        size = padded.shape[-2:]
        corners = bool(getattr(self.head, "upsample_align_corners", False))
        return features, self.head(features), lambda t: upsample_crop(t, size, height, width, align_corners=corners)

    def _run(self, x: Tensor, *, with_aux: bool) -> dict[str, Tensor]:
        features, out, to_input = self.run_head(x)
        result = {"logits": to_input(out["logits"]), "feats": out["feats"]}
        if with_aux and "aux" in out:  # heads with their own aux logits (OCR's soft object regions)
            result["aux"] = to_input(out["aux"])
        elif with_aux and self.aux_head is not None:
            result["aux"] = to_input(self.aux_head(features[self.aux_index]))
        return result


def predict_labels(model: nn.Module, image: Any) -> Tensor:
    """Eval-mode argmax labels of any contract model (``forward`` → logits, ``mean``/``std``).

    ``image``: ``3×H×W`` / ``B×3×H×W`` uint8 (0–255) or float (0–1) tensor, a PIL image, or an
    ``H×W×3`` numpy array. Returns ``H×W`` / ``B×H×W`` int64 labels on the model's device.
    Runs under ``torch.inference_mode()``; the training mode is restored afterwards.
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
            labels = model(x).argmax(dim=1)
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


def pad_to_multiple(x: Tensor, stride: int) -> Tensor:
    """Zero-pad ``B×C×H×W`` on the right/bottom so H and W are multiples of ``stride``."""
    pad_h = -x.shape[-2] % stride
    pad_w = -x.shape[-1] % stride
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (0, pad_w, 0, pad_h))


def upsample_crop(logits: Tensor, size: torch.Size, height: int, width: int, *, align_corners: bool = False) -> Tensor:
    """Bilinear upsample to the padded ``size`` (``align_corners=False`` unless asked), crop to ``height×width``."""
    if logits.shape[-2:] != size:
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=align_corners)
    return logits[..., :height, :width]
