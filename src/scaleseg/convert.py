"""Official checkpoints → scaleseg run folders (``config.yaml`` + ``model.safetensors``).

``scaleseg convert --from edgenets|nvidia|ssseg CKPT --config CFG --out RUN_DIR`` (see :func:`convert`):

* ``edgenets`` — EdgeNets ``ESPNetv2Segmentation`` (``espnetv2_s_2.0_city_*.pth``) → ``model.arch:
  espnetv2``. EdgeNets' Cityscapes model has 20 outputs, the 20th a "background" class that its own
  evaluation relabels to void (``test_segmentation.relabel``: 19 → 255). A 19-class config gets the
  first 19 output rows of the last 1×1 conv (the other 19 logits are unchanged, exactly); the
  argmax then differs from EdgeNets' only on pixels EdgeNets calls background, which its evaluation
  ignores anyway. A config with as many classes as the checkpoint keeps every row. The head keeps
  EdgeNets' projection width (``model.espnetv2.proj_planes``, 10 for 20 outputs) and its
  ``align_corners=True`` final upsampling (``model.espnetv2.align_corners``), so the logits equal
  EdgeNets'.
* ``nvidia`` — NVIDIA/semantic-segmentation ``ocrnet.HRNet_Mscale`` (``cityscapes_ocrnet.HRNet_Mscale_*.pth``,
  ``mapillary_ocrnet.HRNet_Mscale_*.pth``; ``{'state_dict', 'epoch', 'mean_iu', ...}``, keys prefixed
  ``module.``) → ``model.arch: hrnet_ocr`` + ``model.hmsa.mode: hierarchical``. HRNetV2-W48 has
  timm's key names; scaleseg's trunk fuses branches bilinearly like NVIDIA's (timm's classifier:
  nearest), so the converted trunk computes NVIDIA's.
* ``ssseg`` — sssegmentation ``MCIBI`` with the DeepLabV3 host (``{'model': state_dict, ...}``) →
  ``model.arch: deeplabv3`` + ``model.mcibi.enabled`` on ``resnet50c``/``resnet101c`` (the V1c deep
  stem of ``resnet*conv3x3stem``), output stride 8, aux head; the config gets the reference ASPP
  (``model.mcibi.aspp_project_kernel: 3``, ``aspp_dropout: 0``). The ``K×1×C`` memory becomes the
  ``K×C`` buffer, and a class counts as initialised when its row is not all zero (the reference's rule).

Every key is accounted for: a checkpoint key that no rule maps, a model key that nothing fills or a
shape that differs is a one-line :class:`~scaleseg.errors.CheckpointError` naming the first such key.

Reading: ``torch.load(weights_only=True)``. Official checkpoints also pickle other objects next to
the tensors (numpy scalars, argparse namespaces, optimiser classes, ...), which ``weights_only``
refuses. Those globals are then bound to :class:`OpaqueObject` stand-ins through
``torch.serialization.safe_globals`` and the file is read again with ``weights_only=True``: no class
or function named in the file is imported or called, so no code from the checkpoint runs.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import Config, load_config, to_yaml
from .errors import CheckpointError, ConfigError

__all__ = [
    "SOURCES",
    "OpaqueObject",
    "convert",
    "convert_edgenets",
    "convert_nvidia",
    "convert_ssseg",
    "find_state_dict",
    "read_official_checkpoint",
]


# --------------------------------------------------------------------------------------------
# safe reading
# --------------------------------------------------------------------------------------------
class OpaqueObject:
    """Inert stand-in for a class or function that a checkpoint's pickle names (never imported).

    Calling it (pickle REDUCE / NEWOBJ) records the arguments in ``args``; pickle BUILD stores the
    state in ``state``. ``qualname`` is the name the pickle used.
    """

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> OpaqueObject:
        obj = super().__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<opaque {self.qualname}>"


_UNSUPPORTED = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)")


def _stub(name: str) -> tuple[type, str]:
    return type(f"Opaque[{name}]", (OpaqueObject,), {"qualname": name}), name


def read_official_checkpoint(path: str | Path) -> Any:
    """The unpickled object of a ``.pth`` file, read with ``weights_only=True`` only; globals that
    ``weights_only`` does not allow are bound to :class:`OpaqueObject` stand-ins (see module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    names: set[str] = set()
    try:  # zip checkpoints: list the globals without unpickling
        names |= set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - legacy (non-zip) files: learnt from the load errors below
        pass
    for _ in range(64):
        try:
            with torch.serialization.safe_globals([_stub(n) for n in sorted(names)]):
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - every failure becomes one CheckpointError
            match = _UNSUPPORTED.search(str(err))
            if match is None or match.group(1) in names:
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise CheckpointError(f"cannot read checkpoint {path} with weights_only=True: {first}") from None
            names.add(match.group(1))
    raise CheckpointError(f"cannot read checkpoint {path}: more than 64 non-tensor globals in its pickle")


def _tensor_mappings(obj: Any, path: str = "", depth: int = 0) -> Iterator[tuple[str, Mapping[str, Tensor]]]:
    """(where, mapping) for every str → Tensor mapping inside ``obj``, outermost first."""
    if depth > 6:
        return
    if isinstance(obj, Mapping):
        if obj and all(isinstance(k, str) for k in obj) and all(isinstance(v, Tensor) for v in obj.values()):
            yield path or "<top level>", obj
            return
        for key, value in obj.items():
            yield from _tensor_mappings(value, f"{path}[{key!r}]", depth + 1)
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _tensor_mappings(value, f"{path}[{i}]", depth + 1)
    elif isinstance(obj, OpaqueObject):
        yield from _tensor_mappings(obj.args, f"{path}.args", depth + 1)
        yield from _tensor_mappings(obj.state, f"{path}.state", depth + 1)


def find_state_dict(obj: Any, keys: tuple[str, ...], path: str | Path = "checkpoint") -> dict[str, Tensor]:
    """The model state dict inside an unpickled checkpoint: ``obj`` itself when it maps names to
    tensors, else ``obj[key]`` for the first of ``keys`` present; a leading ``module.`` (DDP /
    DataParallel) is stripped from every key."""
    state: Mapping[str, Tensor] | None = None
    if isinstance(obj, Mapping):
        for key in keys:
            if key in obj:  # the mapping itself, or the first one inside a wrapper object
                found = next(_tensor_mappings(obj[key]), None)
                if found is not None:
                    state = found[1]
                    break
    if state is None:
        found = next(_tensor_mappings(obj), None)
        if found is not None and found[0] == "<top level>":
            state = found[1]
    if state is None or not state:
        where = ", ".join(repr(k) for k in keys)
        raise CheckpointError(f"{path}: no state dict found (expected a name → tensor mapping at the top level or under {where})")
    bad = next((k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)), None)
    if bad is not None:
        raise CheckpointError(f"{path}: state dict entry {bad!r} is not a tensor")
    out = dict(state)
    if all(k.startswith("module.") for k in out):
        out = {k[len("module."):]: v for k, v in out.items()}
    return out


