"""ScaleScenes: synthetic street scenes generated from a seed (no files, no downloads).

The data exist to show the two failure modes that multi-scale inference fixes (HMSA, §1):

- **thin structures**: poles (1–2 px wide, with 1 px lamp arms) and overhead wires (1 px) have a
  colour of their own, but at 0.5× they cover at most half of a 2×2 cell and vanish;
- **locally ambiguous regions**: road and sidewalk are painted with one and the same material (the
  same base colour and the same noise fields), so no local patch tells them apart. Only the layout
  does: the road is the central wedge that converges to the vanishing point, the sidewalks are the
  wedges between it and the building fronts (and hold the poles and trees; cars drive on the road).

A scene is a one-point perspective street. With the horizon at row ``hz`` and the vanishing point at
column ``vx``, a ground pixel ``(y, x)`` lies at lateral offset ``u = (x - vx) / (y - hz)`` (in
camera heights): road for ``|u| < r``, sidewalk for ``r <= |u| < r + s``, then the building fronts
(or hedges), whose tops follow ``y = hz - t * |x - vx|`` per facade segment. Objects (trees, poles,
cars) are placed on the ground plane and scaled by ``y_base - hz`` pixels per camera height; they
are painted far to near. A void band at the bottom (the ego vehicle's bonnet) is labelled 255.

Drawing is vectorised numpy on label and material maps; the image is rendered at the end in one
table lookup: ``base[m] + lo·A_lo[m] + hi·A_hi[m] + grain·A_g[m] + ramp·A_y[m]`` with shared
seeded noise fields. Image ``i`` of a split is a pure function of ``(seed, split, i, size)``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ConfigError, DataError
from .base import SegDataset, Transform
from .spec import IGNORE_INDEX, DatasetSpec

CLASSES = ("sky", "building", "vegetation", "road", "sidewalk", "car", "pole", "wire")
PALETTE = (
    (70, 130, 180), (70, 70, 70), (107, 142, 35), (128, 64, 128), (244, 35, 232), (0, 0, 142),
    (153, 153, 153), (250, 170, 30),
)  # fmt: skip
SKY, BUILDING, VEGETATION, ROAD, SIDEWALK, CAR, POLE, WIRE = range(len(CLASSES))
THIN_CLASSES = (POLE, WIRE)

SCALESCENES = DatasetSpec("scalescenes", CLASSES, PALETTE, IGNORE_INDEX)
SPLITS = ("train", "val")
DEFAULT_NUM_IMAGES = {"train": 300, "val": 60}
MIN_SIZE = 32

_SPLIT_STREAM = {"train": 0, "val": 1}  # separate SeedSequence streams: splits never coincide
_FOCAL = 1.0  # focal length in units of the image width (horizontal field of view ≈ 53°)
_CAR_COLOURS = np.array(
    [(170, 30, 30), (30, 50, 140), (225, 225, 225), (25, 25, 28), (150, 150, 155), (30, 90, 50),
     (90, 20, 70), (200, 90, 30)], np.float32,
)  # fmt: skip


class _Canvas:
    """Label map, material map and material table of one scene being painted.

    A material row holds 15 floats: base RGB and per-channel amplitudes of the low-frequency noise,
    the high-frequency noise, the per-pixel grain and the vertical ramp.
    """

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = height, width
        self.label = np.full((height, width), SKY, np.uint8)
        self.material = np.zeros((height, width), np.int16)
        self._rows: list[np.ndarray] = []

    def add_material(self, base: Sequence[float], lo: float | Sequence[float] = 0.0,
                     hi: float | Sequence[float] = 0.0, grain: float | Sequence[float] = 0.0,
                     ramp: float | Sequence[float] = 0.0) -> int:
        row = np.empty(15, np.float32)
        for k, value in enumerate((base, lo, hi, grain, ramp)):
            row[3 * k: 3 * k + 3] = value
        self._rows.append(row)
        return len(self._rows) - 1

    def paint(self, mask: np.ndarray, cls: int, material: int, top: int = 0, left: int = 0) -> None:
        """Assign ``cls``/``material`` where ``mask`` (a window whose corner is at ``(top, left)``) is
        true. The window may stick out of the image; it is clipped."""
        h, w = mask.shape
        y0, x0 = max(top, 0), max(left, 0)
        y1, x1 = min(top + h, self.height), min(left + w, self.width)
        if y0 >= y1 or x0 >= x1:
            return
        window = (slice(y0 - top, y1 - top), slice(x0 - left, x1 - left))
        sub = mask[window]
        region = (slice(y0, y1), slice(x0, x1))
        self.label[region][sub] = cls
        self.material[region][sub] = material

    def paint_points(self, ys: np.ndarray, xs: np.ndarray, cls: int, material: int) -> None:
        """Assign single pixels at rounded coordinates (out-of-image points are dropped)."""
        yi, xi = np.rint(ys).astype(np.int64), np.rint(xs).astype(np.int64)
        keep = (yi >= 0) & (yi < self.height) & (xi >= 0) & (xi < self.width)
        self.label[yi[keep], xi[keep]] = cls
        self.material[yi[keep], xi[keep]] = material

    def render(self, rng: np.random.Generator) -> np.ndarray:
        """H×W×3 uint8 image from the material map and seeded noise fields."""
        h, w = self.height, self.width
        table = np.ascontiguousarray(np.stack(self._rows).T)  # 15×M
        index = self.material.astype(np.intp)
        grain = (rng.random((h, w), dtype=np.float32) - 0.5) * np.float32(12**0.5)  # unit variance
        fields = (_value_noise(rng, h, w, max(h // 6, 2)), _value_noise(rng, h, w, 3), grain,
                  (np.arange(h, dtype=np.float32) / h - 0.5)[:, None])
        image = np.empty((h, w, 3), np.float32)
        for c in range(3):  # per channel: one table lookup per term
            channel = np.take(table[c], index)
            for k, field in enumerate(fields, start=1):
                channel += np.take(table[3 * k + c], index) * field
            image[..., c] = channel
        return np.clip(image, 0, 255).astype(np.uint8)


def _value_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """H×W float32 smooth noise: a Gaussian grid with spacing ``cell`` px, smoothstep-interpolated
    (per-pixel std ≈ 0.6–1)."""
    grid = rng.standard_normal((height // cell + 2, width // cell + 2), dtype=np.float32)

    def coords(n: int) -> tuple[np.ndarray, np.ndarray]:
        t = np.arange(n, dtype=np.float32) / cell
        i = t.astype(np.int64)
        f = t - i
        return i, f * f * (3 - 2 * f)

    yi, fy = coords(height)
    xi, fx = coords(width)
    rows = grid[yi] * (1 - fy)[:, None] + grid[yi + 1] * fy[:, None]
    return rows[:, xi] * (1 - fx) + rows[:, xi + 1] * fx


def _jitter(rng: np.random.Generator, colour: Sequence[float], amount: float) -> np.ndarray:
    return np.asarray(colour, np.float32) + rng.uniform(-amount, amount, 3).astype(np.float32)


def _paint_street(canvas: _Canvas, rng: np.random.Generator, hz: int, vx: float, r: float, walk: float) -> None:
    """Sky, facades/hedges on both sides, and the ground split into road and sidewalk."""
    h, w = canvas.height, canvas.width
    ys = np.arange(h, dtype=np.float32)[:, None]
    xs = np.arange(w, dtype=np.float32)[None, :]
    dist = np.abs(xs[0] - vx)  # W, horizontal distance to the vanishing point
    front = r + walk  # lateral offset of the building fronts, camera heights

    sky = canvas.add_material(_jitter(rng, (120, 165, 215), 15), lo=(16, 16, 10), hi=1.5, grain=2, ramp=(50, 40, 20))
    canvas.material[:] = sky

    # Facade segments along each side, from the far end outwards; every column gets the slope of its
    # segment's top edge (0 = nothing) and its wall / window materials.
    slope = np.zeros(w, np.float32)
    wall = np.zeros(w, np.int16)
    window = np.zeros(w, np.int16)
    is_building = np.zeros(w, bool)
    for side in (xs[0] < vx, xs[0] >= vx):
        start = rng.uniform(3.0, 8.0)
        while start < w:
            stop = start * rng.uniform(1.5, 2.6)
            cols = side & (dist >= start) & (dist < stop)
            if rng.random() < 0.8:
                base = _jitter(rng, [(150, 150, 150), (190, 172, 145), (150, 85, 65), (120, 125, 135)][rng.integers(4)], 18)
                wall_mat = canvas.add_material(base, lo=8, hi=5, grain=5)
                window_mat = canvas.add_material(base * 0.45 + np.float32((15, 25, 45)), lo=4, hi=3, grain=4)
                slope[cols], wall[cols], window[cols], is_building[cols] = rng.uniform(0.3, 1.5), wall_mat, window_mat, True
            else:
                hedge = canvas.add_material(_jitter(rng, (60, 105, 40), 12), lo=(14, 18, 10), hi=(22, 30, 14), grain=(8, 10, 6))
                slope[cols], wall[cols], window[cols] = rng.uniform(0.08, 0.3), hedge, hedge
            start = stop
    top = hz - slope * dist  # W, top edge of the facades
    base_row = hz + dist / front  # W, where the facades meet the ground
    facade = (slope > 0) & (ys >= top) & (ys <= base_row)

    # Windows in facade coordinates (depth along the street, height above the ground), drawn only
    # where a window period spans at least ~3 px.
    depth = _FOCAL * w * front / np.maximum(dist, 1.0)  # camera heights
    height_above = (base_row - ys) * front / np.maximum(dist, 1.0)
    period_px = 2.0 * dist**2 / (_FOCAL * w * front)
    window_col = is_building & (period_px > 3.0) & (np.mod(depth / 2.0 + 0.3, 1.0) < 0.55)
    window_px = window_col & (height_above > 1.6) & (np.mod(height_above / 2.0, 1.0) > 0.35)
    materials = np.where(window_px, window[None, :], wall[None, :])
    classes = np.broadcast_to(np.where(is_building, BUILDING, VEGETATION).astype(np.uint8), (h, w))
    canvas.label[facade] = classes[facade]
    canvas.material[facade] = materials[facade]

    # Ground: one material for road and sidewalk (same colour, same noise): only the layout differs.
    grey = rng.uniform(95, 140)
    ground_mat = canvas.add_material(_jitter(rng, (grey, grey, grey), 6), lo=9, hi=7, grain=7)
    below = (ys > hz) & ~facade
    road = below & (np.abs(xs - vx) < r * (ys - hz))
    canvas.label[below] = SIDEWALK
    canvas.label[road] = ROAD
    canvas.material[below] = ground_mat


def _paint_wire(canvas: _Canvas, x0: float, x1: float, y0: float, y1: float, sag: float, material: int) -> None:
    """A 1 px sagging wire from (y0, x0) to (y1, x1): a parabola sampled 3× per pixel of span."""
    n = int(3 * (abs(x1 - x0) + abs(y1 - y0))) + 2
    t = np.linspace(0.0, 1.0, n)
    canvas.paint_points(y0 + (y1 - y0) * t + 4 * sag * t * (1 - t), x0 + (x1 - x0) * t, WIRE, material)


def _paint_pole(canvas: _Canvas, rng: np.random.Generator, x: float, y_base: float, y_top: float,
                toward_road: int, scale: float, material: int) -> None:
    """A 1–2 px wide vertical pole, optionally with a 1 px lamp arm reaching over the road."""
    width = 1 if rng.random() < 0.75 else 2
    top, left = int(round(y_top)), int(round(x))
    canvas.paint(np.ones((int(round(y_base)) - top, width), bool), POLE, material, top, left)
    if rng.random() < 0.5:
        length = max(int(0.5 * scale), 2)
        arm_left = left + width if toward_road > 0 else left - length
        canvas.paint(np.ones((1, length), bool), POLE, material, top, arm_left)


def _paint_tree(canvas: _Canvas, rng: np.random.Generator, x: float, y_base: float, scale: float,
                trunk_mat: int, crown_mat: int) -> None:
    """Trunk (≥ 3 px wide) and a crown with a noisy outline, both vegetation."""
    trunk_w = max(3, int(0.15 * scale))
    trunk_h = int(1.6 * scale)
    canvas.paint(np.ones((trunk_h, trunk_w), bool), VEGETATION, trunk_mat, int(y_base) - trunk_h, int(x - trunk_w / 2))
    ry, rx = 1.0 * scale, 0.8 * scale
    cy, cx = y_base - trunk_h - 0.7 * ry, x
    top, left = int(cy - 1.3 * ry), int(cx - 1.3 * rx)
    hh, ww = int(2.6 * ry) + 2, int(2.6 * rx) + 2
    yy = (np.arange(hh, dtype=np.float32)[:, None] + top - cy) / ry
    xx = (np.arange(ww, dtype=np.float32)[None, :] + left - cx) / rx
    wobble = 0.25 * _value_noise(rng, hh, ww, max(int(0.3 * scale), 2))
    canvas.paint(yy**2 + xx**2 < 1.0 + wobble, VEGETATION, crown_mat, top, left)


def _paint_car(canvas: _Canvas, rng: np.random.Generator, x: float, y_base: float, scale: float,
               window_mat: int, wheel_mat: int, light_mat: int) -> None:
    """A car seen from behind: body, cabin with a rear window, tail lights and wheels."""
    body = canvas.add_material(_CAR_COLOURS[rng.integers(len(_CAR_COLOURS))], lo=3, hi=2, grain=3)

    def box(y0: float, y1: float, x0: float, x1: float, material: int) -> None:
        top, left = int(round(y_base - y1 * scale)), int(round(x + x0 * scale))
        hh = max(int(round(y_base - y0 * scale)) - top, 1)
        ww = max(int(round(x + x1 * scale)) - left, 1)
        canvas.paint(np.ones((hh, ww), bool), CAR, material, top, left)

    box(0.0, 0.22, -0.55, -0.33, wheel_mat)
    box(0.0, 0.22, 0.33, 0.55, wheel_mat)
    box(0.12, 0.62, -0.6, 0.6, body)
    box(0.62, 1.0, -0.45, 0.45, body)
    box(0.68, 0.94, -0.38, 0.38, window_mat)
    box(0.45, 0.55, -0.56, -0.42, light_mat)
    box(0.45, 0.55, 0.42, 0.56, light_mat)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_options(split: str, size: Sequence[int], seed: int) -> tuple[int, int]:
    """Validated (height, width); a bad split, size or seed is a DataError."""
    if split not in SPLITS:
        raise DataError(f"scalescenes split '{split}' is unknown; expected one of {', '.join(SPLITS)}")
    if not isinstance(size, Sequence) or len(size) != 2 or not all(_is_int(v) and v >= MIN_SIZE for v in size):
        raise DataError(f"scalescenes size={size!r} is invalid; expected (height, width) integers >= {MIN_SIZE}")
    if not _is_int(seed) or seed < 0:
        raise DataError(f"scalescenes seed={seed!r} is invalid; expected a non-negative integer")
    return int(size[0]), int(size[1])


@dataclass(frozen=True)
class _Street:
    """Layout of one scene: horizon row, vanishing column, road half-width and sidewalk width (camera
    heights) and the lowest labelled row (above the bonnet)."""

    hz: int
    vx: float
    road: float
    walk: float
    lowest: int


Painter = tuple[float, Callable[[], None]]  # (base row, paint call): painted in increasing row order


def _poles_and_wires(canvas: _Canvas, rng: np.random.Generator, st: _Street, pole_mat: int, wire_mat: int) -> list[Painter]:
    """1–3 pairs of poles on the sidewalks near the kerb; pairs whose tops are in view carry 1–2
    wires across the street."""
    painters: list[Painter] = []
    height = rng.uniform(3.0, 4.5)  # pole height, camera heights
    for pair in range(rng.integers(1, 4)):
        tops_in_view = (st.hz - 3) / (height - 1)  # largest scale whose top is still in the image
        scale = rng.uniform(6.0, max(min(tops_in_view if pair < 2 else np.inf, st.lowest - st.hz), 7.0))
        y_base, y_top = st.hz + scale, st.hz + scale - height * scale
        xs = [st.vx + sign * (st.road + rng.uniform(0.1, 0.35) * st.walk) * scale for sign in (-1, 1)]
        present = rng.random(2) < 0.85
        for sign, x in zip((-1, 1), xs):
            if present[(sign + 1) // 2]:
                painters.append((y_base, partial(_paint_pole, canvas, rng, x, y_base, y_top, -sign, scale, pole_mat)))
        if present.all() and y_top >= 0:
            gap = rng.uniform(3.5, 6.0)
            for strand in range(rng.integers(1, 3)):
                y, sag = y_top + 2 + strand * gap, rng.uniform(0.02, 0.08) * (xs[1] - xs[0])
                painters.append((y_base - 0.5, partial(_paint_wire, canvas, xs[0], xs[1], y, y, sag, wire_mat)))
    return painters


def _trees(canvas: _Canvas, rng: np.random.Generator, st: _Street) -> list[Painter]:
    """1–4 trees on the outer part of the sidewalks."""
    trunk = canvas.add_material(_jitter(rng, (95, 72, 50), 10), lo=6, hi=6, grain=6)
    crown = canvas.add_material(_jitter(rng, (55, 100, 35), 12), lo=(14, 20, 10), hi=(24, 34, 14), grain=(8, 10, 6))
    painters: list[Painter] = []
    for _ in range(rng.integers(1, 5)):
        scale = rng.uniform(8.0, max(st.lowest - st.hz, 9.0))
        x = st.vx + rng.choice((-1, 1)) * (st.road + rng.uniform(0.4, 0.85) * st.walk) * scale
        painters.append((st.hz + scale, partial(_paint_tree, canvas, rng, x, st.hz + scale, scale, trunk, crown)))
    return painters


def _cars(canvas: _Canvas, rng: np.random.Generator, st: _Street) -> list[Painter]:
    """0–3 cars on the road, seen from behind."""
    window = canvas.add_material((45, 55, 70), lo=4, hi=3, grain=4)
    wheel = canvas.add_material((22, 22, 24), grain=3)
    light = canvas.add_material((200, 25, 25), grain=4)
    painters: list[Painter] = []
    for _ in range(rng.integers(0, 4)):
        scale = rng.uniform(6.0, max(0.6 * (st.lowest - st.hz), 7.0))
        x = st.vx + rng.uniform(-1, 1) * max(st.road - 0.65, 0.0) * scale  # the car (±0.6) stays on the road
        painters.append((st.hz + scale, partial(_paint_car, canvas, rng, x, st.hz + scale, scale, window, wheel, light)))
    return painters


def generate(seed: int, split: str, index: int, size: tuple[int, int] = (256, 512)) -> tuple[np.ndarray, np.ndarray]:
    """Scene ``index`` of ``split``: (H×W×3 uint8 image, H×W uint8 train ids, 255 = ignore)."""
    h, w = _check_options(split, size, seed)
    if not _is_int(index) or index < 0:
        raise DataError(f"scalescenes index={index!r} is invalid; expected a non-negative integer")
    rng = np.random.default_rng([int(seed), _SPLIT_STREAM[split], int(index)])
    canvas = _Canvas(h, w)
    hz = int(h * rng.uniform(0.36, 0.48))
    bonnet = int(rng.integers(2, 7)) * h // 256 + 1  # void band at the bottom
    road = rng.uniform(0.2, 0.34) * w / (h - hz)  # half-width at the bottom row: 20–34 % of the width
    st = _Street(hz=hz, vx=w * (0.5 + rng.uniform(-0.08, 0.08)), road=road, walk=road * rng.uniform(0.5, 0.9),
                 lowest=h - bonnet - 1)
    _paint_street(canvas, rng, st.hz, st.vx, st.road, st.walk)

    wire_mat = canvas.add_material(_jitter(rng, (30, 30, 35), 5), grain=4)
    pole_mat = canvas.add_material(_jitter(rng, (215, 190, 60), 10), grain=4)
    for _ in range(rng.integers(0, 3)):  # long overhead lines across the sky, behind every object
        y0 = rng.uniform(0.05 * h, max(0.7 * hz, 0.06 * h))
        _paint_wire(canvas, -1, w, y0, y0 + rng.uniform(-0.15, 0.15) * w, rng.uniform(0.02, 0.06) * w, wire_mat)
    painters = _poles_and_wires(canvas, rng, st, pole_mat, wire_mat) + _trees(canvas, rng, st) + _cars(canvas, rng, st)
    for _, paint in sorted(painters, key=lambda item: item[0]):  # far to near (stable for equal rows)
        paint()

    hood = canvas.add_material((38, 38, 42), lo=4, grain=5)
    canvas.label[h - bonnet:] = IGNORE_INDEX
    canvas.material[h - bonnet:] = hood
    return canvas.render(rng), canvas.label


class ScaleScenes(SegDataset):
    """Synthetic street scenes, generated on the fly from ``(seed, split, index)``.

    ``seed`` is kept as ``scene_seed`` (the scenes) and is also the initial per-sample augmentation
    seed ``self.seed`` of ``SegDataset``; re-assigning ``self.seed`` (as the data module does with the
    run's seed) changes the augmentation only, never the scenes. Sample names are placeholders like
    ``scalescenes/train/000123.png``.
    """

    generated = True

    def __init__(self, split: str = "train", transform: Transform | None = None, *, num_images: int | None = None,
                 size: tuple[int, int] = (256, 512), seed: int = 0) -> None:
        self.size = _check_options(split, size, seed)
        self.split = split
        self.scene_seed = int(seed)
        count = DEFAULT_NUM_IMAGES[split] if num_images is None else num_images
        if not _is_int(count) or count < 1:
            raise DataError(f"scalescenes num_images={num_images!r} is invalid; expected a positive integer")
        pairs = [(Path(f"scalescenes/{split}/{i:06d}.png"), None) for i in range(int(count))]
        super().__init__(pairs, SCALESCENES, transform, root=".", seed=seed,
                         description=f"scalescenes split '{split}'")

    def name(self, i: int) -> str:
        return self.pairs[i][0].as_posix()

    def load_raw(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(H×W×3 uint8 image, H×W uint8 train ids) of scene ``i`` (negative indices count from the end)."""
        n = len(self.pairs)
        if not -n <= i < n:
            raise IndexError(f"scalescenes index {i} out of range for {n} images")
        return generate(self.scene_seed, self.split, i % n, self.size)


def make_dataset(root: str | Path | None = None, split: str = "train", transform: Transform | None = None,
                 **options: object) -> ScaleScenes:
    """ScaleScenes split; ``root`` is ignored (nothing is read). Options: num_images, size, seed."""
    unknown = sorted(set(options) - {"num_images", "size", "seed"})
    if unknown:
        raise ConfigError(f"scalescenes option '{unknown[0]}' is unknown; expected num_images, size or seed")
    return ScaleScenes(split, transform, **options)  # type: ignore[arg-type]


def export(out_dir: str | Path, split: str = "train", num_images: int | None = None, *,
           size: tuple[int, int] = (256, 512), seed: int = 0) -> Path:
    """Write a split in the CamVid/SegNet layout: ``<split>/NNNNNN.png`` RGB images,
    ``<split>annot/NNNNNN.png`` palette PNGs of train ids (255 = ignore) and ``<split>.txt`` with
    ``image annotation`` lines relative to ``out_dir``. Returns the list file."""
    dataset = ScaleScenes(split, num_images=num_images, size=size, seed=seed)
    out = Path(out_dir)
    (out / split).mkdir(parents=True, exist_ok=True)
    (out / f"{split}annot").mkdir(parents=True, exist_ok=True)
    palette = SCALESCENES.palette_array().ravel().tolist()
    lines = []
    for i in range(len(dataset)):
        image, label = dataset.load_raw(i)
        image_rel, label_rel = f"{split}/{i:06d}.png", f"{split}annot/{i:06d}.png"
        Image.fromarray(image).save(out / image_rel)
        annot = Image.fromarray(label)
        annot.putpalette(palette)  # mode L → P: the pixel values stay the class ids
        annot.save(out / label_rel)
        lines.append(f"{image_rel} {label_rel}\n")
    list_file = out / f"{split}.txt"
    list_file.write_text("".join(lines))
    return list_file
