"""Speed-up of each speed switch on the CamVid CPU recipe's network, interleaved in one run.

Run with no arguments: ``python benchmarks/speed_switches.py``. The network is the one
``configs/camvid/deeplabv3plus_r18_cpu.yaml`` builds (11 classes), trained at that recipe's batch
and crop, and evaluated at its evaluation size (batch 4 × 180×240):

* training: ``eager`` (float32, NCHW), ``channels_last`` (``train.channels_last``), ``bf16``
  (``train.precision=bf16-mixed``: ``torch.autocast`` on the CPU, as Lightning does; on a CPU without
  native bf16 — no AVX512-BF16/AMX — oneDNN emulates it, many times slower, and only its first step
  is timed) and
  ``compile`` (``train.compile``: ``engine.speed.compile_blocks``, inductor);
* inference: ``eager``, ``channels_last`` (``eval.channels_last``) and ``compile`` (``eval.compile``);
  and ``eager`` against ``channels_last`` on a wide network and a large image (DeepLabV3+ R-50 OS8,
  1 × 512×1024, keys ``*_large``): NHWC's gain on the CPU depends on the layer widths and sizes.

Each variant lives in its own worker process, starts from the same weights and batch, warms up
(compiles) first, then the workers are driven one step at a time, round-robin with a rotating
order. ``time`` is the median process CPU time of a step (see ``vs_smp.py`` for why), the median
wall time is reported too. Each variant's first training loss and its inference logits are
compared with eager (dropout off for this check; bf16 to 2 %, the others to 1e-4), so a switch
that changes the result fails the benchmark. Results: ``benchmarks/results/speed_switches.json``
with ``<variant>_speedup`` (eager time ÷ variant time) for training, ``eval_channels_last_speedup``
and ``eval_compile_speedup``.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "camvid" / "deeplabv3plus_r18_cpu.yaml"
NUM_CLASSES = 11
TRAIN_VARIANTS = ("eager", "channels_last", "bf16", "compile")
INFER_VARIANTS = ("eager", "channels_last", "compile")
EVAL_BATCH, EVAL_SIZE = 4, (180, 240)
LARGE_VARIANTS, LARGE_SIZE = ("eager", "channels_last"), (512, 1024)  # DeepLabV3+ R-50 OS8, 19 classes
TIMED_TRAIN, TIMED_INFER, TIMED_LARGE = 3, 5, 3
THREADS = 2
RESULTS = Path(__file__).resolve().parent / "results" / "speed_switches.json"


class _Bench:
    def __init__(self, mode: str, variant: str) -> None:
        import torch
        from torch import nn

        from scaleseg import create_model, load_config
        from scaleseg.engine.speed import batch_to_channels_last, compile_blocks, to_channels_last

        torch.set_num_threads(THREADS)
        self.torch, self.mode, self.variant = torch, mode, variant
        cfg = load_config(RECIPE, [])
        torch.manual_seed(0)
        if mode == "infer_large":  # a wide network on a large image: where NHWC pays on the CPU
            from scaleseg.models.hmsa import deeplabv3plus_os8

            self.model = deeplabv3plus_os8(19, "resnet50")
        else:
            self.model = create_model(cfg, NUM_CLASSES)
        for m in self.model.modules():  # deterministic arithmetic, so results can be compared
            if isinstance(m, (nn.Dropout, nn.Dropout2d)):
                m.p = 0.0
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        g = torch.Generator().manual_seed(0)
        b, (h, w) = cfg.train.batch_size, cfg.data.crop_size
        self.batch = {"image": torch.randn(b, 3, h, w, generator=g),
                      "mask": torch.randint(0, NUM_CLASSES, (b, h, w), generator=g)}
        self.eval_image = (torch.randn(1, 3, *LARGE_SIZE, generator=g) if mode == "infer_large"
                           else torch.randn(EVAL_BATCH, 3, *EVAL_SIZE, generator=g))
        self.setup = {"batch": b, "crop": [h, w], "eval": [EVAL_BATCH, *EVAL_SIZE], "eval_large": [1, *LARGE_SIZE]}
        if variant == "channels_last":
            to_channels_last(self.model)
            self.batch = batch_to_channels_last(self.batch)
        if variant == "compile":
            compile_blocks(self.model)
        _measure.keep_freed_memory()

    def _train_step(self) -> float:
        from scaleseg.types import StepInfo

        torch = self.torch
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.variant == "bf16"):
            losses = self.model.training_losses(self.batch, StepInfo(0, 100))
        loss = sum(losses.values())
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def _infer(self):  # noqa: ANN202
        self.model.eval()
        with self.torch.inference_mode():
            return self.model(self.eval_image)

    def warmup(self) -> dict:
        """First step (compiles), and the values compared across variants: the first loss, or
        a hash-free summary of the logits (their sum and a slice)."""
        wall, cpu = time.perf_counter(), time.process_time()
        if self.mode == "train":
            value = self._train_step()
            return {"loss": value, "warmup_s": time.perf_counter() - wall, "warmup_cpu_s": time.process_time() - cpu,
                    "setup": self.setup}
        out = self._infer()
        self._infer()  # dynamic-shape recompiles happen on the second call at most
        return {"logits": out[0, :, ::16, ::16].flatten().tolist(), "warmup_s": time.perf_counter() - wall,
                "setup": self.setup}

    def skip(self) -> bool:
        """bf16 without native CPU support (AVX512-BF16/AMX) is emulated and many times slower:
        its warm-up step is its only timed step, so the benchmark stays within its time budget."""
        return self.variant == "bf16" and not self.torch.ops.mkldnn._is_mkldnn_bf16_supported()

    def step(self) -> dict:
        wall, cpu = time.perf_counter(), time.process_time()
        self._train_step() if self.mode == "train" else self._infer()
        return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}


def _run(mode: str, variants: tuple[str, ...], rounds: int, env: dict[str, str]) -> dict:
    procs = {v: _measure.start_worker(__file__, [mode, v], env) for v in variants}
    first = {v: _measure.ask(procs[v], "warmup") for v in variants}
    emulated = {v for v in variants if _measure.ask(procs[v], "skip") is True}
    timed = _measure.round_robin({v: p for v, p in procs.items() if v not in emulated}, "step", rounds)
    _measure.stop(procs)
    out = {}
    for v in variants:
        if v in emulated:  # its warm-up step is its only sample
            first[v]["emulated"] = True
            timed[v] = [{"cpu_s": first[v]["warmup_cpu_s"], "wall_s": first[v]["warmup_s"]}]
        cpu, wall = [t["cpu_s"] for t in timed[v]], [t["wall_s"] for t in timed[v]]
        out[v] = first[v] | {"cpu_s": statistics.median(cpu), "wall_s": statistics.median(wall),
                             "cpus_s": cpu, "walls_s": wall}
    return out


def main() -> None:
    import torch

    start = time.perf_counter()
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
    load_before = os.getloadavg()
    train = _run("train", TRAIN_VARIANTS, TIMED_TRAIN, env)
    infer = _run("infer", INFER_VARIANTS, TIMED_INFER, env)
    large = _run("infer_large", LARGE_VARIANTS, TIMED_LARGE, env)
    result: dict = {"setup": train["eager"]["setup"] | {"recipe": str(RECIPE.relative_to(ROOT)), "threads": THREADS,
                                                        "load_before": load_before}}
    base = train["eager"]
    print(f"training step, batch {base['setup']['batch']} × {base['setup']['crop']} (CPU s, median of {TIMED_TRAIN}):")
    for v in TRAIN_VARIANTS:
        f = train[v]
        rel = 2e-2 if v == "bf16" else 1e-4
        same = abs(f["loss"] - base["loss"]) <= rel * abs(base["loss"])
        result[f"{v}_speedup"] = base["cpu_s"] / f["cpu_s"]
        result[f"{v}_wall_speedup"] = base["wall_s"] / f["wall_s"]
        result[f"{v}_loss"] = f["loss"]
        print(f"  {v:>14}: {f['cpu_s']:6.2f} s (wall {f['wall_s']:6.2f} s, first step {f['warmup_s']:6.1f} s)  "
              f"speed-up ×{result[f'{v}_speedup']:.2f} (wall ×{result[f'{v}_wall_speedup']:.2f})  "
              f"loss {f['loss']:.5f}{'' if same else '  DIFFERS'}"
              f"{'  (no native bf16 on this CPU: emulated, one step)' if f.get('emulated') else ''}", flush=True)
        assert same, f"{v}: first loss {f['loss']} differs from eager {base['loss']}"
    cases = [("", f"batch {EVAL_BATCH} × {list(EVAL_SIZE)}, the recipe's network", infer, INFER_VARIANTS, TIMED_INFER),
             ("_large", f"1 × {list(LARGE_SIZE)}, DeepLabV3+ R-50 OS8", large, LARGE_VARIANTS, TIMED_LARGE)]
    for suffix, what, runs, variants, timed in cases:
        print(f"inference, {what} (median of {timed}):")
        ref = torch.tensor(runs["eager"]["logits"])
        for v in variants:
            f = runs[v]
            diff = float((torch.tensor(f["logits"]) - ref).abs().max())
            speed = runs["eager"]["cpu_s"] / f["cpu_s"]
            print(f"  {v:>14}: {f['cpu_s']:6.3f} s (wall {f['wall_s']:6.3f} s, warm-up {f['warmup_s']:6.1f} s)  "
                  f"speed-up ×{speed:.2f} (wall ×{runs['eager']['wall_s'] / f['wall_s']:.2f})  max |Δlogit| {diff:.1e}")
            assert diff < 1e-3, f"eval {v}: logits differ from eager by {diff}"
            if v != "eager":
                result[f"eval_{v}_speedup{suffix}"] = speed
                result[f"eval_{v}_wall_speedup{suffix}"] = runs["eager"]["wall_s"] / f["wall_s"]
    result["raw"] = {"train": train, "infer": infer, "infer_large": large}
    result["setup"]["load_after"] = os.getloadavg()
    result["setup"]["seconds"] = time.perf_counter() - start
    _measure.write_results(RESULTS, result)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        _measure.serve(_Bench(sys.argv[2], sys.argv[3]))
    else:
        main()