# --------------------------------------------------------------------------------------------
# key mapping
# --------------------------------------------------------------------------------------------
Rule = tuple[str, str]  # (source prefix, target prefix)


def _rename(state: Mapping[str, Tensor], rules: list[Rule], source: str) -> dict[str, Tensor]:
    """Apply the first matching prefix rule to every key; a key no rule matches is an error."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        for old, new in rules:
            if key.startswith(old):
                out[new + key[len(old):]] = value
                break
        else:
            raise CheckpointError(f"{source} checkpoint key {key!r} has no counterpart in scaleseg (unexpected key)")
    return out


def _check_against(model_state: Mapping[str, Tensor], converted: Mapping[str, Tensor], source: str) -> None:
    """Nothing missing, nothing unexpected, every shape equal; else one line naming the first bad key."""
    unexpected = [k for k in converted if k not in model_state]
    if unexpected:
        raise CheckpointError(
            f"{source} checkpoint gives {len(unexpected)} key(s) the configured model does not have, first: "
            f"{unexpected[0]!r} (does the config describe the checkpoint's model?)"
        )
    missing = [k for k in model_state if k not in converted]
    if missing:
        raise CheckpointError(
            f"{source} checkpoint lacks {len(missing)} key(s) of the configured model, first: {missing[0]!r}"
        )
    for key, value in converted.items():
        if tuple(value.shape) != tuple(model_state[key].shape):
            raise CheckpointError(
                f"{source} checkpoint key for {key!r} has shape {tuple(value.shape)}; the configured model "
                f"expects {tuple(model_state[key].shape)}"
            )


def _model_keys(cfg: Config) -> dict[str, Tensor]:
    """The configured model's state dict on the meta device (names and shapes, no memory)."""
    from . import num_classes_for
    from .models.factory import create_model

    with torch.device("meta"):
        model = create_model(cfg, num_classes_for(cfg))
    return dict(model.state_dict())


