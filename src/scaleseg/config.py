"""Experiment configuration: one flat YAML file per experiment, validated into typed dataclasses.

Every key has a type and a default here, so the resolved config printed at the start of a run is the
whole truth: no inheritance, no registries. Unknown or misspelled keys are errors, and any key can be
overridden from the command line as ``section.key=value`` (the value is parsed as YAML).

YAML is read with :class:`ConfigLoader`, PyYAML's safe loader with the YAML 1.2 float syntax, so that
``1e-3`` is a float as users expect (PyYAML follows YAML 1.1 and reads it as the string "1e-3").
Ranges are checked at load time (:data:`RANGES`): each violation is one line naming the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError


class ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads YAML 1.2 floats without a dot (``1e-3``, ``5E-4``, ``-2e+5``)."""


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str) -> Any:
    """YAML text → Python objects with :class:`ConfigLoader` (safe; ``1e-3`` is a float)."""
    return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 - ConfigLoader is a SafeLoader


@dataclass
class HMSAConfig:
    """Hierarchical multi-scale attention (Tao et al. 2020) and its baselines."""

    mode: Literal["none", "hierarchical", "explicit"] = "none"
    train_scales: list[float] = field(default_factory=lambda: [0.5, 1.0])
    explicit_scales: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    per_scale_weight: float = 0.05
    attn_channels: int = 256  # hierarchical attention head width
    # explicit baseline's head: "published" = 3×3 → 512, ReLU, 1×1 (Chen et al. / NVIDIA);
    # "bn" = 3×3 → 256, BN, ReLU, 1×1 (scaleseg's earlier layout)
    explicit_head: Literal["published", "bn"] = "published"
    explicit_channels: int | None = None  # None: 512 (published) / 256 (bn)


@dataclass
class MCIBIConfig:
    """Dataset-level memory context (Jin et al. 2021)."""

    enabled: bool = False
    channels: int = 512
    momentum: float = 0.9
    momentum_min_ratio: float = 0.01  # the reference's lr-coupled floor (min_lr = 0.01·lr0)
    init: Literal["mean", "random_pixel"] = "mean"
    # memory update: full_resolution = the reference's path (features upsampled to label size);
    # false = fast feature-resolution update with labels brought to the feature grid by label_downsample
    full_resolution: bool = False
    label_downsample: Literal["soft", "majority", "center"] = "soft"
    # DeepLabV3 host ASPP projection: 1 (1×1 + dropout 0.1, light) or 3 with aspp_dropout 0 (the reference)
    aspp_project_kernel: Literal[1, 3] = 1
    aspp_dropout: float = 0.1
    memory_loss_weight: float = 0.4  # α: CE on the class-probability map W = softmax(H1(R))
    consistency_weight: float = 1.0  # β: representation-consistent learning, CE(H2(M), arange(K))
    consistency_start_epoch: int = 1  # 0-based; the reference skips the first epoch
    stride8_weight: float = 0.4  # DeepLabV3+ host only: CE on H2's stride-8 logits


@dataclass
class DSRLConfig:
    """Dual super-resolution learning (Wang et al. 2020)."""

    enabled: bool = False
    lr_scale: float = 0.5
    upsample: Literal["bilinear", "sssr"] = "sssr"
    sisr: bool = True
    sr_weight: float = 0.1
    fa_weight: float = 1.0
    fa_subsample: int = 8
    fa_max_block_mib: float = 64.0


@dataclass
class ESPNetv2Config:
    """ESPNetv2 head options (``model.arch=espnetv2``)."""

    align_corners: bool = False  # final logits upsampling; EdgeNets' official head: true
    proj_planes: int | None = None  # pyramid-pool projection width; None: min(K // 2, 16) as EdgeNets


