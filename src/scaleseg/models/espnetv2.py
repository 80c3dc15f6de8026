"""ESPNetv2 (Mehta et al., CVPR 2019): EESP units, the EESPNet encoder and the segmentation decoder.

timm has no ESPNetv2, so this is written after ``sacmehta/EdgeNets`` (``nn_layers/eesp.py``,
``nn_layers/efficient_pyramid_pool.py``, ``nn_layers/efficient_pt.py``,
``model/classification/espnetv2.py``, ``model/segmentation/espnetv2.py``; dsrl.md §7), the code the
official DSRL release is built on. It plugs into the model contract as a backbone + head pair::

    model = espnetv2_seg(num_classes=19, s=2.0)     # SegmentationModel(ESPNetv2Backbone, ESPNetv2Head)

``ESPNetv2Backbone(x)`` returns the encoder levels 1–4 (strides 2, 4, 8, 16); ``ESPNetv2Head`` returns
``{"logits": B×K×H/2×W/2, "feats": B×32×H/2×W/2}`` (``feats`` is the decoder feature that enters the
last pyramid-pool block, used by the DSRL SISR branch). ``SegmentationModel`` upsamples the logits to
the input size; ``model.head(model.backbone(x))["logits"]`` gives the 1/2-resolution logits.

Module and parameter names follow EdgeNets (``level1``, ``level2_0``, ``level3``, ``bu_dec_l1``,
``merge_enc_dec_l2``, …) so EdgeNets / DSRL checkpoints can be mapped onto this model by a prefix
change (``base_net.`` → ``backbone.``, decoder modules → ``head.``); see
:func:`edgenets_key_map`. Deliberate differences from EdgeNets:

* decoder upsampling resizes to the skip connection's size (bilinear, ``align_corners=True`` as
  upstream) instead of ``scale_factor=2``, so odd feature sizes cannot break the additions;
* the input reinforcement pools the image a fixed number of times (level index) instead of looping
  until the widths match (same result for every size, no infinite loop on non-square inputs);
* the final upsampling to the input size is done by ``SegmentationModel`` with
  ``align_corners=False`` by default; EdgeNets uses ``True``. ``align_corners=True`` on the head
  (config ``model.espnetv2.align_corners``, set by ``scaleseg convert --from edgenets``) reproduces
  the official output: with the official Cityscapes checkpoints the logits then equal EdgeNets'
  exactly, while ``False`` moves them by up to 1.6 and changes the argmax of 0.2–0.7 % of the pixels
  of CamVid street images (``docs/fidelity.md``). ``False`` stays the default for models trained here
  because it is the convention of every other scaleseg model;
* ``num_classes`` is the real number of classes (EdgeNets' Cityscapes model has 20 outputs, the 20th
  a "background" class that its evaluation maps to void; here void pixels are label 255 and
  ignored). The pyramid-pool projection width is ``min(K // 2, 16)`` in EdgeNets, so a 19-class head
  needs ``proj_planes=10`` to take the 20-output checkpoint (:func:`scaleseg.convert.convert_edgenets`
  drops the background output row).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import init

from scaleseg.errors import ConfigError
from scaleseg.models.pooling import adaptive_avg_pool2d

__all__ = [
    "CHANNELS",
    "DownSampler",
    "EESP",
    "ESPNetv2Backbone",
    "ESPNetv2Head",
    "EfficientPWConv",
    "EfficientPyrPool",
    "edgenets_key_map",
    "espnetv2_seg",
]

CHANNELS: dict[float, tuple[int, ...]] = {
    0.5: (16, 32, 64, 128, 256, 1024),
    1.0: (32, 64, 128, 256, 512, 1024),
    1.25: (32, 80, 160, 320, 640, 1024),
    1.5: (32, 96, 192, 384, 768, 1024),
    2.0: (32, 128, 256, 512, 1024, 1280),
}
"""EdgeNets ``sc_ch_dict``: width multiplier s → channels of levels 1–5 and the classifier."""

REPEATS = (0, 3, 7, 3)  # EESP units after the down-sampler of levels 2, 3, 4, 5
RECEPTIVE_LIMITS = (13, 11, 9, 7, 5)  # largest effective kernel of an EESP unit per spatial level
BRANCHES = 4
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- small layers
class CBR(nn.Module):
    """Conv (no bias) → BN → PReLU, "same" padding: ``B×n_in×H×W → B×n_out×H/stride×W/stride``."""

    def __init__(self, n_in: int, n_out: int, k: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(n_in, n_out, k, stride=stride, padding=(k - 1) // 2, bias=False, groups=groups)
        self.bn = nn.BatchNorm2d(n_out)
        self.act = nn.PReLU(n_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


class CB(nn.Module):
    """Conv (no bias) → BN."""

    def __init__(self, n_in: int, n_out: int, k: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(n_in, n_out, k, stride=stride, padding=(k - 1) // 2, bias=False, groups=groups)
        self.bn = nn.BatchNorm2d(n_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


class BR(nn.Module):
    """BN → PReLU."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(n)
        self.act = nn.PReLU(n)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(x))


