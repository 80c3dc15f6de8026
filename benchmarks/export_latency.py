"""Latency of the exported ONNX graph on onnxruntime (CPU) relative to PyTorch eager, same model.

Run with no arguments: ``python benchmarks/export_latency.py``. Two models, random weights (latency
does not depend on them), 19 classes, batch 1, float32, the threads torch uses (2 here) for both:

* ``r18``: DeepLabV3+ on ResNet-18 (output stride 16, 256-channel head), single scale, 512×1024;
* ``hmsa3``: the same DeepLabV3+ R-18 with hierarchical multi-scale attention chained over
  (0.5, 1.0, 2.0), input 256×512 (the 2.0 scale runs at 512×1024).

Each model's :class:`scaleseg.export.InferenceGraph` (normalisation and fusion inside) is exported
with ``scaleseg.export.export_onnx`` (torch.export strict, dynamic batch/height/width) and run by an
``onnxruntime.InferenceSession`` (CPUExecutionProvider, all graph optimisations). Eager is the same
graph module under ``torch.inference_mode()``. After one warm-up call each, eager and onnxruntime
calls alternate ``REPEATS`` times (load drift on a shared machine hits both alike); per backend the
best wall time (least disturbed by other jobs) and the median process CPU time (all threads) are
kept. Ratios ``ort_over_eager_<model>`` = best wall(onnxruntime) / best wall(eager) (< 1: onnxruntime
is faster), ``*_cpu`` the same for CPU time; the outputs' max |Δ| is recorded as a check. Writes
``benchmarks/results/export_latency.json``.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPEATS = 5
NUM_CLASSES = 19
MODELS = {
    "r18": (["model.arch=deeplabv3plus", "model.backbone=resnet18", "model.output_stride=16"], (1.0,), (512, 1024)),
    "hmsa3": (["model.arch=deeplabv3plus", "model.backbone=resnet18", "model.output_stride=16",
               "model.hmsa.mode=hierarchical"], (0.5, 1.0, 2.0), (256, 512)),
}


def _timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(name: str, overrides: list[str], scales: tuple[float, ...], size: tuple[int, int], tmp: Path) -> dict:
    import onnxruntime as ort

    import scaleseg
    from scaleseg.config import load_config
    from scaleseg.export import build_inference_graph, export_onnx

    torch.manual_seed(0)
    model = scaleseg.create_model(load_config(None, overrides), NUM_CLASSES).eval()
    graph = build_inference_graph(model, scales)
    start = time.perf_counter()
    path = export_onnx(graph, tmp / f"{name}.onnx")
    export_s = time.perf_counter() - start
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(1))
    feed = {"image": x.numpy()}
    with torch.inference_mode():
        eager_out = graph(x).numpy()  # warm-up
    ort_out = session.run(None, feed)[0]  # warm-up
    times: dict[str, list[tuple[float, float]]] = {"eager": [], "ort": []}
    for i in range(REPEATS):
        order = ("eager", "ort") if i % 2 == 0 else ("ort", "eager")
        for backend in order:
            if backend == "eager":
                with torch.inference_mode():
                    times["eager"].append(_timed(lambda: graph(x)))
            else:
                times["ort"].append(_timed(lambda: session.run(None, feed)))
    result = {"input": [1, 3, *size], "scales": list(scales), "export_s": round(export_s, 1),
              "max_abs_diff": float(np.abs(ort_out - eager_out).max())}
    for backend, values in times.items():
        result[f"{backend}_wall_s"] = min(v[0] for v in values)
        result[f"{backend}_cpu_s"] = statistics.median(v[1] for v in values)
    result["ort_over_eager"] = result["ort_wall_s"] / result["eager_wall_s"]
    result["ort_over_eager_cpu"] = result["ort_cpu_s"] / result["eager_cpu_s"]
    return result


def main() -> None:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    results: dict = {"threads": torch.get_num_threads(), "repeats": REPEATS, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (overrides, scales, size) in MODELS.items():
            r = measure(name, overrides, scales, size, Path(tmp))
            results[name] = r
            results[f"ort_over_eager_{name}"] = round(r["ort_over_eager"], 3)
            results[f"ort_over_eager_{name}_cpu"] = round(r["ort_over_eager_cpu"], 3)
            print(f"{name:6s} {tuple(r['input'][2:])} scales {r['scales']}: eager {r['eager_wall_s'] * 1000:.0f} ms, "
                  f"onnxruntime {r['ort_wall_s'] * 1000:.0f} ms → ort/eager {r['ort_over_eager']:.2f} "
                  f"(CPU time {r['ort_over_eager_cpu']:.2f}); max |Δ| {r['max_abs_diff']:.1e}; export {r['export_s']} s",
                  flush=True)
    out = ROOT / "benchmarks" / "results" / "export_latency.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"ort_over_eager_r18 = {results['ort_over_eager_r18']}, ort_over_eager_hmsa3 = {results['ort_over_eager_hmsa3']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
