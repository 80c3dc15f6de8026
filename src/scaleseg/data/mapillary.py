"""Mapillary Vistas v1.2 and v2.0 semantic labels.

Layout (mmsegmentation's, as distributed)::

    <root>/{training,validation}/images/<stem>.jpg
    <root>/{training,validation}/{v1.2,v2.0}/labels/<stem>.png      (8-bit class-index PNGs)
    <root>/testing/images/<stem>.jpg                                (no labels: all-ignore masks)

Split names ``train``/``val``/``test`` are aliases of ``training``/``validation``/``testing``.

Decision on "Unlabeled": the label PNGs hold 66 ids in v1.2 (65 = Unlabeled) and 124 ids in v2.0
(123 = Unlabeled). scaleseg maps Unlabeled to ignore (255) through the spec's lookup table, so the
models have **K = 65 (v1.2) / 123 (v2.0)** classes. This matches NVIDIA's HMSA setup (65 classes,
Unlabeled ignored) and mmsegmentation's ``mapillary_v1_65`` config, and differs from
mmsegmentation's ``MapillaryDataset_v1``/``_v2``, which train Unlabeled as a class. Raw ids above
Unlabeled are not silently ignored: they stay out of range and the label check raises a DataError.

Class names and colours are the official ones (the dataset's ``config_v1.2.json`` /
``config_v2.0.json``, as in mmsegmentation's metainfo), embedded below; the JSON is not needed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from .base import SegDataset, Transform
from .spec import IGNORE_INDEX, DatasetSpec

# id  r   g   b  name   (official order; the last row is "Unlabeled", mapped to ignore)
_V12_TABLE = """
  0 165  42  42 Bird
  1   0 192   0 Ground Animal
  2 196 196 196 Curb
  3 190 153 153 Fence
  4 180 165 180 Guard Rail
  5  90 120 150 Barrier
  6 102 102 156 Wall
  7 128  64 255 Bike Lane
  8 140 140 200 Crosswalk - Plain
  9 170 170 170 Curb Cut
 10 250 170 160 Parking
 11  96  96  96 Pedestrian Area
 12 230 150 140 Rail Track
 13 128  64 128 Road
 14 110 110 110 Service Lane
 15 244  35 232 Sidewalk
 16 150 100 100 Bridge
 17  70  70  70 Building
 18 150 120  90 Tunnel
 19 220  20  60 Person
 20 255   0   0 Bicyclist
 21 255   0 100 Motorcyclist
 22 255   0 200 Other Rider
 23 200 128 128 Lane Marking - Crosswalk
 24 255 255 255 Lane Marking - General
 25  64 170  64 Mountain
 26 230 160  50 Sand
 27  70 130 180 Sky
 28 190 255 255 Snow
 29 152 251 152 Terrain
 30 107 142  35 Vegetation
 31   0 170  30 Water
 32 255 255 128 Banner
 33 250   0  30 Bench
 34 100 140 180 Bike Rack
 35 220 220 220 Billboard
 36 220 128 128 Catch Basin
 37 222  40  40 CCTV Camera
 38 100 170  30 Fire Hydrant
 39  40  40  40 Junction Box
 40  33  33  33 Mailbox
 41 100 128 160 Manhole
 42 142   0   0 Phone Booth
 43  70 100 150 Pothole
 44 210 170 100 Street Light
 45 153 153 153 Pole
 46 128 128 128 Traffic Sign Frame
 47   0   0  80 Utility Pole
 48 250 170  30 Traffic Light
 49 192 192 192 Traffic Sign (Back)
 50 220 220   0 Traffic Sign (Front)
 51 140 140  20 Trash Can
 52 119  11  32 Bicycle
 53 150   0 255 Boat
 54   0  60 100 Bus
 55   0   0 142 Car
 56   0   0  90 Caravan
 57   0   0 230 Motorcycle
 58   0  80 100 On Rails
 59 128  64  64 Other Vehicle
 60   0   0 110 Trailer
 61   0   0  70 Truck
 62   0   0 192 Wheeled Slow
 63  32  32  32 Car Mount
 64 120  10  10 Ego Vehicle
 65   0   0   0 Unlabeled