def _require(cfg: Config, checks: list[tuple[bool, str]], source: str) -> None:
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"convert --from {source}: {message}")


# --------------------------------------------------------------------------------------------
# EdgeNets ESPNetv2
# --------------------------------------------------------------------------------------------
_EDGENETS_LAST = "head.bu_dec_l4.merge_layer.3."


def convert_edgenets(state: Mapping[str, Tensor], cfg: Config) -> tuple[dict[str, Tensor], Config, dict[str, Any]]:
    """EdgeNets ``ESPNetv2Segmentation`` state dict → (scaleseg state dict, adjusted config, notes)."""
    from . import num_classes_for
    from .models.espnetv2 import CHANNELS, edgenets_key_map

    m = cfg.model
    _require(cfg, [
        (m.arch == "espnetv2", f"config key 'model.arch' = {m.arch!r}; expected 'espnetv2'"),
        (not m.dsrl.enabled and m.hmsa.mode == "none" and not m.mcibi.enabled,
         "EdgeNets checkpoints hold a plain ESPNetv2; expected model.dsrl, model.hmsa and model.mcibi off"),
    ], "edgenets")
    converted = {edgenets_key_map(k): v for k, v in state.items()}
    notes: dict[str, Any] = {}
    level2 = converted.get("backbone.level2_0.act.weight")
    if level2 is not None:
        widths = {ch[1]: s for s, ch in CHANNELS.items()}
        s = widths.get(level2.shape[0])
        if s is not None and s != m.width:
            raise ConfigError(f"convert --from edgenets: config key 'model.width' = {m.width}; the checkpoint is s={s}")
    proj = converted.get("head.bu_dec_l1.projection_layer.cbr.0.weight")
    if proj is not None:
        m.espnetv2.proj_planes = int(proj.shape[0])
    m.espnetv2.align_corners = True
    k = num_classes_for(cfg)
    weight = converted.get(_EDGENETS_LAST + "weight")
    if weight is not None and weight.shape[0] == k + 1:
        # EdgeNets' extra last output is "background", relabelled to void by its own evaluation
        converted[_EDGENETS_LAST + "weight"] = weight[:k].clone()
        converted[_EDGENETS_LAST + "bias"] = converted[_EDGENETS_LAST + "bias"][:k].clone()
        notes["dropped_output"] = {"index": k, "meaning": "EdgeNets background (evaluated as void)"}
    elif weight is not None and weight.shape[0] != k:
        raise ConfigError(
            f"convert --from edgenets: the checkpoint has {weight.shape[0]} outputs; the config's dataset has {k} classes "
            f"(expected {weight.shape[0]} or {weight.shape[0] - 1})"
        )
    return converted, cfg, notes


