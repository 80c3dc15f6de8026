import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from scaleseg.errors import DataError
from scaleseg.losses.ce import CrossEntropyLoss
from scaleseg.models.backbone import Backbone
from scaleseg.models.heads import AuxFCNHead, DeepLabV3PlusHead, FCNHead
from scaleseg.models.segmentor import SegmentationModel
from scaleseg.types import StepInfo

K = 5


def _model(output_stride=32, aux=True, **kwargs):
    torch.manual_seed(0)
    backbone = Backbone("test_resnet", output_stride=output_stride)
    head = DeepLabV3PlusHead(backbone.channels, K, output_stride=output_stride)
    aux_head = AuxFCNHead(backbone.channels[-2], K, channels=16) if aux else None
    return SegmentationModel(backbone, head, K, aux_head=aux_head, **kwargs)


def _reference(model, x, pad_h, pad_w):
    """Pad by hand, run backbone → head, upsample to the padded size, crop."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (0, pad_w, 0, pad_h))
    feats = model.backbone(padded)
    out = model.head(feats)
    size = padded.shape[-2:]

    def up(t):
        return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[..., :h, :w]

    return up(out["logits"]), up(model.aux_head(feats[-2])), out["feats"]


def test_attributes():
    model = _model()
    assert model.num_classes == K
    assert model.stride == 32 and _model(output_stride=8).stride == 8
    assert model.mean == (0.5, 0.5, 0.5) and model.std == (0.5, 0.5, 0.5)


def test_odd_input_is_padded_and_cropped():
    model = _model().eval()
    x = torch.randn(2, 3, 67, 93)
    with torch.no_grad():
        out = model.forward_features(x)
        logits, aux, feats = _reference(model, x, pad_h=96 - 67, pad_w=96 - 93)
    assert out["logits"].shape == (2, K, 67, 93)
    assert out["aux"].shape == (2, K, 67, 93)
    assert out["feats"].shape == (2, 304, 24, 24)  # stride 4 of the padded 96×96 input
    torch.testing.assert_close(out["logits"], logits)
    torch.testing.assert_close(out["aux"], aux)
    torch.testing.assert_close(out["feats"], feats)
    torch.testing.assert_close(model(x), out["logits"])
    # running on the unpadded input gives other logits, so the padding comparison can fail
    with torch.no_grad():
        unpadded = model.head(model.backbone(x))["logits"]
    unpadded = F.interpolate(unpadded, size=(67, 93), mode="bilinear", align_corners=False)
    assert not torch.allclose(unpadded, out["logits"], atol=1e-3)


def test_multiple_of_stride_is_not_padded():
    model = _model(output_stride=8).eval()
    x = torch.randn(1, 3, 40, 48)
    with torch.no_grad():
        out = model.forward_features(x)
        logits, aux, _ = _reference(model, x, 0, 0)
        direct = model.head(model.backbone(x))["logits"]
    torch.testing.assert_close(out["logits"], logits)
    torch.testing.assert_close(out["aux"], aux)
    torch.testing.assert_close(
        out["logits"], F.interpolate(direct, size=(40, 48), mode="bilinear", align_corners=False)
    )


def test_no_aux_head():
    model = _model(aux=False).eval()
    with torch.no_grad():
        out = model.forward_features(torch.randn(1, 3, 32, 32))
    assert set(out) == {"logits", "feats", "head_logits", "grid"}


def _batch():
    torch.manual_seed(1)
    mask = torch.randint(0, K, (2, 40, 36))
    mask[:, :5] = 255
    return {"image": torch.randn(2, 3, 40, 36), "mask": mask}


def test_training_losses_and_aux_weighting():
    model = _model(aux_weight=0.4).train()
    batch = _batch()
    torch.manual_seed(7)
    losses = model.training_losses(batch, StepInfo(0, 10))
    torch.manual_seed(7)  # same dropout masks; BN uses batch statistics in both calls
    out = model.forward_features(batch["image"])
    assert set(losses) == {"ce", "aux"}
    ce = F.cross_entropy(out["logits"], batch["mask"], ignore_index=255)
    aux = F.cross_entropy(out["aux"], batch["mask"], ignore_index=255)
    torch.testing.assert_close(losses["ce"], ce)
    torch.testing.assert_close(losses["aux"], 0.4 * aux)
    sum(losses.values()).backward()
    assert model.aux_head.classifier.weight.grad.abs().sum() > 0


def test_training_losses_custom_criterion_without_aux():
    backbone = Backbone("test_resnet")
    weights = [1.0, 2.0, 0.5, 1.0, 3.0]
    head = FCNHead(backbone.channels, K, channels=16)
    model = SegmentationModel(backbone, head, K, criterion=CrossEntropyLoss(class_weights=weights)).eval()
    batch = _batch()
    losses = model.training_losses(batch, StepInfo())
    assert set(losses) == {"ce"}
    logits = model(batch["image"])
    expected = F.cross_entropy(logits, batch["mask"], weight=torch.tensor(weights), ignore_index=255)
    torch.testing.assert_close(losses["ce"], expected)


def _expected_labels(model, image_uint8):
    x = image_uint8.float() / 255.0
    x = (x - torch.tensor(model.mean).view(-1, 1, 1)) / torch.tensor(model.std).view(-1, 1, 1)
    model.eval()
    with torch.no_grad():
        return model(x.unsqueeze(0))[0].argmax(0)


def test_predict_inputs_agree():
    model = _model()
    model.train()
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (45, 61, 3), dtype=np.uint8)
    tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    expected = _expected_labels(model, tensor)
    model.train()

    by_tensor = model.predict(tensor)
    assert model.training  # mode restored
    assert by_tensor.dtype == torch.int64 and by_tensor.shape == (45, 61)
    torch.testing.assert_close(by_tensor, expected)
    torch.testing.assert_close(model.predict(Image.fromarray(array)), expected)
    torch.testing.assert_close(model.predict(array), expected)
    torch.testing.assert_close(model.predict(tensor.float() / 255.0), expected)
    batched = model.predict(torch.stack([tensor, tensor.flip(-1)]))
    assert batched.shape == (2, 45, 61)
    torch.testing.assert_close(batched[0], expected)
    # labels are not constant, so the comparisons above can fail
    assert expected.unique().numel() > 1


def test_predict_rejects_bad_input():
    model = _model(aux=False)
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        model.predict(torch.full((3, 8, 8), 255.0))
    with pytest.raises(DataError, match="H×W×3"):
        model.predict(np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(DataError, match="3×H×W"):
        model.predict(torch.zeros(4, 8, 8, dtype=torch.uint8))


def test_rmi_criterion_supervises_aux_with_its_bce_part_only():
    from scaleseg.losses.rmi import RMICriterion

    criterion = RMICriterion(K)
    model = _model(aux_weight=0.4, criterion=criterion).train()
    batch = _batch()
    torch.manual_seed(7)
    losses = model.training_losses(batch, StepInfo(0, 10))
    torch.manual_seed(7)
    out = model.forward_features(batch["image"])
    torch.testing.assert_close(losses["ce"], criterion(out["logits"], batch["mask"]))
    torch.testing.assert_close(losses["aux"], 0.4 * criterion.bce_only()(out["aux"], batch["mask"]))
    assert not torch.allclose(losses["aux"], 0.4 * criterion(out["aux"], batch["mask"]))
