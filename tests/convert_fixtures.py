"""Inputs shared by the convert tests and by the (out-of-repo) script that recorded the reference values."""
from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# (row, column) positions of the recorded logits in the 256×512 input: sky, building, road, edges
PIXELS = [[5, 7], [40, 100], [64, 256], [120, 30], [128, 400], [180, 255], [230, 60], [250, 505]]


def street_input(height: int = 256, width: int = 512) -> torch.Tensor:
    """A fixed, street-like ``1×3×H×W`` image (blue sky over grey road, a horizon band with
    vertical façade stripes, a pale kerb), normalised with the ImageNet mean/std. A pure function
    of the size: no RNG, so its outputs can be recorded once and compared exactly."""
    y = torch.linspace(0.0, 1.0, height).view(height, 1).expand(height, width)
    x = torch.linspace(0.0, 1.0, width).view(1, width).expand(height, width)
    sky = torch.stack([0.45 + 0.2 * (1 - y), 0.6 + 0.2 * (1 - y), 0.85 + 0.1 * (1 - y)])
    facade = torch.stack([0.5 + 0.15 * torch.sin(60 * x), 0.42 + 0.12 * torch.sin(60 * x), 0.38 + 0.1 * torch.sin(60 * x)])
    road = torch.stack([0.35 + 0.05 * torch.sin(200 * x * y), 0.35 + 0.05 * torch.sin(200 * x * y), 0.37 + 0.04 * torch.cos(150 * y)])
    kerb = torch.full((3, height, width), 0.75)
    image = torch.where(y < 0.3, sky, torch.where(y < 0.55, facade, road))
    image = torch.where(((y - 0.55 - 0.1 * (x - 0.5).abs()).abs() < 0.015), kerb, image)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((image.clamp(0, 1) - mean) / std).unsqueeze(0).float()