class CDilated(nn.Module):
    """Dilated 3×3 conv (no bias), padding keeps the size at stride 1."""

    def __init__(self, n_in: int, n_out: int, k: int, stride: int = 1, d: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            n_in, n_out, k, stride=stride, padding=(k - 1) // 2 * d, bias=False, dilation=d, groups=groups
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class _SeqBR(nn.Module):
    """EdgeNets ``cnn_utils.BR`` (keys ``br.0/1``): BN → PReLU."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.br = nn.Sequential(nn.BatchNorm2d(n), nn.PReLU(n))

    def forward(self, x: Tensor) -> Tensor:
        return self.br(x)


class _SeqCBR(nn.Module):
    """EdgeNets ``cnn_utils.CBR`` (keys ``cbr.0/1/2``): conv → BN → PReLU."""

    def __init__(self, n_in: int, n_out: int, k: int, groups: int = 1) -> None:
        super().__init__()
        self.cbr = nn.Sequential(
            nn.Conv2d(n_in, n_out, k, padding=(k - 1) // 2, bias=False, groups=groups),
            nn.BatchNorm2d(n_out),
            nn.PReLU(n_out),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.cbr(x)


class Shuffle(nn.Module):
    """Channel shuffle with ``groups`` groups: ``B×(g·c)×H×W → B×(c·g)×H×W``."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        return x.view(b, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(b, c, h, w)


# --------------------------------------------------------------------------- EESP units
def eesp_dilations(k: int, r_lim: int) -> list[int]:
    """Dilations of the k depthwise 3×3 branches: effective kernels 3, 5, 7, … (3 + 2i), any kernel
    above the receptive-field limit ``r_lim`` replaced by 3 (d = 1), sorted ascending.

    >>> eesp_dilations(4, 13), eesp_dilations(4, 7)
    ([1, 2, 3, 4], [1, 1, 2, 3])
    """
    sizes = sorted(3 + 2 * i if 3 + 2 * i <= r_lim else 3 for i in range(k))
    return [(s - 1) // 2 for s in sizes]


class EESP(nn.Module):
    """Extremely efficient spatial pyramid unit: reduce → split → transform → merge.

    ``B×n_in×H×W → B×n_out×H/stride×W/stride``: grouped 1×1 CBR to n = n_out/k channels, k depthwise
    dilated 3×3 branches (:func:`eesp_dilations`), hierarchical fusion (branch i += branch i−1),
    concat → BN+PReLU → grouped 1×1 conv + BN, residual add when shapes match, PReLU. With
    ``stride=2, down_method="avg"`` the pre-activation merge is returned (the DownSampler adds and
    activates it).
    """

    def __init__(
        self, n_in: int, n_out: int, stride: int = 1, k: int = BRANCHES, r_lim: int = 7, down_method: str = "esp"
    ) -> None:
        super().__init__()
        if n_in % k or n_out % (k * k):
            raise ConfigError(
                f"EESP: n_in={n_in} must be divisible by k={k} and n_out={n_out} by k²={k * k} "
                "(grouped 1×1 convs with k groups on n_out/k channels)"
            )
        if down_method not in ("avg", "esp"):
            raise ConfigError(f"EESP: down_method={down_method!r}, expected 'avg' or 'esp'")
        n = n_out // k
        self.stride = stride
        self.proj_1x1 = CBR(n_in, n, 1, stride=1, groups=k)
        self.spp_dw = nn.ModuleList(
            CDilated(n, n, 3, stride=stride, groups=n, d=d) for d in eesp_dilations(k, r_lim)
        )
        self.conv_1x1_exp = CB(n_out, n_out, 1, 1, groups=k)
        self.br_after_cat = BR(n_out)
        self.module_act = nn.PReLU(n_out)
        self.down_avg = down_method == "avg"

    def forward(self, x: Tensor) -> Tensor:
        reduced = self.proj_1x1(x)
        outputs = [self.spp_dw[0](reduced)]
        for branch in self.spp_dw[1:]:
            outputs.append(branch(reduced) + outputs[-1])  # hierarchical feature fusion
        expanded = self.conv_1x1_exp(self.br_after_cat(torch.cat(outputs, dim=1)))
        if self.stride == 2 and self.down_avg:
            return expanded
        if expanded.shape == x.shape:
            expanded = expanded + x
        return self.module_act(expanded)


class DownSampler(nn.Module):
    """Strided EESP (``n_out − n_in`` ch) ‖ 3×3 average pool (``n_in`` ch), plus input reinforcement.

    ``forward(x B×n_in×H×W, image B×3×H0×W0 | None) → B×n_out×⌈H/2⌉×⌈W/2⌉``. Reinforcement: the image is
    average-pooled (3×3, stride 2, pad 1) ``image_pools`` times to the output size, then
    ``CBR(3, 3, 3) → CB(3, n_out, 1)`` is added before the PReLU.
    """

    def __init__(self, n_in: int, n_out: int, *, k: int = BRANCHES, r_lim: int = 9, reinf: bool = True,
                 image_pools: int = 1, image_channels: int = 3) -> None:
        super().__init__()
        self.eesp = EESP(n_in, n_out - n_in, stride=2, k=k, r_lim=r_lim, down_method="avg")
        self.avg = nn.AvgPool2d(kernel_size=3, padding=1, stride=2)
        self.inp_reinf = (
            nn.Sequential(CBR(image_channels, image_channels, 3, 1), CB(image_channels, n_out, 1, 1)) if reinf else None
        )
        self.image_pools = image_pools
        self.act = nn.PReLU(n_out)

    def forward(self, x: Tensor, image: Tensor | None = None) -> Tensor:
        avg_out = self.avg(x)
        out = torch.cat([avg_out, self.eesp(x)], dim=1)
        if image is not None and self.inp_reinf is not None:
            for _ in range(self.image_pools):
                image = F.avg_pool2d(image, kernel_size=3, padding=1, stride=2)
            out = out + self.inp_reinf(image)
        return self.act(out)


# --------------------------------------------------------------------------- encoder
def _channels(s: float) -> tuple[int, ...]:
    if s not in CHANNELS:
        raise ConfigError(f"ESPNetv2: width multiplier s={s!r} is not supported; expected one of {sorted(CHANNELS)}")
    return CHANNELS[s]


class ESPNetv2Backbone(nn.Module):
    """EESPNet encoder levels 1–4 (level 5 and the classifier are dropped, as in EdgeNets' seg net).

    ``B×3×H×W → [B×c1×H/2, B×c2×H/4, B×c3×H/8, B×c4×H/16]`` (each ⌈·⌉). Backbone interface of
    ``SegmentationModel``: ``channels``, ``strides`` (2, 4, 8, 16), ``mean``/``std`` (ImageNet).
    """

    def __init__(self, s: float = 2.0, *, input_reinforcement: bool = True) -> None:
        super().__init__()
        ch = _channels(s)
        lim = RECEPTIVE_LIMITS
        reinf = input_reinforcement
        self.level1 = CBR(3, ch[0], 3, 2)
        self.level2_0 = DownSampler(ch[0], ch[1], r_lim=lim[0], reinf=reinf, image_pools=2)
        self.level3_0 = DownSampler(ch[1], ch[2], r_lim=lim[1], reinf=reinf, image_pools=3)
        self.level3 = nn.ModuleList(EESP(ch[2], ch[2], stride=1, r_lim=lim[2]) for _ in range(REPEATS[1]))
        self.level4_0 = DownSampler(ch[2], ch[3], r_lim=lim[2], reinf=reinf, image_pools=4)
        self.level4 = nn.ModuleList(EESP(ch[3], ch[3], stride=1, r_lim=lim[3]) for _ in range(REPEATS[2]))
        self.input_reinforcement = reinf
        self.s = s
        self.channels: list[int] = list(ch[:4])
        self.strides: list[int] = [2, 4, 8, 16]
        self.mean: tuple[float, ...] = IMAGENET_MEAN
        self.std: tuple[float, ...] = IMAGENET_STD
        _init_params(self)

    def forward(self, x: Tensor) -> list[Tensor]:
        image = x if self.input_reinforcement else None
        l1 = self.level1(x)
        l2 = self.level2_0(l1, image)
        l3 = self.level3_0(l2, image)
        for layer in self.level3:
            l3 = layer(l3)
        l4 = self.level4_0(l3, image)
        for layer in self.level4:
            l4 = layer(l4)
        return [l1, l2, l3, l4]

    def extra_repr(self) -> str:
        return f"s={self.s}, channels={self.channels}, strides={self.strides}"


# --------------------------------------------------------------------------- decoder
class EfficientPyrPool(nn.Module):
    """Efficient pyramid pooling: ``B×in×H×W → B×out×H×W``.

    1×1 CBR projection → per scale in (2.0, 1.5, 1.0, 0.5, 0.1) a depthwise 3×3 conv at that scale
    (sizes ⌈h·scale⌉, at least 5; bilinear/adaptive-pool back to h×w; the pooling is
    :func:`scaleseg.models.pooling.adaptive_avg_pool2d`, exportable at any size) → concat → BN+PReLU → channel
    shuffle → grouped 3×3 CBR → 1×1 conv (+ BN+PReLU unless ``last_layer_br=False``).
    """

    def __init__(self, in_planes: int, proj_planes: int, out_planes: int,
                 scales: Sequence[float] = (2.0, 1.5, 1.0, 0.5, 0.1), last_layer_br: bool = True) -> None:
        super().__init__()
        self.scales = sorted(scales, reverse=True)
        n = len(self.scales)
        self.projection_layer = _SeqCBR(in_planes, proj_planes, 1)
        self.stages = nn.ModuleList(
            nn.Conv2d(proj_planes, proj_planes, 3, padding=1, bias=False, groups=proj_planes) for _ in self.scales
        )
        self.merge_layer = nn.Sequential(
            _SeqBR(proj_planes * n),
            Shuffle(groups=n),
            _SeqCBR(proj_planes * n, proj_planes, 3, groups=proj_planes),
            nn.Conv2d(proj_planes, out_planes, 1, bias=not last_layer_br),
        )
        self.br = _SeqBR(out_planes) if last_layer_br else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.projection_layer(x)
        height, width = x.shape[2:]
        branches = []
        for scale, stage in zip(self.scales, self.stages):
            size = (torch.sym_max(math.ceil(height * scale), 5), torch.sym_max(math.ceil(width * scale), 5))
            if scale < 1.0:
                h = adaptive_avg_pool2d(x, size)
                h = F.interpolate(stage(h), (height, width), mode="bilinear", align_corners=True)
            elif scale > 1.0:
                h = F.interpolate(x, size, mode="bilinear", align_corners=True)
                h = adaptive_avg_pool2d(stage(h), (height, width))
            else:
                h = stage(x)
            branches.append(h)
        out = self.merge_layer(torch.cat(branches, dim=1))
        return self.br(out) if self.br is not None else out


class EfficientPWConv(nn.Module):
    """Skip merge: grouped 3×3 CBR (groups = gcd(in, out)) gated by a global-pool → 1×1 → sigmoid weight.

    ``B×in×H×W → B×out×H×W``.
    """

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.wt_layer = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(n_in, n_out, 1, bias=False), nn.Sigmoid()
        )
        self.expansion_layer = _SeqCBR(n_in, n_out, 3, groups=math.gcd(n_in, n_out))

    def forward(self, x: Tensor) -> Tensor:
        return self.expansion_layer(x) * self.wt_layer(x)


class ESPNetv2Head(nn.Module):
    """ESPNetv2 segmentation decoder (EdgeNets ``ESPNetv2Segmentation``, ``dataset='city'``, base 16).

    ``features`` = ``ESPNetv2Backbone`` levels 1–4 → ``{"logits": B×K×h1×w1, "feats": B×32×h1×w1}``
    at level 1's resolution (stride 2). Four EfficientPyrPool blocks with 64, 48, 32, K outputs;
    between them bilinear ×2 (to the skip's size) + EfficientPWConv skip from levels 3, 2, 1 + BN+PReLU.
    ``feats`` is the 32-channel decoder feature fed to the last block. Head attributes as in
    ``scaleseg.models.heads``: ``context()``/``decode()``, ``context_channels``, ``feat_channels``,
    ``feature_index`` (0: logits at the backbone's level-1 stride), ``num_classes``.

    ``proj_planes``: width of every pyramid-pool projection (EdgeNets: ``min(K // 2, base_planes)``,
    the default). ``align_corners``: how ``SegmentationModel`` upsamples the stride-2 logits to the
    input (attribute ``upsample_align_corners``; EdgeNets: True, scaleseg default False).
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, *, base_planes: int = 16,
                 proj_planes: int | None = None, align_corners: bool = False) -> None:
        super().__init__()
        if len(in_channels) != 4:
            raise ConfigError(f"ESPNetv2Head: expected the 4 encoder levels' channels, got {list(in_channels)}")
        if num_classes < 2:
            raise ConfigError(f"ESPNetv2Head: num_classes={num_classes}, expected ≥ 2")
        if proj_planes is not None and proj_planes < 1:
            raise ConfigError(f"ESPNetv2Head: proj_planes={proj_planes}, expected ≥ 1")
        planes = [4 * base_planes, 3 * base_planes, 2 * base_planes, num_classes]
        # EdgeNets ties the pyramid-pool projection width to the class count; a model fine-tuned from
        # another dataset's checkpoint keeps that checkpoint's width (proj_planes) to reuse its decoder
        proj = proj_planes if proj_planes is not None else min(num_classes // 2, base_planes)
        self.proj_planes = proj
        self.upsample_align_corners = bool(align_corners)
        self.bu_dec_l1 = EfficientPyrPool(in_channels[3], proj, planes[0])
        self.bu_dec_l2 = EfficientPyrPool(planes[0], proj, planes[1])
        self.bu_dec_l3 = EfficientPyrPool(planes[1], proj, planes[2])
        self.bu_dec_l4 = EfficientPyrPool(planes[2], proj, planes[3], last_layer_br=False)
        self.merge_enc_dec_l2 = EfficientPWConv(in_channels[2], planes[0])
        self.merge_enc_dec_l3 = EfficientPWConv(in_channels[1], planes[1])
        self.merge_enc_dec_l4 = EfficientPWConv(in_channels[0], planes[2])
        self.bu_br_l2 = nn.Sequential(nn.BatchNorm2d(planes[0]), nn.PReLU(planes[0]))
        self.bu_br_l3 = nn.Sequential(nn.BatchNorm2d(planes[1]), nn.PReLU(planes[1]))
        self.bu_br_l4 = nn.Sequential(nn.BatchNorm2d(planes[2]), nn.PReLU(planes[2]))
        self.num_classes = num_classes
        self.context_channels = planes[0]
        self.feat_channels = planes[2]
        self.feature_index = 0
        _init_params(self)

    def context(self, features: list[Tensor]) -> Tensor:
        """First pyramid-pool block on level 4: ``B×64×h16×w16``."""
        return self.bu_dec_l1(features[3])

    def decode(self, context: Tensor, features: list[Tensor]) -> dict[str, Tensor]:
        """Three up-merge-decode steps to level 1's resolution."""
        out = self._merge(context, features[2], self.merge_enc_dec_l2, self.bu_br_l2)
        out = self.bu_dec_l2(out)
        out = self._merge(out, features[1], self.merge_enc_dec_l3, self.bu_br_l3)
        out = self.bu_dec_l3(out)
        feats = self._merge(out, features[0], self.merge_enc_dec_l4, self.bu_br_l4)
        return {"logits": self.bu_dec_l4(feats), "feats": feats}

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        """Encoder levels 1–4 → ``{"logits": B×K×h1×w1, "feats": B×32×h1×w1}``."""
        return self.decode(self.context(features), features)

    @staticmethod
    def _merge(x: Tensor, skip: Tensor, merge: nn.Module, br: nn.Module) -> Tensor:
        x = F.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=True)
        return br(x + merge(skip))