# --------------------------------------------------------------------------------------------
# NVIDIA HRNet-OCR + hierarchical multi-scale attention
# --------------------------------------------------------------------------------------------
NVIDIA_RULES: list[Rule] = [
    ("backbone.", "base.backbone.body.model."),  # HRNetV2-W48: same names as timm's hrnet_w48
    ("ocr.", "base.head."),  # OCR_block: conv3x3_ocr, ocr_distri_head, cls_head, aux_head
    ("scale_attn.", "scale_attn."),  # make_attn_head: conv0, bn0, conv1, bn1, conv2
]


def convert_nvidia(state: Mapping[str, Tensor], cfg: Config) -> tuple[dict[str, Tensor], Config, dict[str, Any]]:
    """NVIDIA ``ocrnet.HRNet_Mscale`` state dict → (scaleseg state dict, adjusted config, notes)."""
    m = cfg.model
    _require(cfg, [
        (m.arch == "hrnet_ocr", f"config key 'model.arch' = {m.arch!r}; expected 'hrnet_ocr'"),
        (m.hmsa.mode == "hierarchical", f"config key 'model.hmsa.mode' = {m.hmsa.mode!r}; expected 'hierarchical'"),
        (not m.dsrl.enabled and not m.mcibi.enabled, "expected model.dsrl and model.mcibi off"),
    ], "nvidia")
    return _rename(state, NVIDIA_RULES, "nvidia"), cfg, {}


# --------------------------------------------------------------------------------------------
# sssegmentation MCIBI (DeepLabV3 host)
# --------------------------------------------------------------------------------------------
SSSEG_RULES: list[Rule] = [
    ("backbone_net.stem.0.", "backbone.model.conv1.0."),  # V1c deep stem: 3×3 32, 3×3 32, 3×3 64
    ("backbone_net.stem.1.", "backbone.model.conv1.1."),
    ("backbone_net.stem.3.", "backbone.model.conv1.3."),
    ("backbone_net.stem.4.", "backbone.model.conv1.4."),
    ("backbone_net.stem.6.", "backbone.model.conv1.6."),
    ("backbone_net.stem.7.", "backbone.model.bn1."),
    ("backbone_net.layer", "backbone.model.layer"),
    ("context_within_image_module.parallel_branches.", "head.context_module.branches."),
    ("context_within_image_module.global_branch.1.", "head.context_module.pool_conv."),
    ("context_within_image_module.global_branch.2.", "head.context_module.pool_bn."),
    ("context_within_image_module.bottleneck.", "head.context_module.project.0."),
    ("bottleneck.", "head.memory_context.bottleneck."),
    ("memory_module.self_attention_ms.", "head.memory_context.context_attention."),
    ("memory_module.self_attention.", "head.memory_context.memory_attention."),
    ("memory_module.bottleneck_ms.", "head.memory_context.context_fuse."),
    ("memory_module.bottleneck.", "head.memory_context.memory_fuse."),
    ("memory_module.memory", "head.memory_context.memory.memory"),
    ("decoder_stage1.", "head.memory_context.class_head."),
    ("decoder_stage2.", "head.classifier."),
    ("auxiliary_decoder.0.", "aux_head.conv.0."),
    ("auxiliary_decoder.1.", "aux_head.conv.1."),
    ("auxiliary_decoder.4.", "aux_head.classifier."),
]
_SSSEG_MEMORY = "head.memory_context.memory.memory"


