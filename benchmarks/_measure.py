"""Shared measuring helpers for the benchmarks: CPU peak memory from RSS, and worker processes
driven one command at a time (so variants never compute at the same time and load drift on a
shared machine hits them alike).

Peak memory on CPU (Linux) is the peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``)
minus the RSS before the measured call, with glibc's mmap threshold lowered to 64 KiB so that
freed tensors go back to the OS and RSS follows the live tensors. On CUDA it is
``max_memory_allocated`` minus ``memory_allocated`` before the call. Between measurements glibc is
set to keep freed memory (mmap threshold 32 MiB), as it ends up in a long run.
"""
from __future__ import annotations

import gc
import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

def mallopt(mmap_threshold: int, trim_threshold: int) -> None:
    """Set glibc's mmap/trim thresholds (no-op on other C libraries)."""
    from scaleseg.engine.speed import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, glibc_mallopt

    glibc_mallopt((M_MMAP_THRESHOLD, mmap_threshold), (M_TRIM_THRESHOLD, trim_threshold))


def keep_freed_memory() -> None:
    """glibc keeps freed blocks (the steady state of a long run); call once at worker start."""
    mallopt(32 << 20, 1 << 30)


def release_freed_memory() -> None:
    from scaleseg.engine.speed import release_freed_memory as trim

    gc.collect()
    trim()


def proc_status_bytes(key: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in bytes (Linux ``/proc``)."""
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name == key:
                return int(value.split()[0]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}; CPU peak memory needs Linux")


def peak_memory_mib(fn: Callable[[], Any], cuda: bool = False) -> float:
    """Peak memory of ``fn()`` above the state before the call, in MiB (see module docstring)."""
    if cuda:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        rest = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - rest) / 2**20
    mallopt(64 << 10, 128 << 10)
    release_freed_memory()
    rest = proc_status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    fn()
    peak = proc_status_bytes("VmHWM")
    keep_freed_memory()
    return (peak - rest) / 2**20


def serve(obj: Any) -> None:
    """Worker loop: answer each stdin line ``method`` (or ``method arg``) with ``obj.method(arg)``
    as one JSON line, until EOF."""
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        name, _, arg = line.strip().partition(" ")
        method = getattr(obj, name)
        print(json.dumps(method(arg) if arg else method()), flush=True)


def start_worker(script: str, args: Sequence[str], env: dict[str, str]) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, script, "--worker", *args], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    ask(proc, None)  # wait until it has built its model
    return proc


def ask(proc: subprocess.Popen, command: str | None) -> dict:
    """Send ``command`` (None: only read) and return the worker's JSON answer."""
    if command is not None:
        assert proc.stdin is not None
        proc.stdin.write(command + "\n")
        proc.stdin.flush()
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        sys.exit(f"worker {' '.join(map(str, proc.args[2:]))} exited with code {proc.wait()} "
                 "(its error is printed above)")
    return json.loads(line)


def round_robin(procs: dict[str, subprocess.Popen], command: str, rounds: int) -> dict[str, list[dict]]:
    """``rounds`` × each worker once, rotating the order each round."""
    names = list(procs)
    answers: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            answers[n].append(ask(procs[n], command))
    return answers


def stop(procs: dict[str, subprocess.Popen]) -> None:
    for proc in procs.values():
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait()


def write_results(path: Any, result: dict[str, Any]) -> None:
    """Write ``result`` as JSON to ``path`` (``benchmarks/results/<script>.json``) and say so, with the
    run's seconds and the 1-minute load average before and after (``result["setup"]``)."""
    import json
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    setup = result["setup"]
    print(f"\nwrote {path} ({setup['seconds']:.0f} s, load {setup['load_before'][0]:.1f} → {setup['load_after'][0]:.1f})")
