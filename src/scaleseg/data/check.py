"""``scaleseg check-data``: open every image and label of a dataset before training, in parallel,
and report all bad files at once.

Each image/label pair is checked the way training reads it (``scaleseg.data.base``): the image
decodes completely (truncated and undecodable files fail) and has a usable bit depth, the label
decodes, is a single-channel id image (mode L/P), holds only ids the dataset's spec maps to a class
or ignore, and has the image's size. Image and label are checked independently, so a pair can have
two problems. Datasets that build samples differently (auto-labels) are checked through their own
``load_raw``; generated datasets (ScaleScenes) have nothing to check.

Verdicts are cached per pair, keyed by both files' size and mtime (and by the dataset spec), in
``$SCALESEG_CACHE_DIR`` (default ``$XDG_CACHE_HOME/scaleseg`` or ``~/.cache/scaleseg``) under
``check/``: a second run only stats the files. A corrupted or unwritable cache is ignored.

Decoding runs in a thread pool (Pillow's decoders and numpy release the GIL). The progress bar shows
on a terminal only and is cleared before the table is printed.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..errors import DataError
from ..files import atomic_write_text
from .base import SegDataset, check_sizes, read_checked_label, read_image

CHECK_VERSION = 1
Verdict = list[tuple[str, str]]  # (file, problem) pairs; empty = good


@dataclass(frozen=True)
class Problem:
    split: str
    path: str
    reason: str


@dataclass
class Report:
    """What ``check_splits`` found: pairs checked, how many verdicts came from the cache, problems."""

    pairs: int = 0
    cached: int = 0
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)
    generated: list[str] = field(default_factory=list)  # splits with nothing to check

    @property
    def bad_files(self) -> int:
        return len({(p.split, p.path) for p in self.problems})


def cache_root() -> Path:
    if os.environ.get("SCALESEG_CACHE_DIR"):
        return Path(os.environ["SCALESEG_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "scaleseg"


# --------------------------------------------------------------------------------------------------
# one sample


def leaves(dataset: Any) -> list[Any]:
    """The datasets a (possibly joined) dataset is made of."""
    parts = getattr(dataset, "parts", None)
    if parts:
        return [leaf for part in parts for leaf in leaves(part)]
    return [dataset]


def reads_pairs(dataset: Any) -> bool:
    """True when samples are exactly the (image, label) files of ``dataset.pairs``."""
    return isinstance(dataset, SegDataset) and type(dataset).load_raw is SegDataset.load_raw


def sample_files(dataset: Any, i: int) -> list[Path]:
    """The files sample ``i`` is built from (the cache key)."""
    image, label = dataset.pairs[i]
    files = [image] + ([label] if label is not None else [])
    conf = getattr(dataset, "conf_paths", None)
    if conf is not None:
        files.append(conf[i])
    base = getattr(dataset, "base", None)
    if base is not None and getattr(dataset, "merge", ()) and base.pairs[i][1] is not None:
        files.append(base.pairs[i][1])
    return [Path(f) for f in files]


def _problem(err: DataError, fallback: Path) -> tuple[str, str]:
    return (err.path or str(fallback), err.reason or str(err))


def check_sample(dataset: Any, i: int) -> Verdict:
    """Everything wrong with sample ``i``: [(file, problem)], empty when it loads cleanly."""
    if not reads_pairs(dataset):
        try:
            dataset.load_raw(i)
        except DataError as err:
            return [_problem(err, dataset.pairs[i][0])]
        return []
    image_path, label_path = dataset.pairs[i]
    found: Verdict = []
    image = label = None
    try:
        image = read_image(image_path)
    except DataError as err:
        found.append(_problem(err, image_path))
    if label_path is not None:
        try:
            label = read_checked_label(label_path, dataset.spec)
        except DataError as err:
            found.append(_problem(err, label_path))
    if image is not None and label is not None:
        try:
            check_sizes(label, image, label_path, image_path)
        except DataError as err:
            found.append(_problem(err, label_path))
    return found


# --------------------------------------------------------------------------------------------------
# the cache


def _token(path: Path) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


class VerdictCache:
    """Per-sample verdicts of one dataset spec, keyed by the sample's files and their size + mtime."""

    def __init__(self, folder: Path | None, dataset: Any) -> None:
        spec = dataset.spec
        lut = spec.label_map.tobytes() if spec.label_map is not None else b""
        key_text = repr((CHECK_VERSION, type(dataset).__qualname__, spec.name, spec.classes, spec.ignore_index,
                         getattr(dataset, "threshold", None), getattr(dataset, "merge", None)))
        key = hashlib.blake2b(key_text.encode() + lut, digest_size=10).hexdigest()
        self.path = None if folder is None else folder / "check" / f"{spec.name}_{key}.json"
        self.entries: dict[str, Any] = {}
        self.dirty = False
        if self.path is not None and self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
                self.entries = data if isinstance(data, dict) else {}
            except (OSError, ValueError):
                self.entries = {}

    @staticmethod
    def key(files: Sequence[Path]) -> str:
        return "\0".join(str(f) for f in files)

    def get(self, files: Sequence[Path]) -> Verdict | None:
        entry = self.entries.get(self.key(files))
        if not isinstance(entry, dict):
            return None
        tokens = [_token(f) for f in files]
        if None in tokens or entry.get("tokens") != tokens:
            return None
        return [tuple(p) for p in entry.get("problems", [])]  # type: ignore[misc]

    def put(self, files: Sequence[Path], verdict: Verdict) -> None:
        tokens = [_token(f) for f in files]
        if None in tokens:
            return
        self.entries[self.key(files)] = {"tokens": tokens, "problems": [list(p) for p in verdict]}
        self.dirty = True

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        try:
            atomic_write_text(self.path, json.dumps(self.entries))
        except Exception:  # noqa: BLE001 - the cache is an optimisation: never fail a check because of it
            pass