@dataclass
class ModelConfig:
    arch: Literal["deeplabv3plus", "deeplabv3", "fcn", "pspnet", "hrnet_ocr", "espnetv2", "bisenet", "dabnet"] = "deeplabv3plus"
    backbone: str = "resnet50"
    pretrained: bool = False
    pretrained_file: str | None = None
    output_stride: int = 16
    aux_head: bool = False
    aux_weight: float = 0.4
    head_channels: int = 256
    # DeepLabV3+/DeepLabV3 heads: depthwise-separable 3×3 convs in ASPP and decoder (the DeepLabV3+
    # paper's); DeepLabV3+ decoder: number and width of the 3×3 convs after the low-level fusion
    separable: bool = False
    decoder_convs: int = 2
    decoder_channels: int = 256
    width: float = 2.0
    # inputs that are not a multiple of the stride: "pad" (pixel-exact: pad, upsample, crop) or
    # "stretch" (NVIDIA's HMSA code: run unpadded, stretch ceil(h/s) maps over h pixels)
    input_fit: Literal["pad", "stretch"] = "pad"
    hmsa: HMSAConfig = field(default_factory=HMSAConfig)
    mcibi: MCIBIConfig = field(default_factory=MCIBIConfig)
    dsrl: DSRLConfig = field(default_factory=DSRLConfig)
    espnetv2: ESPNetv2Config = field(default_factory=ESPNetv2Config)


@dataclass
class AutolabelConfig:
    """Auto-labelled images: pixels with confidence below ``threshold`` become ignore at load time."""

    dir: str | None = None
    threshold: float = 0.9  # the paper's value; NVIDIA's code release used 0.5
    split: str | None = None  # split whose images carry auto-labels (e.g. train_extra); None: the train split
    mix: Literal["append", "boost"] = "append"  # join the image list, or only class-uniform pools
    classes: list[int] | None = None  # boost classes for mix=boost
    merge_classes: list[int] = field(default_factory=list)  # Cityscapes: union with human gtCoarse


@dataclass
class DataConfig:
    dataset: Literal["scalescenes", "camvid", "cityscapes", "mapillary", "ade20k", "folder"] = "scalescenes"
    root: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    # dataset-specific options; each is passed only to datasets that accept it
    classes: list[str] | None = None
    palette: list[list[int]] | None = None
    ignore_index: int | None = None
    list_file: str | None = None
    image_dir: str | None = None
    mask_dir: str | None = None
    version: str | None = None
    label_type: str | None = None
    num_images: int | None = None
    image_size: list[int] | None = None
    # augmentation
    crop_size: list[int] = field(default_factory=lambda: [512, 1024])
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    base_size: int | None = None
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    hflip: bool = True
    color_jitter: float = 0.25
    blur: bool = False
    class_uniform_pct: float = 0.0
    class_uniform_tile: int = 1024
    class_uniform_classes: list[int] | None = None
    autolabel: AutolabelConfig = field(default_factory=AutolabelConfig)
    check: bool = True  # `train` first checks every file (as `scaleseg check-data` does), cached per file


@dataclass
class LossConfig:
    name: Literal["ce", "ohem", "rmi"] = "ce"
    class_weights: list[float] | None = None
    ohem_thresh: float = 0.7
    ohem_min_kept: int = 100_000
    # RMI, with NVIDIA's meanings: lambda_way 1 → λ·BCE + (1 − λ)·RMI, 0 → BCE + λ·RMI
    rmi_lambda: float = 0.5  # NVIDIA RMILoss loss_weight_lambda
    rmi_lambda_way: Literal[0, 1] = 1  # NVIDIA RMILoss lambda_way
    ocr_aux_rmi: bool = False  # NVIDIA --ocr_aux_loss_rmi: aux logits get BCE + RMI (per-scale terms stay BCE)


@dataclass
class OptimConfig:
    # sgd: momentum / nesterov apply; adamw: torch.optim.AdamW (betas (0.9, 0.999), decoupled weight decay)
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    poly_power: float = 0.9
    warmup_steps: int = 0
    warmup_ratio: float = 0.1


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 8
    num_workers: int = 2
    precision: Literal["32", "16-mixed", "bf16-mixed"] = "32"
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"
    sync_bn: bool = False
    val_every_n_epochs: int = 1
    log_every_n_steps: int = 10
    limit_train_batches: int | None = None
    checkpoint_every_n_steps: int | None = None
    progress: bool = True
    # model and batches in NHWC memory format (engine/speed.py). auto: on for CPU runs on AVX-512 CPUs, where
    # oneDNN's NHWC kernels are faster (DeepLabV3+ R-18 / R-50 training step ×1.16 / ×1.09, benchmarks/vs_smp.py),
    # off elsewhere (AVX2: ×0.94–0.99; on a GPU it pays with mixed precision: set true there)
    channels_last: bool | Literal["auto"] = "auto"
    compile: bool = False  # torch.compile the backbone and heads in place for training
    # EMA of the weights (and BN buffers), updated after every optimiser step; validation, the
    # checkpoints' state_dict and model.safetensors hold the EMA weights (engine/ema.py)
    ema_decay: float | None = None
    # start from these weights (.safetensors or a scaleseg .ckpt of the same model), e.g. the second,
    # high-resolution phase of a recipe; a resume (--resume) restores its own checkpoint instead
    init_weights: str | None = None
    # inference scales of the validation during training (None: eval.scales, i.e. what eval uses)
    val_scales: list[float] | None = None