# --------------------------------------------------------------------------- assembly
def espnetv2_seg(num_classes: int, s: float = 2.0, *, criterion: nn.Module | None = None,
                 proj_planes: int | None = None, align_corners: bool = False) -> nn.Module:
    """ESPNetv2 segmentation network as a ``SegmentationModel`` (logits at the input size).

    ``proj_planes`` / ``align_corners``: see :class:`ESPNetv2Head` (EdgeNets' official Cityscapes
    model as 19 classes: ``proj_planes=10, align_corners=True``).
    Parameters for s = 2.0: 0.79 M with EdgeNets' 20 Cityscapes outputs (see ``tests/test_espnetv2.py``).
    ``proj_planes``: the decoder's pyramid-pool projection width (default EdgeNets' ``min(K // 2, 16)``).
    """
    from scaleseg.models.segmentor import SegmentationModel

    backbone = ESPNetv2Backbone(s)
    head = ESPNetv2Head(backbone.channels, num_classes, proj_planes=proj_planes, align_corners=align_corners)
    return SegmentationModel(backbone, head, num_classes, criterion=criterion)


def edgenets_key_map(key: str) -> str:
    """EdgeNets ``ESPNetv2Segmentation`` state-dict key → key of :func:`espnetv2_seg`'s model.

    ``base_net.level1.conv.weight`` → ``backbone.level1.conv.weight``;
    ``bu_dec_l1.stages.0.weight`` → ``head.bu_dec_l1.stages.0.weight``.
    Verified against the two official Cityscapes checkpoints (``espnetv2_s_2.0_city_{512x256,
    1024x512}.pth``, 526 tensors each): every key maps onto a key of ``espnetv2_seg(20, 2.0)`` with
    the same shape and none is left over (``tests/test_convert.py``).
    """
    if key.startswith("base_net."):
        return "backbone." + key[len("base_net."):]
    return "head." + key


def _init_params(module: nn.Module) -> None:
    """EdgeNets initialisation: Kaiming-normal (fan_out) convs, zero biases, BN weight 1 / bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            init.ones_(m.weight)
            init.zeros_(m.bias)