"""

_V20_TABLE = """
  0 165  42  42 Bird
  1   0 192   0 Ground Animal
  2 250 170  31 Ambiguous Barrier
  3 250 170  32 Concrete Block
  4 196 196 196 Curb
  5 190 153 153 Fence
  6 180 165 180 Guard Rail
  7  90 120 150 Barrier
  8 250 170  33 Road Median
  9 250 170  34 Road Side
 10 128 128 128 Lane Separator
 11 250 170  35 Temporary Barrier
 12 102 102 156 Wall
 13 128  64 255 Bike Lane
 14 140 140 200 Crosswalk - Plain
 15 170 170 170 Curb Cut
 16 250 170  36 Driveway
 17 250 170 160 Parking
 18 250 170  37 Parking Aisle
 19  96  96  96 Pedestrian Area
 20 230 150 140 Rail Track
 21 128  64 128 Road
 22 110 110 110 Road Shoulder
 23 110 110 110 Service Lane
 24 244  35 232 Sidewalk
 25 128 196 128 Traffic Island
 26 150 100 100 Bridge
 27  70  70  70 Building
 28 150 150 150 Garage
 29 150 120  90 Tunnel
 30 220  20  60 Person
 31 220  20  60 Person Group
 32 255   0   0 Bicyclist
 33 255   0 100 Motorcyclist
 34 255   0 200 Other Rider
 35 255 255 255 Lane Marking - Dashed Line
 36 255 255 255 Lane Marking - Straight Line
 37 250 170  29 Lane Marking - Zigzag Line
 38 250 170  28 Lane Marking - Ambiguous
 39 250 170  26 Lane Marking - Arrow (Left)
 40 250 170  25 Lane Marking - Arrow (Other)
 41 250 170  24 Lane Marking - Arrow (Right)
 42 250 170  22 Lane Marking - Arrow (Split Left or Straight)
 43 250 170  21 Lane Marking - Arrow (Split Right or Straight)
 44 250 170  20 Lane Marking - Arrow (Straight)
 45 255 255 255 Lane Marking - Crosswalk
 46 250 170  19 Lane Marking - Give Way (Row)
 47 250 170  18 Lane Marking - Give Way (Single)
 48 250 170  12 Lane Marking - Hatched (Chevron)
 49 250 170  11 Lane Marking - Hatched (Diagonal)
 50 255 255 255 Lane Marking - Other
 51 255 255 255 Lane Marking - Stop Line
 52 250 170  16 Lane Marking - Symbol (Bicycle)
 53 250 170  15 Lane Marking - Symbol (Other)
 54 250 170  15 Lane Marking - Text
 55 255 255 255 Lane Marking (only) - Dashed Line
 56 255 255 255 Lane Marking (only) - Crosswalk
 57 255 255 255 Lane Marking (only) - Other
 58 255 255 255 Lane Marking (only) - Test
 59  64 170  64 Mountain
 60 230 160  50 Sand
 61  70 130 180 Sky
 62 190 255 255 Snow
 63 152 251 152 Terrain
 64 107 142  35 Vegetation
 65   0 170  30 Water
 66 255 255 128 Banner
 67 250   0  30 Bench
 68 100 140 180 Bike Rack
 69 220 128 128 Catch Basin
 70 222  40  40 CCTV Camera
 71 100 170  30 Fire Hydrant
 72  40  40  40 Junction Box
 73  33  33  33 Mailbox
 74 100 128 160 Manhole
 75  20  20 255 Parking Meter
 76 142   0   0 Phone Booth
 77  70 100 150 Pothole
 78 250 171  30 Signage - Advertisement
 79 250 172  30 Signage - Ambiguous
 80 250 173  30 Signage - Back
 81 250 174  30 Signage - Information
 82 250 175  30 Signage - Other
 83 250 176  30 Signage - Store
 84 210 170 100 Street Light
 85 153 153 153 Pole
 86 153 153 153 Pole Group
 87 128 128 128 Traffic Sign Frame
 88   0   0  80 Utility Pole
 89 210  60  60 Traffic Cone
 90 250 170  30 Traffic Light - General (Single)
 91 250 170  30 Traffic Light - Pedestrians
 92 250 170  30 Traffic Light - General (Upright)
 93 250 170  30 Traffic Light - General (Horizontal)
 94 250 170  30 Traffic Light - Cyclists
 95 250 170  30 Traffic Light - Other
 96 192 192 192 Traffic Sign - Ambiguous
 97 192 192 192 Traffic Sign (Back)
 98 192 192 192 Traffic Sign - Direction (Back)
 99 220 220   0 Traffic Sign - Direction (Front)
