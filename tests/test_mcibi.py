"""MCIBI: FeatureMemory update against a plain per-class loop, schedule, checkpoints; the model."""
from __future__ import annotations

import io
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

from scaleseg.errors import ConfigError, DataError
from scaleseg.models.mcibi import FeatureMemory
from scaleseg.types import StepInfo

IGNORE = 255


# --------------------------------------------------------------------------------------------
# reference: the reference code's loop over classes (float64), plus our degenerate fallback
# --------------------------------------------------------------------------------------------
def loop_update(memory, initialized, feats, labels, momentum, *, mode="soft", tol=1e-5):
    """Per-class Python loop like sssegmentation's FeaturesMemory.update, in float64.

    ``mode="full"``: features bilinearly upsampled to the label size (the reference);
    ``"soft"``: features repeated over their s×s cell (nearest upsampling), i.e. every feature pixel
    counts once per label pixel of its cell; ``"center"``: the label at the cell centre (s·i + s/2);
    ``"majority"``: the most frequent valid label of the cell (lowest id on ties).
    A class with Σ(1 − cos) < ``tol`` takes the plain mean."""
    mem = memory.double().clone()
    init = initialized.clone()
    feats = feats.double()
    s = labels.shape[-1] // feats.shape[-1]
    if mode == "full":
        feats = F.interpolate(feats, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    elif mode == "soft":
        feats = feats.repeat_interleave(s, dim=2).repeat_interleave(s, dim=3)
    elif mode == "center":
        labels = labels[:, s // 2 :: s, s // 2 :: s]
    else:  # majority, one cell at a time
        b, h, w = labels.shape[0], feats.shape[2], feats.shape[3]
        out = torch.full((b, h, w), IGNORE, dtype=torch.long)
        for n in range(b):
            for i in range(h):
                for j in range(w):
                    cell = labels[n, i * s : (i + 1) * s, j * s : (j + 1) * s].flatten()
                    cell = cell[cell != IGNORE]
                    if cell.numel():
                        counts = torch.bincount(cell)
                        out[n, i, j] = int(counts.argmax())  # first maximum = lowest id
        labels = out
    channels = feats.shape[1]
    x = feats.permute(0, 2, 3, 1).reshape(-1, channels)
    y = labels.reshape(-1)
    for k in y.unique().tolist():
        if k == IGNORE:
            continue
        xk = x[y == k]
        if not init[k]:
            mem[k] = xk.mean(0)
            init[k] = True
            continue
        sim = F.cosine_similarity(xk, mem[k].expand_as(xk), dim=1)
        total = (1 - sim).sum()
        new = xk.mean(0) if total < tol else (xk * ((1 - sim) / total)[:, None]).sum(0)
        mem[k] = (1 - momentum) * mem[k] + momentum * new
    return mem.float(), init


def make_batch(seed, *, batch=2, channels=16, size=8, stride=8, num_classes=7, ignore_frac=0.2, absent=()):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, channels, size, size, generator=g).relu() + 0.05
    labels = torch.randint(0, num_classes, (batch, size * stride, size * stride), generator=g)
    for k in absent:
        labels[labels == k] = (k + 1) % num_classes
    labels[torch.rand(labels.shape, generator=g) < ignore_frac] = IGNORE
    return feats, labels


def partially_initialised(num_classes=7, channels=16, *, seed=5, **kwargs):
    mem = FeatureMemory(num_classes, channels, **kwargs)
    g = torch.Generator().manual_seed(seed)
    mem.memory[: num_classes // 2] = torch.randn(num_classes // 2, channels, generator=g).relu() + 0.1
    mem.initialized[: num_classes // 2] = True
    return mem


# --------------------------------------------------------------------------------------------
# update rule
# --------------------------------------------------------------------------------------------
MODES = {"full": {"full_resolution": True}, "soft": {}, "center": {"label_downsample": "center"},
         "majority": {"label_downsample": "majority"}}


@pytest.mark.parametrize("mode", list(MODES))
def test_update_matches_per_class_loop(mode):
    mem = partially_initialised(**MODES[mode])
    feats, labels = make_batch(0, absent=(6,))  # class 6 absent: stays empty
    step = StepInfo(step=30, max_steps=100)
    m = mem.momentum_at(30, 100)
    ref_mem, ref_init = loop_update(mem.memory, mem.initialized, feats, labels, m, mode=mode)
    mem.update(feats, labels, step)
    torch.testing.assert_close(mem.memory, ref_mem, atol=1e-6, rtol=0)
    assert torch.equal(mem.initialized, ref_init)
    assert not mem.initialized[6] and mem.memory[6].abs().sum() == 0
    # second step: every seen class now takes the EMA path
    feats2, labels2 = make_batch(1)
    ref_mem2, ref_init2 = loop_update(mem.memory, mem.initialized, feats2, labels2, m, mode=mode)
    mem.update(feats2, labels2, step)
    torch.testing.assert_close(mem.memory, ref_mem2, atol=1e-6, rtol=0)
    assert torch.equal(mem.initialized, ref_init2)


def test_feature_and_full_resolution_differ_and_chunking_is_exact():
    feats, labels = make_batch(2)
    a = partially_initialised(full_resolution=False)
    b = partially_initialised(full_resolution=True)
    c = partially_initialised(full_resolution=True, chunk_pixels=1001)  # odd chunk size, several chunks per image
    for mem in (a, b, c):
        mem.update(feats, labels, StepInfo(0, 10))
    assert (a.memory - b.memory).abs().max() > 1e-3  # two genuinely different paths
    torch.testing.assert_close(b.memory, c.memory, atol=1e-6, rtol=0)


def test_label_downsampling_by_hand():
    """One 2×2 feature map at stride 4 (8×8 labels): cell (0, 0) holds 10 px of class 1 and 6 of class 2.

    soft: class 1 gets feature f00 with multiplicity 10 and f01 with 16, class 2 f00 with 6; a first
    sighting takes the pixel-count-weighted mean. center: the label at pixel (2, 2) of each cell.
    majority: the most frequent label per cell."""
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [4.0, 0.0]])  # f00, f01, f10, f11 (C = 2)
    feats = f.T.reshape(1, 2, 2, 2)
    labels = torch.full((1, 8, 8), IGNORE)
    cell00 = torch.tensor([1] * 10 + [2] * 6).view(4, 4)  # rows 0-1 and half of row 2 are class 1
    assert cell00[2, 2] == 2  # the centre pixel (2, 2) is class 2
    labels[0, :4, :4] = cell00
    labels[0, :4, 4:] = 1  # f01: all class 1
    labels[0, 4:, :4] = 3  # f10: all class 3
    # f11 cell: all ignore
    soft = FeatureMemory(4, 2)
    soft.update(feats, labels, StepInfo(0, 10))
    torch.testing.assert_close(soft.memory[1], (10 * f[0] + 16 * f[1]) / 26)
    torch.testing.assert_close(soft.memory[2], f[0])
    torch.testing.assert_close(soft.memory[3], f[2])
    assert soft.initialized.tolist() == [False, True, True, True]
    center = FeatureMemory(4, 2, label_downsample="center")
    center.update(feats, labels, StepInfo(0, 10))
    torch.testing.assert_close(center.memory[1], f[1])  # cell 00 centre is class 2
    torch.testing.assert_close(center.memory[2], f[0])
    majority = FeatureMemory(4, 2, label_downsample="majority")
    majority.update(feats, labels, StepInfo(0, 10))
    torch.testing.assert_close(majority.memory[1], (f[0] + f[1]) / 2)  # cell 00 is mostly class 1
    assert not majority.initialized[2]
    with pytest.raises(ConfigError, match="label_downsample='nearest'"):
        FeatureMemory(4, 2, label_downsample="nearest")  # type: ignore[arg-type]


def test_first_seen_class_takes_mean_without_ema_and_ignore_is_excluded():
    mem = FeatureMemory(3, 4, momentum=0.5)
    feats = torch.zeros(1, 4, 2, 2)
    feats[0, :, 0, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    feats[0, :, 0, 1] = torch.tensor([3.0, 2.0, 1.0, 0.0])
    feats[0, :, 1, 0] = torch.tensor([100.0, 100.0, 100.0, 100.0])  # ignored
    feats[0, :, 1, 1] = torch.tensor([0.0, 0.0, 5.0, 0.0])
    labels = torch.tensor([[[1, 1], [IGNORE, 2]]])
    mem.update(feats, labels, StepInfo(0, 10))
    torch.testing.assert_close(mem.memory[1], torch.tensor([2.0, 2.0, 2.0, 2.0]))
    torch.testing.assert_close(mem.memory[2], torch.tensor([0.0, 0.0, 5.0, 0.0]))
    assert mem.initialized.tolist() == [False, True, True]
    # a batch of ignore only changes nothing
    before = mem.memory.clone()
    mem.update(feats, torch.full_like(labels, IGNORE), StepInfo(1, 10))
    assert torch.equal(mem.memory, before)


def test_hand_computed_ema_step():
    """M1 = (1, 0); pixels a = (1, 0) (cos 1, weight 0) and b = (0, 2) (cos 0, weight 1):
    R' = b and M1 <- (1 - m) M1 + m R' (no epsilon in the denominator)."""
    mem = FeatureMemory(2, 2, momentum=0.8)
    mem.memory[1] = torch.tensor([1.0, 0.0])
    mem.initialized[1] = True
    feats = torch.tensor([[1.0, 0.0], [0.0, 2.0]]).T.reshape(1, 2, 1, 2)
    labels = torch.tensor([[[1, 1]]])
    mem.update(feats, labels, StepInfo(0, 10))
    m = 0.8
    expected = torch.tensor([(1 - m) * 1.0, m * 2.0])
    torch.testing.assert_close(mem.memory[1], expected, atol=1e-7, rtol=0)


def test_degenerate_class_falls_back_to_the_plain_mean():
    """Pixels parallel to M_k up to 1e-7 rad: Σ(1 − cos) ≈ 1e-14 < 1e-5. The reference divides ~0/0;
    with the old ε = 1e-6 in the denominator the update shrank R′ to ~0 (|M| 2.34 → 0.85 in the issue's
    case). Now R′ = the class mean: M ← (1 − m)·M + m·mean. And exactly parallel pixels no longer NaN."""
    mem = FeatureMemory(2, 3, momentum=0.9)
    mem.memory[0] = torch.tensor([1.0, 2.0, 3.0])
    mem.initialized[0] = True
    u = torch.tensor([1.0, 2.0, 3.0]) / math.sqrt(14.0)
    tilt = torch.tensor([3.0, 0.0, -1.0]) / math.sqrt(10.0)  # ⟂ u
    pixels = torch.stack([2.0 * u, 4.0 * (u + 1e-7 * tilt), 6.0 * u, 3.0 * (u - 1e-7 * tilt)])
    feats = pixels.T.reshape(1, 3, 2, 2)
    labels = torch.zeros(1, 2, 2, dtype=torch.long)
    stats = mem.batch_statistics(feats, labels)
    assert float(stats["wtot"][0]) < 1e-12
    m = mem.momentum_at(0, 10)
    mem.update(feats, labels, StepInfo(0, 10))
    expected = (1 - m) * torch.tensor([1.0, 2.0, 3.0]) + m * pixels.mean(0)  # mean norm 3.75, |M| = 3.75·0.9 + 0.1·√14
    torch.testing.assert_close(mem.memory[0], expected, atol=1e-6, rtol=0)
    assert mem.memory[0].norm().item() == pytest.approx(0.9 * 3.75 + 0.1 * math.sqrt(14.0), abs=1e-5)  # 3.7492
    # exactly parallel: no NaN, same rule
    exact = FeatureMemory(2, 3)
    exact.memory[0] = torch.tensor([1.0, 2.0, 3.0])
    exact.initialized[0] = True
    exact.update(torch.tensor([2.0, 4.0, 6.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2).contiguous(),
                 torch.zeros(1, 2, 2, dtype=torch.long), StepInfo(0, 10))
    m = exact.momentum_at(0, 10)
    torch.testing.assert_close(exact.memory[0], (1 - m) * torch.tensor([1.0, 2.0, 3.0]) + m * torch.tensor([2.0, 4.0, 6.0]))
    # just above the tolerance the cosine weights are used again
    far = FeatureMemory(2, 3, degenerate_tol=1e-20)
    far.load_state_dict({"memory": mem.memory * 0 + torch.tensor([1.0, 2.0, 3.0]), "initialized": mem.initialized})
    far.update(feats, labels, StepInfo(0, 10))
    assert (far.memory[0] - expected).abs().max() > 1e-2


def test_random_pixel_init_picks_one_pixel_of_the_class_deterministically():
    feats, labels = make_batch(3, absent=(6,))
    results = []
    for _ in range(2):
        mem = partially_initialised(init="random_pixel", seed=5)
        ema_ref, _ = loop_update(mem.memory, mem.initialized, feats, labels, mem.momentum_at(0, 10), mode="soft")
        mem.update(feats, labels, StepInfo(0, 10))
        results.append(mem.memory.clone())
        # initialised classes still follow the EMA rule
        torch.testing.assert_close(mem.memory[:3], ema_ref[:3], atol=1e-6, rtol=0)
        pixels = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
        has = F.one_hot(torch.where(labels == IGNORE, 7, labels), 8).view(2, 8, 8, 8, 8, 8).amax(dim=(2, 4))
        for k in (3, 4, 5):  # newly seen: equal to one feature pixel whose cell holds class k
            dist = (pixels[has.reshape(-1, 8)[:, k] > 0] - mem.memory[k]).abs().sum(1)
            assert dist.min() == 0
        assert not mem.initialized[6]
    assert torch.equal(results[0], results[1])


def test_momentum_schedule_values():
    mem = FeatureMemory(2, 2, momentum=0.9, min_ratio=0.0)
    assert mem.momentum_at(0, 1000) == pytest.approx(0.9)
    assert mem.momentum_at(500, 1000) == pytest.approx(0.9 * 0.5**0.9)
    assert mem.momentum_at(250, 1000) == pytest.approx(0.9 * 0.75**0.9)
    assert mem.momentum_at(1000, 1000) == pytest.approx(0.0)
    assert mem.momentum_at(999, 1000) == pytest.approx(0.0018, abs=1e-4)  # no floor: the old default
    # default = reference parity: m0 * lr/lr0 with poly(0.9) and min_lr = 0.01 lr0
    ref = FeatureMemory(2, 2, momentum=0.9)
    assert ref.min_ratio == 0.01
    assert ref.momentum_at(500, 1000) == pytest.approx(0.4865, abs=1e-4)
    assert ref.momentum_at(999, 1000) == pytest.approx(0.9 * (0.99 * 0.001**0.9 + 0.01))
    assert ref.momentum_at(999, 1000) == pytest.approx(0.0108, abs=1e-4)
    # the reference's Cityscapes configs (base_lr = 0.9·lr0) are m0 = 1
    assert FeatureMemory(2, 2, momentum=1.0).momentum_at(0, 1000) == pytest.approx(1.0)
    # the schedule is what update() uses
    mem.memory[0] = torch.tensor([1.0, 0.0])
    mem.initialized[0] = True
    feats = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)
    mem.update(feats, torch.zeros(1, 1, 1, dtype=torch.long), StepInfo(500, 1000))
    m = 0.9 * 0.5**0.9
    torch.testing.assert_close(mem.memory[0], torch.tensor([1 - m, m]))


def test_memory_roundtrips_through_checkpoint():
    mem = partially_initialised()
    feats, labels = make_batch(4, absent=(6,))
    mem.update(feats, labels, StepInfo(0, 10))
    assert set(mem.state_dict()) == {"memory", "initialized"}
    assert list(mem.parameters()) == []
    buffer = io.BytesIO()
    torch.save(mem.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = FeatureMemory(7, 16)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.memory, mem.memory)
    assert fresh.initialized.dtype == torch.bool
    assert torch.equal(fresh.initialized, mem.initialized)
    assert fresh.initialized.tolist() == [True] * 6 + [False]
    # the restored memory continues exactly like the original
    feats2, labels2 = make_batch(5)
    mem.update(feats2, labels2, StepInfo(1, 10))
    fresh.update(feats2, labels2, StepInfo(1, 10))
    assert torch.equal(fresh.memory, mem.memory)


def test_snapshot_is_a_detached_copy():
    mem = partially_initialised()
    snap = mem.snapshot()
    assert not snap.requires_grad and snap.data_ptr() != mem.memory.data_ptr()
    before = snap.clone()
    mem.update(*make_batch(6), StepInfo(0, 10))
    assert torch.equal(snap, before) and not torch.equal(mem.memory, before)


def test_bad_inputs_raise_single_line_errors():
    mem = FeatureMemory(4, 8)
    feats = torch.rand(1, 8, 2, 2)
    with pytest.raises(DataError, match=r"\[7\].*outside \[0, 4\)") as err:
        mem.update(feats, torch.full((1, 16, 16), 7), StepInfo())
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="expected B×8×h×w"):
        mem.update(torch.rand(1, 5, 2, 2), torch.zeros(1, 16, 16, dtype=torch.long), StepInfo())
    with pytest.raises(ConfigError, match="init='first'"):
        FeatureMemory(4, 8, init="first")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# aggregation blocks
# --------------------------------------------------------------------------------------------
from scaleseg.models.backbone import Backbone  # noqa: E402
from scaleseg.models.mcibi import HOSTS, MCIBIModel, MemoryContext, SelfAttentionBlock  # noqa: E402


def test_gather_memory_is_softmax_weighted_sum_of_memory_rows():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, 5, generator=g)
    memory = torch.randn(4, 6, generator=g)
    out = MemoryContext.gather_memory(logits, memory)
    w = logits.softmax(1)
    for b, i, j in [(0, 0, 0), (1, 2, 4), (0, 1, 3)]:
        expected = sum(w[b, k, i, j] * memory[k] for k in range(4))
        torch.testing.assert_close(out[b, :, i, j], expected)