@dataclass
class EvalConfig:
    mode: Literal["whole", "slide"] = "whole"
    crop_size: list[int] | None = None
    stride: list[int] | None = None
    flip: bool = False
    # None: single scale, or (0.5, 1.0, 2.0) for a hierarchical model (its own inference scales)
    scales: list[float] | None = None
    # auto: hierarchical chaining for models with hmsa.mode=hierarchical, average pooling otherwise
    scale_mode: Literal["auto", "avg", "max", "hierarchical"] = "auto"
    batch_size: int = 1
    num_workers: int = 2
    base_size: int | None = None
    compile: bool = False  # torch.compile the backbone and heads in place for eval / predict
    # model in channels-last (NHWC) memory format for eval / predict. auto: as train.channels_last (on for
    # CPU runs on AVX-512 CPUs: DeepLabV3+ R-18 at 512×1024 ×1.26). On AVX2 it pays for wide networks on large
    # images (R-50 OS8 at 512×1024: ×1.22) and can cost on small ones: benchmarks/speed_switches.py
    channels_last: bool | Literal["auto"] = "auto"
    # fold each eval-mode BatchNorm into the conv that feeds it (same logits to float rounding, one pass
    # over each activation less; models/fold_bn.py) for eval / predict / autolabel / the demo's eval
    fold_bn: bool = True
    # glibc: large tensors from the heap, freed memory kept for reuse (no page faults when re-allocated;
    # dense 3-scale R-50 OS8 inference at 512×1024: 20 % less CPU time), while eval / predict /
    # autolabel runs; glibc's defaults again after it (engine/speed.py). What PyTorch's CPU tuning
    # guide gets by preloading jemalloc or tcmalloc
    reuse_memory: bool = True
    # whole-image inference of an image (or a scale of it) with more pixels than this runs in windows
    # with the same logits (scaleseg/tiling.py); null: never. tile_margin null: the receptive field
    # 2 Mpx: a 1024×2048 Cityscapes frame still runs whole; a 4000×3000 predict peaks at 1.7 GiB, not 3.7
    max_pixels: int | None = 2_097_152
    tile_margin: int | None = None
    # hierarchical models: run the top scale (> 1) only on tiles where it can change the fused
    # prediction (scaleseg/sparse.py); tile in 1.0-scale px, margin in top-scale px; budget: the
    # fraction of the top-scale image its windows may run, tiles of most flagged mass first (0.15:
    # 0.25 + 1 + 4·0.15 = 1.85× single scale in pixels); null: every tile with a flagged pixel.
    # Defaults chosen on ScaleScenes *training* images (docs/sparse_inference.md)
    sparse: bool = False
    sparse_threshold: float = 2.0
    sparse_tile: int = 8
    sparse_margin: int = 8
    sparse_budget: float | None = 0.15
    base_size: int | None = None  # resizes image AND labels: the score is then at the reduced size
    # resize only the image by this factor; logits are upsampled to the label size (honest scoring)
    infer_scale: float | None = None
    num_images: int | None = None  # evaluate only this many evenly spaced images of the split


@dataclass
class StageConfig:
    """One stage of staged training (``stages:``, see ``engine/stages.py``). ``train`` / ``freeze``
    name parts (``backbone``, ``head``, ``attention``, ``aux``, ``mcibi``, ``sisr``) or parameter-name
    prefixes; give at most one of them (neither: everything trains)."""

    name: str = "stage"
    epochs: int = 1
    lr: float | None = None  # None: optim.lr
    # poly: optim.poly_power over the stage; exponential: lr · gamma^(epoch in stage); constant
    schedule: Literal["poly", "exponential", "constant"] = "poly"
    gamma: float = 0.8
    warmup_steps: int = 0
    train: list[str] | None = None  # only these train (the rest is frozen)
    freeze: list[str] = field(default_factory=list)  # these are frozen (the rest trains)
    # hierarchical attention only: the (lo, 1.0) training pair of this stage (None: model.hmsa.train_scales)
    train_scales: list[float] | None = None
    # hierarchical attention only: false trains the base at each training scale on its own (mean of
    # the per-scale losses, no attention, no fusion), stage 1 of the single-GPU recipe
    fuse_scales: bool = True


