"""Datasets and loaders from a config: deterministic, rank-sharded and resumable mid-epoch."""
from __future__ import annotations

from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from ..config import Config
from ..data.build import build_dataset
from ..data.sampler import EpochSampler
from ..data.transforms import eval_transform, train_transform

class ResumableLoader(DataLoader):
    """A DataLoader Lightning can checkpoint mid-epoch. Its state is (epoch, batches trained), where
    ``trained_batches()`` asks the trainer (the loader itself cannot know: batches are prefetched).
    After ``load_state_dict`` the next iteration of that epoch skips the batches already trained on."""

    def __init__(self, *args: Any, trained_batches: Callable[[], int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.trained_batches = trained_batches or (lambda: 0)
        self._resume: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        sampler = self.sampler
        if self._resume is not None and self._resume[0] == sampler.epoch:
            sampler.skip = self._resume[1] * self.batch_size
        self._resume = None
        try:
            yield from super().__iter__()
        finally:
            sampler.skip = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.sampler.epoch), "batches": int(self.trained_batches())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # Lightning creates (and prefetches from) the iterator before it calls set_epoch on a resume
        self.sampler.set_epoch(int(state["epoch"]))
        self._resume = (int(state["epoch"]), int(state["batches"]))


class SegDataModule(L.LightningDataModule):
    """Train / val loaders for one config. ``spec`` (classes, palette) is known right after init."""

    def __init__(self, cfg: Config, mean: tuple[float, ...] = (0.485, 0.456, 0.406),
                 std: tuple[float, ...] = (0.229, 0.224, 0.225)) -> None:
        super().__init__()
        self.cfg = cfg
        self.mean, self.std = tuple(mean), tuple(std)
        self.val_set = build_dataset(cfg.data, cfg.data.val_split, None, cfg.seed)
        self.spec = self.val_set.spec
        self.train_set: Any = None
        self.train_length = 0

    def set_normalization(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        """Input normalisation comes from the backbone's pretrained config."""
        self.mean, self.std = tuple(mean), tuple(std)

    def lr_scale(self) -> float | None:
        dsrl = self.cfg.model.dsrl
        return dsrl.lr_scale if dsrl.enabled else None

    def make_train_transform(self) -> Any:
        d = self.cfg.data
        return train_transform(
            tuple(d.crop_size), self.mean, self.std, scale_range=tuple(d.scale_range), base_size=d.base_size,
            interpolation=d.interpolation, hflip=d.hflip, color_jitter=d.color_jitter, blur=d.blur,
            lr_scale=self.lr_scale(),
        )

    def make_eval_transform(self) -> Any:
        return eval_transform(self.mean, self.std, base_size=self.cfg.eval.base_size, lr_scale=self.lr_scale())

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            self.train_set, self.train_length = self.build_train_set()
        self.val_set.transform = self.make_eval_transform()

    def build_train_set(self) -> tuple[Any, int]:
        """The training set, with auto-labelled images joined as configured, and the number of
        images an epoch covers (boost mode: only the fine images; auto-labels enter via centroids)."""
        d, seed = self.cfg.data, self.cfg.seed
        dataset = build_dataset(d, d.train_split, self.make_train_transform(), seed)
        length = len(dataset)
        a = d.autolabel
        if a.dir is not None:
            from ..data.autolabel import mix_autolabelled, with_autolabels

            if a.split is None:
                dataset = with_autolabels(dataset, a.dir, a.threshold, merge_classes=a.merge_classes)
                length = len(dataset)
            else:
                auto = build_dataset(d, a.split, self.make_train_transform(), seed)
                auto = with_autolabels(auto, a.dir, a.threshold, merge_classes=a.merge_classes)
                dataset, length = mix_autolabelled(dataset, auto, a.mix)
            dataset.seed = seed
        return dataset, length

    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _trained_batches(self) -> int:
        """Batches of the current epoch whose optimiser step is done (read when a checkpoint is saved)."""
        return int(self.trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank()
        t = self.cfg.train
        d = self.cfg.data
        if d.class_uniform_pct > 0:
            from ..data.uniform import class_uniform_sampler

            sampler = class_uniform_sampler(
                self.train_set, pct=d.class_uniform_pct, tile=d.class_uniform_tile,
                cache_dir=Path(self.cfg.output_dir) / "cache", seed=self.cfg.seed, rank=rank, world_size=world,
                num_images=self.train_length, boost_classes=d.class_uniform_classes,
                extra_classes=d.autolabel.classes if d.autolabel.mix == "boost" else None,
                workers=max(1, t.num_workers), progress=t.progress,
            )
        else:
            sampler = EpochSampler(self.train_length, shuffle=True, seed=self.cfg.seed, rank=rank, world_size=world, pad=True)
        return ResumableLoader(
            self.train_set, trained_batches=self._trained_batches, batch_size=t.batch_size, sampler=sampler, num_workers=t.num_workers,
            drop_last=len(sampler) >= t.batch_size, persistent_workers=t.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def val_dataloader(self) -> DataLoader:
        return eval_loader(self.val_set, self.cfg, *self._rank())


class IndexSubset(Dataset):
    """``dataset`` restricted to ``indices``; like ``torch.utils.data.Subset`` but it also maps the
    ``(epoch, i[, point])`` indices that scaleseg's samplers yield."""

    def __init__(self, dataset: Any, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, tuple):
            return self.dataset[(index[0], self.indices[index[1]], *index[2:])]
        return self.dataset[self.indices[index]]


def eval_loader(dataset: Any, cfg: Config, rank: int = 0, world_size: int = 1) -> DataLoader:
    """Ordered, unpadded shard of ``dataset`` for this rank (every image is counted exactly once).
    With ``eval.num_images = n`` only n evenly spaced images (indices ``⌊i·N/n⌋``) are evaluated."""
    n = cfg.eval.num_images
    if n is not None and n < len(dataset):
        dataset = IndexSubset(dataset, [i * len(dataset) // n for i in range(n)])
    sampler = EpochSampler(len(dataset), shuffle=False, rank=rank, world_size=world_size, pad=False)
    return DataLoader(dataset, batch_size=cfg.eval.batch_size, sampler=sampler,
                      num_workers=cfg.eval.num_workers, pin_memory=torch.cuda.is_available())
