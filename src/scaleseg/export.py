"""Export a trained model as one inference graph: ONNX (onnxruntime) or a torch.export ``.pt2`` program.

:class:`InferenceGraph` is the module both exporters trace:

    image (B×3×H×W float32 in [0, 1], or uint8 0–255 with ``raw_input``)
      → normalise with the model's mean/std (inside the graph)
      → fused inference: hierarchical attention chained over ``scales`` for an HMSA model, average
        pooling of logits over ``scales`` for any other model, optionally averaged with a horizontal flip
      → ``B×K×H'×W'`` float32 logits (H' = H, or ``output_scale``·H for DSRL).

Batch, height and width are dynamic. A DSRL model is exported as its inference model (base + SSSR,
no SISR, no FA); the MCIBI memory is a buffer and becomes a constant of the graph. The JSON sidecar
written next to the graph (:func:`sidecar`) holds what a runtime needs to read the output: classes,
palette, ignore id, mean/std, scales, flip and the output-resolution rule.

An exporter failure is reported as one line naming the operator (:func:`explain_export_error`).
"""
from __future__ import annotations

import copy
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Config, to_dict
from .errors import ScalesegError
from .models.shapes import round_scaled

__all__ = [
    "ExportError",
    "InferenceGraph",
    "build_inference_graph",
    "dynamic_shapes",
    "explain_export_error",
    "export_onnx",
    "export_program",
    "export_pt2",
    "graph_for_config",
    "inference_model",
    "run_export",
    "sidecar",
]

FORMATS = ("onnx", "pt2")
# smallest height/width the exported graph accepts: the smallest scale must still give a 1-pixel
# feature map at the model's stride; 32 is the largest stride of the supported models
MIN_SIDE = 32
MAX_SIDE = 8192


class ExportError(ScalesegError):
    """A model or option that cannot be exported; the message names the operator."""


