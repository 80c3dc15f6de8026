"""scaleseg against segmentation_models.pytorch (smp) 0.6.0 on the same DeepLabV3+ networks.

Run with no arguments: ``python benchmarks/vs_smp.py`` (needs smp: ``pip install -e ".[bench]"``).

Networks: DeepLabV3+ on ResNet-50 and on ResNet-18, output stride 16, 19 classes, random init for
both (no downloads; smp ``encoder_weights=None``). The two libraries are configured to the same
architecture, and the script prints parameter counts and FLOPs to show it (equal within 1 %):

* smp: ``DeepLabV3Plus(encoder_output_stride=16, decoder_atrous_rates=(6, 12, 18),
  decoder_aspp_dropout=0.1)`` — its default rates (12, 24, 36) are the OS8 ones, and its default
  dropout 0.5 differs from the paper's 0.1; decoder channels 256, upsampling ×4 (defaults);
* scaleseg: ``Backbone(resnet, output_stride=16)`` + ``DeepLabV3PlusHead(separable=True,
  decoder_convs=1)``: depthwise-separable ASPP branches, 48-channel low-level projection, one
  separable 3×3 conv → 256 after the fusion, 1×1 classifier, bilinear upsampling ×4.

Remaining differences (all < 1 % of parameters and FLOPs): smp has one more separable 3×3 conv at
the ASPP output (stride 16) and a bias on the classifier; scaleseg's separable convs have BN + ReLU
after the depthwise conv (the paper's TF reference), smp's do not. smp's ResNet encoder is
torchvision's, scaleseg's is timm's (same layers).

scaleseg runs as its commands run it by default: the training step in the layout that
``train.channels_last=auto`` picks (NHWC for a CPU run on an AVX-512 CPU, NCHW elsewhere, see
``engine.speed.use_channels_last``), inference through ``ready_for_inference`` (``eval.fold_bn``: BN folded
into the convs, ``eval.channels_last=auto``). smp runs as its README shows (``model.eval()``, NCHW).
To show what those defaults buy, a third worker runs scaleseg with smp's settings (NCHW, BN unfolded):
its ratios are ``*_plain_ratio_<net>``; the two architectures alone are a tie within the noise.

Figures, scaleseg ÷ smp, each measured interleaved in one run (every variant in its own worker
process, driven one call at a time, round-robin with a rotating order):

* training step (forward, cross-entropy with ignore 255, backward, SGD with momentum) at batch
  2 × 512×512: ``train_time_ratio_<net>``, peak memory ``train_mem_ratio_<net>``;
* inference (eval mode, ``torch.inference_mode``) at 1 × 512×1024: ``infer_time_ratio_<net>``.

``time`` is the median **process CPU time** of the timed calls (all threads; OpenMP told not to
spin): on a machine shared with other jobs wall time swings with their load, CPU time tracks the
work done. The median wall-time ratios are reported too (``*_wall_ratio_*``). Peak memory is the
peak RSS above the resting state (weights and momentum buffers), see ``_measure.py``. Results go
to ``benchmarks/results/vs_smp.json``.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _measure  # noqa: E402

NETWORKS = {"r50": "resnet50", "r18": "resnet18"}
LIBRARIES = ("scaleseg", "scaleseg_plain", "smp")  # scaleseg_plain: NCHW, BN unfolded, as smp runs
NUM_CLASSES, OUTPUT_STRIDE, RATES = 19, 16, (6, 12, 18)
TRAIN_BATCH, TRAIN_SIZE = 2, (512, 512)
INFER_SIZE = (512, 1024)
FLOP_SIZE = (512, 512)
TIMED_TRAIN, TIMED_INFER = 10, 12  # medians of these: single calls spread ±10 % on a 2-core VM
WARMUP = 2  # untimed rounds first: the first calls after the one in `info` still fault in fresh pages
THREADS = 2
RESULTS = Path(__file__).resolve().parent / "results" / "vs_smp.json"
INSTALL_HINT = ('segmentation_models_pytorch is not installed; install the benchmark extra: '
                'pip install -e ".[bench]"  (segmentation-models-pytorch==0.6.0)')


def build(library: str, encoder: str):  # noqa: ANN201
    """The DeepLabV3+ of ``library`` on ``encoder`` (see the module docstring for the matching)."""
    if library == "smp":
        import segmentation_models_pytorch as smp

        return smp.DeepLabV3Plus(
            encoder_name=encoder, encoder_weights=None, encoder_output_stride=OUTPUT_STRIDE,
            decoder_atrous_rates=RATES, decoder_aspp_dropout=0.1, decoder_channels=256, classes=NUM_CLASSES,
        )
    from scaleseg.models.backbone import Backbone
    from scaleseg.models.heads import DeepLabV3PlusHead
    from scaleseg.models.segmentor import SegmentationModel

    backbone = Backbone(encoder, output_stride=OUTPUT_STRIDE)
    head = DeepLabV3PlusHead(backbone.channels, NUM_CLASSES, output_stride=OUTPUT_STRIDE, separable=True,
                             decoder_convs=1)
    assert head.aspp.dilations == RATES
    return SegmentationModel(backbone, head, NUM_CLASSES)


class _Bench:
    """One variant's model, optimiser and fixed inputs; measures single calls."""

    def __init__(self, library: str, encoder: str) -> None:
        import torch
        import torch.nn.functional as F

        from scaleseg.engine.speed import use_channels_last

        torch.set_num_threads(THREADS)
        torch.manual_seed(0)
        self.torch, self.F, self.library = torch, F, library
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.cuda = self.device.type == "cuda"
        self.model = build("smp" if library == "smp" else "scaleseg", encoder).to(self.device)
        self.defaults = library == "scaleseg"  # scaleseg's default layout and inference preparation
        self.channels_last = self.defaults and use_channels_last("auto", self.device.type)
        self.infer_model = None  # built on first use: BN folding needs the trained model in eval mode
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
        g = torch.Generator().manual_seed(0)
        self.image = torch.randn(TRAIN_BATCH, 3, *TRAIN_SIZE, generator=g).to(self.device)
        self.mask = torch.randint(0, NUM_CLASSES, (TRAIN_BATCH, *TRAIN_SIZE), generator=g).to(self.device)
        self.infer_image = torch.randn(1, 3, *INFER_SIZE, generator=g).to(self.device)
        if self.channels_last:
            from scaleseg.engine.speed import batch_to_channels_last, to_channels_last

            to_channels_last(self.model)
            self.image = batch_to_channels_last({"image": self.image})["image"]
        self.steps = 0
        _measure.keep_freed_memory()

    def _sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def _loss(self):  # noqa: ANN202
        if self.library == "smp":
            return self.F.cross_entropy(self.model(self.image), self.mask, ignore_index=255)
        from scaleseg.types import StepInfo

        losses = self.model.training_losses({"image": self.image, "mask": self.mask}, StepInfo(self.steps, 100))
        return sum(losses.values())

    def _train_step(self) -> None:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        self._loss().backward()
        self.optimizer.step()
        self._sync()
        self.steps += 1

    def _inference_model(self):  # noqa: ANN202
        """The model as inference runs it: scaleseg's ``ready_for_inference`` with the default eval
        config on a copy (BN folded, auto layout), the plain variants ``model.eval()``."""
        if not self.defaults:
            return self.model.eval()
        if self.infer_model is None:
            import copy

            from scaleseg.config import Config
            from scaleseg.engine.evaluate import ready_for_inference

            cfg = Config()
            cfg.train.accelerator = self.device.type
            self.infer_model = ready_for_inference(copy.deepcopy(self.model).eval(), cfg)
        return self.infer_model

    def _infer(self) -> None:
        model = self._inference_model()
        with self.torch.inference_mode():
            model(self.infer_image)
        self._sync()

    def info(self) -> dict:
        """Parameters, inference FLOPs at 1×3×512×512 and training-step FLOPs (also the warm-up)."""
        from torch.utils.flop_counter import FlopCounterMode

        self.model.eval()
        x = self.torch.randn(1, 3, *FLOP_SIZE, device=self.device)
        with self.torch.inference_mode(), FlopCounterMode(display=False) as counter:
            self.model(x)  # the unfolded network: the architecture compared
        infer_flops = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            self._train_step()
        self._infer()  # warm-up of the inference path at its own size
        return {"params": sum(p.numel() for p in self.model.parameters()), "flops": infer_flops,
                "train_flops": counter.get_total_flops(), "device": self.device.type}

    def _timed(self, fn) -> dict:  # noqa: ANN001
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}

    def train(self) -> dict:
        return self._timed(self._train_step)

    def infer(self) -> dict:
        return self._timed(self._infer)

    def train_memory(self) -> dict:
        self.optimizer.zero_grad(set_to_none=True)
        return {"peak_mib": _measure.peak_memory_mib(self._train_step, self.cuda)}

    def infer_memory(self) -> dict:
        return {"peak_mib": _measure.peak_memory_mib(self._infer, self.cuda)}


