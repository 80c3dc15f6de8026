"""ENet class weights: the formula against hand-computed values, the pixel counts, and the CamVid
configs' weights against the train labels."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from scaleseg.config import load_config
from scaleseg.data.build import build_dataset
from scaleseg.data.class_weights import class_pixel_counts, enet_class_weights
from scaleseg.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]
HOUR = ["configs/camvid/deeplabv3plus_r18_os32_weighted_cpu.yaml",
        "configs/camvid/deeplabv3plus_r18_os32_weighted_cpu_hr.yaml"]


def test_enet_weights_match_hand_computed_values() -> None:
    # p = (0.75, 0.25): 1 / ln 1.77 = 1 / 0.570980 = 1.75138; 1 / ln 1.27 = 1 / 0.239017 = 4.18380
    np.testing.assert_allclose(enet_class_weights(np.array([3, 1])), [1.75138, 4.18380], atol=2e-5)
    # an absent class gets the cap 1 / ln 1.02 = 50.4983; one class with every pixel 1 / ln 2.02 = 1.42229
    np.testing.assert_allclose(enet_class_weights(np.array([0, 7])), [50.4983, 1.42229], atol=2e-4)
    # c = 1.5: p = 0.5 → 1 / ln 2 = 1.442695
    np.testing.assert_allclose(enet_class_weights(np.array([2, 2]), c=1.5), [1.442695] * 2, atol=1e-6)


def test_enet_weights_reject_bad_input() -> None:
    with pytest.raises(DataError, match="no labelled pixel"):
        enet_class_weights(np.zeros(3))
    with pytest.raises(DataError, match="invalid"):
        enet_class_weights(np.array([1, -1]))
    with pytest.raises(ConfigError, match="c=1.0"):
        enet_class_weights(np.array([1, 1]), c=1.0)


def test_pixel_counts_skip_ignored_pixels() -> None:
    labels = [np.array([[0, 1], [255, 2]], np.uint8), np.array([[2, 2], [2, 255]], np.uint8)]

    class Labels:
        spec = SimpleNamespace(num_classes=4)

        def __len__(self) -> int:
            return len(labels)

        def load_label(self, i: int) -> np.ndarray:
            return labels[i]

    assert class_pixel_counts(Labels(), progress=False).tolist() == [1, 1, 4, 0]


def test_hour_recipe_weights_are_enet_weights_of_the_camvid_train_labels(camvid_root: Path) -> None:
    cfg = load_config(REPO / HOUR[0], [f"data.root={camvid_root}"])
    counts = class_pixel_counts(build_dataset(cfg.data, "train"), progress=False)
    assert counts.sum() > 0.9 * 367 * 360 * 480  # void is under 10 % of the pixels
    expected = np.round(enet_class_weights(counts), 2)
    for path in HOUR:
        weights = load_config(REPO / path).loss.class_weights
        np.testing.assert_allclose(weights, expected, atol=0.005, err_msg=path)
    names = build_dataset(cfg.data, "train").spec.classes
    # the thin classes weigh 9-14x the road
    road, pole = names.index("road"), names.index("pole")
    assert 9 < expected[pole] / expected[road] < 14
