"""One TensorBoard and one CSV history per run, continued across resumes.

Both loggers use the fixed version ``version_0`` (Lightning would start ``version_N+1`` on every
resume and split one run's curves). On a resume from global step ``S`` the history is cut back to
what the checkpoint covers, so steps replayed after a kill are not logged twice:

- TensorBoard: ``purge_step=S`` (TensorBoard hides events at steps >= S written before the resume);
- CSV: rows at steps >= S are dropped from ``metrics.csv`` (rewritten atomically), and so are the
  validation rows at step ``S - 1`` when the checkpoint was written before that validation ran.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from ..files import atomic_write_text

VERSION = 0


class _ContinuedWriter(ExperimentWriter):
    """Lightning's CSV writer, but an existing ``metrics.csv`` is kept (cut back to the resume point)
    instead of deleted."""

    def __init__(self, log_dir: str, resume_step: int | None, drop_validation_at: int | None) -> None:
        self._resume_step = resume_step
        self._drop_validation_at = drop_validation_at
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        if self._resume_step is None:  # a new run: no history to continue
            path.unlink()
            return
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            header = list(reader.fieldnames or [])
            rows = [row for row in reader if self._keep(row)]
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, out.getvalue())
        self.metrics_keys = sorted(header)

    def _keep(self, row: dict[str, str]) -> bool:
        try:
            step = int(float(row.get("step") or 0))
        except ValueError:
            return True
        assert self._resume_step is not None
        if step >= self._resume_step:
            return False
        validation = any(k.startswith("val/") and v not in ("", None) for k, v in row.items())
        return not (validation and step == self._drop_validation_at)


class ContinuedCSVLogger(CSVLogger):
    """CSVLogger with the fixed version and the cut-back history of :class:`_ContinuedWriter`."""

    def __init__(self, save_dir: str | Path, resume_step: int | None = None, drop_validation_at: int | None = None) -> None:
        super().__init__(save_dir, name="csv", version=VERSION)
        self._resume_step = resume_step
        self._drop_validation_at = drop_validation_at

    @property
    def experiment(self) -> Any:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedWriter(self.log_dir, self._resume_step, self._drop_validation_at)
        return self._experiment


def run_loggers(out: Path, resume_step: int | None = None, resumed_before_validation: bool = False) -> list[Any]:
    """TensorBoard + CSV loggers of the run in ``out``; ``resume_step`` is the checkpoint's global step."""
    tb_kwargs: dict[str, Any] = {}
    if resume_step is not None:
        tb_kwargs["purge_step"] = resume_step
    drop = resume_step - 1 if resume_step is not None and resumed_before_validation else None
    return [
        TensorBoardLogger(out, name="tensorboard", version=VERSION, **tb_kwargs),
        ContinuedCSVLogger(out, resume_step=resume_step, drop_validation_at=drop),
    ]
