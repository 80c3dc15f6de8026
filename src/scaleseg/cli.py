"""Command line: ``scaleseg train|eval|predict|autolabel|export|serve|demo|convert``. Any config key can be overridden as key=value."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import Config, load_config, to_yaml
from .errors import ScalesegError


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
        return [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--scales expects comma-separated numbers like 0.5,1.0,2.0, got '{text}'") from None


def _eval_overrides(args: argparse.Namespace) -> list[str]:
    extra = []
    if getattr(args, "scales", None):
        extra.append(f"eval.scales=[{','.join(str(s) for s in args.scales)}]")
    if getattr(args, "flip", False):
        extra.append("eval.flip=true")
    return extra


def _load(args: argparse.Namespace, overrides: list[str]) -> Config:
    cfg = load_config(args.config, overrides + _eval_overrides(args))
    if not getattr(args, "quiet", False):
        print("# resolved config\n" + to_yaml(cfg), file=sys.stderr)
    return cfg


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scaleseg",
        description="Semantic segmentation with hierarchical multi-scale attention, MCIBI and DSRL. "
                    "Any config key can be overridden as section.key=value (e.g. train.epochs=5).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.epochs=5")
    p.add_argument("--resume", help="checkpoint to resume from, or 'auto' for the latest in output_dir")
    p.add_argument("--quiet", action="store_true", help="do not print the resolved config")

    for name, helptext in (("eval", "evaluate a checkpoint on data.val_split"),
                           ("predict", "write label, colour and overlay PNGs for images"),
                           ("autolabel", "label images with a teacher: train-id PNG + confidence PNG each")):
        p = sub.add_parser(name, help=helptext)
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
            p.add_argument("--batch-size", type=int, default=4)

    _add_deploy_commands(sub)
    # --- convert: official checkpoints into run folders (scaleseg.convert) -------------------
    p = sub.add_parser("convert", help="turn an official EdgeNets / NVIDIA / sssegmentation checkpoint into a run folder")
    p.add_argument("checkpoint", help="the official .pth file")
    p.add_argument("items", nargs="*", help="key=value config overrides")
    p.add_argument("--from", dest="source", required=True, choices=("edgenets", "nvidia", "ssseg"),
                   help="edgenets: ESPNetv2; nvidia: HRNet-OCR + hierarchical attention; ssseg: MCIBI (DeepLabV3 host)")
    p.add_argument("--config", required=True, help="YAML config describing the checkpoint's model and dataset")
    p.add_argument("--out", required=True, help="run folder to write (config.yaml + model.safetensors)")
    p.add_argument("--quiet", action="store_true")
    # -------------------------------------------------------------------------------------------

    p = sub.add_parser("demo", help="train and evaluate a small model on the embedded ScaleScenes data")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--quiet", action="store_true")
    return parser


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
        from .engine.train import train

        train(_load(args, args.overrides), resume=args.resume)
    elif args.command == "eval":
        from .engine.evaluate import evaluate

        overrides, rest = _split_overrides(args.items)
        if rest:
            raise ScalesegError(f"eval takes only key=value overrides, got: {' '.join(rest)}")
        evaluate(_load(args, overrides), args.checkpoint, args.out, dump_scales=args.dump_scales)
    elif args.command == "predict":
        from .engine.evaluate import predict

        overrides, inputs = _split_overrides(args.items)
        if not inputs:
            raise ScalesegError("predict needs at least one input image or folder")
        written = predict(_load(args, overrides), args.checkpoint, inputs, args.out, batch_size=args.batch_size)
        print(f"wrote predictions for {len(written)} images to {args.out}")
    elif args.command == "autolabel":
        from .engine.autolabel import autolabel

        overrides, inputs = _split_overrides(args.items)
        if not inputs:
            raise ScalesegError("autolabel needs at least one input image or folder")
        written = autolabel(_load(args, overrides), args.checkpoint, inputs, args.out,
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
    elif args.command == "demo":
        from .engine.demo import demo

        demo(args.out, args.overrides, quiet=args.quiet)
    return 0


# ---------------------------------------------------------------------------- deployment (issue #11)
DEPLOY_COMMANDS = ("export", "serve")


def _add_deploy_commands(sub: argparse._SubParsersAction) -> None:
    """``export`` (ONNX / torch.export graph + JSON sidecar) and ``serve`` (web page + REST API)."""
    p = sub.add_parser("export", help="export the inference graph (normalise, multi-scale fusion, logits) "
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

    p = sub.add_parser("serve", help="serve a trained run folder: web page (upload an image) and REST API")
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


def one_line(err: BaseException) -> str:
    """The error's own message. A DataLoader worker re-raises our errors with its traceback prepended;
    the original message is then the last line, after the exception's qualified name."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    if len(lines) <= 1:
        return str(err).strip()
    last = lines[-1]
    name = f"{type(err).__module__}.{type(err).__qualname__}: "
    return last[len(name):] if last.startswith(name) else last


def main(argv: list[str] | None = None) -> None:
    try:
        code = run(argv)
    except ScalesegError as err:
        print(f"scaleseg: error: {one_line(err)}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("scaleseg: interrupted; resume with --resume auto", file=sys.stderr)
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
