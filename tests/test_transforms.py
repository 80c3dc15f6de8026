"""Joint transforms: shapes, padding, nearest masks, image/mask alignment, determinism, DSRL pairs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as nnf

from scaleseg.data.transforms import eval_transform, train_transform
from scaleseg.errors import ConfigError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _normalise(image: torch.Tensor) -> torch.Tensor:
    """float64 reference: (x / 255 − mean) / std."""
    mean = torch.tensor(MEAN, dtype=torch.float64)[:, None, None]
    std = torch.tensor(STD, dtype=torch.float64)[:, None, None]
    return (image.double() / 255 - mean) / std


def _denormalise(image: torch.Tensor) -> torch.Tensor:
    """Back to 0..255 units (float64)."""
    mean = torch.tensor(MEAN, dtype=torch.float64)[:, None, None]
    std = torch.tensor(STD, dtype=torch.float64)[:, None, None]
    return (image.double() * std + mean) * 255


def _blocks(h: int, w: int, block: int, num_ids: int, seed: int = 0) -> torch.Tensor:
    """H×W uint8 mask of constant block×block tiles with random ids."""
    g = torch.Generator().manual_seed(seed)
    tiles = torch.randint(0, num_ids, (h // block, w // block), generator=g, dtype=torch.uint8)
    return tiles.repeat_interleave(block, 0).repeat_interleave(block, 1)


def _encode(mask: torch.Tensor) -> torch.Tensor:
    """3×H×W uint8 image whose pixels encode the mask id (per channel 20·id + c)."""
    ids = mask.long()
    return torch.stack([20 * ids + 10, 200 - 15 * ids, 20 * ids + 30]).to(torch.uint8)


def test_output_shapes_and_dtypes():
    image = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    mask = torch.randint(0, 5, (20, 30), dtype=torch.uint8)
    transform = train_transform((8, 10), MEAN, STD, blur=True)
    for seed in range(5):
        torch.manual_seed(seed)
        out = transform(image, mask)
        assert set(out) == {"image", "mask"}
        assert out["image"].shape == (3, 8, 10) and out["image"].dtype == torch.float32
        assert out["mask"].shape == (8, 10) and out["mask"].dtype == torch.int64


def test_padding_is_ignore_and_black():
    image = torch.randint(0, 256, (3, 4, 6), dtype=torch.uint8)
    mask = torch.randint(0, 5, (4, 6), dtype=torch.uint8)
    transform = train_transform((8, 10), MEAN, STD, scale_range=(1.0, 1.0), hflip=False, color_jitter=0)
    out = transform(image, mask)
    assert torch.equal(out["mask"][:4, :6], mask.long())
    assert (out["mask"][4:, :] == 255).all() and (out["mask"][:, 6:] == 255).all()
    reference = _normalise(image)
    assert torch.allclose(out["image"][:, :4, :6].double(), reference, atol=1e-5)
    black = _normalise(torch.zeros(3, 1, 1))
    assert torch.allclose(out["image"][:, 4:, :].double(), black.expand(3, 4, 10), atol=1e-6)
    assert torch.allclose(out["image"][:, :, 6:].double(), black.expand(3, 8, 4), atol=1e-6)


def test_base_size_and_scale_compose():
    mask = _blocks(10, 20, 1, 7)
    image = _encode(mask)
    transform = train_transform((40, 80), MEAN, STD, scale_range=(2.0, 2.0), base_size=40, hflip=False, color_jitter=0)
    out = transform(image, mask)  # factor = 2 · 40 / 20 = 4 → exactly the 40×80 crop, no padding
    assert torch.equal(out["mask"], mask.long().repeat_interleave(4, 0).repeat_interleave(4, 1))


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_nearest_mask_never_invents_ids(interpolation):
    g = torch.Generator().manual_seed(0)
    choices = torch.tensor([3, 7, 255], dtype=torch.uint8)
    mask = choices[torch.randint(0, 3, (17, 23), generator=g)]
    image = torch.randint(0, 256, (3, 17, 23), dtype=torch.uint8, generator=g)
    transform = train_transform((12, 12), MEAN, STD, scale_range=(0.5, 2.0), interpolation=interpolation)
    for seed in range(10):
        torch.manual_seed(seed)
        assert set(transform(image, mask)["mask"].unique().tolist()) <= {3, 7, 255}
    out = eval_transform(MEAN, STD, base_size=31)(image, mask)
    assert out["mask"].shape == (23, 31) and set(out["mask"].unique().tolist()) <= {3, 7, 255}


@pytest.mark.parametrize("lr_scale", [None, 0.5])
def test_image_mask_alignment_under_scale_flip_crop(lr_scale):
    """Bilinear upscaling by s ∈ [1, 2] reads input pixels n−1..n+1 around the nearest source n, which
    output pixels i−2..i+2 cover: where the mask's 5×5 neighbourhood is constant, the image must
    decode to exactly that id (±1 grey level for rounding)."""
    mask = _blocks(24, 36, 6, 9)
    image = _encode(mask)
    transform = train_transform((12, 16), MEAN, STD, scale_range=(1.0, 2.0), color_jitter=0, lr_scale=lr_scale)
    checked = 0
    for seed in range(12):
        torch.manual_seed(seed)
        out = transform(image, mask)
        hr = out["image"] if lr_scale is None else out["image_hr"]
        target = out["mask"]
        pooled_max = nnf.max_pool2d(target[None, None].double(), 5, 1, 2)[0, 0]
        pooled_min = -nnf.max_pool2d(-target[None, None].double(), 5, 1, 2)[0, 0]
        interior = (pooled_max == pooled_min) & (target != 255)
        interior[:2], interior[-2:], interior[:, :2], interior[:, -2:] = False, False, False, False
        expected = _encode(target.clamp(max=9).to(torch.uint8)).double()
        error = (_denormalise(hr) - expected).abs().amax(0)
        assert (error[interior] <= 1.0 + 1e-6).all(), f"seed {seed}: image and mask are misaligned"
        checked += int(interior.sum())
    assert checked > 300


def test_flip_moves_image_and_mask_together():
    mask = _blocks(6, 8, 2, 5)
    image = _encode(mask)
    transform = train_transform((6, 8), MEAN, STD, scale_range=(1.0, 1.0), color_jitter=0)
    seen = set()
    for seed in range(10):
        torch.manual_seed(seed)
        out = transform(image, mask)
        flipped = not torch.equal(out["mask"], mask.long())
        seen.add(flipped)
        reference_mask = mask.flip(-1) if flipped else mask
        reference_image = image.flip(-1) if flipped else image
        assert torch.equal(out["mask"], reference_mask.long())
        assert torch.allclose(out["image"].double(), _normalise(reference_image), atol=1e-5)
    assert seen == {True, False}


def test_crop_and_flip_keep_exact_pixel_alignment():
    """Without resampling (scale 1) every output pixel must decode to its mask id: a one-pixel offset
    between image and mask crops fails."""
    mask = _blocks(20, 28, 1, 9)
    image = _encode(mask)
    transform = train_transform((6, 8), MEAN, STD, scale_range=(1.0, 1.0), color_jitter=0)
    offsets = set()
    for seed in range(10):
        torch.manual_seed(seed)
        out = transform(image, mask)
        expected = _normalise(_encode(out["mask"].to(torch.uint8)))
        assert torch.allclose(out["image"].double(), expected, atol=1e-5), f"seed {seed}"
        offsets.add(tuple(out["mask"][0, :3].tolist()))
    assert len(offsets) > 5  # the crops really move


def test_photometric_changes_image_only():
    mask = _blocks(8, 8, 2, 5)
    image = torch.randint(30, 220, (3, 8, 8), dtype=torch.uint8)
    plain = _normalise(image)
    for kwargs in ({"color_jitter": 0.25}, {"color_jitter": 0.0, "blur": True}):
        transform = train_transform((8, 8), MEAN, STD, scale_range=(1.0, 1.0), hflip=False, **kwargs)
        changed = []
        for seed in range(8):
            torch.manual_seed(seed)
            out = transform(image, mask)
            assert torch.equal(out["mask"], mask.long())
            changed.append(not torch.allclose(out["image"].double(), plain, atol=1e-5))
        assert any(changed), kwargs
        if "blur" in kwargs:
            assert not all(changed)  # blur has probability 0.5
    jitter = train_transform((8, 8), MEAN, STD, color_jitter=0.8).photometric.transforms[1]
    assert jitter.hue == (-0.5, 0.5) and jitter.brightness == pytest.approx((0.2, 1.8))


def test_same_seed_same_sample():
    image = torch.randint(0, 256, (3, 30, 40), dtype=torch.uint8)
    mask = torch.randint(0, 5, (30, 40), dtype=torch.uint8)
    transform = train_transform((16, 16), MEAN, STD, blur=True, lr_scale=0.5)
    torch.manual_seed(123)
    first = transform(image, mask)
    torch.manual_seed(123)
    again = transform(image, mask)
    for key in ("image", "image_hr", "mask"):
        assert torch.equal(first[key], again[key]), key
    torch.manual_seed(124)
    other = transform(image, mask)
    assert not torch.equal(first["image_hr"], other["image_hr"])


def test_dsrl_pair_shapes_and_consistency():
    image = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    mask = torch.randint(0, 5, (20, 30), dtype=torch.uint8)
    transform = train_transform((8, 12), MEAN, STD, blur=True, lr_scale=0.5)
    for seed in range(4):
        torch.manual_seed(seed)
        out = transform(image, mask)
        assert out["image"].shape == (3, 4, 6)
        assert out["image_hr"].shape == (3, 8, 12) and out["mask"].shape == (8, 12)
        down = nnf.interpolate(out["image_hr"][None], size=(4, 6), mode="bilinear", align_corners=False, antialias=True)
        assert torch.allclose(down[0], out["image"], atol=1e-6)
        # by hand: antialiased bilinear ×0.5 is the separable filter [1, 3, 3, 1] / 8 around 2i, 2i+1
        weights = torch.tensor([1.0, 3.0, 3.0, 1.0]) / 8
        by_hand = torch.einsum("a,b,cab->c", weights, weights, out["image_hr"][:, 1:5, 3:7])
        assert torch.allclose(out["image"][:, 1, 2], by_hand, atol=1e-5)
    # eval pair mode: long edge to 40 (20×30 → 27×40), LR input 14×20 (rounded half up)
    out = eval_transform(MEAN, STD, base_size=40, lr_scale=0.5)(image, mask)
    assert out["image_hr"].shape == (3, 27, 40) and out["mask"].shape == (27, 40) and out["image"].shape == (3, 14, 20)
    plain = eval_transform(MEAN, STD)(image, mask)
    assert torch.allclose(plain["image"].double(), _normalise(image), atol=1e-5)
    assert torch.equal(plain["mask"], mask.long()) and set(plain) == {"image", "mask"}


def test_eval_base_size_resizes_mask_nearest():
    mask = _blocks(6, 12, 1, 9)
    image = _encode(mask)
    out = eval_transform(MEAN, STD, base_size=24)(image, mask)
    assert out["image"].shape == (3, 12, 24)
    assert torch.equal(out["mask"], mask.long().repeat_interleave(2, 0).repeat_interleave(2, 1))


def test_crop_keeps_the_point_inside():
    mask = torch.zeros(64, 64, dtype=torch.uint8)
    mask[38:43, 48:53] = 5  # 5×5 block centred on (x=50, y=40)
    image = _encode(mask)
    transform = train_transform((8, 8), MEAN, STD, scale_range=(0.5, 2.0), color_jitter=0)
    missed_without_point = 0
    for seed in range(20):
        torch.manual_seed(seed)
        assert (transform(image, mask, point=(50, 40))["mask"] == 5).any(), f"seed {seed}"
        torch.manual_seed(seed)
        missed_without_point += int(not (transform(image, mask)["mask"] == 5).any())
    assert missed_without_point > 10  # a plain random crop mostly misses the block


def test_invalid_arguments():
    with pytest.raises(ConfigError, match="interpolation 'nearest'"):
        train_transform((8, 8), MEAN, STD, interpolation="nearest")
    with pytest.raises(ConfigError, match=r"scale_range \(2.0, 1.0\)"):
        train_transform((8, 8), MEAN, STD, scale_range=(2.0, 1.0))
    with pytest.raises(ConfigError, match="lr_scale 2"):
        eval_transform(MEAN, STD, lr_scale=2)
    with pytest.raises(ConfigError, match="crop_size"):
        train_transform((0, 8), MEAN, STD)
