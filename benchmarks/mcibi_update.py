"""MCIBI memory update: vectorised FeatureMemory.update vs the reference's per-class loop.

Run ``python benchmarks/mcibi_update.py`` (no arguments; a few minutes on 2 CPU cores). Prints the
figures and writes ``benchmarks/results/mcibi_update.json``.

Setting: batch 2, C = 512, features 64×64 (stride 8), labels 512×512 made of 16×16-pixel blocks of
random classes (nearly every class present) with 5 % ignore pixels; the memory is initialised, so
every step is the EMA path (the steady state of training).

Timing (in this process, median of repeats after one warm-up call each; the variants take turns
so that load from other processes affects them alike; the 1-minute load average is recorded):
* ``reference loop``: sssegmentation's ``FeaturesMemory.update`` — features bilinearly upsampled to
  label size, ``permute().contiguous()``, then a Python loop over ``labels.unique()`` with one
  boolean-mask gather over all B·H·W pixels per class, cosine weights without eps.
* ``vectorised``: ``FeatureMemory.update`` with its default ``full_resolution=False`` (soft label
  counts per feature cell, ``label_downsample="soft"``) and, for same-pixels comparisons, with
  ``full_resolution=True`` and with labels nearest-downsampled beforehand (the loop is also timed at
  feature resolution on those labels; ``vectorised_feature_nearest_s``).
``speedup_k{19,150}`` = reference loop (full resolution, as upstream) ÷ vectorised default update
(feature resolution). The ``*_same_pixels_*`` keys compare loop and vectorised on identical pixel
sets, so they isolate vectorisation from the resolution change.

Peak memory (Linux): each update runs once in a fresh subprocess, after the inputs exist and a
tiny warm-up update has loaded the kernels. The peak-RSS mark is reset (``/proc/self/clear_refs``
← 5), and the figure is ``VmHWM`` after the call minus ``VmRSS`` before it. glibc is told to mmap
every block ≥ 64 KiB (``MALLOC_MMAP_THRESHOLD_``), so freed blocks leave the resident set and the
high-water mark follows torch's live CPU allocations (tracemalloc does not see torch).
``memory_ratio`` = full-resolution ÷ feature-resolution peak increase of the vectorised update.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from scaleseg.models.mcibi import FeatureMemory
from scaleseg.types import StepInfo

BATCH, CHANNELS, FEAT, LABEL, BLOCK = 2, 512, 64, 512, 16
IGNORE = 255
RESULTS = Path(__file__).resolve().parent / "results" / "mcibi_update.json"
STEP = StepInfo(step=100, max_steps=1000)


def make_inputs(num_classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``B×C×64×64`` non-negative features, ``B×512×512`` int64 labels in blocks, 5 % ignore."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(BATCH, CHANNELS, FEAT, FEAT, generator=g).relu()
    cells = LABEL // BLOCK
    grid = torch.randint(0, num_classes, (BATCH, 1, cells, cells), generator=g).float()
    labels = F.interpolate(grid, size=(LABEL, LABEL), mode="nearest")[:, 0].long()
    labels[torch.rand(labels.shape, generator=g) < 0.05] = IGNORE
    return feats, labels


def reference_loop_update(
    memory: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor, momentum: float, *, full_resolution: bool = True
) -> None:
    """sssegmentation ``FeaturesMemory.update`` (``num_feats_per_cls = 1``, cosine strategy)."""
    with torch.no_grad():
        if full_resolution:
            feats = F.interpolate(feats, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        else:
            labels = F.interpolate(labels[:, None].float(), size=feats.shape[-2:], mode="nearest")[:, 0].long()
        channels = feats.shape[1]
        feats = feats.permute(0, 2, 3, 1).contiguous().view(-1, channels)
        labels = labels.view(-1)
        for clsid in labels.unique().tolist():
            if clsid == IGNORE:
                continue
            feats_cls = feats[labels == clsid]
            mem_cls = memory[clsid]
            if (mem_cls == 0).all():
                memory[clsid] = feats_cls.mean(0)
                continue
            sim = F.cosine_similarity(feats_cls, mem_cls.unsqueeze(0).expand_as(feats_cls))
            weight = (1 - sim) / (1 - sim).sum()
            memory[clsid] = (1 - momentum) * mem_cls + momentum * (feats_cls * weight.unsqueeze(-1)).sum(0)


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per function; one warm-up call each, then the functions take turns so that
    load from other processes affects all of them alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def time_all(num_classes: int, repeats_full: int, repeats_feature: int) -> dict[str, float]:
    feats, labels = make_inputs(num_classes)
    init_feats, init_labels = make_inputs(num_classes, seed=1)
    momentum = FeatureMemory(num_classes, CHANNELS).momentum_at(STEP.step, STEP.max_steps)

    def vectorised(full_resolution: bool) -> FeatureMemory:
        mem = FeatureMemory(num_classes, CHANNELS, full_resolution=full_resolution)
        mem.update(init_feats, init_labels, StepInfo(0, 1000))  # initialise every class
        return mem

    mem_feat, mem_full = vectorised(False), vectorised(True)
    nearest = F.interpolate(labels[:, None].float(), size=feats.shape[-2:], mode="nearest")[:, 0].long()
    ref_mem_full = mem_full.memory.clone()
    ref_mem_feat = mem_feat.memory.clone()
    out = interleaved_medians(
        {
            "loop_full_s": lambda: reference_loop_update(ref_mem_full.clone(), feats, labels, momentum),
            "vectorised_full_s": lambda: mem_full.update(feats, labels, STEP),
        },
        repeats_full,
    )
    out |= interleaved_medians(
        {
            "loop_feature_s": lambda: reference_loop_update(
                ref_mem_feat.clone(), feats, labels, momentum, full_resolution=False
            ),
            "vectorised_feature_s": lambda: mem_feat.update(feats, labels, STEP),
            "vectorised_feature_nearest_s": lambda: mem_feat.update(feats, nearest, STEP),
        },
        repeats_feature,
    )
    # sanity: the vectorised update computes the same thing as the loop
    check = FeatureMemory(num_classes, CHANNELS, full_resolution=True)
    check.load_state_dict({"memory": ref_mem_full, "initialized": torch.ones(num_classes, dtype=torch.bool)})
    check.update(feats, labels, STEP)
    loop_mem = ref_mem_full.clone()
    reference_loop_update(loop_mem, feats, labels, momentum)
    out["max_abs_diff_vs_loop"] = float((check.memory - loop_mem).abs().max())
    return out


# ---------------------------------------------------------------------------------------------
# peak memory, one fresh subprocess per measurement
# ---------------------------------------------------------------------------------------------
def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _peak_child(mode: str) -> None:
    """One update of the given kind; prints the peak-RSS increase it caused (KiB)."""
    num_classes = 150
    feats, labels = make_inputs(num_classes)
    init = torch.ones(num_classes, dtype=torch.bool)
    memory = torch.rand(num_classes, CHANNELS)
    # tiny warm-up through the same code path so lazy kernel/thread-pool setup is not counted
    small_feats, small_labels = feats[:1, :, :8, :8].clone(), labels[:1, :64, :64].clone()
    if mode == "loop_full":
        reference_loop_update(memory.clone(), small_feats, small_labels, 0.5)
    else:
        mem = FeatureMemory(num_classes, CHANNELS, full_resolution=(mode == "vectorised_full"))
        mem.load_state_dict({"memory": memory, "initialized": init})
        mem.update(small_feats, small_labels, STEP)
    with open("/proc/self/clear_refs", "w") as clear:  # reset the peak (VmHWM) to the current RSS
        clear.write("5")
    before = _proc_status_kib("VmRSS")
    if mode == "loop_full":
        reference_loop_update(memory, feats, labels, 0.5)
    else:
        mem.update(feats, labels, STEP)
    print(json.dumps({"peak_increase_kib": _proc_status_kib("VmHWM") - before}))


def measure_peak(mode: str) -> float:
    """Peak-RSS increase (MiB) of one update in a fresh process. ``MALLOC_MMAP_THRESHOLD_`` makes
    glibc serve every block ≥ 64 KiB by mmap and unmap it on free, so freed memory never stays
    resident and the RSS high-water mark follows torch's live CPU allocations."""
    proc = subprocess.run(
        [sys.executable, __file__, "--peak-child", mode],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "65536"},
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_increase_kib"] / 1024.0