def test_self_attention_block_matches_explicit_formula():
    torch.manual_seed(0)
    block = SelfAttentionBlock(6, 5, 4, 7).eval()
    query, kv = torch.randn(2, 6, 3, 4), torch.randn(2, 5, 2, 3)
    q = block.query_project(query).flatten(2).transpose(1, 2)
    k = block.key_project(kv).flatten(2).transpose(1, 2)
    v = block.value_project(kv).flatten(2).transpose(1, 2)
    attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(4), dim=-1)  # 1/sqrt(T), T = C/2 here
    expected = block.out_project((attn @ v).transpose(1, 2).reshape(2, 4, 3, 4))
    out = block(query, kv)
    assert out.shape == (2, 7, 3, 4)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def _context_with_memory(seed=0):
    torch.manual_seed(seed)
    mc = MemoryContext(8, 4, channels=8, context_channels=None)
    mc.memory.memory.copy_(torch.rand(4, 8) + 0.1)
    mc.memory.initialized.fill_(True)
    return mc


def test_backward_uses_the_memory_the_forward_used():
    """The update after the forward (as in training_losses) must not change the gradients."""
    import copy

    mc = _context_with_memory()
    twin = copy.deepcopy(mc)
    x = torch.randn(2, 8, 4, 4)
    weights = torch.randn(2, 8, 4, 4)
    grads = []
    for model, update in ((mc, True), (twin, False)):
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(1)  # same dropout masks
        out = model(xi)
        loss = (out["out"] * weights).sum() + out["memory_logits"].square().sum()
        if update:
            before = model.memory.memory.clone()
            labels = torch.randint(0, 4, (2, 4, 4))
            model.memory.update(torch.rand(2, 8, 4, 4) * 5, labels, StepInfo(0, 10))
            assert (model.memory.memory - before).abs().max() > 0.1  # the memory did change
            assert torch.equal(out["memory"], before)  # the snapshot did not
        loss.backward()
        grads.append((xi.grad.clone(), model.class_head[0].weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=0, rtol=0)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=0, rtol=0)


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------
K = 5