def _summary(samples: list[dict], device: str) -> dict:
    cpu, wall = [s["cpu_s"] for s in samples], [s["wall_s"] for s in samples]
    return {"cpu_s": statistics.median(cpu), "wall_s": statistics.median(wall), "cpus_s": cpu, "walls_s": wall,
            "time_s": statistics.median(wall) if device == "cuda" else statistics.median(cpu)}


def measure(net: str, encoder: str, env: dict[str, str]) -> dict:
    procs = {lib: _measure.start_worker(__file__, [lib, encoder], env) for lib in LIBRARIES}
    info = {lib: _measure.ask(procs[lib], "info") for lib in LIBRARIES}
    _measure.round_robin(procs, "train", WARMUP)
    train = _measure.round_robin(procs, "train", TIMED_TRAIN)
    _measure.round_robin(procs, "infer", WARMUP)
    infer = _measure.round_robin(procs, "infer", TIMED_INFER)
    train_mem = _measure.round_robin(procs, "train_memory", 1)
    infer_mem = _measure.round_robin(procs, "infer_memory", 1)
    _measure.stop(procs)
    raw = {}
    for lib in LIBRARIES:
        device = info[lib]["device"]
        raw[lib] = info[lib] | {"train": _summary(train[lib], device), "infer": _summary(infer[lib], device),
                                "train_peak_mib": train_mem[lib][0]["peak_mib"],
                                "infer_peak_mib": infer_mem[lib][0]["peak_mib"]}
    ours, plain, smp = raw["scaleseg"], raw["scaleseg_plain"], raw["smp"]
    ratios = {
        f"params_ratio_{net}": ours["params"] / smp["params"],
        f"flops_ratio_{net}": ours["flops"] / smp["flops"],
        f"train_flops_ratio_{net}": ours["train_flops"] / smp["train_flops"],
    }
    for name, variant in (("", ours), ("plain_", plain)):
        ratios |= {
            f"train_time_{name}ratio_{net}": variant["train"]["time_s"] / smp["train"]["time_s"],
            f"train_mem_{name}ratio_{net}": variant["train_peak_mib"] / smp["train_peak_mib"],
            f"infer_time_{name}ratio_{net}": variant["infer"]["time_s"] / smp["infer"]["time_s"],
            f"train_wall_{name}ratio_{net}": variant["train"]["wall_s"] / smp["train"]["wall_s"],
            f"infer_wall_{name}ratio_{net}": variant["infer"]["wall_s"] / smp["infer"]["wall_s"],
            f"infer_mem_{name}ratio_{net}": variant["infer_peak_mib"] / smp["infer_peak_mib"],
        }
    unit = "wall" if ours["device"] == "cuda" else "CPU"
    print(f"\nDeepLabV3+ {encoder} OS{OUTPUT_STRIDE}:")
    for lib in LIBRARIES:
        r = raw[lib]
        print(f"  {lib:>14}: {r['params'] / 1e6:6.2f} M params  {r['flops'] / 1e9:6.1f} GFLOPs (1×512×512)  "
              f"train {r['train']['time_s']:5.2f} s ({unit}, wall {r['train']['wall_s']:5.2f} s)  "
              f"peak {r['train_peak_mib']:7.1f} MiB  infer {r['infer']['time_s']:5.2f} s "
              f"(wall {r['infer']['wall_s']:5.2f} s)  peak {r['infer_peak_mib']:6.1f} MiB", flush=True)
    print("  ÷ smp: " + "  ".join(f"{k.rsplit('_', 1)[0]} {v:.3f}" for k, v in ratios.items()), flush=True)
    return {"raw": raw, "ratios": ratios}


