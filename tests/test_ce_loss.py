import math

import pytest
import torch
import torch.nn.functional as F

from scaleseg.errors import ConfigError, DataError
from scaleseg.losses.ce import CrossEntropyLoss


def _data(seed=0, k=4):
    torch.manual_seed(seed)
    logits = torch.randn(2, k, 6, 7) * 3
    target = torch.randint(0, k, (2, 6, 7))
    target[0, :2] = 255
    target[1, :, -1] = 255
    return logits, target


def test_equals_torch_cross_entropy_with_ignore():
    logits, target = _data()
    loss = CrossEntropyLoss()(logits, target)
    torch.testing.assert_close(loss, F.cross_entropy(logits, target, ignore_index=255))


def test_no_ignored_pixels_and_hand_computed_value():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])  # 1×2×1×2
    target = torch.tensor([[[0, 1]]])
    expected = 0.5 * (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-1.0)))
    torch.testing.assert_close(CrossEntropyLoss()(logits, target), torch.tensor(expected))


def test_class_weights_give_weighted_mean():
    logits, target = _data(1)
    weights = [0.5, 2.0, 1.0, 3.0]
    loss = CrossEntropyLoss(class_weights=weights)(logits, target)
    torch.testing.assert_close(
        loss, F.cross_entropy(logits, target, weight=torch.tensor(weights), ignore_index=255)
    )
    # float64 plain reference: Σ w[y]·(-log p_y) / Σ w[y] over valid pixels
    logp = logits.double().log_softmax(1)
    num = den = 0.0
    for b, i, j in zip(*torch.nonzero(target != 255, as_tuple=True)):
        y = int(target[b, i, j])
        num += weights[y] * -float(logp[b, y, i, j])
        den += weights[y]
    assert loss.item() == pytest.approx(num / den, rel=1e-5)


def test_custom_ignore_index():
    logits, target = _data(2)
    target[target == 255] = 3
    loss = CrossEntropyLoss(ignore_index=3)(logits, target)
    torch.testing.assert_close(loss, F.cross_entropy(logits, target, ignore_index=3))


def test_all_ignored_gives_zero_with_graph():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.full((2, 4, 4), 255)
    for loss_fn in (CrossEntropyLoss(), CrossEntropyLoss(ohem_thresh=0.7, ohem_min_kept=5)):
        loss = loss_fn(logits, target)
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert torch.equal(logits.grad, torch.zeros_like(logits))


def _ohem_example():
    """Class-0 probabilities (true class 0) per pixel; the last pixel is ignored."""
    p = torch.tensor([0.1, 0.3, 0.5, 0.65, 0.9, 0.05])
    logits = torch.stack([p.log(), (1 - p).log()]).view(1, 2, 2, 3)
    target = torch.tensor([0, 0, 0, 0, 0, 255]).view(1, 2, 3)
    return p, logits, target


@pytest.mark.parametrize(
    ("thresh", "min_kept", "kept"),
    [
        (0.6, 2, [0, 1, 2]),  # threshold alone keeps three (≥ min_kept)
        (0.2, 4, [0, 1, 2, 3]),  # threshold keeps one; topped up to the 4 hardest
        (0.6, 5, [0, 1, 2, 3, 4]),  # min_kept covers every valid pixel, never the ignored one
        (0.6, 100, [0, 1, 2, 3, 4]),
        (0.05, 0, []),  # nothing below threshold, nothing forced → 0
    ],
)
def test_ohem_keeps_expected_pixels(thresh, min_kept, kept):
    p, logits, target = _ohem_example()
    logits.requires_grad_(True)
    loss = CrossEntropyLoss(ohem_thresh=thresh, ohem_min_kept=min_kept)(logits, target)
    expected = -p[kept].log().mean() if kept else torch.tensor(0.0)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    has_grad = logits.grad.abs().sum(1).flatten() > 0
    assert has_grad.nonzero().flatten().tolist() == kept


def test_ohem_with_class_weights():
    p = torch.tensor([0.1, 0.3, 0.8, 0.9])
    logits = torch.stack([p.log(), (1 - p).log()]).view(1, 2, 1, 4)
    # true class 0 for pixels 0, 2; true class 1 for pixels 1, 3 (their p(true) = 1 - p)
    target = torch.tensor([0, 1, 0, 1]).view(1, 1, 4)
    p_true = torch.tensor([0.1, 0.7, 0.8, 0.1])
    loss = CrossEntropyLoss(class_weights=[1.0, 3.0], ohem_thresh=0.5, ohem_min_kept=0)(logits, target)
    kept, w = [0, 3], torch.tensor([1.0, 3.0])
    expected = (w * -p_true[kept].log()).sum() / w.sum()
    torch.testing.assert_close(loss, expected)


def test_ohem_ties_at_kth_are_kept():
    p = torch.tensor([0.2, 0.4, 0.4, 0.9])
    logits = torch.stack([p.log(), (1 - p).log()]).view(1, 2, 1, 4)
    target = torch.zeros(1, 1, 4, dtype=torch.long)
    loss = CrossEntropyLoss(ohem_thresh=0.1, ohem_min_kept=2)(logits, target)
    torch.testing.assert_close(loss, -p[:3].log().mean())


def test_float32_under_autocast():
    logits, target = _data(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = CrossEntropyLoss()(logits.bfloat16(), target)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, F.cross_entropy(logits.bfloat16().float(), target, ignore_index=255))


def test_bad_inputs():
    logits, target = _data()
    with pytest.raises(DataError, match=r"\(2, 6, 6\)"):
        CrossEntropyLoss()(logits, target[:, :, :6])
    with pytest.raises(ConfigError, match="3 values"):
        CrossEntropyLoss(class_weights=[1.0, 1.0, 1.0])(logits, target)
    with pytest.raises(ConfigError, match="ohem_thresh=1.5"):
        CrossEntropyLoss(ohem_thresh=1.5)
    with pytest.raises(ConfigError, match="ohem_min_kept=-1"):
        CrossEntropyLoss(ohem_thresh=0.7, ohem_min_kept=-1)


def test_class_weights_are_a_non_persistent_buffer():
    loss_fn = CrossEntropyLoss(class_weights=[1.0, 2.0])
    assert "class_weights" not in loss_fn.state_dict()
    loss_fn = loss_fn.to(torch.float64)  # buffers follow .to(); the loss stays float32
    logits, target = torch.randn(1, 2, 3, 3), torch.randint(0, 2, (1, 3, 3))
    loss = loss_fn(logits, target)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, F.cross_entropy(logits, target, weight=torch.tensor([1.0, 2.0])))
