"""Hub-style folders: ``model.save_pretrained(dir)`` and ``scaleseg.from_pretrained(dir or "org/name")``.

A pretrained folder is a scaleseg run folder plus a model card::

    config.yaml          the resolved experiment config (rebuilds the architecture)
    model.safetensors    the weights (MCIBI's memory included: it is a buffer)
    metrics.json         the last evaluation's scores (when known)
    README.md            the model card: architecture, method, dataset, classes, training command,
                         metrics and the exact scaleseg version; YAML front matter for the Hugging Face Hub

``from_pretrained`` reads local folders without any network access. A name ``org/name`` that is not
a local folder is fetched with ``huggingface_hub.snapshot_download`` (the same four files only);
with ``HF_HUB_OFFLINE=1`` that resolves only from the local cache, else a one-line CheckpointError.
``push_to_hub`` uploads the folder with ``huggingface_hub.HfApi.upload_folder``. huggingface_hub's
``ModelHubMixin`` is not used: it serialises constructor kwargs to ``config.json``, while a scaleseg
model is rebuilt from its YAML config (modules, not kwargs, are its constructor arguments).
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import Config, load_config, to_yaml
from .errors import CheckpointError

__all__ = ["PretrainedMixin", "load_pretrained", "model_card", "resolve_pretrained", "save_pretrained", "version_string"]

HUB_FILES = ("config.yaml", "model.safetensors", "metrics.json", "README.md")
CARD_METRICS = ("mIoU", "mAcc", "aAcc", "fwIoU", "mDice")

_METHODS = {
    "hmsa": ("Hierarchical Multi-Scale Attention", "Tao, Sapra, Catanzaro, *Hierarchical Multi-Scale Attention "
             "for Semantic Segmentation*, 2020 (arXiv:2005.10821)"),
    "explicit": ("explicit scale attention", "Chen et al., *Attention to Scale*, CVPR 2016"),
    "mcibi": ("MCIBI dataset-level memory", "Jin et al., *Mining Contextual Information Beyond Image for Semantic "
              "Segmentation*, ICCV 2021"),
    "dsrl": ("DSRL dual super-resolution learning", "Wang et al., *Dual Super-Resolution Learning for Semantic "
             "Segmentation*, CVPR 2020"),
}


class PretrainedMixin:
    """``save_pretrained`` / ``push_to_hub`` for scaleseg models (mixed into every model class).

    The config comes from ``config=`` or from ``self.scaleseg_config``, which ``scaleseg.create_model``
    and ``scaleseg.from_pretrained`` set; metrics from ``metrics=`` or ``self.scaleseg_metrics``.
    """

    def save_pretrained(self, save_directory: str | Path, *, config: Config | None = None,
                        metrics: Mapping[str, Any] | None = None, training_command: str | None = None) -> Path:
        """Write ``config.yaml``, ``model.safetensors``, ``metrics.json`` (if known) and ``README.md``."""
        return save_pretrained(self, save_directory, config=config, metrics=metrics, training_command=training_command)

    def push_to_hub(self, repo_id: str, *, config: Config | None = None, metrics: Mapping[str, Any] | None = None,
                    private: bool = False, token: str | None = None,
                    commit_message: str = "Upload scaleseg model") -> str:
        """``save_pretrained`` into a temporary folder and upload it to the Hub repo ``repo_id``
        (created if missing); returns the commit URL."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, config=config, metrics=metrics)
            api.create_repo(repo_id, private=private, exist_ok=True)
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message)
        return str(getattr(info, "commit_url", info))


def _model_config(model: Any, config: Config | None) -> Config:
    cfg = config if config is not None else getattr(model, "scaleseg_config", None)
    if not isinstance(cfg, Config):
        raise CheckpointError("save_pretrained needs the model's config: build the model with "
                              "scaleseg.create_model(cfg) / scaleseg.from_pretrained(...), or pass config=cfg")
    return cfg