# --------------------------------------------------------------------------------------------------
# whole splits


def check_splits(datasets: dict[str, Any], workers: int | None = None, progress: bool = True,
                 cache_dir: Path | None | bool = True) -> Report:
    """Check every sample of ``{split name: dataset}``; ``cache_dir=False`` disables the cache."""
    start = time.perf_counter()
    folder = cache_root() if cache_dir is True else (None if cache_dir is False else Path(cache_dir))
    report = Report()
    todo: list[tuple[str, Any, int, list[Path], VerdictCache]] = []
    caches: dict[Any, VerdictCache] = {}  # one per cache file: splits of one dataset share it
    for split, dataset in datasets.items():
        for leaf in leaves(dataset):
            if getattr(leaf, "generated", False):
                report.generated.append(split)
                continue
            cache = VerdictCache(folder, leaf)
            cache = caches.setdefault(cache.path or id(cache), cache)
            for i in range(len(leaf)):
                files = sample_files(leaf, i)
                report.pairs += 1
                verdict = cache.get(files)
                if verdict is None:
                    todo.append((split, leaf, i, files, cache))
                else:
                    report.cached += 1
                    report.problems += [Problem(split, f, r) for f, r in verdict]
    workers = workers or min(32, (os.cpu_count() or 1) + 2)
    if todo:
        with ThreadPoolExecutor(max_workers=workers) as pool, \
                tqdm(total=len(todo), desc="check-data", unit="pair", disable=None if progress else True, leave=False) as bar:
            futures = {pool.submit(check_sample, leaf, i): (split, files, cache) for split, leaf, i, files, cache in todo}
            for future in as_completed(futures):
                split, files, cache = futures[future]
                verdict = future.result()
                cache.put(files, verdict)
                report.problems += [Problem(split, f, r) for f, r in verdict]
                bar.update()
    for cache in caches.values():
        cache.save()
    report.problems.sort(key=lambda p: (p.split, p.path, p.reason))
    report.seconds = time.perf_counter() - start
    return report


def _relative(path: str, roots: Iterable[Path]) -> str:
    for root in roots:
        try:
            return str(Path(path).relative_to(root))
        except ValueError:
            continue
    return path


def format_table(report: Report, roots: Sequence[Path] = ()) -> str:
    """The bad files as an aligned table: split, file (relative to the dataset root), problem."""
    rows = [(p.split, _relative(p.path, roots), p.reason) for p in report.problems]
    head = ("split", "file", "problem")
    widths = [max(len(r[c]) for r in [head, *rows]) for c in range(2)]
    lines = [f"{head[0]:<{widths[0]}}  {head[1]:<{widths[1]}}  {head[2]}"]
    lines.append("-" * (widths[0] + widths[1] + 4 + max(len(r[2]) for r in [head, *rows])))
    lines += [f"{s:<{widths[0]}}  {f:<{widths[1]}}  {r}" for s, f, r in rows]
    return "\n".join(lines)


def summary(report: Report, splits: Sequence[str]) -> str:
    """One line: how many samples, how many bad files, how long, how many from the cache."""
    checked = [s for s in splits if s not in report.generated]
    where = f"split{'s' if len(checked) != 1 else ''} {', '.join(checked)}" if checked else "no split"
    timing = f"{report.seconds:.1f} s, {report.cached} of {report.pairs} verdicts cached"
    if report.problems:
        return (f"{report.bad_files} bad file{'s' if report.bad_files != 1 else ''} in {report.pairs} image/label "
                f"pairs of {where} (table above; {timing})")
    note = f"; {', '.join(report.generated)}: generated, nothing to check" if report.generated else ""
    return f"{report.pairs} image/label pairs of {where} are readable and valid ({timing}){note}"
