"""Dataset specification: class names, palette, ignore id and the raw-id → train-id lookup table."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IGNORE_INDEX = 255


@dataclass(frozen=True)
class DatasetSpec:
    """What a label map means.

    ``label_map`` is an optional 256-entry uint8 lookup table applied to raw label PNG values at load
    time (raw id → train id, ``IGNORE_INDEX`` for ignored ids). Without it, raw values are train ids.
    After the lookup every value must lie in ``[0, num_classes) ∪ {ignore_index}``.
    """

    name: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    ignore_index: int = IGNORE_INDEX
    label_map: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.classes) != len(self.palette):
            raise ValueError(
                f"dataset '{self.name}': {len(self.classes)} classes but {len(self.palette)} palette colours"
            )
        if self.label_map is not None and self.label_map.shape != (256,):
            raise ValueError(f"dataset '{self.name}': label_map must have 256 entries, got {self.label_map.shape}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def encode(self, raw: np.ndarray) -> np.ndarray:
        """Raw label values (H×W uint8) → train ids (H×W uint8, ignore = ``ignore_index``)."""
        if self.label_map is None:
            return raw
        return self.label_map[raw]

    def palette_array(self) -> np.ndarray:
        """256×3 uint8 colour table; ids without a class (ignore included) are black."""
        table = np.zeros((256, 3), np.uint8)
        table[: self.num_classes] = np.asarray(self.palette, np.uint8)
        return table
