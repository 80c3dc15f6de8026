"""Command line: ``scaleseg train|eval|predict|autolabel|export|serve|convert|demo|check-data|config``. Any config key can be
overridden as key=value.

No traceback reaches a user: every failure is one line ``scaleseg: error: ...`` (``--debug`` prints the
traceback too). Exit codes: 0 success, 2 bad input (config, data, checkpoint, run folder), 1 a fault of
the machine (full disk, out of memory, diverged training, an unexpected error), 130 Ctrl-C.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import traceback
from pathlib import Path

from . import __version__
from .config import Config, load_config, to_yaml
from .errors import DiskFullError, Interrupted, ScalesegError
from .quiet import quiet_vendor_output


def _split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """Separate ``key=value`` overrides from positional inputs (an existing path is never an override)."""
    overrides, rest = [], []
    for item in items:
        if "=" in item and not Path(item).exists():
            overrides.append(item)
        else:
            rest.append(item)
    return overrides, rest


def _scales(text: str) -> list[float]:
    try:
        scales = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--scales expects comma-separated numbers like 0.5,1.0,2.0, got '{text}'") from None
    if not scales or any(not s > 0 for s in scales):
        raise argparse.ArgumentTypeError(f"--scales expects positive numbers like 0.5,1.0,2.0, got '{text}'")
    return scales


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer (>= 1), got {value}")
    return value


def _eval_overrides(args: argparse.Namespace) -> list[str]:
    extra = []
    if getattr(args, "scales", None):
        extra.append(f"eval.scales=[{','.join(str(s) for s in args.scales)}]")
    if getattr(args, "flip", False):
        extra.append("eval.flip=true")
    return extra


def _print_config(cfg: Config, args: argparse.Namespace) -> Config:
    if not getattr(args, "quiet", False):
        print("# resolved config\n" + to_yaml(cfg), file=sys.stderr)
    return cfg


def _load(args: argparse.Namespace, overrides: list[str]) -> Config:
    return _print_config(load_config(args.config, overrides + _eval_overrides(args)), args)


def _output_folder(path: str, option: str = "--out") -> Path:
    """``--out`` must be a folder or a path that can become one (not a file)."""
    from .engine.runfolder import ensure_folder

    out = Path(path)
    ensure_folder(out, option)
    return out


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="print the traceback of an error")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show Lightning's info lines and dependency warnings")
    parser = argparse.ArgumentParser(
        prog="scaleseg", parents=[common],
        description="Semantic segmentation with hierarchical multi-scale attention, MCIBI and DSRL. "
                    "Any config key can be overridden as section.key=value (e.g. train.epochs=5).",
    )
    parser.add_argument("--version", action="version", version=f"scaleseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", parents=[common], help="train a model from a YAML config")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.epochs=5")
    p.add_argument("--resume", help="checkpoint to resume from, or 'auto' for the latest in output_dir; the run's "
                                    "own config is restored, overrides on top")
    p.add_argument("--force", action="store_true",
                   help="allow a resume whose overrides change the model or the training schedule")
    p.add_argument("--quiet", action="store_true", help="do not print the resolved config")

    for name, helptext in (("eval", "evaluate a checkpoint on data.val_split"),
                           ("predict", "write label, colour and overlay PNGs for images"),
                           ("autolabel", "label images with a teacher: train-id PNG + confidence PNG each")):
        p = sub.add_parser(name, parents=[common], help=helptext)
        p.add_argument("config")
        p.add_argument("items", nargs="*", help="key=value overrides" + ("" if name == "eval" else " and input files/folders"))
        p.add_argument("--checkpoint", required=True)
        p.add_argument("--out", required=True)
        p.add_argument("--scales", type=_scales, help="inference scales, e.g. 0.5,1.0,2.0")
        if name == "autolabel":
            p.add_argument("--no-flip", action="store_true", help="do not average with a horizontal flip")
        else:
            p.add_argument("--flip", action="store_true", help="average logits with a horizontal flip")
        p.add_argument("--quiet", action="store_true")
        if name == "eval":
            p.add_argument("--dump-scales", type=int, default=0, metavar="N",
                           help="also write per-scale predictions and attention maps of N images (PNG + index.html)")
        if name != "eval":
            p.add_argument("--batch-size", type=_positive_int, default=4)
        if name == "predict":
            p.add_argument("--skip-bad", action="store_true",
                           help="skip unreadable images (listed at the end) instead of stopping at the first")

    _add_deploy_commands(sub, common)
    # --- convert: official checkpoints into run folders (scaleseg.convert) -------------------
    p = sub.add_parser("convert", parents=[common], help="turn an official EdgeNets / NVIDIA / sssegmentation checkpoint into a run folder")
    p.add_argument("checkpoint", help="the official .pth file")
    p.add_argument("items", nargs="*", help="key=value config overrides")
    p.add_argument("--from", dest="source", required=True, choices=("edgenets", "nvidia", "ssseg"),
                   help="edgenets: ESPNetv2; nvidia: HRNet-OCR + hierarchical attention; ssseg: MCIBI (DeepLabV3 host)")
    p.add_argument("--config", required=True, help="YAML config describing the checkpoint's model and dataset")
    p.add_argument("--out", required=True, help="run folder to write (config.yaml + model.safetensors)")
    p.add_argument("--quiet", action="store_true")
    # -------------------------------------------------------------------------------------------


    p = sub.add_parser("check-data", parents=[common],
                       help="open every image and label of the configured dataset; report all bad files at once")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--split", action="append", help="split to check (repeatable); default: data.train_split and data.val_split")
    p.add_argument("--workers", type=_positive_int, help="decoding threads (default: CPU count + 2)")
    p.add_argument("--no-cache", action="store_true", help="check every file again, ignoring cached verdicts")

    p = sub.add_parser("config", parents=[common], help="print the resolved config (YAML + overrides) and exit")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")

    p = sub.add_parser("demo", parents=[common], help="train and evaluate a small model on the embedded ScaleScenes data")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quiet", action="store_true")
    return parser


def _train(args: argparse.Namespace) -> None:
    from .engine.runfolder import resume_config
    from .engine.train import train

    cfg = load_config(args.config, args.overrides)
    if args.resume is not None:
        cfg, ignored = resume_config(cfg, args.overrides)
        if ignored:
            shown = ", ".join(ignored[:5]) + (" ..." if len(ignored) > 5 else "")
            print(f"scaleseg: resuming with the run's own config; {args.config} differs in {shown} (ignored)", file=sys.stderr)
    _print_config(cfg, args)
    try:
        train(cfg, resume=args.resume, force=args.force)
    except Interrupted as err:
        if any((Path(cfg.output_dir) / "checkpoints").glob("last*.ckpt")):
            hint = f"resume with: scaleseg train {args.config} output_dir={cfg.output_dir} --resume auto"
        else:
            hint = "no checkpoint was written yet; start again with the same command"
        raise Interrupted(f"{err}; {hint}") from None


def _check_data(args: argparse.Namespace) -> int:
    from .data.check import check_splits, format_table, summary
    from .data.build import build_dataset

    cfg = load_config(args.config, args.overrides)
    splits = args.split or list(dict.fromkeys([cfg.data.train_split, cfg.data.val_split]))
    datasets = {split: build_dataset(cfg.data, split, None, cfg.seed) for split in splits}
    report = check_splits(datasets, workers=args.workers, progress=cfg.train.progress, cache_dir=not args.no_cache)
    if report.problems:
        roots = [Path(cfg.data.root)] if cfg.data.root else []
        print(format_table(report, roots), file=sys.stderr)
        print(f"scaleseg: error: {summary(report, splits)}", file=sys.stderr)
        return 2
    print(summary(report, splits))
    return 0


def _predict(args: argparse.Namespace) -> None:
    from .engine.evaluate import predict

    overrides, inputs = _split_overrides(args.items)
    if not inputs:
        raise ScalesegError("predict needs at least one input image or folder")
    out = _output_folder(args.out)
    result = predict(_load(args, overrides), args.checkpoint, inputs, out, batch_size=args.batch_size,
                     skip_bad=args.skip_bad)
    if result.skipped:
        print(f"skipped {len(result.skipped)} unreadable file{'s' if len(result.skipped) != 1 else ''}:", file=sys.stderr)
        for path, reason in result.skipped:
            print(f"  {path}: {reason}", file=sys.stderr)
    if result.renamed:
        print(f"note: {len(result.renamed)} inputs share a file stem with another input; their outputs keep the "
              f"extension (e.g. {result.renamed[0]})", file=sys.stderr)
    skipped = f"; skipped {len(result.skipped)} (listed above)" if result.skipped else ""
    print(f"wrote predictions for {len(result.written)} images to {args.out}{skipped}")


def run(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # positionals may follow options (``predict CFG --checkpoint C img/ --out D``): collect the rest
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    for name in ("items", "overrides"):
        if hasattr(args, name):
            setattr(args, name, getattr(args, name) + extra)
            extra = []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "train":
        _train(args)
    elif args.command == "eval":
        from .engine.evaluate import evaluate

        overrides, rest = _split_overrides(args.items)
        if rest:
            raise ScalesegError(f"eval takes only key=value overrides, got: {' '.join(rest)}")
        out = _output_folder(args.out)
        evaluate(_load(args, overrides), args.checkpoint, out, dump_scales=args.dump_scales)
    elif args.command == "predict":
        _predict(args)
    elif args.command == "autolabel":
        from .engine.autolabel import autolabel

        overrides, inputs = _split_overrides(args.items)
        if not inputs:
            raise ScalesegError("autolabel needs at least one input image or folder")
        out = _output_folder(args.out)
        written = autolabel(_load(args, overrides), args.checkpoint, inputs, out,
                            batch_size=args.batch_size, scales=args.scales, flip=not args.no_flip)
        print(f"auto-labelled {len(written)} images into {args.out}")
    elif args.command in DEPLOY_COMMANDS:
        _run_deploy(args)
    elif args.command == "convert":  # --- convert (scaleseg.convert) ---
        from .convert import convert

        overrides, rest = _split_overrides(args.items)
        if rest:
            raise ScalesegError(f"convert takes one checkpoint and key=value overrides, got also: {' '.join(rest)}")
        out = convert(args.source, args.checkpoint, args.config, args.out, overrides)
        if not args.quiet:
            print((out / "config.yaml").read_text(), file=sys.stderr)
        print(f"wrote {out / 'config.yaml'} and {out / 'model.safetensors'} (from {args.source} {args.checkpoint}); "
              f"use scaleseg.from_pretrained('{out}') or --checkpoint {out / 'model.safetensors'}")
    elif args.command == "check-data":
        return _check_data(args)
    elif args.command == "config":
        print(to_yaml(load_config(args.config, args.overrides)), end="")
    elif args.command == "demo":
        from .engine.demo import demo

        _output_folder(args.out)
        demo(args.out, args.overrides, quiet=args.quiet)
    return 0


# ---------------------------------------------------------------------------- deployment (issue #11)
DEPLOY_COMMANDS = ("export", "serve")


def _add_deploy_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """``export`` (ONNX / torch.export graph + JSON sidecar) and ``serve`` (web page + REST API)."""
    p = sub.add_parser("export", parents=[common], help="export the inference graph (normalise, multi-scale fusion, logits) "
                                      "to ONNX or a torch.export .pt2 program, with a JSON sidecar")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--checkpoint", required=True, help=".ckpt or .safetensors weights")
    p.add_argument("--format", choices=("onnx", "pt2"), default="onnx")
    p.add_argument("--out", required=True, help="output file, e.g. model.onnx (the sidecar is <out>.json)")
    p.add_argument("--scales", type=_scales, help="inference scales inside the graph (default eval.scales or 1.0)")
    p.add_argument("--flip", action="store_true", help="average with a horizontal flip inside the graph")
    p.add_argument("--opset", type=int, help="ONNX opset version (default: the exporter's)")
    p.add_argument("--raw-input", action="store_true", help="the graph takes uint8 RGB (0-255) instead of float 0-1")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("serve", parents=[common], help="serve a trained run folder: web page (upload an image) and REST API")
    p.add_argument("run_dir", help="run folder with config.yaml + model.safetensors (or a save_pretrained folder)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (e.g. eval.scales=[0.5,1.0,2.0])")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default localhost only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-side", type=int, default=1024,
                   help="longest image side inferred at once; larger images are downscaled (or tiled with --tile)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest accepted upload in MiB")
    p.add_argument("--tile", action="store_true", help="run larger images with sliding-window inference instead of downscaling")
    p.add_argument("--quiet", action="store_true")


def _run_deploy(args: argparse.Namespace) -> None:
    if args.command == "export":
        from .export import run_export

        overrides, rest = _split_overrides(args.overrides)
        if rest:
            raise ScalesegError(f"export takes only key=value overrides, got: {' '.join(rest)}")
        cfg = _load(args, overrides)
        graph, meta = run_export(cfg, args.checkpoint, args.out, fmt=args.format, scales=args.scales,
                                 flip=args.flip or None, opset=args.opset, raw_input=args.raw_input)
        print(f"wrote {graph} and {meta}")
    else:
        from .serve import serve

        overrides, rest = _split_overrides(args.overrides)
        if rest:
            raise ScalesegError(f"serve takes one run folder and key=value overrides, got: {' '.join(rest)}")
        serve(args.run_dir, overrides, host=args.host, port=args.port, max_side=args.max_side,
              max_upload_mb=args.max_upload_mb, tile=args.tile, quiet=args.quiet)


# --------------------------------------------------------------------------------------------------
# errors → one line


def one_line(err: BaseException) -> str:
    """The error's own message. A DataLoader worker re-raises our errors with its traceback prepended;
    the original message is then the last line, after the exception's qualified name."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    if len(lines) <= 1:
        return str(err).strip()
    last = lines[-1]
    name = f"{type(err).__module__}.{type(err).__qualname__}: "
    return last[len(name):] if last.startswith(name) else last


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