def convert_ssseg(state: Mapping[str, Tensor], cfg: Config) -> tuple[dict[str, Tensor], Config, dict[str, Any]]:
    """sssegmentation ``MCIBI`` (DeepLabV3 host) state dict → (scaleseg state dict, adjusted config, notes)."""
    m = cfg.model
    _require(cfg, [
        (m.mcibi.enabled, "expected model.mcibi.enabled: true"),
        (m.arch == "deeplabv3", f"config key 'model.arch' = {m.arch!r}; expected 'deeplabv3' (the released MCIBI host)"),
        (m.backbone.split(".")[0] in ("resnet50c", "resnet101c"),
         f"config key 'model.backbone' = {m.backbone!r}; expected resnet50c or resnet101c (sssegmentation's "
         "resnet*conv3x3stem, the V1c deep stem)"),
        (m.output_stride == 8, f"config key 'model.output_stride' = {m.output_stride}; expected 8"),
        (not m.dsrl.enabled and m.hmsa.mode == "none", "expected model.dsrl and model.hmsa off"),
    ], "ssseg")
    m.mcibi.aspp_project_kernel = 3
    m.mcibi.aspp_dropout = 0.0
    converted = _rename(state, SSSEG_RULES, "ssseg")
    memory = converted.get(_SSSEG_MEMORY)
    notes: dict[str, Any] = {}
    if memory is not None:
        if memory.dim() == 3:
            if memory.shape[1] != 1:
                raise CheckpointError(
                    f"ssseg checkpoint key 'memory_module.memory' has shape {tuple(memory.shape)}: "
                    "num_feats_per_cls > 1 is not supported (every released config uses 1)"
                )
            memory = memory[:, 0]
        converted[_SSSEG_MEMORY] = memory.float().contiguous()
        initialized = memory.ne(0).any(dim=1)
        converted["head.memory_context.memory.initialized"] = initialized
        if not initialized.is_meta:
            notes["memory_initialized_classes"] = int(initialized.sum())
    return converted, cfg, notes


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------
Converter = Callable[[Mapping[str, Tensor], Config], tuple[dict[str, Tensor], Config, dict[str, Any]]]
SOURCES: dict[str, tuple[Converter, tuple[str, ...]]] = {
    "edgenets": (convert_edgenets, ("state_dict", "model")),
    "nvidia": (convert_nvidia, ("state_dict",)),
    "ssseg": (convert_ssseg, ("model",)),
}


def convert_state(source: str, state: Mapping[str, Tensor], cfg: Config) -> tuple[dict[str, Tensor], Config, dict[str, Any]]:
    """Map an official state dict onto the configured scaleseg model and check every key and shape
    (on the meta device: no weights are allocated). Returns (state dict, adjusted config, notes)."""
    if source not in SOURCES:
        raise ConfigError(f"convert --from {source!r}: expected one of {', '.join(SOURCES)}")
    converted, cfg, notes = SOURCES[source][0](state, cfg)
    _check_against(_model_keys(cfg), converted, source)
    return converted, cfg, notes


def convert(
    source: str,
    checkpoint: str | Path,
    config: str | Path,
    out_dir: str | Path,
    overrides: list[str] | None = None,
) -> Path:
    """Convert an official checkpoint into a scaleseg run folder: ``out_dir/config.yaml`` (the
    config with the settings the weights need) + ``out_dir/model.safetensors`` (+ ``convert.json``:
    source, checkpoint SHA-256, notes). ``scaleseg.from_pretrained(out_dir)``, ``scaleseg eval`` and
    ``scaleseg predict`` (``--checkpoint out_dir/model.safetensors``) accept the folder."""
    from . import num_classes_for
    from .engine.checkpoint import save_weights
    from .engine.train import write_text_atomic
    from .models.factory import create_model

    if source not in SOURCES:
        raise ConfigError(f"convert --from {source!r}: expected one of {', '.join(SOURCES)}")
    cfg = load_config(config, overrides)
    cfg.model.pretrained, cfg.model.pretrained_file = False, None  # the checkpoint supplies every weight
    raw = read_official_checkpoint(checkpoint)
    state = find_state_dict(raw, SOURCES[source][1], checkpoint)
    converted, cfg, notes = convert_state(source, state, cfg)
    out = Path(out_dir)
    cfg.output_dir = str(out)
    model = create_model(cfg, num_classes_for(cfg))
    model.load_state_dict(converted, strict=True)
    save_weights(model, out / "model.safetensors")
    write_text_atomic(out / "config.yaml", to_yaml(cfg))
    info = {"source": source, "checkpoint": str(checkpoint), "sha256": _sha256(checkpoint),
            "tensors": len(state), "notes": notes}
    write_text_atomic(out / "convert.json", json.dumps(info, indent=2) + "\n")
    return out


def _sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