@dataclass
class Config:
    name: str = "experiment"
    seed: int = 0
    output_dir: str = "runs/experiment"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # staged training: stages run one after the other in one run folder; train.epochs is their sum
    stages: list[StageConfig] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"list of {_type_name(inner)}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, key)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(f"config key '{key}' = {value!r}: expected {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"config key '{key}' = {value!r}: expected null")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        # `precision: 32` (a YAML int) means the literal "32"
        if isinstance(value, int) and not isinstance(value, bool) and str(value) in typing.get_args(tp):
            return str(value)
        raise ConfigError(f"config key '{key}' = {value!r}: expected one of {_type_name(tp)}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' = {value!r}: expected {_type_name(tp)}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config section '{key}' = {value!r}: expected a mapping of keys")
        return _build(tp, value, key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"config key '{key}' = {value!r}: expected {_type_name(tp)}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint} (valid keys: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    obj = cls(**kwargs)
    return obj


def from_dict(data: dict[str, Any]) -> Config:
    """Validate a nested mapping into a ``Config``; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
    cfg = _build(Config, data)
    check(cfg)
    if cfg.stages:
        total = sum(stage.epochs for stage in cfg.stages)
        given = (data.get("train") or {}).get("epochs")
        if given is not None and given != total:
            raise ConfigError(f"config key 'train.epochs' = {given} but the stages sum to {total} epochs; with "
                              f"stages:, train.epochs is their sum (drop it, or set it to {total})")
        cfg.train.epochs = total  # resolved: printed and recorded
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"model.backbone=resnet50"`` → (["model", "backbone"], "resnet50"); the value is YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override '{text}' has no key")
    try:
        value = parse_yaml(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides to a raw mapping. Paths are checked against the schema."""
    for text in overrides:
        path, value = parse_override(text)
        node: dict[str, Any] = data
        cls: Any = Config
        for depth, part in enumerate(path):
            hints = typing.get_type_hints(cls)
            prefix = ".".join(path[:depth])
            if part not in hints:
                names = list(hints)
                close = difflib.get_close_matches(part, names, n=1)
                hint = f"; did you mean '{'.'.join(path[:depth] + [close[0]])}'?" if close else ""
                where = f"'{prefix}'" if prefix else "the top level"
                raise ConfigError(f"unknown config key '{'.'.join(path)}' in override{hint} (keys of {where}: {', '.join(names)})")
            if depth == len(path) - 1:
                node[part] = value
            else:
                cls = hints[part]
                if not dataclasses.is_dataclass(cls):
                    raise ConfigError(f"config key '{'.'.join(path[: depth + 1])}' is a value, not a section")
                child = node.get(part)
                if not isinstance(child, dict):
                    child = {}
                    node[part] = child
                node = child
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (or start from defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = parse_yaml(path.read_text()) or {}
        except yaml.YAMLError as err:
            first = str(err).splitlines()[0] if str(err) else "syntax error"
            raise ConfigError(f"config file {path} is not valid YAML: {first}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    data = apply_overrides(data, list(overrides or []))
    return from_dict(data)


# --------------------------------------------------------------------------------------------------
# ranges

# key → rule. ">0" / ">=0" / ">=1": a bound (floats must also be finite); "[0,1]": a probability or
# fraction; "(0,1]": a fraction above zero. For lists the rule applies to every element; None passes.
RANGES: dict[str, str] = {
    "seed": ">=0",
    "model.output_stride": ">=1", "model.aux_weight": ">=0", "model.head_channels": ">=1", "model.width": ">0",
    "model.hmsa.train_scales": ">0", "model.hmsa.explicit_scales": ">0", "model.hmsa.per_scale_weight": ">=0",
    "model.hmsa.attn_channels": ">=1",
    "model.mcibi.channels": ">=1", "model.mcibi.momentum": "[0,1]", "model.mcibi.momentum_min_ratio": "[0,1]",
    "model.mcibi.memory_loss_weight": ">=0", "model.mcibi.consistency_weight": ">=0",
    "model.mcibi.consistency_start_epoch": ">=0", "model.mcibi.stride8_weight": ">=0",
    "model.dsrl.lr_scale": "(0,1]", "model.dsrl.sr_weight": ">=0", "model.dsrl.fa_weight": ">=0",
    "model.dsrl.fa_subsample": ">=1", "model.dsrl.fa_max_block_mib": ">0",
    "data.num_images": ">=1", "data.image_size": ">=1", "data.crop_size": ">=1", "data.scale_range": ">0",
    "data.base_size": ">=1", "data.color_jitter": ">=0", "data.class_uniform_pct": "[0,1]",
    "data.class_uniform_tile": ">=1", "data.autolabel.threshold": "[0,1]",
    "loss.class_weights": ">=0", "loss.ohem_thresh": "[0,1]", "loss.ohem_min_kept": ">=1",
    "optim.lr": ">0", "optim.momentum": "[0,1]", "optim.weight_decay": ">=0", "optim.poly_power": ">=0",
    "optim.warmup_steps": ">=0", "optim.warmup_ratio": "[0,1]",
    "train.epochs": ">=1", "train.batch_size": ">=1", "train.num_workers": ">=0", "train.num_nodes": ">=1",
    "train.val_every_n_epochs": ">=1", "train.log_every_n_steps": ">=1", "train.limit_train_batches": ">=1",
    "train.checkpoint_every_n_steps": ">=1",
    "eval.crop_size": ">=1", "eval.stride": ">=1", "eval.scales": ">0", "eval.batch_size": ">=1",
    "eval.num_workers": ">=0", "eval.base_size": ">=1",
}

_RULE_TEXT = {">0": "> 0", ">=0": ">= 0", ">=1": ">= 1", "[0,1]": "in [0, 1]", "(0,1]": "in (0, 1]"}


def _in_range(value: float, rule: str) -> bool:
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return {
        ">0": value > 0, ">=0": value >= 0, ">=1": value >= 1,
        "[0,1]": 0 <= value <= 1, "(0,1]": 0 < value <= 1,
    }[rule]


def lookup(cfg: Any, key: str) -> Any:
    """The value at a dotted key (``"optim.lr"``) of a config object."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def check_ranges(cfg: Config) -> None:
    """Every :data:`RANGES` rule; the first violation is a one-line ConfigError naming the key."""
    for key, rule in RANGES.items():
        value = lookup(cfg, key)
        values = value if isinstance(value, list) else [value]
        for v in values:
            if v is not None and not _in_range(v, rule):
                expected = "every element " + _RULE_TEXT[rule] if isinstance(value, list) else _RULE_TEXT[rule]
                raise ConfigError(f"config key '{key}' = {value!r}: expected {expected}")


def check(cfg: Config) -> None:
    """Ranges (:data:`RANGES`) and cross-field checks that types alone cannot express."""
    check_ranges(cfg)
    if len(cfg.data.crop_size) != 2:
        raise ConfigError(f"config key 'data.crop_size' = {cfg.data.crop_size}: expected [height, width] > 0")
    lo, hi = (cfg.data.scale_range + [None, None])[:2]
    if len(cfg.data.scale_range) != 2 or not 0 < lo <= hi:
        raise ConfigError(f"config key 'data.scale_range' = {cfg.data.scale_range}: expected [min, max] with 0 < min <= max")
    for key in ("data.image_size", "eval.crop_size", "eval.stride"):
        value = lookup(cfg, key)
        if value is not None and len(value) != 2:
            raise ConfigError(f"config key '{key}' = {value}: expected [height, width]")
    if cfg.model.output_stride not in (8, 16, 32):
        raise ConfigError(f"config key 'model.output_stride' = {cfg.model.output_stride}: expected 8, 16 or 32")
    if not 0 <= cfg.seed < 2**32:
        raise ConfigError(f"config key 'seed' = {cfg.seed}: expected an integer in [0, 2**32)")
    a = cfg.data.autolabel
    if a.mix == "boost" and cfg.data.class_uniform_pct == 0:
        raise ConfigError("config key 'data.autolabel.mix' = 'boost' needs data.class_uniform_pct > 0")
    e = cfg.eval
    if e.max_pixels is not None and e.max_pixels < 1:
        raise ConfigError(f"config key 'eval.max_pixels' = {e.max_pixels}: expected a positive pixel count or null")
    if e.sparse_tile < 1 or e.sparse_margin < 0 or e.sparse_threshold < 0:
        raise ConfigError(f"config keys 'eval.sparse_tile' = {e.sparse_tile}, 'eval.sparse_margin' = {e.sparse_margin}, "
                          f"'eval.sparse_threshold' = {e.sparse_threshold}: expected tile >= 1, margin >= 0, threshold >= 0")
    if e.sparse_budget is not None and not 0 <= e.sparse_budget <= 1:
        raise ConfigError(f"config key 'eval.sparse_budget' = {e.sparse_budget}: expected a fraction in [0, 1] or null")
    if e.tile_margin is not None and e.tile_margin < 0:
        raise ConfigError(f"config key 'eval.tile_margin' = {e.tile_margin}: expected >= 0 or null")
    if cfg.eval.infer_scale is not None and cfg.eval.infer_scale <= 0:
        raise ConfigError(f"config key 'eval.infer_scale' = {cfg.eval.infer_scale}: expected a positive factor (e.g. 0.5)")
    if cfg.eval.num_images is not None and cfg.eval.num_images < 1:
        raise ConfigError(f"config key 'eval.num_images' = {cfg.eval.num_images}: expected a positive number of images")
    if cfg.train.ema_decay is not None and not 0.0 < cfg.train.ema_decay < 1.0:
        raise ConfigError(f"config key 'train.ema_decay' = {cfg.train.ema_decay}: expected a decay in (0, 1), e.g. 0.999")
    check_stages(cfg)
    m = cfg.model
    if m.separable and not (m.arch == "deeplabv3plus" or (m.arch == "deeplabv3" and not m.mcibi.enabled)):
        raise ConfigError(f"config key 'model.separable' = true needs model.arch deeplabv3plus, or deeplabv3 "
                          f"without model.mcibi (got arch {m.arch!r}{', mcibi' if m.mcibi.enabled else ''})")
    if m.decoder_convs < 1 or m.decoder_channels < 1:
        raise ConfigError(f"config keys 'model.decoder_convs' = {m.decoder_convs} and 'model.decoder_channels' = "
                          f"{m.decoder_channels}: expected both >= 1")


def check_stages(cfg: Config) -> None:
    """``stages:``: unique names, epochs >= 1, positive LRs, one of train/freeze, a valid HMSA pair."""
    names: set[str] = set()
    for i, st in enumerate(cfg.stages):
        key = f"stages[{i}]"
        if st.name in names:
            raise ConfigError(f"config key '{key}.name' = {st.name!r}: stage names must be unique")
        names.add(st.name)
        if st.epochs < 1:
            raise ConfigError(f"config key '{key}.epochs' = {st.epochs}: expected >= 1")
        if st.lr is not None and not (st.lr > 0 and math.isfinite(st.lr)):
            raise ConfigError(f"config key '{key}.lr' = {st.lr}: expected > 0 (or null for optim.lr)")
        if not 0 < st.gamma <= 1 or st.warmup_steps < 0:
            raise ConfigError(f"config keys '{key}.gamma' = {st.gamma}, '{key}.warmup_steps' = {st.warmup_steps}: "
                              "expected gamma in (0, 1] and warmup_steps >= 0")
        if st.train is not None and st.freeze:
            raise ConfigError(f"config keys '{key}.train' and '{key}.freeze' are both set: give what trains or what "
                              "is frozen, not both")
        if st.train is not None and not st.train:
            raise ConfigError(f"config key '{key}.train' = []: nothing would train; list parts or prefixes")
        if st.train_scales is not None or not st.fuse_scales:
            if cfg.model.hmsa.mode != "hierarchical":
                what = "train_scales" if st.train_scales is not None else "fuse_scales"
                raise ConfigError(f"config key '{key}.{what}' needs model.hmsa.mode=hierarchical "
                                  f"(got {cfg.model.hmsa.mode!r})")
        if st.train_scales is not None and (len(st.train_scales) != 2 or 1.0 not in st.train_scales
                                            or not 0 < min(st.train_scales) < 1):
            raise ConfigError(f"config key '{key}.train_scales' = {st.train_scales}: expected two scales (lo, 1.0) "
                              "with 0 < lo < 1")