100 220 220   0 Traffic Sign (Front)
101   0   0 196 Traffic Sign - Parking
102 192 192 192 Traffic Sign - Temporary (Back)
103 220 220   0 Traffic Sign - Temporary (Front)
104 140 140  20 Trash Can
105 119  11  32 Bicycle
106 150   0 255 Boat
107   0  60 100 Bus
108   0   0 142 Car
109   0   0  90 Caravan
110   0   0 230 Motorcycle
111   0  80 100 On Rails
112 128  64  64 Other Vehicle
113   0   0 110 Trailer
114   0   0  70 Truck
115   0   0 142 Vehicle Group
116   0   0 192 Wheeled Slow
117 170 170 170 Water Valve
118  32  32  32 Car Mount
119 111  74   0 Dynamic
120 120  10  10 Ego Vehicle
121  81   0  81 Ground
122 111 111   0 Static
123   0   0   0 Unlabeled
"""


def _parse(table: str) -> tuple[tuple[str, ...], tuple[tuple[int, int, int], ...]]:
    names, colours = [], []
    for row, line in enumerate(table.strip().splitlines()):
        index, r, g, b, name = line.split(maxsplit=4)
        assert int(index) == row, f"mapillary table row {row} has id {index}"
        names.append(name)
        colours.append((int(r), int(g), int(b)))
    return tuple(names), tuple(colours)


def _spec(version: str, table: str) -> DatasetSpec:
    names, colours = _parse(table)
    assert names[-1] == "Unlabeled"
    num_classes = len(names) - 1
    lut = np.arange(256, dtype=np.uint8)  # raw id = train id; out-of-range ids fail the label check
    lut[num_classes] = IGNORE_INDEX  # Unlabeled → ignore
    return DatasetSpec(f"mapillary-{version}", names[:-1], colours[:-1], IGNORE_INDEX, lut)


MAPILLARY_V12 = _spec("v1.2", _V12_TABLE)  # 65 classes
MAPILLARY_V20 = _spec("v2.0", _V20_TABLE)  # 123 classes
SPECS = {"v1.2": MAPILLARY_V12, "v2.0": MAPILLARY_V20}
SPLIT_ALIASES = {"train": "training", "val": "validation", "test": "testing",
                 "training": "training", "validation": "validation", "testing": "testing"}


def list_pairs(root: str | Path, split: str, version: str = "v1.2") -> list[tuple[Path, Path | None]]:
    """Sorted (image, label) pairs paired by file stem; ``testing`` has label ``None``.

    An image without its label (or a label without its image) is a DataError naming the file.
    """
    if version not in SPECS:
        raise ConfigError(f"mapillary version '{version}' is unknown; expected 'v1.2' or 'v2.0'")
    if split not in SPLIT_ALIASES:
        raise ConfigError(f"mapillary split '{split}' is unknown; expected one of {', '.join(SPLIT_ALIASES)}")
    folder = Path(root) / SPLIT_ALIASES[split]
    image_dir, label_dir = folder / "images", folder / version / "labels"
    if not image_dir.is_dir():
        raise DataError(f"mapillary folder {image_dir} does not exist; expected <root>/{folder.name}/images/*.jpg")
    images = sorted(image_dir.glob("*.jpg"))
    if folder.name == "testing":
        return [(image, None) for image in images]
    if not label_dir.is_dir():
        raise DataError(
            f"mapillary folder {label_dir} does not exist; expected <root>/{folder.name}/{version}/labels/*.png"
        )
    labels = {p.stem: p for p in label_dir.glob("*.png")}
    pairs = []
    for image in images:
        label = labels.pop(image.stem, None)
        if label is None:
            raise DataError(f"mapillary image {image} has no label: expected {label_dir / (image.stem + '.png')}")
        pairs.append((image, label))
    if labels:
        orphan = labels[min(labels)]
        raise DataError(f"mapillary label {orphan} has no image: expected {image_dir / (orphan.stem + '.jpg')}")
    return pairs


def make_dataset(
    root: str | Path,
    split: str,
    transform: Transform | None = None,
    *,
    version: str = "v1.2",
    seed: int = 0,
) -> SegDataset:
    """Mapillary Vistas split with K = 65 (v1.2) or 123 (v2.0) classes; Unlabeled → 255."""
    pairs = list_pairs(root, split, version)
    return SegDataset(pairs, SPECS[version], transform, root=root, seed=seed,
                      description=f"mapillary {version} split '{split}' at {root}")
