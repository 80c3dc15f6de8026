"""DSRL feature-affinity loss: peak memory of the chunked loss at 1024×2048 vs a dense affinity.

Run ``python benchmarks/dsrl_fa.py`` (no arguments; a few minutes on 2 CPU cores). Prints the figures
and writes ``benchmarks/results/dsrl_fa.json`` with

* ``fa_peak_mib``: memory the chunked FA loss needs, forward + backward, for two 1×32×1024×2048
  float32 feature maps (subsample 8 → N = 128·256 = 32768 pixels), on top of the memory any loss on
  those maps needs (the inputs and their two 256 MiB gradients). It is the larger of
  (a) peak RSS growth of ``fa_loss(...).backward()`` minus peak RSS growth of a pooling-only loss
      with the same inputs and input gradients, and
  (b) peak RSS growth of the affinity stage alone (leaves already pooled to 32×128×256), which needs
      no subtraction.
* ``dense_mib``: what a dense affinity needs, analytically: 4·N²·4 bytes = S_seg, S_sr, D = S_seg − S_sr
  and |D| (forward; in the backward the sign/gradient of D takes |D|'s place), fp32, one image.
  (The two input-sized gradients come on top in both cases and are not counted in either figure.)
* ``max_abs_diff``: largest |chunked − dense| loss over small inputs (2×32×256×512 → N = 2048) with
  several block budgets; ``max_abs_grad_diff`` the same for the input gradients.

Peak memory is measured honestly in a fresh subprocess per case: the kernel's resident-set high-water
mark (``VmHWM``) is reset through ``/proc/self/clear_refs`` right before the call, the current
``VmRSS`` is the baseline, and ``VmHWM`` after forward + backward is the peak. This counts every
allocation (PyTorch, BLAS workspaces), unlike allocator statistics. If the reset is not permitted,
``ru_maxrss`` is used instead (it can only over-report, never under-report, the peak).
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from scaleseg.losses.fa import DEFAULT_MAX_BLOCK_BYTES, dense_fa_loss, fa_loss

MIB = 2**20
CHANNELS, HEIGHT, WIDTH, SUBSAMPLE = 32, 1024, 2048, 8
RESULTS = Path(__file__).resolve().parent / "results" / "dsrl_fa.json"


# ------------------------------------------------------------------------- memory probes
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _measure(fn) -> dict:
    """Run ``fn()``; peak RSS growth (MiB) over the RSS right before the call, and wall time."""
    reset = _reset_peak()
    base_kib = _status_kib("VmRSS")
    base_max_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    if reset:
        peak_kib = _status_kib("VmHWM")
    else:  # fallback: process-lifetime maximum (over-reports if an earlier peak was higher)
        peak_kib = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, base_max_kib)
    return {"peak_mib": (peak_kib - base_kib) / 1024, "seconds": seconds, "hwm_reset": reset}


def _worker(case: str) -> dict:
    """One measurement in this (fresh) process."""
    torch.manual_seed(0)
    if case == "affinity_stage":  # leaves already pooled: only the affinity part of the loss
        shape = (1, CHANNELS, HEIGHT // SUBSAMPLE, WIDTH // SUBSAMPLE)
        sub = 1
    else:
        shape = (1, CHANNELS, HEIGHT, WIDTH)
        sub = SUBSAMPLE
    f_seg = torch.randn(shape).requires_grad_(True)
    f_sr = torch.randn(shape).requires_grad_(True)

    def run() -> None:
        if case == "pool_reference":
            loss = (torch.nn.functional.avg_pool2d(f_seg, sub).sum() + torch.nn.functional.avg_pool2d(f_sr, sub).sum())
        else:
            loss = fa_loss(f_seg, f_sr, sub, max_block_bytes=DEFAULT_MAX_BLOCK_BYTES)
        loss.backward()

    result = _measure(run)
    result["input_mib"] = 2 * f_seg.numel() * f_seg.element_size() / MIB
    result["grads_present"] = f_seg.grad is not None and f_sr.grad is not None
    return result


def _spawn(case: str) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", case],
        check=True, capture_output=True, text=True, env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------- accuracy
def _accuracy() -> tuple[float, float]:
    torch.manual_seed(1)
    f_seg = torch.randn(2, CHANNELS, 256, 512, requires_grad=True)
    f_sr = torch.rand(2, CHANNELS, 256, 512, requires_grad=True)
    dense = dense_fa_loss(f_seg, f_sr, SUBSAMPLE)
    dense_grads = torch.autograd.grad(dense, (f_seg, f_sr))
    n = (256 // SUBSAMPLE) * (512 // SUBSAMPLE)
    max_diff = max_grad_diff = 0.0
    for rows in (1, 7, 100, 512, n):
        chunked = fa_loss(f_seg, f_sr, SUBSAMPLE, max_block_bytes=rows * n * 4)
        grads = torch.autograd.grad(chunked, (f_seg, f_sr))
        max_diff = max(max_diff, abs(chunked.item() - dense.item()))
        max_grad_diff = max(max_grad_diff, *(float((a - b).abs().max()) for a, b in zip(grads, dense_grads)))
    return max_diff, max_grad_diff


def main() -> None:
    n = (HEIGHT // SUBSAMPLE) * (WIDTH // SUBSAMPLE)
    dense_mib = 4 * n * n * 4 / MIB
    print(f"FA loss, features 1×{CHANNELS}×{HEIGHT}×{WIDTH} fp32, subsample {SUBSAMPLE}: N = {n}")
    print(f"block budget {DEFAULT_MAX_BLOCK_BYTES / MIB:.0f} MiB = {DEFAULT_MAX_BLOCK_BYTES // (n * 4)} rows of N")
    full = _spawn("fa_full")
    ref = _spawn("pool_reference")
    stage = _spawn("affinity_stage")
    excess = full["peak_mib"] - ref["peak_mib"]
    fa_peak = max(excess, stage["peak_mib"])
    max_diff, max_grad_diff = _accuracy()
    results = {
        "fa_peak_mib": round(fa_peak, 1),
        "dense_mib": round(dense_mib, 1),
        "max_abs_diff": max_diff,
        "max_abs_grad_diff": max_grad_diff,
        "n_pixels": n,
        "block_budget_mib": DEFAULT_MAX_BLOCK_BYTES / MIB,
        "fa_full_call_peak_mib": round(full["peak_mib"], 1),
        "pool_only_reference_peak_mib": round(ref["peak_mib"], 1),
        "fa_minus_reference_mib": round(excess, 1),
        "affinity_stage_peak_mib": round(stage["peak_mib"], 1),
        "input_features_mib": full["input_mib"],
        "fa_full_call_seconds": round(full["seconds"], 2),
        "affinity_stage_seconds": round(stage["seconds"], 2),
        "hwm_reset": full["hwm_reset"] and ref["hwm_reset"] and stage["hwm_reset"],
        "dense_formula": "4 * N^2 * 4 B (S_seg, S_sr, D, |D| or grad D), fp32, batch 1",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    print(f"full fa_loss fwd+bwd: peak +{full['peak_mib']:.1f} MiB ({full['seconds']:.1f} s), "
          f"pool-only reference +{ref['peak_mib']:.1f} MiB → FA excess {excess:.1f} MiB")
    print(f"affinity stage alone (pooled leaves): peak +{stage['peak_mib']:.1f} MiB ({stage['seconds']:.1f} s)")
    print(f"fa_peak_mib = {fa_peak:.1f} MiB   dense_mib = {dense_mib:.0f} MiB (4·N²·4 B)")
    print(f"max |chunked − dense| loss = {max_diff:.3e}, gradient = {max_grad_diff:.3e} (2×32×256×512, N = 2048)")
    ok = fa_peak <= 256 and max_diff <= 1e-5
    print("acceptance (fa_peak_mib ≤ 256, max_abs_diff ≤ 1e-5):", "PASS" if ok else "FAIL")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(_worker(sys.argv[2])))
    else:
        main()