def main() -> None:
    start = time.perf_counter()
    load_at_start = os.getloadavg()[0]
    print(f"load average {load_at_start:.2f}; torch {torch.__version__}, {torch.get_num_threads()} threads; batch {BATCH}, C {CHANNELS}, "
          f"features {FEAT}x{FEAT}, labels {LABEL}x{LABEL}")
    timings = {}
    for k in (19, 150):
        t = time_all(k, repeats_full=3, repeats_feature=15)
        timings[k] = t
        print(
            f"K={k:3d}: reference loop (full res) {t['loop_full_s'] * 1e3:8.1f} ms | vectorised feature res "
            f"{t['vectorised_feature_s'] * 1e3:7.1f} ms | vectorised full res {t['vectorised_full_s'] * 1e3:8.1f} ms | "
            f"loop feature res {t['loop_feature_s'] * 1e3:7.1f} ms | max |diff| vs loop {t['max_abs_diff_vs_loop']:.2e}"
        )
    peaks = {mode: measure_peak(mode) for mode in ("vectorised_feature", "vectorised_full", "loop_full")}
    print(
        f"peak RSS increase (K=150): vectorised feature res {peaks['vectorised_feature']:.1f} MiB, "
        f"vectorised full res {peaks['vectorised_full']:.1f} MiB, reference loop full res {peaks['loop_full']:.1f} MiB"
    )
    result = {
        "speedup_k19": timings[19]["loop_full_s"] / timings[19]["vectorised_feature_s"],
        "speedup_k150": timings[150]["loop_full_s"] / timings[150]["vectorised_feature_s"],
        "memory_ratio": peaks["vectorised_full"] / peaks["vectorised_feature"],
        "speedup_same_pixels_full_k19": timings[19]["loop_full_s"] / timings[19]["vectorised_full_s"],
        "speedup_same_pixels_full_k150": timings[150]["loop_full_s"] / timings[150]["vectorised_full_s"],
        "speedup_same_pixels_feature_k19": timings[19]["loop_feature_s"] / timings[19]["vectorised_feature_nearest_s"],
        "speedup_same_pixels_feature_k150": timings[150]["loop_feature_s"] / timings[150]["vectorised_feature_nearest_s"],
        "timings_s": {str(k): v for k, v in timings.items()},
        "peak_rss_increase_mib": peaks,
        "memory_ratio_reference_loop_vs_feature": peaks["loop_full"] / peaks["vectorised_feature"],
        "setup": {
            "batch": BATCH, "channels": CHANNELS, "features": [FEAT, FEAT], "labels": [LABEL, LABEL],
            "label_block": BLOCK, "ignore_fraction": 0.05, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "machine": platform.machine(),
            "memory_method": "VmHWM after - VmRSS before one update in a fresh subprocess (peak reset via clear_refs, MALLOC_MMAP_THRESHOLD_=65536)",
            "load_average_1min_at_start": load_at_start,
            "speedup_definition": "reference loop at full resolution / vectorised update at feature resolution (default)",
        },
        "wall_time_s": time.perf_counter() - start,
    }
    for key in ("speedup_k19", "speedup_k150", "memory_ratio", "speedup_same_pixels_full_k150", "speedup_same_pixels_feature_k150"):
        print(f"{key}: {result[key]:.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS} ({result['wall_time_s']:.0f} s)")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--peak-child":  # internal: one measurement per process
        _peak_child(sys.argv[2])
    else:
        main()
