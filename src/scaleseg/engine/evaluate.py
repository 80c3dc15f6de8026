"""``scaleseg eval`` and ``scaleseg predict``."""
from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..config import Config
from ..data.base import read_image
from ..data.spec import DatasetSpec
from ..errors import ConfigError, DataError
from ..metrics import format_table
from ..models.dsrl import count_flops
from ..models.factory import create_model
from ..models.fold_bn import fold_batchnorm, probe_input
from ..visualize import colorize, overlay, save_png
from .checkpoint import load_model_weights
from .datamodule import SegDataModule
from .speed import compile_blocks, to_channels_last, use_channels_last, with_eval_memory
from .task import SegTask, make_predictor
from .train import build_trainer, write_text_atomic

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def load_trained(cfg: Config, checkpoint: str | Path) -> tuple[Any, SegDataModule]:
    """The configured model with the checkpoint's weights, and the data module for its dataset."""
    dm = SegDataModule(cfg)
    model = create_model(cfg, dm.spec.num_classes)
    load_model_weights(model, checkpoint)
    dm.set_normalization(model.mean, model.std)
    return ready_for_inference(model, cfg), dm


def ready_for_inference(model: Any, cfg: Config) -> Any:
    """The loaded model in eval mode with ``eval.fold_bn``, ``eval.channels_last`` and ``eval.compile``
    applied, in place."""
    model.eval()
    if cfg.eval.fold_bn:
        fold_batchnorm(model, probe_input(model))
    if use_channels_last(cfg.eval.channels_last, cfg.train.accelerator):  # inputs follow: a conv with NHWC weights returns NHWC
        to_channels_last(model)
    if cfg.eval.compile:
        compile_blocks(model)
    return model


def label_spec(cfg: Config) -> DatasetSpec:
    """Classes and palette of the configured dataset. Cityscapes, CamVid, ADE20K, ScaleScenes and a
    ``folder`` dataset with ``data.classes`` need no files, so ``predict`` can label images from
    anywhere (e.g. a model converted from official weights, with no copy of its dataset); Mapillary
    (and a folder dataset without ``data.classes``) reads the dataset."""
    from ..data.ade20k import ADE20K
    from ..data.camvid import CAMVID
    from ..data.cityscapes import CITYSCAPES
    from ..data.folder import make_spec
    from ..data.scalescenes import SCALESCENES

    static = {"cityscapes": CITYSCAPES, "camvid": CAMVID, "ade20k": ADE20K, "scalescenes": SCALESCENES}
    d = cfg.data
    if d.dataset in static:
        return static[d.dataset]
    if d.dataset == "folder" and d.classes:
        return make_spec(d.classes, d.palette, d.ignore_index if d.ignore_index is not None else 255)
    return SegDataModule(cfg).spec


@with_eval_memory
def evaluate(cfg: Config, checkpoint: str | Path, out_dir: str | Path, dump_scales: int = 0) -> dict[str, Any]:
    """Evaluate on ``data.val_split``; prints the per-class table and writes ``out_dir/metrics.json``
    (with the model's GFLOPs at the first image's input size). ``dump_scales`` > 0 also writes that
    many images' per-scale predictions and attention maps with an ``index.html`` to ``out_dir/scales``."""
    model, dm = load_trained(cfg, checkpoint)
    task = SegTask(model, cfg, list(dm.spec.classes))
    trainer = build_trainer(cfg, None, logger=False, max_epochs=1)
    trainer.validate(task, datamodule=dm, verbose=False)
    result = dict(task.last_scores or {})
    result["confusion_matrix"] = task.last_confusion.tolist() if task.last_confusion is not None else None
    result["checkpoint"] = str(checkpoint)
    result["split"] = cfg.data.val_split
    if trainer.is_global_zero:
        image = dm.val_set[0]["image"]
        size = list(image.shape[-2:])
        if cfg.eval.infer_scale is not None:  # the network sees the resized image
            size = [max(1, round(v * cfg.eval.infer_scale)) for v in size]
        result["gflops"] = count_flops(model, (1, image.shape[0], *size)) / 1e9
        result["input_size"] = size
        result["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
        print(format_table(task.last_scores))
        print(f"GFLOPs per image at {size[0]}×{size[1]}: {result['gflops']:.2f}")
        write_text_atomic(Path(out_dir) / "metrics.json", json.dumps(result, indent=2))
        if dump_scales:
            from .report import dump_scale_maps

            page = dump_scale_maps(model, dm.val_set, cfg.eval.scales or [1.0], Path(out_dir) / "scales", limit=dump_scales)
            print(f"wrote {page}")
    return result


def collect_images(inputs: Sequence[str | Path]) -> list[tuple[Path, Path]]:
    """(file, path relative to its input) for every image file given directly or found in folders."""
    found: list[tuple[Path, Path]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found += [(f, f.relative_to(path)) for f in sorted(path.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
        elif path.is_file():
            found.append((path, Path(path.name)))
        else:
            raise DataError(f"predict input not found: {path}")
    if not found:
        raise DataError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {', '.join(map(str, inputs))}")
    return found


def _same_size_batches(files: list[tuple[Path, Path]], batch_size: int) -> Iterator[list[tuple[Path, Path, np.ndarray]]]:
    batch: list[tuple[Path, Path, np.ndarray]] = []
    for path, rel in files:
        image = read_image(path)
        if batch and (len(batch) == batch_size or batch[0][2].shape != image.shape):
            yield batch
            batch = []
        batch.append((path, rel, image))
    if batch:
        yield batch


def resize_image(image: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """``H×W×3`` uint8 → ``size`` (h, w), bilinear; unchanged when the size already matches."""
    if image.shape[:2] == tuple(size[:2]):
        return image
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((int(size[1]), int(size[0])), Image.BILINEAR))


def normalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float], device: torch.device) -> torch.Tensor:
    """B×H×W×3 uint8 → B×3×H×W float32 normalised."""
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div_(255)
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)  # in place: one image-sized float buffer


@dataclass
class PredictResult:
    """What ``predict`` did: label PNGs written, inputs skipped (path, reason), inputs whose output
    name keeps the extension because another input has the same stem."""

    written: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    renamed: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.written)