_ALLOC = re.compile(r"tried to allocate (\d+) bytes|Tried to allocate ([\d.]+ [KMGT]i?B)")


def out_of_memory(err: BaseException) -> str | None:
    """A short description if ``err`` is an out-of-memory error (CPU or GPU), else None."""
    torch = sys.modules.get("torch")
    oom_types = tuple(t for t in (MemoryError, getattr(torch, "OutOfMemoryError", None)) if t is not None)
    text = str(err)
    if not (isinstance(err, oom_types) or "can't allocate memory" in text or "not enough memory" in text
            or "out of memory" in text.lower()):
        return None
    found = _ALLOC.search(text)
    if found and found.group(1):
        return f"tried to allocate {int(found.group(1)) / 2**30:.1f} GB"
    return f"tried to allocate {found.group(2)}" if found else "an allocation failed"


def _oom_hint(command: str | None) -> str:
    if command == "train":
        return "use a smaller train.batch_size or data.crop_size"
    return ("use eval.mode=slide with eval.crop_size=[H,W] (bounded memory on large images), fewer or smaller "
            "--scales, or a smaller --batch-size / eval.batch_size")


def close_progress_bars() -> None:
    """Close live tqdm bars (Lightning's too) without redrawing them, so the error starts a clean line
    and no stale bar is drawn after it."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return
    bars = list(getattr(tqdm, "_instances", []))
    for bar in bars:
        try:
            bar.leave = False
            bar.close()
        except Exception:  # noqa: BLE001 - a broken bar must not hide the error
            pass
    if bars and not sys.stderr.isatty():
        print(file=sys.stderr)  # a file has no cursor to return: end the bar's line


def describe(err: BaseException, command: str | None) -> tuple[str, int]:
    """(one-line message, exit code) for any exception."""
    if isinstance(err, Interrupted):
        return f"scaleseg: {one_line(err)}", err.exit_code
    if isinstance(err, KeyboardInterrupt):
        hint = "; resume with --resume auto" if command == "train" else ""
        return f"scaleseg: interrupted{hint}", 130
    if isinstance(err, ScalesegError):
        return f"scaleseg: error: {one_line(err)}", err.exit_code
    oom = out_of_memory(err)
    if oom is not None:
        return f"scaleseg: error: out of memory in '{command}' ({oom}); {_oom_hint(command)}", 1
    if isinstance(err, OSError):
        from .files import disk_full_error

        full = disk_full_error(err, err.filename or "a file")
        if full is not None:
            return f"scaleseg: error: {full}", DiskFullError.exit_code
        where = f" {err.filename}" if err.filename else ""
        return f"scaleseg: error: cannot access{where}: {err.strerror or _first_line(err)}", 1
    name = type(err).__name__
    if name == "MisconfigurationException":
        return f"scaleseg: error: {_first_line(err)}", 2
    return f"scaleseg: error: unexpected {name}: {_first_line(err)} (run again with --debug for the traceback)", 1


def _install_sigint() -> object:
    """Ctrl-C raises :class:`Interrupted` (exit 130) in the main process, also inside Lightning (which
    would turn a KeyboardInterrupt into exit code 1). Forked DataLoader workers keep the default.
    Returns the previous handler (None when not on the main thread, where signals cannot be set)."""
    main_pid = os.getpid()

    def on_sigint(signum: int, frame: object) -> None:
        if os.getpid() != main_pid:
            raise KeyboardInterrupt
        raise Interrupted("interrupted")

    try:
        return signal.signal(signal.SIGINT, on_sigint)
    except ValueError:
        return None


def _command(argv: list[str]) -> str | None:
    commands = {"train", "eval", "predict", "autolabel", "demo", "check-data", "config"}
    return next((a for a in argv if a in commands), None)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    quiet_vendor_output(verbose="-v" in argv or "--verbose" in argv)
    previous = _install_sigint()
    try:
        code = run(argv)
    except SystemExit:
        raise
    except BaseException as err:  # noqa: BLE001 - every error becomes one line
        close_progress_bars()
        if debug:
            traceback.print_exc()
        message, code = describe(err, _command(argv))
        print(message, file=sys.stderr, flush=True)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    sys.exit(code)


if __name__ == "__main__":
    main()
