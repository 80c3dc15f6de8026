#!/usr/bin/env python
"""Print ENet's class weights (``data/class_weights.py``) of a config's train split, as the
``loss.class_weights`` line to paste into a config:

    PYTHONPATH=src python scripts/class_weights.py configs/camvid/deeplabv3plus_r18_os32_weighted_cpu.yaml
"""
from __future__ import annotations

import argparse
import sys

from scaleseg.config import load_config
from scaleseg.data.build import build_dataset
from scaleseg.data.class_weights import class_pixel_counts, enet_class_weights
from scaleseg.errors import ScalesegError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    parser.add_argument("--c", type=float, default=1.02, help="ENet's constant (default 1.02)")
    args = parser.parse_args()
    try:
        cfg = load_config(args.config, args.overrides)
        dataset = build_dataset(cfg.data, cfg.data.train_split)
        counts = class_pixel_counts(dataset)
        weights = enet_class_weights(counts, args.c)
    except ScalesegError as err:
        sys.exit(f"error: {err}")
    share = counts / counts.sum()
    for name, p, w in zip(dataset.spec.classes, share, weights):
        print(f"{name:>16}  share {p:.4f}  weight {w:.2f}")
    print(f"  class_weights: [{', '.join(f'{w:.2f}' for w in weights)}]")


if __name__ == "__main__":
    main()