def save_pretrained(model: Any, save_directory: str | Path, *, config: Config | None = None,
                    metrics: Mapping[str, Any] | None = None, training_command: str | None = None) -> Path:
    """See :meth:`PretrainedMixin.save_pretrained`. Every file is written atomically."""
    from .engine.checkpoint import save_weights

    cfg = _model_config(model, config)
    metrics = dict(metrics) if metrics is not None else getattr(model, "scaleseg_metrics", None)
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    _write_text(out / "config.yaml", to_yaml(cfg))
    save_weights(model, out / "model.safetensors")
    if metrics:
        _write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    else:
        (out / "metrics.json").unlink(missing_ok=True)
    _write_text(out / "README.md", model_card(model, cfg, metrics, training_command))
    return out


def resolve_pretrained(name: str | Path, *, revision: str | None = None) -> Path:
    """A local file/folder as is; otherwise ``org/name`` from the Hub (cache only when offline)."""
    path = Path(name)
    if path.exists():
        return path
    text = str(name)
    if text.count("/") != 1 or text.startswith((".", "/", "~")) or text.endswith("/"):
        raise CheckpointError(f"{text} does not exist; expected a run folder (config.yaml + model.safetensors), "
                              "a .ckpt/.safetensors file in one, or a Hub repo id 'org/name'")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, revision=revision, allow_patterns=list(HUB_FILES)))
    except Exception as err:  # noqa: BLE001 - offline, unknown repo, auth: all one line
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        hint = " (HF_HUB_OFFLINE is set: only the local cache is searched)" if offline else ""
        raise CheckpointError(f"'{text}' is not a local path, and fetching it from the Hugging Face Hub failed{hint}: "
                              f"{first[:200]}") from None


def load_pretrained(name: str | Path, *, revision: str | None = None) -> Any:
    """The model of a run / pretrained folder, a ``.ckpt``/``.safetensors`` file next to its run's
    ``config.yaml``, or a Hub repo ``org/name``; in eval mode, with ``scaleseg_config`` and
    ``scaleseg_metrics`` (the folder's ``metrics.json``, if any) set."""
    from . import create_model
    from .engine.checkpoint import load_model_weights

    path = resolve_pretrained(name, revision=revision)
    folder = path if path.is_dir() else path.parent
    weights = path / "model.safetensors" if path.is_dir() else path
    config = next((p for p in (folder / "config.yaml", folder.parent / "config.yaml") if p.is_file()), None)
    if config is None:
        raise CheckpointError(f"no config.yaml next to {path}; expected a scaleseg run folder")
    cfg = load_config(config)
    model = create_model(cfg)
    load_model_weights(model, weights)
    metrics_file = next((p for p in (folder / "metrics.json", folder.parent / "metrics.json") if p.is_file()), None)
    if metrics_file is not None:
        try:
            model.scaleseg_metrics = json.loads(metrics_file.read_text())
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{metrics_file} is not valid JSON: {err}") from None
    return model.eval()


# ------------------------------------------------------------------------------------ model card
def version_string() -> str:
    """``scaleseg <version>``, plus the git commit (and ``-dirty``) when run from a checkout."""
    from . import __version__

    root = Path(__file__).resolve().parents[2]
    text = f"scaleseg {__version__}"
    if (root / ".git").exists():
        try:
            commit = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
                                    capture_output=True, text=True, timeout=10, check=True).stdout.strip()
            if commit:
                text += f" (git {commit})"
        except (OSError, subprocess.SubprocessError):
            pass
    return text


def _methods(cfg: Config) -> list[str]:
    m = cfg.model
    keys = []
    if m.hmsa.mode == "hierarchical":
        keys.append("hmsa")
    elif m.hmsa.mode == "explicit":
        keys.append("explicit")
    if m.mcibi.enabled:
        keys.append("mcibi")
    if m.dsrl.enabled:
        keys.append("dsrl")
    return keys


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


