"""``scaleseg autolabel``: a teacher labels images for training (HMSA §5.1).

Per image ``<name>`` (its path relative to the input folder, as ``scaleseg predict`` names outputs)
it writes ``<out>/<name>.png`` (uint8 train ids, argmax) and then ``<out>/<name>_conf.png``
(``uint8(round(255 · max softmax))``), each atomically. An image counts as done only when both files
exist, so an interrupted run resumes where it stopped. No threshold is applied here: it is applied
when the labels are loaded for training (``data.autolabel.threshold``, see
:mod:`scaleseg.data.autolabel`). Unlike NVIDIA's dump, labels stay train ids (no labelId conversion).

Teacher: the configured inference (``make_predictor``) with ``scales`` and ``flip`` overriding
``eval.scales``/``eval.flip``: for a :class:`~scaleseg.models.hmsa.HierarchicalAttention` model its
hierarchical chain over ``scales`` (default ``eval.scales`` or (0.5, 1.0, 2.0)), for any other model
pooling over ``eval.scales`` (if any). Logits are averaged with the horizontal flip when ``flip`` is
set (NVIDIA's teacher: three scales + flip).

Sharding: with an initialised process group, or ``RANK``/``WORLD_SIZE`` in the environment (torchrun),
rank ``r`` of ``W`` labels the files ``r, r + W, ...`` of the sorted file list.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..config import Config
from ..data.autolabel import autolabel_paths
from ..errors import ConfigError, DataError
from ..models.hmsa import HierarchicalAttention, check_scales
from ..visualize import save_png
from .evaluate import _same_size_batches, collect_images, load_trained, normalize
from .speed import with_eval_memory
from .task import make_predictor

DEFAULT_SCALES = (0.5, 1.0, 2.0)


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) from the process group, else from ``RANK``/``WORLD_SIZE``, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    if not (rank.isdigit() and world.isdigit()) or not int(rank) < int(world):
        raise ConfigError(f"environment RANK={rank!r} WORLD_SIZE={world!r}: expected integers with 0 <= RANK < WORLD_SIZE")
    return int(rank), int(world)


def build_teacher(model: torch.nn.Module, cfg: Config, scales: Sequence[float] | None = None,
                  flip: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x: B×3×H×W`` normalised → ``B×K×H×W`` logits of the teacher: the configured inference
    (:func:`~scaleseg.engine.task.make_predictor`) with ``eval.flip = flip`` and ``eval.scales =
    scales`` (default: ``eval.scales``, or (0.5, 1.0, 2.0) for a hierarchical-attention model)."""
    e = cfg.eval
    hierarchical = isinstance(model, HierarchicalAttention)
    chosen = list(scales) if scales is not None else (e.scales or (list(DEFAULT_SCALES) if hierarchical else None))
    if hierarchical and e.scale_mode in ("auto", "hierarchical") and chosen is not None:
        check_scales(chosen, "autolabel scales")  # fail before the first batch, not in it
    teacher_cfg = dataclasses.replace(cfg, eval=dataclasses.replace(e, flip=flip, scales=chosen))
    return make_predictor(model, teacher_cfg)


def teacher_logits(teacher: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``B×K×H×W`` float logits of ``teacher`` at the input size (one call per batch)."""
    logits = teacher(x)
    if logits.shape[-2:] != x.shape[-2:]:
        logits = torch.nn.functional.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return logits.float()


def labels_and_confidence(logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``B×K×H×W`` logits → (``B×H×W`` uint8 argmax, ``B×H×W`` uint8 ``round(255 · max softmax)``)."""
    prob, label = torch.softmax(logits.float(), dim=1).max(dim=1)
    conf = torch.round(prob * 255).clamp_(0, 255)
    return label.to(torch.uint8).cpu().numpy(), conf.to(torch.uint8).cpu().numpy()


@with_eval_memory
def autolabel(cfg: Config, checkpoint: str | Path, inputs: Sequence[str | Path], out_dir: str | Path,
              batch_size: int = 4, scales: Sequence[float] | None = None, flip: bool = True) -> list[Path]:
    """Label every image of ``inputs`` (files/folders) with the teacher → label + confidence PNGs in
    ``out_dir``. Returns the label PNGs written by this call on this rank (done images are skipped)."""
    if batch_size < 1:
        raise ConfigError(f"autolabel batch_size={batch_size}: expected >= 1")
    out = Path(out_dir)
    inside_out = out.resolve()
    files = [f for f in collect_images(inputs) if not f[0].resolve().is_relative_to(inside_out)]  # skip own outputs
    if not files:
        raise DataError(f"no images to label in {', '.join(map(str, inputs))} (outside the output folder {out})")
    owners: dict[Path, Path] = {}
    for path, rel in files:
        target = autolabel_paths(out, rel)[0]
        if target in owners:
            raise DataError(f"autolabel inputs {owners[target]} and {path} would both write {target}; give distinct names")
        owners[target] = path
    rank, world = distributed_rank()

    def done(rel: Path) -> bool:
        return all(p.is_file() for p in autolabel_paths(out, rel))

    todo = [f for f in files[rank::world] if not done(f[1])]
    written: list[Path] = []
    if not todo:
        return written
    model, _ = load_trained(cfg, checkpoint)
    if model.num_classes > 255:
        raise ConfigError(f"autolabel writes uint8 label PNGs; the model has {model.num_classes} classes (expected <= 255)")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
    model.to(device).eval()
    teacher = build_teacher(model, cfg, scales, flip)
    bar = tqdm(total=len(todo), desc=f"autolabel (rank {rank}/{world})" if world > 1 else "autolabel",
               unit="img", disable=rank != 0)
    with torch.inference_mode(), bar:
        for batch in _same_size_batches(todo, batch_size):
            x = normalize(np.stack([b[2] for b in batch]), model.mean, model.std, device)
            labels, confs = labels_and_confidence(teacher_logits(teacher, x))
            for (_, rel, _), label, conf in zip(batch, labels, confs):
                label_path, conf_path = autolabel_paths(out, rel)
                save_png(label_path, label)  # label first, confidence last: done == both exist
                save_png(conf_path, conf)
                written.append(label_path)
            bar.update(len(batch))
    return written
