"""MCIBI (Jin et al., ICCV 2021): a dataset-level class memory and the context it aggregates.

* :class:`FeatureMemory` — a ``K×C`` memory of class representations (buffers, so it lives in
  checkpoints), updated every training step by a cosine-weighted EMA of the batch's per-class
  pixel features, vectorised and exactly synchronised across DDP ranks.
* :class:`SelfAttentionBlock` — the reference's non-local block (query, key/value from two inputs).
* :class:`MemoryContext` — R = bottleneck(C5), W = softmax(H1(R)), C_bi′ = W·M, attention, fusion
  with R and (optionally) with the host's within-image context (ASPP / PPM / OCR).
* :class:`MCIBIModel` — a :class:`~scaleseg.models.segmentor.SegmentationModel` whose head is a host
  (FCN, DeepLabV3, DeepLabV3+, PSPNet, OCR) augmented with the memory context, with the four MCIBI
  losses and the memory update in ``training_losses``.

Deliberate differences from the reference code (``SegmentationBLWX/sssegmentation``
``ssseg/modules/models/segmentors/mcibi/{mcibi,memory}.py``):

* the memory is a pair of buffers (``memory`` K×C float32, ``initialized`` K bool) updated in place
  with ``copy_``; "empty" is an explicit flag, not an all-zero vector;
* the update is one vectorised segment-sum pass (no Python loop over ``unique()`` classes), either
  at full resolution (``full_resolution=True``: features bilinearly upsampled to label size, one
  image at a time — the reference's path, used by the reproduction recipes) or, faster, at feature
  resolution with each feature pixel weighted by its cell's label counts (``label_downsample``);
* classes whose pixels are all (numerically) parallel to their memory vector, Σ(1 − cos) <
  ``degenerate_tol``, take the plain class mean as R′ (the reference divides 0/0 there);
* the momentum is an explicit schedule of the step (:meth:`FeatureMemory.momentum_at`), not
  ``0.9·lr/base_lr`` read from the optimiser;
* under DDP the per-class *sums* are all-reduced before one EMA step (the reference averages whole
  memories, which dilutes first-seen slots by the world size and the momentum by k/W);
* the forward uses a *clone* of the memory, so backward and the consistency loss see exactly the
  memory the forward used (the reference aliases ``memory.data`` and updates it in place);
* the consistency loss runs the classifier H2 in eval mode, so memory vectors never enter the BN
  running statistics (and no Dropout2d on prototypes);
* OCR is supported as a within-image context (the reference has ASPP and PPM only) and DeepLabV3+
  as a host (see :class:`MCIBIHead`). MCIBI++ (mean/std memory) is not implemented.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, DataError
from ..losses.ce import CrossEntropyLoss
from ..types import StepInfo
from .backbone import Backbone
from .heads import ASPP, PPM, AuxFCNHead, ConvBNReLU, DeepLabV3PlusHead, aspp_dilations
from .ocr import SpatialGather, SpatialOCR
from .contract import Grid, Run, supervise
from .segmentor import SegmentationModel, side_criterion

InitMode = Literal["mean", "random_pixel"]
LabelDownsample = Literal["soft", "majority", "center"]
LABEL_DOWNSAMPLE = ("soft", "majority", "center")


# --------------------------------------------------------------------------------------------
# distributed helpers
# --------------------------------------------------------------------------------------------
def _world_size() -> int:
    """Number of processes in the default group (1 when torch.distributed is not initialised)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def _all_reduce_(tensor: Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
    """In-place all-reduce over the default group; a no-op on a single process."""
    if _world_size() > 1:
        dist.all_reduce(tensor, op=op)
    return tensor


# --------------------------------------------------------------------------------------------
# the memory
# --------------------------------------------------------------------------------------------
class FeatureMemory(nn.Module):
    """Dataset-level class memory ``M`` (``K×C``) with an explicit per-class ``initialized`` flag.

    Both are buffers: they are saved in ``state_dict()`` (checkpoints) and restored by
    ``load_state_dict``; no gradient ever reaches them.

    Update (:meth:`update`, every training step, after the forward): for the valid pixels r_i of
    class k, ``w_i = (1 − cos(r_i, M_k)) / Σ_j (1 − cos(r_j, M_k))``, ``R′_k = Σ_i w_i r_i`` and
    ``M_k ← (1 − m)·M_k + m·R′_k`` for initialised classes present in the batch, with
    ``m = momentum_at(step)``. ``1 − cos`` of nearly parallel vectors is computed as ``½‖x̂ − M̂‖²``
    (never negative, precise). When Σ_j (1 − cos) < ``degenerate_tol`` (every pixel parallel to M_k up to rounding: the
    reference divides 0/0 and any ε in the denominator shrinks or flips R′), R′_k is the plain class
    mean. A class seen for the first time is set to the mean of its features (``init="mean"``, the
    reference code) or to one random pixel of the class (``init="random_pixel"``, the paper's text),
    without EMA that step. Classes absent from the batch are unchanged.

    Resolution:

    * ``full_resolution=True`` (the reference's path): the features are upsampled bilinearly
      (``align_corners=False``) to the label size, one image at a time, so the peak is one
      ``C×H×W`` float32 image plus ``chunk_pixels`` rows of float64 temporaries (the reference
      holds two ``B×C×H×W`` copies);
    * ``full_resolution=False`` (fast, ∝ B·h·w·C): labels are brought to the feature grid by
      ``label_downsample``: ``"soft"`` (default) — every feature pixel enters the sums of each class
      in its cell (the ``H/h × W/w`` block of label pixels it covers) with that class's pixel count
      as multiplicity, i.e. the full-resolution update with piecewise-constant instead of bilinear
      features; ``"majority"`` — the cell's most frequent valid label (ties: lowest id);
      ``"center"`` — the label at the cell centre (pixel ``⌊(i + ½)·H/h⌋``), the point bilinear
      upsampling of the features assumes. Against ``full_resolution`` after 4 updates on CamVid
      label maps (``benchmarks/mcibi_label_alignment.py``, ``docs/fidelity.md``): max relative L2
      per class 4.1 % (soft), 12.6 % (center), 42.5 % (majority: thin classes vanish), and 21.1 % for
      the earlier top-left nearest pick, which sat (s − 1)/2 px off the centre at stride s and is
      not offered any more.
      Labels that already have the feature grid's size are used as they are.

    DDP: with torch.distributed initialised and world size > 1, the per-class sums
    (Σ(1−cos)·r, Σ(1−cos), Σr, pixel counts) are all-reduced before the single EMA step. The
    weights depend only on the (identical) memory and each pixel, so every rank ends with the
    memory a 1-process update on the concatenated batch would give. ``random_pixel`` draws
    keys from a private CPU generator seeded with ``seed + rank`` (not checkpointed); the pixel with
    the largest key over all ranks wins, i.e. a uniform pick over the global batch, though not the
    same pixel a 1-process run would pick (at feature resolution a feature pixel of the class).
    """

    memory: Tensor
    initialized: Tensor

    def __init__(
        self,
        num_classes: int,
        channels: int,
        *,
        momentum: float = 0.9,
        power: float = 0.9,
        min_ratio: float = 0.01,
        init: InitMode = "mean",
        ignore_index: int = 255,
        full_resolution: bool = False,
        label_downsample: LabelDownsample = "soft",
        degenerate_tol: float = 1e-5,
        seed: int = 0,
        chunk_pixels: int = 32768,
    ) -> None:
        super().__init__()
        if num_classes < 1 or channels < 1:
            raise ConfigError(f"FeatureMemory: num_classes={num_classes}, channels={channels}; expected both >= 1")
        if not 0.0 <= momentum <= 1.0:
            raise ConfigError(f"FeatureMemory: momentum={momentum}; expected a value in [0, 1]")
        if not 0.0 <= min_ratio <= 1.0:
            raise ConfigError(f"FeatureMemory: min_ratio={min_ratio}; expected a value in [0, 1]")
        if init not in ("mean", "random_pixel"):
            raise ConfigError(f"FeatureMemory: init={init!r}; expected 'mean' or 'random_pixel'")
        if label_downsample not in LABEL_DOWNSAMPLE:
            raise ConfigError(
                f"FeatureMemory: label_downsample={label_downsample!r}; expected one of {', '.join(LABEL_DOWNSAMPLE)}"
            )
        if degenerate_tol < 0:
            raise ConfigError(f"FeatureMemory: degenerate_tol={degenerate_tol}; expected >= 0")
        if chunk_pixels < 1:
            raise ConfigError(f"FeatureMemory: chunk_pixels={chunk_pixels}; expected >= 1")
        self.num_classes = num_classes
        self.channels = channels
        self.base_momentum = momentum
        self.power = power
        self.min_ratio = min_ratio
        self.init = init
        self.ignore_index = ignore_index
        self.full_resolution = full_resolution
        self.label_downsample = label_downsample
        self.degenerate_tol = degenerate_tol
        self.seed = seed
        self.chunk_pixels = chunk_pixels
        self._generator: torch.Generator | None = None
        self.register_buffer("memory", torch.zeros(num_classes, channels, dtype=torch.float32))
        self.register_buffer("initialized", torch.zeros(num_classes, dtype=torch.bool))

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, channels={self.channels}, momentum={self.base_momentum}, "
            f"init={self.init!r}, full_resolution={self.full_resolution}, label_downsample={self.label_downsample!r}"
        )

    # -- schedule ---------------------------------------------------------------------------
    def momentum_at(self, step: int, max_steps: int) -> float:
        """EMA momentum at ``step``: ``m0 · [(1 − r)·(1 − t/T)^power + r]`` with ``r = min_ratio``.

        The reference instead uses ``m0 · lr(t) / base_lr`` read from the optimiser; with its poly
        scheduler (``min_lr = 0.01·lr0``) and ``base_lr = lr0`` that equals this formula with the
        default ``min_ratio=0.01`` (end-of-training momentum 0.0108 at T = 1000; ``r = 0`` would give
        0.0018). It also follows any LR warm-up, and its Cityscapes configs set ``base_lr = 0.9·lr0``,
        i.e. ``m0 = 1``. Here the schedule is explicit and independent of the optimiser.
        """
        t = min(max(step / max(max_steps, 1), 0.0), 1.0)
        return self.base_momentum * ((1.0 - self.min_ratio) * (1.0 - t) ** self.power + self.min_ratio)

    # -- forward-side access ------------------------------------------------------------------
    def snapshot(self) -> Tensor:
        """A detached ``K×C`` clone of the memory for the forward pass.

        Autograd saves this clone (not the buffer) for backward, so the later in-place update does
        not change the gradient, and the consistency loss sees the memory the forward used.
        """
        return self.memory.detach().clone()

    # -- update -------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, feats: Tensor, labels: Tensor, step: StepInfo) -> None:
        """One EMA step from ``feats`` ``B×C×h×w`` and ``labels`` ``B×H×W`` (int, ``ignore_index``).

        Under torch.distributed (world size > 1) the per-class sums are all-reduced first, so every
        rank ends with the same memory, equal to a single-process update on the concatenated batch.
        """
        stats = self.batch_statistics(feats, labels)
        self._ema_step(stats, self.momentum_at(step.step, step.max_steps))

    @torch.no_grad()
    def batch_statistics(self, feats: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """Per-class sums over the local batch (not reduced): ``wsum`` K×C = Σ(1−cos)·r,
        ``wtot`` K = Σ(1−cos), ``fsum`` K×C = Σr, ``count`` K (pixels), and for ``random_pixel``
        init ``key`` K (the largest random key, −1 if absent) and ``pick`` K×C (that pixel's feature)."""
        self._check_inputs(feats, labels)
        feats = feats.detach().float()
        labels = labels.detach()
        k, c, dev, f64 = self.num_classes, self.channels, feats.device, torch.float64
        unit_memory = F.normalize(self.memory.float(), dim=1, eps=1e-12)
        stats = {
            "wsum": torch.zeros(k, c, device=dev, dtype=f64),
            "wtot": torch.zeros(k, device=dev, dtype=f64),
            "fsum": torch.zeros(k, c, device=dev, dtype=f64),
            "count": torch.zeros(k, device=dev, dtype=f64),
        }
        need_pick = self.init == "random_pixel" and not bool(self.initialized.all())
        if need_pick:
            stats["key"] = torch.full((k,), -1.0, dtype=f64, device=dev)
            stats["pick"] = torch.zeros(k, c, device=dev, dtype=f64)
        same_grid = labels.shape[-2:] == feats.shape[-2:]
        for b in range(feats.shape[0]):  # one image at a time bounds the full-resolution peak
            if self.full_resolution or same_grid:
                self._accumulate_image(stats, feats[b : b + 1], labels[b], unit_memory)
            else:
                self._accumulate_cells(stats, feats[b], labels[b], unit_memory)
        return stats

    def _accumulate_image(self, stats: dict[str, Tensor], feats: Tensor, labels: Tensor, unit_memory: Tensor) -> None:
        """One image, one label per pixel: ``feats`` 1×C×h×w, ``labels`` H×W (features upsampled to it)."""
        # channels-last so that pixel rows are contiguous (interpolate keeps the format)
        feats = feats.contiguous(memory_format=torch.channels_last)
        if labels.shape[-2:] != feats.shape[-2:]:
            feats = F.interpolate(feats, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        pixels = feats[0].permute(1, 2, 0).reshape(-1, self.channels)  # (H·W)×C rows, a view
        flat_labels = labels.flatten()
        for start in range(0, pixels.shape[0], self.chunk_pixels):
            stop = start + self.chunk_pixels
            y = flat_labels[start:stop]
            valid = y != self.ignore_index
            if bool(valid.any()):  # every row is an entry; ignored rows: any class, multiplicity 0
                self._accumulate(stats, pixels[start:stop], None, torch.where(valid, y, 0).long(),
                                 valid.double(), unit_memory)

    def _accumulate_cells(self, stats: dict[str, Tensor], feats: Tensor, labels: Tensor, unit_memory: Tensor) -> None:
        """One image at feature resolution: ``feats`` C×h×w, ``labels`` H×W → entries (feature pixel,
        class, multiplicity) by ``label_downsample`` (see the class docstring)."""
        _, h, w = feats.shape
        height, width = labels.shape
        pixels = feats.permute(1, 2, 0).reshape(-1, self.channels)  # (h·w)×C
        dev = labels.device
        if self.label_downsample == "center":
            ys = ((torch.arange(h, device=dev) * 2 + 1) * height) // (2 * h)
            xs = ((torch.arange(w, device=dev) * 2 + 1) * width) // (2 * w)
            y = labels[ys][:, xs].flatten()
            valid = y != self.ignore_index
            rows = valid.nonzero().squeeze(1)
            weight = torch.ones_like(rows, dtype=torch.float64)
            cls = y[rows]
        else:
            cell = ((torch.arange(height, device=dev) * h) // height)[:, None] * w \
                + ((torch.arange(width, device=dev) * w) // width)[None, :]
            bins = self.num_classes * h * w  # one (class, cell) bin per pair; ignored pixels → an extra bin
            key = torch.where(labels != self.ignore_index, labels.long() * (h * w) + cell, bins)
            counts = torch.bincount(key.flatten(), minlength=bins + 1)[:bins].view(self.num_classes, h * w)
            if self.label_downsample == "majority":
                best, cls_all = counts.max(dim=0)  # ties: the lowest class id
                rows = (best > 0).nonzero().squeeze(1)
                cls = cls_all[rows]
                weight = torch.ones_like(rows, dtype=torch.float64)
            else:  # soft: every (class, cell) pair with its pixel count
                cls, rows = counts.nonzero(as_tuple=True)
                weight = counts[cls, rows].double()
        if rows.numel():
            self._accumulate(stats, pixels, rows, cls, weight, unit_memory)

    def _accumulate(
        self, stats: dict[str, Tensor], x: Tensor, rows: Tensor | None, cls: Tensor, mult: Tensor, unit_memory: Tensor
    ) -> None:
        """Add entries e = (pixel row ``rows[e]`` of ``x`` N×C, class ``cls[e]``, multiplicity
        ``mult[e]``) to the per-class sums; ``rows=None``: entry e is row e (no gather of ``x``).

        ``1 − cos_e = 1 − ⟨x_r, M̂_k⟩ / ‖x_r‖`` (a zero vector on either side gives cos = 0); where that
        is below 1e-3 it is recomputed as ``½‖x̂_r − M̂_k‖²`` (x̂, M̂ unit vectors), which keeps its
        relative precision as the vectors become parallel, whereas the float32 rounding of the first
        form (~6e-8 per pixel) can exceed the true value and flip its sign.
        Weight ``mult·(1 − cos)``. ``wsum`` and ``fsum`` come from one sparse ``2K×N`` ·
        ``N×C`` product whose rows are ``cls`` (values mult·(1 − cos)) and ``K + cls`` (values mult):
        the same segment sums as ``index_add_``, in one kernel (CPU ``index_add_`` on rows dispatches
        once per row and is ~4× slower) and without gathering the rows of the sums. Sums are float64:
        a class can cover ~10⁶ pixels at full resolution.
        """
        k = self.num_classes
        xe = x if rows is None else x[rows]
        cols = torch.arange(x.shape[0], device=x.device) if rows is None else rows
        norm = xe.norm(dim=1).clamp_min(1e-30)
        unit_rows = unit_memory[cls]
        one_minus_cos = 1.0 - torch.linalg.vecdot(xe, unit_rows) / norm  # zero vector on either side: 1
        near = one_minus_cos < 1e-3  # nearly parallel: recompute without the cancellation
        if bool(near.any()):
            index = near.nonzero().squeeze(1)
            diff = unit_rows[index] - xe[index] / norm[index, None]
            exact = 0.5 * torch.linalg.vecdot(diff, diff)
            exact = torch.where(unit_rows[index].abs().amax(dim=1) > 0, exact, 1.0)
            one_minus_cos = one_minus_cos.index_put((index,), exact)
        weight = mult * one_minus_cos.double()
        xd = x.double()
        selector = torch.sparse_coo_tensor(
            torch.stack([torch.cat([cls, cls + k]), cols.repeat(2)]), torch.cat([weight, mult]),
            (2 * k, x.shape[0]), check_invariants=False,
        )
        sums = torch.sparse.mm(selector, xd)
        stats["wsum"] += sums[:k]
        stats["fsum"] += sums[k:]
        stats["wtot"].index_add_(0, cls, weight)
        stats["count"].index_add_(0, cls, mult)
        if "key" in stats:
            present = mult > 0
            self._accumulate_pick(stats, xe[present].double(), cls[present])

    def _accumulate_pick(self, stats: dict[str, Tensor], x: Tensor, y: Tensor) -> None:
        """Reservoir-free random pixel per class: keep the pixel with the largest iid uniform key."""
        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.seed + _rank())
        keys = torch.rand(y.shape[0], generator=self._generator, dtype=torch.float64).to(x.device)
        best = torch.full_like(stats["key"], -1.0).scatter_reduce_(0, y, keys, "amax")
        is_best = keys == best[y]
        index = torch.arange(y.shape[0], device=x.device)
        best_index = torch.full((self.num_classes,), -1, dtype=torch.long, device=x.device)
        best_index.scatter_reduce_(0, y[is_best], index[is_best], "amax")
        improved = best > stats["key"]
        stats["key"] = torch.where(improved, best, stats["key"])
        stats["pick"][improved] = x[best_index[improved]].double()

    def _reduce(self, stats: dict[str, Tensor]) -> dict[str, Tensor]:
        """Sum the statistics over ranks: one packed float64 all-reduce, plus, for the random-pixel
        choice, a MAX on the keys and a MIN on the owning rank (ties go to the lowest rank) and a
        SUM of the owners' picks. Every rank calls the same collectives (the decision to pick
        depends only on ``initialized``, which is identical on all ranks)."""
        if _world_size() == 1:
            return stats
        k, c = self.num_classes, self.channels
        packed = torch.cat([stats["wsum"].flatten(), stats["wtot"], stats["fsum"].flatten(), stats["count"]])
        wsum, wtot, fsum, count = _all_reduce_(packed).split([k * c, k, k * c, k])
        out = {"wsum": wsum.view(k, c), "wtot": wtot, "fsum": fsum.view(k, c), "count": count}
        if "key" in stats:
            best = _all_reduce_(stats["key"].clone(), dist.ReduceOp.MAX)
            mine = (stats["key"] == best) & (best >= 0)
            owner = torch.where(mine, float(_rank()), float(_world_size())).to(torch.float64)
            owner = _all_reduce_(owner, dist.ReduceOp.MIN)
            out["pick"] = _all_reduce_(stats["pick"] * (owner == _rank())[:, None])
        return out

    def _ema_step(self, stats: dict[str, Tensor], momentum: float) -> None:
        """Reduce over ranks, then one EMA step (float64, stored as float32) for initialised
        present classes and the first-seen initialisation for the others."""
        stats = self._reduce(stats)
        memory = self.memory.to(torch.float64)
        present = stats["count"] > 0
        ema = present & self.initialized
        first = present & ~self.initialized
        mean = stats["fsum"] / stats["count"].clamp_min(1e-12)[:, None]
        degenerate = stats["wtot"] < self.degenerate_tol  # all pixels parallel to M_k: weights are 0/0
        weighted = stats["wsum"] / torch.where(degenerate, 1.0, stats["wtot"])[:, None]
        represent = torch.where(degenerate[:, None], mean, weighted)
        updated = (1.0 - momentum) * memory + momentum * represent
        if self.init == "mean":
            first_value = mean
        else:
            first_value = stats.get("pick", torch.zeros_like(memory))
        new = torch.where(ema[:, None], updated, memory)
        new = torch.where(first[:, None], first_value, new)
        self.memory.copy_(new)
        self.initialized.logical_or_(present)

    def _check_inputs(self, feats: Tensor, labels: Tensor) -> None:
        if feats.dim() != 4 or feats.shape[1] != self.channels:
            raise DataError(
                f"FeatureMemory.update: feats shape {tuple(feats.shape)}; expected B×{self.channels}×h×w"
            )
        if labels.dim() != 3 or labels.shape[0] != feats.shape[0]:
            raise DataError(
                f"FeatureMemory.update: labels shape {tuple(labels.shape)}; expected {feats.shape[0]}×H×W"
            )
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise DataError(f"FeatureMemory.update: labels dtype {labels.dtype}; expected an integer dtype")
        bad = (labels != self.ignore_index) & ((labels < 0) | (labels >= self.num_classes))
        if bool(bad.any()):
            values = labels[bad].unique()[:8].tolist()
            raise DataError(
                f"FeatureMemory.update: label values {values} outside [0, {self.num_classes}) "
                f"and not ignore_index={self.ignore_index}"
            )


# --------------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------------
def _classifier(channels: int, num_classes: int, dropout: float) -> nn.Sequential:
    """H1/H2 of the reference: 1×1 C→C (no bias), BN, ReLU, Dropout2d, 1×1 C→K."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, 1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
        nn.Dropout2d(dropout),
        nn.Conv2d(channels, num_classes, 1),
    )


class SelfAttentionBlock(nn.Module):
    """Non-local attention of the reference (``base/selfattention.py``): query from one map,
    key/value from another.

    ``q = φ_q(query)``, ``k = φ_k(kv)`` (two 1×1 conv + BN + ReLU each, to ``transform_channels`` T),
    ``v = φ_v(kv)`` (one), ``out = φ_o(softmax(q·kᵀ / √T)·v)`` with φ_o a 1×1 conv + BN + ReLU
    T → ``out_channels``. Shapes: query ``B×Cq×h×w``, kv ``B×Ckv×h'×w'`` → ``B×out×h×w``.
    Uses ``F.scaled_dot_product_attention`` (its default scale is 1/√T, as the reference; its fused
    kernels never materialise the (hw)×(h′w′) attention map).
    """

    def __init__(self, query_channels: int, kv_channels: int, transform_channels: int, out_channels: int) -> None:
        super().__init__()
        t = transform_channels
        self.transform_channels = t
        self.query_project = nn.Sequential(ConvBNReLU(query_channels, t, 1), ConvBNReLU(t, t, 1))
        self.key_project = nn.Sequential(ConvBNReLU(kv_channels, t, 1), ConvBNReLU(t, t, 1))
        self.value_project = ConvBNReLU(kv_channels, t, 1)
        self.out_project = ConvBNReLU(t, out_channels, 1)

    def forward(self, query: Tensor, kv: Tensor) -> Tensor:
        b, _, h, w = query.shape
        q = self.query_project(query).flatten(2).transpose(1, 2)  # B×hw×T
        k = self.key_project(kv).flatten(2).transpose(1, 2)  # B×h'w'×T
        v = self.value_project(kv).flatten(2).transpose(1, 2)
        # one head as a 4-D B×1×hw×T batch: the layout every backend (and the ONNX exporter) supports
        context = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        # contiguous: a transposed view's strides depend on whether B is 1, which would pin the exported batch
        return self.out_project(context.transpose(1, 2).reshape(b, self.transform_channels, h, w).contiguous())


class MemoryContext(nn.Module):
    """Dataset-level context: last backbone level (+ optional host context) → fused ``B×C×h×w``.

    ``R = bottleneck(C5)`` (3×3 conv → C, BN, ReLU); ``W = softmax(H1(R))`` over the K classes;
    ``C_bi′ = W·M`` (``B×C×h×w``) with M the memory snapshot; ``C_bi = SA(R, C_bi′)``;
    ``F1 = conv3×3(cat[R, C_bi])`` (2C → C, BN, ReLU). With a host context ``C_wi′``
    (``context_channels`` wide, same h×w): ``C_wi = SA(R, C_wi′)``, ``out = conv3×3(cat[C_wi, F1])``;
    without one (FCN host), ``out = F1``.

    ``forward`` returns ``{"out", "R", "memory_logits" (H1(R), B×K×h×w), "memory" (the K×C snapshot
    the forward used), "initialized" (its K flags)}``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        channels: int = 512,
        context_channels: int | None = None,
        dropout: float = 0.1,
        memory: FeatureMemory | None = None,
    ) -> None:
        super().__init__()
        if channels < 2:
            raise ConfigError(f"MemoryContext: channels={channels}; expected >= 2")
        self.memory = memory if memory is not None else FeatureMemory(num_classes, channels)
        if (self.memory.num_classes, self.memory.channels) != (num_classes, channels):
            raise ConfigError(
                f"MemoryContext: memory is {self.memory.num_classes}×{self.memory.channels}; "
                f"expected {num_classes}×{channels}"
            )
        self.channels = channels
        self.bottleneck = ConvBNReLU(in_channels, channels, 3)
        self.class_head = _classifier(channels, num_classes, dropout)  # H1
        self.memory_attention = SelfAttentionBlock(channels, channels, channels // 2, channels)
        self.memory_fuse = ConvBNReLU(2 * channels, channels, 3)
        self.context_attention: SelfAttentionBlock | None = None
        self.context_fuse: nn.Module | None = None
        if context_channels is not None:
            self.context_attention = SelfAttentionBlock(channels, context_channels, channels // 2, channels)
            self.context_fuse = ConvBNReLU(2 * channels, channels, 3)

    @staticmethod
    def gather_memory(memory_logits: Tensor, memory: Tensor) -> Tensor:
        """``C_bi′ = softmax_K(memory_logits)·M``: ``B×K×h×w``, ``K×C`` → ``B×C×h×w``."""
        weights = memory_logits.softmax(dim=1)
        # contiguous: einsum returns a permuted view whose strides depend on whether B is 1 (export)
        return torch.einsum("bkhw,kc->bchw", weights, memory.to(weights.dtype)).contiguous()

    def forward(self, last_level: Tensor, context: Tensor | None = None) -> dict[str, Tensor]:
        """``last_level`` ``B×Cin×h×w``, ``context`` ``B×context_channels×h×w`` or None → dict above."""
        if (context is None) != (self.context_attention is None):
            raise ConfigError(
                "MemoryContext: a host context must be given iff context_channels was set "
                f"(context_channels {'set' if self.context_attention is not None else 'None'})"
            )
        memory = self.memory.snapshot()
        initialized = self.memory.initialized.clone()
        rep = self.bottleneck(last_level)
        memory_logits = self.class_head(rep)
        memory_context = self.memory_attention(rep, self.gather_memory(memory_logits, memory))
        out = self.memory_fuse(torch.cat([rep, memory_context], dim=1))
        if context is not None and self.context_attention is not None and self.context_fuse is not None:
            within = self.context_attention(rep, context)
            out = self.context_fuse(torch.cat([within, out], dim=1))
        return {"out": out, "R": rep, "memory_logits": memory_logits, "memory": memory, "initialized": initialized}


class OCRContext(nn.Module):
    """OCR's object-contextual representation used as MCIBI's within-image context (new work: the
    reference supports only ASPP and PPM). ``B×Cin×h×w`` → ``(B×C×h×w context, B×K×h×w soft-region
    logits)``; the region logits need their own supervision (``MCIBIModel`` weights them like aux).

    3×3 ConvBNReLU Cin → C; regions: 1×1 Cin → Cin, BN, ReLU, 1×1 → K (as ``OCRHead.aux_head``);
    ``SpatialGather`` + ``SpatialOCR`` from :mod:`scaleseg.models.ocr` with C/2 key channels.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int, *, dropout: float = 0.05) -> None:
        super().__init__()

        self.conv = ConvBNReLU(in_channels, channels, 3)
        self.regions = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 1, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, num_classes, 1),
        )
        self.gather = SpatialGather()
        self.distribute = SpatialOCR(channels, channels // 2, channels, dropout)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.conv(x)
        region_logits = self.regions(x)
        return self.distribute(feats, self.gather(feats, region_logits)), region_logits


HOSTS = ("deeplabv3", "deeplabv3plus", "pspnet", "ocr", "fcn")


class MCIBIHead(nn.Module):
    """A host segmentation head with the MCIBI memory context between its context module and its
    classifier. Backbone feature list → dict with ``logits`` (``B×K×h×w`` at the head stride),
    ``feats``, ``memory_logits`` (H1, stride of the last level), ``R``, ``memory``, ``initialized``
    and, per host, ``ocr_aux`` (OCR soft-region logits) or ``stride8_logits`` (DeepLabV3+).

    Hosts (the within-image context ``C_wi′``, on the last backbone level):

    * ``"deeplabv3"``: ASPP (rates for ``output_stride``) → ``context_channels``; logits = H2(out).
      ``aspp_project_kernel=3, aspp_dropout=0`` is the reference's ASPP (sssegmentation: 3×3 fusion
      conv, no dropout; 11.80 M projection weights at 5×512 → 512); the default 1×1 + Dropout(0.1)
      projection (1.31 M) is scaleseg's lighter layout;
    * ``"pspnet"``: PPM → ``context_channels``; logits = H2(out);
    * ``"ocr"``: :class:`OCRContext` → ``context_channels``; logits = H2(out);
    * ``"fcn"``: no within-image context; out = F1; logits = H2(out);
    * ``"deeplabv3plus"``: the ASPP of a :class:`~scaleseg.models.heads.DeepLabV3PlusHead`
      (``aspp_channels = channels``) is ``C_wi′``, and the MCIBI ``out`` replaces the ASPP output
      that enters its low-level fusion decoder, which produces the final stride-4 ``logits``.
      H2 stays the stride-8 classifier of ``out`` (``stride8_logits``, supervised as deep
      supervision), because the consistency loss needs a classifier that reads C-dimensional
      vectors of the memory's space; the decoder's classifier reads low-level-fused 256-d features
      and cannot classify memory vectors. ``decoder_channels``, ``decoder_convs`` and ``separable``
      shape that decoder as they shape the plain head (``model.*`` keys of the same names), so an
      MCIBI model and its host without the memory share the decoder.

    H2 (``classifier``): 1×1 C→C (no bias), BN, ReLU, Dropout2d, 1×1 C→K — applied to ``out`` and,
    for the consistency loss, to the memory as ``K×C×1×1``.
    """

    def __init__(
        self,
        in_channels: list[int],
        num_classes: int,
        *,
        host: str = "deeplabv3",
        output_stride: int = 8,
        channels: int = 512,
        context_channels: int | None = None,
        dropout: float = 0.1,
        memory: FeatureMemory | None = None,
        aspp_project_kernel: int = 1,
        aspp_dropout: float = 0.1,
        decoder_channels: int = 256,
        decoder_convs: int = 2,
        separable: bool = False,
    ) -> None:
        super().__init__()
        if host not in HOSTS:
            raise ConfigError(f"MCIBI host={host!r}; expected one of {', '.join(HOSTS)}")
        self.host = host
        self.num_classes = num_classes
        last = in_channels[-1]
        ctx_channels = context_channels or channels
        self.context_module: nn.Module | None = None
        self.decoder: DeepLabV3PlusHead | None = None
        if host == "deeplabv3":
            self.context_module = ASPP(last, ctx_channels, aspp_dilations(output_stride),
                                       dropout=aspp_dropout, project_kernel=aspp_project_kernel)
        elif host == "pspnet":
            self.context_module = PPM(last, ctx_channels)
        elif host == "ocr":
            self.context_module = OCRContext(last, num_classes, ctx_channels)
        elif host == "deeplabv3plus":
            self.decoder = DeepLabV3PlusHead(
                in_channels, num_classes, output_stride=output_stride, aspp_channels=channels,
                decoder_channels=decoder_channels, decoder_convs=decoder_convs, separable=separable,
            )
            ctx_channels = channels
        self.memory_context = MemoryContext(
            last,
            num_classes,
            channels=channels,
            context_channels=None if host == "fcn" else ctx_channels,
            dropout=dropout,
            memory=memory,
        )
        self.classifier = _classifier(channels, num_classes, dropout)  # H2
        self.feature_index = self.decoder.feature_index if self.decoder is not None else len(in_channels) - 1
        self.feat_channels = self.decoder.feat_channels if self.decoder is not None else channels
        self.channels = channels

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        last = features[-1]
        extra: dict[str, Tensor] = {}
        context: Tensor | None = None
        if self.decoder is not None:
            context = self.decoder.context(features)
        elif isinstance(self.context_module, OCRContext):
            context, extra["ocr_aux"] = self.context_module(last)
        elif self.context_module is not None:
            context = self.context_module(last)
        mc = self.memory_context(last, context)
        head_logits = self.classifier(mc["out"])
        if self.decoder is not None:
            decoded = self.decoder.decode(mc["out"], features)
            logits, feats = decoded["logits"], decoded["feats"]
            extra["stride8_logits"] = head_logits
        else:
            logits, feats = head_logits, mc["out"]
        internal = {k: mc[k] for k in ("memory_logits", "R", "memory", "initialized")}
        return {"logits": logits, "feats": feats, **extra, **internal}

    def classify_memory(self, memory: Tensor) -> Tensor:
        """H2 on memory vectors ``N×C`` → ``N×K`` logits, with H2 in eval mode (BN uses and keeps
        its running statistics, no Dropout2d); gradients reach H2's weights. The reference runs H2
        in train mode here, so K prototypes enter the BN statistics (shared reference §4)."""
        was_training = self.classifier.training
        self.classifier.eval()
        try:
            return self.classifier(memory.view(*memory.shape, 1, 1)).flatten(1)
        finally:
            self.classifier.train(was_training)


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------
_FORWARD_EXTRAS = ("memory_logits", "ocr_aux", "stride8_logits")


class MCIBIModel(SegmentationModel):
    """Backbone + :class:`MCIBIHead` (+ aux FCN head) with the MCIBI losses and memory update.

    ``forward_features(x)`` → the :class:`~scaleseg.models.segmentor.SegmentationModel` outputs
    (``logits``, ``aux`` with an aux head, ``feats``, ``head_logits``, ``grid``) plus
    ``memory_logits`` (H1 logits, i.e. the W of the aggregation, before softmax), ``ocr_aux`` (OCR
    host) or ``stride8_logits`` (DeepLabV3+ host), all on the output grid, and the internals the
    losses and the update need: ``R`` (``B×C×h×w``), ``memory`` (the ``K×C`` snapshot the forward
    used) and ``initialized`` (its K flags).

    Loss terms, already weighted (sum = the MCIBI objective):

    * supervision (:meth:`supervision_losses`, as every segmentation model): ``ce`` (criterion on
      ``logits``), ``aux`` (``aux_weight`` · side criterion on ``aux``);
    * method (:meth:`method_losses`, also what a wrapper gets for each run it made of this model):
      ``memory_ce`` (α·CE(memory_logits), α = ``memory_loss_weight``), ``ocr_aux`` / ``stride8_ce``
      (host-specific, ``aux_weight`` / ``stride8_weight``), ``consistency`` (β·CE(H2(M_k), k) over
      initialised classes k; zero before ``consistency_start_epoch`` (0-based; default 1 = off during
      the first epoch, like the reference's ``epoch > 1``) or ``consistency_start_step``). With
      several runs (HMSA: one per scale) each per-run term is the mean over the runs, so the method's
      weight does not grow with the number of scales; the consistency term depends only on the
      memory snapshot, which every run of one step shares.

    Side terms use the side criterion (the BCE part only under RMI), as aux logits do everywhere.

    State (:meth:`update_state`, training only, after the losses): one EMA step of the memory from
    the ``R`` of the run at scale 1.0 and the batch mask (padded with ignore like the image, at the
    output grid; a DSRL wrapper's high-resolution mask is mapped onto the feature grid by
    :class:`FeatureMemory`). Inside HMSA the low-scale runs do **not** update the memory: their
    feature cells cover 1/scale × as many label pixels, so more cells mix classes at boundaries, and a
    second EMA step per optimiser step would change the momentum schedule the MCIBI hyper-parameters
    were set for. The forward and the consistency loss use the pre-update snapshot.
    """

    head: MCIBIHead

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        *,
        host: str = "deeplabv3",
        channels: int = 512,
        context_channels: int | None = None,
        criterion: nn.Module | None = None,
        aux_head: nn.Module | bool = True,
        aux_weight: float = 0.4,
        memory_loss_weight: float = 0.4,
        consistency_weight: float = 1.0,
        consistency_start_epoch: int = 1,
        consistency_start_step: int = 0,
        stride8_weight: float = 0.4,
        momentum: float = 0.9,
        momentum_min_ratio: float = 0.01,
        memory_init: InitMode = "mean",
        full_resolution: bool = False,
        label_downsample: LabelDownsample = "soft",
        dropout: float = 0.1,
        aspp_project_kernel: int = 1,
        aspp_dropout: float = 0.1,
        decoder_channels: int = 256,
        decoder_convs: int = 2,
        separable: bool = False,
        input_fit: str = "pad",
    ) -> None:
        criterion = criterion if criterion is not None else CrossEntropyLoss()
        memory = FeatureMemory(
            num_classes,
            channels,
            momentum=momentum,
            min_ratio=momentum_min_ratio,
            init=memory_init,
            ignore_index=getattr(criterion, "ignore_index", 255),
            full_resolution=full_resolution,
            label_downsample=label_downsample,
        )
        head = MCIBIHead(
            backbone.channels,
            num_classes,
            host=host,
            output_stride=backbone.strides[-1],
            channels=channels,
            context_channels=context_channels,
            dropout=dropout,
            memory=memory,
            aspp_project_kernel=aspp_project_kernel,
            aspp_dropout=aspp_dropout,
            decoder_channels=decoder_channels,
            decoder_convs=decoder_convs,
            separable=separable,
        )
        aux: nn.Module | None
        if aux_head is True:
            aux = AuxFCNHead(backbone.channels[-2], num_classes, channels)
        else:
            aux = aux_head or None
        super().__init__(backbone, head, num_classes, criterion=criterion, aux_head=aux, aux_weight=aux_weight,
                         input_fit=input_fit)
        self.memory_loss_weight = memory_loss_weight
        self.consistency_weight = consistency_weight
        self.consistency_start_epoch = consistency_start_epoch
        self.consistency_start_step = consistency_start_step
        self.stride8_weight = stride8_weight

    @property
    def feature_memory(self) -> FeatureMemory:
        """The model's :class:`FeatureMemory` (``head.memory_context.memory``)."""
        return self.head.memory_context.memory

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
        if with_aux:
            for key in _FORWARD_EXTRAS:
                if key in out:
                    result[key] = grid.to_output(out[key], size)
            if self.aux_head is not None:
                result["aux"] = grid.to_output(self.aux_head(features[self.aux_index]), size)
            result.update({"R": out["R"], "memory": out["memory"], "initialized": out["initialized"]})
        return result

    def method_losses(self, runs: Sequence[Run], batch: dict[str, Any], step: StepInfo) -> dict[str, Tensor]:
        """``memory_ce``, ``ocr_aux`` / ``stride8_ce`` (each the mean over ``runs``) and ``consistency``.

        ``ocr_aux`` (OCR's soft regions) uses the aux criterion, like every aux logit (RMI: BCE, or
        BCE + RMI with ``loss.ocr_aux_rmi``); H1's and the stride-8 logits use the side criterion
        (BCE only under RMI)."""
        mask = batch["mask"]
        side = side_criterion(self.criterion)
        weights = {"memory_logits": ("memory_ce", self.memory_loss_weight, side),
                   "ocr_aux": ("ocr_aux", self.aux_weight, self.aux_criterion),
                   "stride8_logits": ("stride8_ce", self.stride8_weight, side)}
        losses: dict[str, Tensor] = {}
        for key, (name, weight, crit) in weights.items():
            terms = [supervise(crit, run.out[key], mask) for run in runs if key in run.out]
            if terms:
                losses[name] = weight * torch.stack(terms).mean()
        first = runs[0].out
        losses["consistency"] = self.consistency_loss(first["memory"], first["initialized"], step)
        return losses

    def update_state(self, runs: Sequence[Run], batch: dict[str, Any], step: StepInfo) -> None:
        """Update the memory from the run at scale 1.0 (see the class docstring). A memory frozen by
        staged training (its module in eval mode while the model trains) is not updated."""
        if not self.head.memory_context.training:
            return
        for run in runs:
            if run.scale == 1.0:
                self.update_memory(run.out["R"], batch["mask"], run.out["grid"], step)

    def consistency_active(self, step: StepInfo) -> bool:
        """Whether the representation-consistent loss is on at ``step``."""
        return (
            self.consistency_weight > 0
            and step.epoch >= self.consistency_start_epoch
            and step.step >= self.consistency_start_step
        )

    def consistency_loss(self, memory: Tensor, initialized: Tensor, step: StepInfo) -> Tensor:
        """``β · CE(H2(M_k), k)`` over the initialised classes k of the snapshot ``memory`` K×C
        (H2 in eval mode: BN running statistics are not touched). Zero when inactive or empty."""
        if not self.consistency_active(step) or not bool(initialized.any()):
            return memory.new_zeros(())
        classes = initialized.nonzero().squeeze(1)
        logits = self.head.classify_memory(memory[classes])
        return self.consistency_weight * F.cross_entropy(logits.float(), classes)

    @torch.no_grad()
    def update_memory(self, rep: Tensor, mask: Tensor, grid: Grid, step: StepInfo) -> None:
        """Memory update from ``rep`` (R, ``B×C×h×w`` of the padded input) and ``mask`` ``B×H×W`` on
        the output grid, padded with the ignore index to the padded output size so that label and
        feature grids align."""
        memory = self.feature_memory
        memory.update(rep.detach(), grid.pad_mask(mask, memory.ignore_index), step)


def mcibi(
    num_classes: int,
    backbone: str = "resnet50",
    host: str = "deeplabv3",
    *,
    output_stride: int = 8,
    pretrained: bool = False,
    pretrained_file: str | None = None,
    **kwargs: Any,
) -> MCIBIModel:
    """Convenience constructor: ``Backbone(backbone, output_stride)`` + :class:`MCIBIModel`."""
    trunk = Backbone(backbone, output_stride=output_stride, pretrained=pretrained, pretrained_file=pretrained_file)
    return MCIBIModel(trunk, num_classes, host=host, **kwargs)