def tiny_model(host="deeplabv3", **kwargs):
    torch.manual_seed(0)
    return MCIBIModel(Backbone("test_resnet", output_stride=8), K, host=host, channels=32, **kwargs)


def tiny_batch(h=36, w=44, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.randint(0, K, (2, h, w), generator=g)
    mask[:, :4] = IGNORE
    return {"image": torch.randn(2, 3, h, w, generator=g), "mask": mask}


EXPECTED_TERMS = {
    "deeplabv3": set(),
    "pspnet": set(),
    "fcn": set(),
    "ocr": {"ocr_aux"},
    "deeplabv3plus": {"stride8_ce"},
}


@pytest.mark.parametrize("host", HOSTS)
def test_shapes_and_loss_terms_for_each_host(host):
    model = tiny_model(host)
    batch = tiny_batch()
    out = model.forward_features(batch["image"])
    for key in ("logits", "aux", "memory_logits"):
        assert out[key].shape == (2, K, 36, 44), key
    feat_shape = (2, 80, 10, 12) if host == "deeplabv3plus" else (2, 32, 5, 6)  # padded to 40×48
    assert out["feats"].shape == feat_shape
    losses = model.training_losses(batch, StepInfo(0, 10, epoch=1))
    assert set(losses) == {"ce", "memory_ce", "aux", "consistency"} | EXPECTED_TERMS[host]
    assert all(torch.isfinite(v) for v in losses.values())
    assert model.feature_memory.initialized.all()  # every class is in the mask
    sum(losses.values()).backward()
    assert model.head.classifier[-1].weight.grad.abs().sum() > 0
    model.eval()
    assert model(batch["image"]).shape == (2, K, 36, 44)


def test_training_losses_equal_hand_computed_terms_and_update_memory():
    model = tiny_model("deeplabv3", consistency_start_epoch=1)
    mem = model.feature_memory
    mem.memory[:3] = torch.rand(3, 32) + 0.1
    mem.initialized[:3] = True
    old_memory, old_init = mem.memory.clone(), mem.initialized.clone()
    batch = tiny_batch()
    captured = {}
    model.head.memory_context.bottleneck.register_forward_hook(lambda m, i, o: captured.__setitem__("R", o.detach()))
    torch.manual_seed(3)
    ref = model.forward_features(batch["image"])
    torch.manual_seed(3)
    step = StepInfo(step=4, max_steps=10, epoch=1)
    losses = model.training_losses(batch, step)
    crit = model.criterion
    mask = batch["mask"]
    torch.testing.assert_close(losses["ce"], crit(ref["logits"], mask))
    torch.testing.assert_close(losses["memory_ce"], 0.4 * crit(ref["memory_logits"], mask))
    torch.testing.assert_close(losses["aux"], 0.4 * crit(ref["aux"], mask))
    # consistency: H2 in eval mode on the *pre-update* memory of initialised classes 0..2 only
    import copy

    h2 = copy.deepcopy(model.head.classifier).eval()
    expected = F.cross_entropy(h2(old_memory[:3].view(3, 32, 1, 1)).flatten(1), torch.arange(3))
    torch.testing.assert_close(losses["consistency"], expected)
    # the memory update used this forward's R and the mask padded with ignore to 40×48
    manual = FeatureMemory(K, 32)  # the model's defaults: soft labels at feature resolution, floor 0.01
    manual.load_state_dict({"memory": old_memory, "initialized": old_init})
    padded = F.pad(mask, (0, 4, 0, 4), value=IGNORE)
    manual.update(captured["R"], padded, step)
    torch.testing.assert_close(mem.memory, manual.memory, atol=1e-6, rtol=0)
    assert mem.initialized.all()


def test_consistency_loss_gate():
    model = tiny_model("fcn", consistency_start_epoch=1, consistency_start_step=5)
    model.feature_memory.memory.copy_(torch.rand(K, 32))
    model.feature_memory.initialized.fill_(True)
    batch = tiny_batch()
    assert model.training_losses(batch, StepInfo(10, 20, epoch=0))["consistency"] == 0  # first epoch
    assert model.training_losses(batch, StepInfo(3, 20, epoch=1))["consistency"] == 0  # before step 5
    assert model.training_losses(batch, StepInfo(6, 20, epoch=1))["consistency"] > 0
    empty = tiny_model("fcn", consistency_start_epoch=0)
    assert empty.consistency_loss(empty.feature_memory.snapshot(), empty.feature_memory.initialized, StepInfo()) == 0


def test_consistency_loss_leaves_bn_running_stats_unchanged():
    model = tiny_model("deeplabv3", consistency_start_epoch=0).train()
    memory = torch.rand(K, 32) * 3
    initialized = torch.tensor([True, False, True, True, False])
    bn = model.head.classifier[1]
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    loss = model.consistency_loss(memory, initialized, StepInfo())
    loss.backward()
    for key, value in bn.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert model.head.classifier.training and bn.training  # mode restored
    assert model.head.classifier[0].weight.grad.abs().sum() > 0  # H2 still learns
    # the check is sensitive: the same call in train mode would move the running mean
    model.head.classifier(memory[initialized].view(-1, 32, 1, 1))
    assert not torch.equal(bn.running_mean, before["running_mean"])


def test_eval_mode_training_losses_do_not_update_memory():
    model = tiny_model("pspnet").eval()
    model.training_losses(tiny_batch(), StepInfo())
    assert not model.feature_memory.initialized.any()


def test_model_checkpoint_roundtrip_keeps_memory():
    model = tiny_model("deeplabv3")
    model.training_losses(tiny_batch(), StepInfo(0, 10))
    assert model.feature_memory.initialized.all()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    restored = tiny_model("deeplabv3")
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(restored.feature_memory.memory, model.feature_memory.memory)
    assert restored.feature_memory.initialized.all()
    x = tiny_batch()["image"]
    model.eval(), restored.eval()
    torch.testing.assert_close(restored(x), model(x))


def test_unknown_host_is_a_config_error():
    with pytest.raises(ConfigError, match="host='unet'"):
        tiny_model("unet")


# --------------------------------------------------------------------------------------------
# reproduction recipes and the reference ASPP
# --------------------------------------------------------------------------------------------
def test_reference_aspp_projection_sizes():
    """sssegmentation's ASPP fuses 5×512 → 512 with a 3×3 conv (11.80 M weights), scaleseg's light
    layout with a 1×1 conv + dropout (1.31 M)."""
    from scaleseg.models.heads import ASPP

    with torch.device("meta"):
        ref = ASPP(2048, 512, (12, 24, 36), project_kernel=3, dropout=0.0)
        light = ASPP(2048, 512, (12, 24, 36))
    conv = lambda m: m.project[0][0].weight.numel()  # noqa: E731
    assert conv(ref) == 5 * 512 * 512 * 9 == 11_796_480
    assert conv(light) == 5 * 512 * 512 == 1_310_720
    assert ref.project[1].p == 0.0 and light.project[1].p == 0.1
    with pytest.raises(ConfigError, match="project_kernel=5"):
        ASPP(8, 4, project_kernel=5)


@pytest.mark.parametrize("recipe", ["ade20k/deeplabv3_mcibi.yaml", "cityscapes/deeplabv3_mcibi.yaml"])
def test_reproduction_recipes_use_the_reference_path(recipe):
    from pathlib import Path

    import scaleseg

    path = Path(__file__).resolve().parents[1] / "configs" / recipe
    cfg = scaleseg.load_config(path, ["model.pretrained=false"])
    with torch.device("meta"):
        model = scaleseg.create_model(cfg)
    mem = model.feature_memory
    assert mem.full_resolution and mem.min_ratio == 0.01
    aspp = model.head.context_module
    assert aspp.dilations == (12, 24, 36) and aspp.project[0][0].kernel_size == (3, 3) and aspp.project[1].p == 0.0
    assert model.aux_head is not None and model.aux_weight == 0.4 and model.memory_loss_weight == 0.4
    ade = recipe.startswith("ade20k")
    assert model.consistency_weight == (1.0 if ade else 0.0)
    assert cfg.model.backbone == ("resnet50c" if ade else "resnet101c")
    # momentum: ADE20K m(0) = 0.9; Cityscapes m(0) = 1.0 (reference base_lr = 0.9·lr0); floor 0.01·m0
    assert mem.momentum_at(0, 1000) == pytest.approx(0.9 if ade else 1.0)
    assert mem.momentum_at(999, 1000) == pytest.approx((0.9 if ade else 1.0) * (0.99 * 0.001**0.9 + 0.01))


def test_shipped_non_reference_mcibi_configs_keep_the_fast_path():
    from pathlib import Path

    import scaleseg

    root = Path(__file__).resolve().parents[1] / "configs"
    for path in sorted(root.rglob("*mcibi*.yaml")):
        cfg = scaleseg.load_config(path)
        assert cfg.model.mcibi.momentum_min_ratio == 0.01, path
        assert cfg.model.mcibi.full_resolution == (cfg.model.arch == "deeplabv3"), path


def test_mcibi_deeplabv3plus_host_takes_the_plain_heads_decoder_options():
    """model.decoder_channels / decoder_convs / separable shape the MCIBI host's decoder exactly as they
    shape the plain DeepLabV3+ head (they were ignored: the MCIBI arm had a 256-wide full-conv decoder
    against a separable, narrower host)."""
    import scaleseg
    from scaleseg.models.factory import create_model
    from scaleseg.models.heads import SeparableConvBNReLU

    args = ["model.arch=deeplabv3plus", "model.backbone=test_resnet", "model.output_stride=8", "model.head_channels=16",
            "model.decoder_channels=24", "model.decoder_convs=1", "model.separable=true", "model.pretrained=false"]
    plain = create_model(scaleseg.load_config(None, args), 5)
    with_memory = create_model(scaleseg.load_config(None, [*args, "model.mcibi.enabled=true", "model.mcibi.channels=16"]), 5)
    decoder = with_memory.head.decoder
    assert [type(b) for b in decoder.final[:-1]] == [SeparableConvBNReLU]
    assert decoder.final[-1].in_channels == 24 and decoder.final[-1].out_channels == 5
    shapes = {k: v.shape for k, v in plain.head.state_dict().items() if not k.startswith("aspp.")}
    assert shapes == {k.removeprefix("decoder."): v.shape for k, v in with_memory.head.state_dict().items()
                      if k.startswith("decoder.") and not k.startswith("decoder.aspp.")}
    x = torch.randn(2, 3, 64, 64)
    with_memory.eval()
    assert with_memory(x).shape == (2, 5, 64, 64)
