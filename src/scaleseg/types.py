"""Small shared types: the per-step information handed to models during training."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepInfo:
    """Where training is: ``step`` counts optimiser steps from 0 to ``max_steps`` (exclusive)."""

    step: int = 0
    max_steps: int = 1
    epoch: int = 0

    @property
    def progress(self) -> float:
        """Fraction of training done, in [0, 1)."""
        return self.step / max(self.max_steps, 1)