class InferenceGraph(nn.Module):
    """Normalisation → fused multi-scale (and flip) inference → logits, as one traceable module.

    Args:
        model: a contract model (``forward``/``forward_features``, ``mean``, ``std``, ``num_classes``).
            A model with ``export_inference_model()`` (DSRL) is replaced by what it returns.
        scales: inference scales. For a hierarchical-attention model (it has ``scale_attn`` and a
            ``forward_features(x, scales=...)``) they are chained by the attention and must contain 1.0;
            for any other model their logits are averaged (resized ``round(s·H)×round(s·W)`` and back,
            exactly :func:`scaleseg.inference.scale_pooling`).
        flip: also run the horizontally flipped image and average the logits (inside each scale for
            pooling; around the whole chain for a hierarchical model, as ``make_predictor`` does).
        raw_input: the graph takes ``B×3×H×W`` uint8 RGB (0–255) instead of float in [0, 1].

    ``forward(image) -> B×K×H'×W'`` float32 logits; ``output_scale`` gives H'/H (DSRL: 1/lr_scale).
    """

    def __init__(
        self,
        model: nn.Module,
        scales: Sequence[float] = (1.0,),
        *,
        flip: bool = False,
        raw_input: bool = False,
        pooling: str = "auto",
    ) -> None:
        super().__init__()
        model = inference_model(model)
        self.model = model.eval()
        self.scales = tuple(float(s) for s in scales)
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ExportError(f"--scales {list(scales)}: expected positive scales")
        if pooling not in ("auto", "avg", "max"):
            raise ExportError(f"scale pooling {pooling!r}: expected 'auto', 'avg' or 'max'")
        # a hierarchical model chains its scales unless pooling is forced (the paper's baselines)
        self.hierarchical = _is_hierarchical(model) and pooling == "auto"
        self.pool_mode = "max" if pooling == "max" else "avg"
        if self.hierarchical and 1.0 not in self.scales:
            raise ExportError(f"--scales {list(self.scales)}: a hierarchical model's scales must contain 1.0")
        self.flip = bool(flip)
        self.raw_input = bool(raw_input)
        self.num_classes: int = int(model.num_classes)
        self.mean_values = tuple(float(v) for v in model.mean)
        self.std_values = tuple(float(v) for v in model.std)
        self.output_scale: int = int(getattr(model, "output_scale", 1))
        self.register_buffer("mean", torch.tensor(self.mean_values).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("inv_std", 1.0 / torch.tensor(self.std_values).view(1, 3, 1, 1), persistent=False)

    @property
    def fusion(self) -> str:
        """``"hierarchical"``, ``"avg"`` / ``"max"`` (several scales pooled) or ``"single"``."""
        if self.hierarchical and len(self.scales) > 1:
            return "hierarchical"
        return self.pool_mode if len(self.scales) > 1 else "single"

    def normalize(self, image: Tensor) -> Tensor:
        """``B×3×H×W`` uint8 (raw input) or [0, 1] float → normalised float32."""
        x = image.to(torch.float32)
        if self.raw_input:
            x = x / 255.0
        return (x - self.mean) * self.inv_std

    def forward(self, image: Tensor) -> Tensor:
        x = self.normalize(image)
        if self.hierarchical:
            logits = self._chain(x)
            if self.flip:
                logits = 0.5 * (logits + self._chain(x.flip(-1)).flip(-1))
            return logits
        return self._pool(x)

    def _chain(self, x: Tensor) -> Tensor:
        return self.model.forward_features(x, scales=self.scales)["logits"]

    def _one_scale(self, x: Tensor) -> Tensor:
        if _is_hierarchical(self.model):  # pooled baseline: the model's own 1.0-scale output
            return self.model.forward_features(x, scales=(1.0,))["logits"]
        return self.model(x)

    def _single(self, x: Tensor) -> Tensor:
        logits = self._one_scale(x)
        if self.flip:
            logits = 0.5 * (logits + self._one_scale(x.flip(-1)).flip(-1))
        return logits

    def _pool(self, x: Tensor) -> Tensor:
        """Mean (or max) of the logits over scales, each resized back to the 1.0 output size: the
        arithmetic of :func:`scaleseg.inference.scale_pooling` (``round(s·H)`` sizes, bilinear).

        Deliberate difference for DSRL: the logits are pooled at the output resolution (2× the
        input), where ``scale_pooling`` resizes every scale to the input size."""
        if self.scales == (1.0,):
            return self._single(x)
        h, w = x.shape[-2:]
        out_size = (h * self.output_scale, w * self.output_scale)
        pooled: Tensor | None = None
        for s in self.scales:
            if s == 1.0:
                out = self._single(x)
            else:
                size = (torch.sym_max(1, round_scaled(h, s)), torch.sym_max(1, round_scaled(w, s)))
                out = self._single(F.interpolate(x, size=size, mode="bilinear", align_corners=False))
                out = F.interpolate(out, size=out_size, mode="bilinear", align_corners=False)
            if pooled is None:
                pooled = out
            else:
                pooled = pooled + out if self.pool_mode == "avg" else torch.maximum(pooled, out)
        assert pooled is not None
        return pooled / len(self.scales) if self.pool_mode == "avg" else pooled

    def example_input(self, batch: int = 1, height: int = 96, width: int = 160) -> Tensor:
        """A deterministic example image of the graph's input dtype."""
        g = torch.Generator().manual_seed(0)
        x = torch.rand(batch, 3, height, width, generator=g)
        return (x * 255).round().to(torch.uint8) if self.raw_input else x


def inference_model(model: nn.Module) -> nn.Module:
    """``model`` with every DSRL wrapper in it (at the top or inside HMSA) replaced by its
    ``export_inference_model()`` (base + SSSR: no SISR, no FA transform, no aux head); a copy when
    anything is replaced, else ``model`` itself."""
    export = getattr(model, "export_inference_model", None)
    if callable(export):
        return export()
    children = dict(model.named_children())
    replaced = {name: inference_model(child) for name, child in children.items()}
    if all(replaced[name] is child for name, child in children.items()):
        return model
    copy_ = copy.copy(model)  # shallow: the untouched children are shared, not duplicated
    copy_._modules = dict(model._modules)
    for name, child in replaced.items():
        copy_._modules[name] = child
    return copy_


def _is_hierarchical(model: nn.Module) -> bool:
    from .models.hmsa import HierarchicalAttention

    return isinstance(model, HierarchicalAttention)


def build_inference_graph(model: nn.Module, scales: Sequence[float] | None = None, *, flip: bool = False,
                          raw_input: bool = False, pooling: str = "auto") -> InferenceGraph:
    """:class:`InferenceGraph` in eval mode; ``scales`` default ``(1.0,)``."""
    return InferenceGraph(model, scales or (1.0,), flip=flip, raw_input=raw_input, pooling=pooling).eval()


def graph_for_config(model: nn.Module, cfg: Config, *, scales: Sequence[float] | None = None,
                     flip: bool | None = None, raw_input: bool = False) -> InferenceGraph:
    """The graph of the configured inference (``eval`` section), as ``make_predictor`` runs it:
    ``eval.scales`` (or ``scales``), ``eval.flip`` (or ``flip``), ``eval.scale_mode``.
    ``eval.mode=slide`` has no graph form: a one-line ExportError."""
    e = cfg.eval
    if e.mode != "whole":
        raise ExportError(f"config key 'eval.mode' = {e.mode!r} cannot be exported: the graph runs whole-image "
                          "inference (set eval.mode=whole; tile large images outside the graph)")
    if e.scale_mode == "hierarchical" and not _is_hierarchical(model):
        raise ExportError("config key 'eval.scale_mode' = 'hierarchical' needs model.hmsa.mode=hierarchical")
    pooling = {"auto": "auto", "hierarchical": "auto", "avg": "avg", "max": "max"}[e.scale_mode]
    default = tuple(model.infer_scales) if _is_hierarchical(model) and pooling == "auto" else (1.0,)
    return build_inference_graph(model, scales or e.scales or default, flip=e.flip if flip is None else flip,
                                 raw_input=raw_input, pooling=pooling)


def dynamic_shapes() -> tuple[dict[int, Any]]:
    """torch.export dynamic shapes of the single ``image`` input: batch, height and width."""
    from torch.export import Dim

    return ({0: Dim.DYNAMIC(min=1, max=1024), 2: Dim.DYNAMIC(min=MIN_SIDE, max=MAX_SIDE),
             3: Dim.DYNAMIC(min=MIN_SIDE, max=MAX_SIDE)},)


def export_program(graph: InferenceGraph, *, strict: bool = True) -> torch.export.ExportedProgram:
    """``torch.export.export(graph, strict=strict)`` with dynamic batch, height and width.

    Traced under ``backed_size_oblivious``: a padded-then-cropped map is a view whose contiguity
    depends on whether the size is a multiple of the stride; without this option the exporter would
    fix that answer from the example input and the program would refuse other sizes.
    """
    example = graph.example_input(2, 97, 161)  # odd sizes: no stride divides them
    try:
        with torch.no_grad(), _size_oblivious():
            return torch.export.export(graph, (example,), dynamic_shapes=dynamic_shapes(), strict=strict)
    except Exception as err:  # noqa: BLE001 - every exporter failure becomes one line
        raise ExportError(explain_export_error(err, "torch.export")) from None


def _size_oblivious() -> Any:
    import torch.fx.experimental._config as fx_config

    return fx_config.patch(backed_size_oblivious=True)


def export_pt2(graph: InferenceGraph, out: str | Path, *, program: torch.export.ExportedProgram | None = None) -> Path:
    """Save the exported program (``torch.export.load(out).module()(image) -> logits``) to ``out``."""
    program = program if program is not None else export_program(graph)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    try:
        torch.export.save(program, tmp)
        tmp.replace(out)
    except Exception as err:  # noqa: BLE001 - e.g. a float math.ceil on a size cannot be serialised
        raise ExportError(explain_export_error(err, "pt2")) from None
    finally:
        tmp.unlink(missing_ok=True)
    return out


def export_onnx(graph: InferenceGraph, out: str | Path, *, opset: int | None = None,
                program: torch.export.ExportedProgram | None = None) -> Path:
    """ONNX through the dynamo exporter from the exported program: input ``image``, output ``logits``,
    dynamic batch/height/width, weights (and the MCIBI memory) as initialisers in one file."""
    program = program if program is not None else export_program(graph)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    kwargs: dict[str, Any] = {"opset_version": opset} if opset is not None else {}
    try:
        with torch.no_grad(), _size_oblivious():
            onnx_program = torch.onnx.export(
                program, (graph.example_input(2, 97, 161),), input_names=["image"], output_names=["logits"],
                dynamic_shapes=dynamic_shapes(), dynamo=True, external_data=False, verbose=False, **kwargs,
            )
        onnx_program.save(str(tmp))
        tmp.replace(out)
    except Exception as err:  # noqa: BLE001
        raise ExportError(explain_export_error(err, "ONNX")) from None
    finally:
        tmp.unlink(missing_ok=True)
    return out


_OP_PATTERNS = (
    re.compile(r"OpOverload\(op='([\w.]+)'"),
    re.compile(r"target=(math\.\w+)"),
    re.compile(r"<built-in function (\w+)>"),
    re.compile(r"torch\.ops\.([\w.]+?)\.(?:default|Tensor|int|vec)\b"),
    re.compile(r"\b(aten::[\w.]+)"),
    re.compile(r"\b((?:aten|prims)\.[\w]+)"),
)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CLASS_PREFIX = re.compile(r"^<class '[\w.]+'>: ")


def explain_export_error(err: BaseException, backend: str) -> str:
    """One line: the backend, the operator the exporter names (if any) and the exporter's reason."""
    texts = [_ANSI.sub("", str(e)) for e in _chain_of(err)]
    text = "\n".join(texts)
    op = next((m.group(1) for p in _OP_PATTERNS for m in [p.search(text)] if m), None)
    lines = [line.strip() for line in texts[0].splitlines() if line.strip()]
    reason = lines[0] if lines else type(err).__name__
    if "## Exception summary" in lines:  # the ONNX exporter puts the cause after this heading
        after = lines[lines.index("## Exception summary") + 1:]
        if after:
            reason = _CLASS_PREFIX.sub("", after[0])
    where = f" at operator {op}" if op else ""
    return f"{backend} export failed{where}: {reason[:240]}"


def _chain_of(err: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        chain.append(err)
        seen.add(id(err))
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return chain


def sidecar(graph: InferenceGraph, spec: Any, *, fmt: str, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a runtime needs besides the graph: classes, palette, ignore id, normalisation, fusion and
    the output-resolution rule."""
    from . import __version__

    rule = "same as input" if graph.output_scale == 1 else f"{graph.output_scale}x input (H*{graph.output_scale}, W*{graph.output_scale})"
    return {
        "format": fmt,
        "scaleseg_version": __version__,
        "input": {
            "name": "image",
            "layout": "NCHW",
            "channels": "RGB",
            "dtype": "uint8" if graph.raw_input else "float32",
            "range": "0-255" if graph.raw_input else "0-1",
            "dynamic": ["batch", "height", "width"],
            "min_side": MIN_SIDE,
            "normalization_in_graph": True,
        },
        "output": {
            "name": "logits",
            "layout": "NCHW",
            "dtype": "float32",
            "num_classes": graph.num_classes,
            "resolution": rule,
            "output_scale": graph.output_scale,
        },
        "classes": list(spec.classes),
        "palette": [list(c) for c in spec.palette],
        "ignore_index": int(spec.ignore_index),
        "mean": list(graph.mean_values),
        "std": list(graph.std_values),
        "scales": list(graph.scales),
        "fusion": graph.fusion,
        "flip": graph.flip,
        "config": config,
    }


def write_sidecar(path: str | Path, data: dict[str, Any]) -> Path:
    """JSON next to the graph (``<out>.json``), written atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return path


def run_export(cfg: Config, checkpoint: str | Path, out: str | Path, *, fmt: str = "onnx",
               scales: Sequence[float] | None = None, flip: bool | None = None, opset: int | None = None,
               raw_input: bool = False) -> tuple[Path, Path]:
    """``scaleseg export``: build the configured model, load ``checkpoint`` (``.ckpt`` or
    ``.safetensors``), export its inference graph as ``fmt`` to ``out`` and write ``<out>.json``.
    Returns (graph file, sidecar file)."""
    from . import create_model
    from .data.catalog import spec_for
    from .engine.checkpoint import load_model_weights

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if opset is not None and fmt != "onnx":
        raise ExportError("--opset applies to --format onnx only")
    spec = spec_for(cfg.data)
    model = create_model(cfg, spec.num_classes)
    load_model_weights(model, checkpoint)
    graph = graph_for_config(model.eval(), cfg, scales=scales, flip=flip, raw_input=raw_input)
    out = Path(out)
    program = export_program(graph)
    if fmt == "onnx":
        export_onnx(graph, out, opset=opset, program=program)
    else:
        export_pt2(graph, out, program=program)
    meta = sidecar(graph, spec, fmt=fmt, config=to_dict(cfg))
    meta["checkpoint"] = str(checkpoint)
    if opset is not None:
        meta["opset"] = opset
    return out, write_sidecar(out.with_name(out.name + ".json"), meta)
