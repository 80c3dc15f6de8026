"""Training cost of HMSA vs single-scale vs explicit multi-scale attention on the same trunk and batch.

Run with no arguments: ``python benchmarks/hmsa_cost.py``. Three variants — single scale;
hierarchical attention trained on (0.5, 1.0); explicit attention on (0.5, 1.0, 2.0) — are trained
with SGD on DeepLabV3+ / ResNet-50 at output stride 8 (the paper's ablation trunk), batch 2,
320×320 crop, 19 classes, the same batch for all. Each variant lives in its **own worker process**
(so memory figures do not mix); the workers are driven one step at a time, round-robin with a
rotating order, so only one computes at a time and load drift on a shared machine hits all variants
alike. Per variant:

* ``flops``: forward + backward FLOPs of one training step (``torch.utils.flop_counter``; exact and
  independent of the machine — the paper's figure is training FLOPs 1.0 / 1.25 / 5.25). This first
  step is also the warm-up (it allocates gradients and momentum buffers).
* ``time_s``: one training step (forward + backward + SGD step), median over ``TIMED_STEPS`` (``TIMED_EXPLICIT`` for explicit) after ``WARMUP``
  untimed rounds. On
  CPU it is the **process CPU time** (all threads; OpenMP threads told not to spin): on a shared
  machine wall time swings up to 10× with other jobs' load, CPU time tracks the work done.
  ``wall_s`` (best of the timed steps) is reported too. On CUDA ``time_s`` is the best wall time.
  glibc is set to keep freed memory (mmap threshold 32 MiB), as it ends up in a long run.
* ``peak_mib``: peak memory of one steady-state step above the resting state (weights and
  momentum buffers), i.e. activations, gradients and temporaries. CUDA: ``max_memory_allocated``
  minus ``memory_allocated`` before the step. CPU (Linux): peak RSS (``VmHWM``, reset through
  ``/proc/self/clear_refs``) minus RSS before the step, measured in a separate step with glibc's
  mmap threshold at 64 KiB so that freed tensors go back to the OS and RSS follows live tensors.

Ratios to single scale (``hier_time_ratio``, ``hier_mem_ratio``, ``explicit_time_ratio``,
``explicit_mem_ratio``, plus ``*_flops_ratio`` and ``*_wall_ratio``) and the raw figures are
written to ``benchmarks/results/hmsa_cost.json``.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure  # noqa: E402  (the glibc and /proc helpers the benchmarks share)

VARIANTS = ("single", "hierarchical", "explicit")
BACKBONE, NUM_CLASSES, BATCH, CROP = "resnet50", 19, 2, 320
WARMUP = 1  # untimed round after the FLOP count: the first steps still fault in fresh pages
TIMED_STEPS = 8  # single and hierarchical, interleaved: their ratio is the figure to pin (single steps spread ±10 %)
TIMED_EXPLICIT = 3  # explicit (0.5, 1, 2) takes ~6× a single step
THREADS = 2
RESULTS = Path(__file__).resolve().parent / "results" / "hmsa_cost.json"


def _build(variant: str):  # noqa: ANN202
    from scaleseg.models.hmsa import ExplicitAttention, HierarchicalAttention, deeplabv3plus_os8

    base = deeplabv3plus_os8(NUM_CLASSES, BACKBONE)
    channels = base.head.feat_channels
    if variant == "single":
        return base
    if variant == "hierarchical":
        return HierarchicalAttention(base, channels, train_scales=(0.5, 1.0))
    return ExplicitAttention(base, channels, scales=(0.5, 1.0, 2.0))


class _Trainer:
    """One variant's model, SGD optimiser and fixed batch; runs and measures single training steps."""

    def __init__(self, variant: str) -> None:
        import torch

        torch.set_num_threads(THREADS)
        torch.manual_seed(0)
        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.cuda = self.device.type == "cuda"
        self.model = _build(variant).to(self.device).train()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
        g = torch.Generator().manual_seed(0)
        self.batch = {
            "image": torch.randn(BATCH, 3, CROP, CROP, generator=g).to(self.device),
            "mask": torch.randint(0, NUM_CLASSES, (BATCH, CROP, CROP), generator=g).to(self.device),
        }
        self.steps = 0
        _measure.mallopt(32 << 20, 1 << 30)  # keep freed memory, as glibc's dynamic threshold ends up doing

    def _step(self) -> None:
        from scaleseg.types import StepInfo

        self.optimizer.zero_grad(set_to_none=True)
        losses = self.model.training_losses(self.batch, StepInfo(step=self.steps, max_steps=100))
        sum(losses.values()).backward()
        self.optimizer.step()
        if self.cuda:
            self.torch.cuda.synchronize()
        self.steps += 1

    def flops(self) -> dict:
        """Warm-up step under the FLOP counter."""
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            self._step()
        params = sum(p.numel() for p in self.model.parameters())
        return {"flops": counter.get_total_flops(), "params": params, "device": self.device.type}

    def time(self) -> dict:
        """Wall and process CPU time of one step."""
        wall, cpu = time.perf_counter(), time.process_time()
        self._step()
        return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}

    def memory(self) -> dict:
        """Peak memory of one step above the resting state (weights, momentum), in MiB."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
            rest = self.torch.cuda.memory_allocated()
            self._step()
            return {"peak_mib": (self.torch.cuda.max_memory_allocated() - rest) / 2**20}
        _measure.mallopt(64 << 10, 128 << 10)
        _measure.release_freed_memory()
        rest = _measure.proc_status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        self._step()
        peak = _measure.proc_status_bytes("VmHWM")
        _measure.mallopt(32 << 20, 1 << 30)
        return {"peak_mib": (peak - rest) / 2**20}


def worker(variant: str) -> None:
    """Serve commands (``flops`` / ``time`` / ``memory``) from stdin, one JSON line each, until EOF."""
    trainer = _Trainer(variant)
    print(json.dumps({"ready": variant}), flush=True)
    for line in sys.stdin:
        print(json.dumps(getattr(trainer, line.strip())()), flush=True)


def main() -> None:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
    procs = {
        v: subprocess.Popen([sys.executable, __file__, "--worker", v], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        for v in VARIANTS
    }
    for proc in procs.values():
        _measure.ask(proc, None)  # built
    figures = {v: {"variant": v} | _measure.ask(procs[v], "flops") for v in VARIANTS}
    _measure.round_robin(procs, "time", WARMUP)
    timed = _measure.round_robin({v: procs[v] for v in ("single", "hierarchical")}, "time", TIMED_STEPS)
    timed |= _measure.round_robin({"explicit": procs["explicit"]}, "time", TIMED_EXPLICIT)
    memory = _measure.round_robin(procs, "memory", 1)
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()

    for v in VARIANTS:
        f = figures[v]
        f["cpus_s"] = [t["cpu_s"] for t in timed[v]]
        f["walls_s"] = [t["wall_s"] for t in timed[v]]
        f["cpu_s"], f["wall_s"] = statistics.median(f["cpus_s"]), min(f["walls_s"])
        f["time_s"] = f["wall_s"] if f["device"] == "cuda" else f["cpu_s"]
        f["peak_mib"] = memory[v][0]["peak_mib"]
        print(f"{v:>12}: {f['flops'] / 1e9:7.1f} GFLOP/step  {f['time_s']:6.2f} s/step "
              f"({'wall' if f['device'] == 'cuda' else 'CPU'})  best wall {f['wall_s']:6.2f} s  "
              f"peak {f['peak_mib']:7.1f} MiB  ({f['params'] / 1e6:.2f} M params)", flush=True)
    single = figures["single"]
    result = {
        "setup": {"trunk": f"DeepLabV3+ {BACKBONE} OS8", "num_classes": NUM_CLASSES, "batch": BATCH,
                  "crop": CROP, "warmup": WARMUP, "timed_steps": TIMED_STEPS, "timed_explicit": TIMED_EXPLICIT, "threads": THREADS, "device": single["device"]},
        "raw": figures,
    }
    for key, variant in (("hier", "hierarchical"), ("explicit", "explicit")):
        f = figures[variant]
        for name, field in (("time", "time_s"), ("mem", "peak_mib"), ("flops", "flops"), ("wall", "wall_s")):
            result[f"{key}_{name}_ratio"] = f[field] / single[field]
        print(f"{key:>12} / single: flops ×{result[f'{key}_flops_ratio']:.2f}  "
              f"time ×{result[f'{key}_time_ratio']:.2f}  memory ×{result[f'{key}_mem_ratio']:.2f}  "
              f"(best wall ×{result[f'{key}_wall_ratio']:.2f})")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
    else:
        main()
