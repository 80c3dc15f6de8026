"""Pictures of what a model does: per image the input, ground truth and prediction, and for a
hierarchical-attention model each scale's prediction and attention map (as in Figure 5 of the
NVIDIA blog post), gathered in an HTML page."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..data.base import SegDataset
from ..models.hmsa import HierarchicalAttention, scale_key
from ..visualize import attention_to_color, colorize, overlay, save_png, write_html
from .evaluate import normalize


def dump_scale_maps(model: Any, dataset: SegDataset, scales: Sequence[float], out_dir: str | Path,
                    limit: int = 20, title: str = "scaleseg: predictions per scale",
                    table_html: str = "") -> Path:
    """Write PNGs for the first ``limit`` images of ``dataset`` (raw, untransformed) and ``index.html``.

    With a HierarchicalAttention model every scale's own prediction ``pred_<s>x`` and attention
    ``attn_<s>x`` (the gate of that scale; the highest scale has none) are shown next to the fused one.
    """
    out = Path(out_dir)
    palette = dataset.spec.palette_array()
    device = next(model.parameters()).device
    hierarchical = isinstance(model, HierarchicalAttention)
    rows: list[dict[str, str]] = []
    model.eval()
    with torch.inference_mode():
        for i in tqdm(range(min(limit, len(dataset))), desc="pictures", unit="img"):
            image, label = dataset.load_raw(i)
            x = normalize(image[None], model.mean, model.std, device)
            stem = Path(dataset.name(i)).with_suffix("").as_posix().replace("/", "_")
            row: dict[str, str] = {}

            def put(caption: str, suffix: str, array: Any) -> None:
                save_png(out / f"{stem}_{suffix}.png", array)
                row[caption] = f"{stem}_{suffix}.png"

            put("input", "input", image)
            put("ground truth", "gt", overlay(image, colorize(label, palette), 0.6))
            if hierarchical:
                res = model.forward_features(x, scales=scales, return_scales=True)
            else:
                res = {"logits": model(x)}
            pred = res["logits"].argmax(1)[0].cpu().numpy()
            put("prediction", "pred", overlay(image, colorize(pred, palette), 0.6))
            for s in sorted(scales, reverse=True) if hierarchical else ():
                p = res[scale_key("pred", s)].argmax(1)[0].cpu().numpy()
                put(f"pred {s:g}x", f"pred_{s:g}x", colorize(p, palette))
                attn = res.get(scale_key("attn", s))
                if attn is not None:
                    put(f"attention {s:g}x", f"attn_{s:g}x", attention_to_color(attn[0, 0].cpu().numpy()))
            rows.append(row)
    header = ("Attention maps: bright = this scale's prediction wins over the higher scales already fused "
              "(lower scales act last). Scales: " + ", ".join(f"{s:g}" for s in sorted(scales)))
    page = out / "index.html"
    write_html(page, title, rows, header=header if hierarchical else "", table_html=table_html)
    return page