def model_card(model: Any, cfg: Config, metrics: Mapping[str, Any] | None = None,
               training_command: str | None = None) -> str:
    """The README.md of a pretrained folder (Markdown with Hugging Face YAML front matter)."""
    from .data.catalog import spec_for
    from .engine.task import model_signature

    spec = spec_for(cfg.data)
    m = cfg.model
    methods = _methods(cfg)
    params = sum(p.numel() for p in model.parameters())
    signature = model_signature(cfg, spec.num_classes)
    command = training_command or f"scaleseg train config.yaml output_dir=runs/{cfg.name}_retrain"
    tags = ["scaleseg", "semantic-segmentation", "pytorch", *methods]
    lines = [
        "---",
        "library_name: scaleseg",
        "pipeline_tag: image-segmentation",
        "license: apache-2.0",
        "tags:",
        *[f"- {t}" for t in tags],
        "---",
        "",
        f"# {cfg.name}",
        "",
        f"A scaleseg semantic-segmentation model: `{signature}`, {params / 1e6:.2f} M parameters.",
        "",
        "## Architecture",
        "",
        f"- segmentation model: `{m.arch}` on the `{m.backbone}` backbone"
        + (f" (output stride {m.output_stride})" if m.arch not in ("espnetv2", "hrnet_ocr") else "")
        + (f", width s={m.width}" if m.arch == "espnetv2" else ""),
        f"- classes: {spec.num_classes}, logits `B×{spec.num_classes}×H×W` (float32)",
        f"- input normalisation: mean {list(getattr(model, 'mean', ()))}, std {list(getattr(model, 'std', ()))}",
    ]
    if m.dsrl.enabled:
        lines.append(f"- output resolution: {round(1 / m.dsrl.lr_scale)}× the input (DSRL SSSR head)")
    lines += ["", "## Method", ""]
    if methods:
        for key in methods:
            title, ref = _METHODS[key]
            lines.append(f"- **{title}** — {ref}")
        if "hmsa" in methods:
            lines.append(f"  - trained on scales {m.hmsa.train_scales}; inference scales "
                         f"{cfg.eval.scales or [1.0]} (chained by the learned attention)")
    else:
        lines.append("- plain single-scale segmentation (no method wrapper)")
    lines += [
        "",
        "## Dataset",
        "",
        f"- `{cfg.data.dataset}`" + (f" ({cfg.data.version})" if cfg.data.version else "")
        + f", train split `{cfg.data.train_split}`, evaluated on `{cfg.data.val_split}`",
        f"- label ids 0–{spec.num_classes - 1}; {spec.ignore_index} = ignore",
        "",
        "| id | class | colour (RGB) |",
        "|---:|---|---|",
        *[f"| {i} | {name} | {tuple(colour)} |" for i, (name, colour) in enumerate(zip(spec.classes, spec.palette))],
        "",
        "## Training",
        "",
        "```bash",
        command,
        "```",
        "",
        f"`config.yaml` here is the complete resolved config of the original run (`output_dir: {cfg.output_dir}`); "
        "any key can be overridden as `section.key=value`.",
        f"{cfg.train.epochs} epochs, batch size {cfg.train.batch_size}, crop {cfg.data.crop_size}, "
        f"SGD lr {cfg.optim.lr}, loss `{cfg.loss.name}`, seed {cfg.seed}.",
        "",
        "## Metrics (last evaluation)",
        "",
    ]
    if metrics:
        split = metrics.get("split", cfg.data.val_split)
        lines += [f"On `{split}`" + (f", GFLOPs {metrics['gflops']:.2f}" if isinstance(metrics.get("gflops"), float) else "") + ":",
                  "", "| " + " | ".join(CARD_METRICS) + " |", "|" + "---:|" * len(CARD_METRICS),
                  "| " + " | ".join(_fmt(metrics.get(k)) for k in CARD_METRICS) + " |", ""]
        per_class = metrics.get("per_class") or {}
        if per_class:
            lines += ["| class | IoU % |", "|---|---:|", *[f"| {k} | {_fmt(v)} |" for k, v in per_class.items()], ""]
    else:
        lines += ["No evaluation recorded with this model.", ""]
    lines += [
        "## Use",
        "",
        "```python",
        "import scaleseg",
        'model = scaleseg.from_pretrained("path/to/this/folder")   # or "org/name" on the Hub',
        "labels = model.predict(pil_image)                         # H×W train ids",
        "```",
        "",
        "```bash",
        "scaleseg serve path/to/this/folder                        # web page + REST API on 127.0.0.1:8000",
        "scaleseg export config.yaml --checkpoint model.safetensors --format onnx --out model.onnx",
        "```",
        "",
        f"Written by {version_string()}.",
        "",
    ]
    return "\n".join(lines)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