def main() -> None:
    try:
        import segmentation_models_pytorch as smp
    except ImportError:
        sys.exit(INSTALL_HINT)
    if smp.__version__ != "0.6.0":
        print(f"note: smp {smp.__version__} installed; the figures in the README are for 0.6.0")
    start = time.perf_counter()
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
    from scaleseg.engine.speed import use_channels_last

    result: dict = {"setup": {"scaleseg_channels_last": use_channels_last("auto", "auto"), "num_classes": NUM_CLASSES, "output_stride": OUTPUT_STRIDE, "rates": RATES,
                              "train": [TRAIN_BATCH, *TRAIN_SIZE], "infer": [1, *INFER_SIZE],
                              "timed_train": TIMED_TRAIN, "timed_infer": TIMED_INFER, "warmup": WARMUP, "threads": THREADS,
                              "smp": smp.__version__, "load_before": os.getloadavg()}}
    for net, encoder in NETWORKS.items():
        m = measure(net, encoder, env)
        result[f"raw_{net}"] = m["raw"]
        result.update(m["ratios"])
    result["setup"]["load_after"] = os.getloadavg()
    result["setup"]["seconds"] = time.perf_counter() - start
    for net in NETWORKS:
        for key in ("params", "flops"):
            ratio = result[f"{key}_ratio_{net}"]
            assert abs(ratio - 1) < 0.01, f"{key} differ by {100 * (ratio - 1):.2f} % on {net}: not the same network"
    _measure.write_results(RESULTS, result)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        _measure.serve(_Bench(sys.argv[2], sys.argv[3]))
    else:
        main()
