import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import timm
import torch
from safetensors.torch import save_file

from scaleseg.errors import CheckpointError, ConfigError
from scaleseg.models.backbone import Backbone


@pytest.mark.parametrize(
    ("output_stride", "strides"),
    [(32, [4, 8, 16, 32]), (16, [4, 8, 16, 16]), (8, [4, 8, 8, 8])],
)
def test_test_resnet_channels_and_strides(output_stride, strides):
    backbone = Backbone("test_resnet", output_stride=output_stride)
    kwargs = {} if output_stride == 32 else {"output_stride": output_stride}
    ref = timm.create_model("test_resnet", features_only=True, out_indices=(1, 2, 3, 4), **kwargs)
    assert backbone.channels == ref.feature_info.channels() == [32, 48, 192, 96]
    assert backbone.strides == ref.feature_info.reduction() == strides
    assert backbone.out_indices == (1, 2, 3, 4)
    x = torch.randn(2, 3, 64, 96)
    feats = backbone(x)
    assert [tuple(f.shape) for f in feats] == [
        (2, c, 64 // s, 96 // s) for c, s in zip(backbone.channels, backbone.strides)
    ]


def test_explicit_out_indices_and_in_chans():
    backbone = Backbone("test_resnet", out_indices=(0, 2), in_chans=1)
    assert backbone.channels == [32, 48]
    assert backbone.strides == [2, 8]
    feats = backbone(torch.randn(1, 1, 32, 32))
    assert [tuple(f.shape) for f in feats] == [(1, 32, 16, 16), (1, 48, 4, 4)]


def test_mean_std_from_pretrained_config():
    backbone = Backbone("test_resnet")
    cfg = timm.data.resolve_data_config({}, model=timm.create_model("test_resnet"))
    assert backbone.mean == tuple(cfg["mean"]) == (0.5, 0.5, 0.5)
    assert backbone.std == tuple(cfg["std"])


def test_hrnet_uses_branch_features():
    backbone = Backbone("hrnet_w18")
    assert backbone.channels == [18, 36, 72, 144]
    assert backbone.strides == [4, 8, 16, 32]
    assert backbone.mean == pytest.approx((0.485, 0.456, 0.406))
    feats = backbone(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(1, 18, 16, 16), (1, 36, 8, 8), (1, 72, 4, 4), (1, 144, 2, 2)]


def test_nhwc_outputs_are_converted():
    backbone = Backbone("test_mambaout").eval()
    assert backbone._nhwc
    x = torch.randn(1, 3, 64, 64)
    feats = backbone(x)
    raw = backbone.model(x)
    for f, r, c, s in zip(feats, raw, backbone.channels, backbone.strides):
        assert f.shape == (1, c, 64 // s, 64 // s)
        torch.testing.assert_close(f, r.permute(0, 3, 1, 2))


def test_unknown_backbone_names_it_and_suggests():
    with pytest.raises(ConfigError) as err:
        Backbone("resnett18")
    msg = str(err.value)
    assert "'resnett18'" in msg and "resnet18" in msg and "\n" not in msg


def test_hrnet_cannot_dilate():
    with pytest.raises(ConfigError) as err:
        Backbone("hrnet_w18", output_stride=8)
    msg = str(err.value)
    assert msg.startswith("backbone 'hrnet_w18' does not support output_stride=8; supported: 32")
    assert "ResNet" in msg and "\n" not in msg


def test_vit_cannot_dilate_and_invalid_output_stride():
    with pytest.raises(ConfigError, match="'test_vit' does not support output_stride=16"):
        Backbone("test_vit", output_stride=16)
    with pytest.raises(ConfigError, match="output_stride=4"):
        Backbone("test_resnet", output_stride=4)


def test_missing_weight_file(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(ConfigError, match=str(path)):
        Backbone("test_resnet", pretrained_file=str(path))


def _random_checkpoint() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = timm.create_model("test_resnet")
    state = model.state_dict()
    for key, value in state.items():  # make BN buffers non-default too
        if value.is_floating_point():
            state[key] = torch.randn_like(value).abs() + 0.1
    return {k: v.contiguous() for k, v in state.items()}


@pytest.mark.parametrize("suffix", ["safetensors", "pth"])
def test_loads_local_weights(tmp_path, suffix):
    state = _random_checkpoint()
    path = tmp_path / f"test_resnet.{suffix}"
    if suffix == "safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    backbone = Backbone("test_resnet", pretrained_file=str(path), output_stride=8)
    loaded = backbone.model.state_dict()
    assert len(loaded) > 50
    for key, value in loaded.items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)
    # a randomly initialised backbone does not hold these weights
    fresh = Backbone("test_resnet").model.state_dict()
    assert not torch.equal(fresh["conv1.0.weight"], state["conv1.0.weight"])


def test_checkpoint_with_foreign_keys_is_rejected(tmp_path):
    state = {"backbone." + k: v for k, v in _random_checkpoint().items()}
    path = tmp_path / "prefixed.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match="prefixed.safetensors"):
        Backbone("test_resnet", pretrained_file=str(path))


def test_wrong_architecture_checkpoint_is_rejected(tmp_path):
    state = timm.create_model("test_efficientnet").state_dict()
    path = tmp_path / "effnet.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="effnet.pth"):
        Backbone("test_resnet", pretrained_file=str(path))