def output_names(files: list[tuple[Path, Path]]) -> tuple[list[tuple[Path, Path]], list[str]]:
    """(file, output stem) per input, all distinct. Inputs found under the same relative path in
    different folders mirror their paths below the folders' common parent; inputs whose stems
    collide (``x.png`` and ``x.jpg``) keep the extension (``x.png_label.png``, ``x.jpg_label.png``)."""
    rels = [rel for _, rel in files]
    if len({str(r).lower() for r in rels}) < len({f.resolve() for f, _ in files}):
        common = Path(os.path.commonpath([str(f.resolve().parent) for f, _ in files]))
        rels = [f.resolve().relative_to(common) for f, _ in files]
    counts = Counter(str(r.with_suffix("")).lower() for r in rels)
    named, renamed = [], []
    for (path, _), rel in zip(files, rels):
        if counts[str(rel.with_suffix("")).lower()] > 1:
            named.append((path, rel))  # the whole name, extension included, is the stem
            renamed.append(str(rel))
        else:
            named.append((path, rel.with_suffix("")))
    return named, renamed


def _readable_batches(files: list[tuple[Path, Path]], batch_size: int, skip_bad: bool,
                      skipped: list[tuple[str, str]]) -> Iterator[list[tuple[Path, Path, np.ndarray]]]:
    """Batches of equal-size images. An unreadable file is skipped (and listed) with ``skip_bad``;
    without it the images read so far are yielded first, then its DataError is raised."""
    batch: list[tuple[Path, Path, np.ndarray]] = []
    for path, stem in files:
        try:
            image = read_image(path)
        except DataError as err:
            if not skip_bad:
                if batch:
                    yield batch
                raise
            skipped.append((str(path), err.reason or str(err)))
            continue
        if batch and (len(batch) == batch_size or batch[0][2].shape != image.shape):
            yield batch
            batch = []
        batch.append((path, stem, image))
    if batch:
        yield batch


@with_eval_memory
def predict(cfg: Config, checkpoint: str | Path, inputs: Sequence[str | Path], out_dir: str | Path,
            batch_size: int = 4, skip_bad: bool = False) -> PredictResult:
    """Write ``<name>_label.png`` (ids), ``<name>_color.png`` (palette PNG) and ``<name>_overlay.png``
    per image (names: :func:`output_names`), in batches of equal-size images, with a progress bar.
    Labels are at the model's output resolution (a DSRL model: 1/lr_scale × the input; the overlay shows
    the upsampled image). An unreadable image stops the command (after writing the images before it)
    unless ``skip_bad``."""
    if batch_size < 1:
        raise ConfigError(f"predict batch_size={batch_size}: expected >= 1")
    files, renamed = output_names(collect_images(inputs))
    spec = label_spec(cfg)
    model = create_model(cfg, spec.num_classes)
    load_model_weights(model, checkpoint)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ready_for_inference(model.to(device).eval(), cfg)
    infer = make_predictor(model, cfg, labels=True)
    palette = spec.palette_array()
    out = Path(out_dir)
    result = PredictResult(renamed=renamed)
    with torch.inference_mode(), tqdm(total=len(files), desc="predict", unit="img") as bar:
        for batch in _readable_batches(files, batch_size, skip_bad, result.skipped):
            x = normalize(np.stack([b[2] for b in batch]), model.mean, model.std, device)
            labels = infer(x).to(torch.uint8).cpu().numpy()
            del x
            for (_, stem, image), label in zip(batch, labels):
                base = out / stem
                color = colorize(label, palette)
                save_png(f"{base}_label.png", label)
                save_png(f"{base}_color.png", label, palette=palette)  # palette PNG: ids + colours
                save_png(f"{base}_overlay.png", overlay(resize_image(image, label.shape), color, 0.5))
                result.written.append(Path(f"{base}_label.png"))
            bar.n = len(result.written) + len(result.skipped)
            bar.refresh()
    return result
