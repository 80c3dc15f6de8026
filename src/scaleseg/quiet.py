"""Quiet output: scaleseg prints its own progress and results, not its dependencies' chatter.

Unless ``-v`` is given, the CLI hides Lightning's info lines (device availability, vendor tips such
as "💡 Tip: ... litlogger / litmodels", the model summary, "`Trainer.fit` stopped") and dependency
deprecation warnings (``DeprecationWarning``, ``FutureWarning`` such as torch's ``_pytree``
``LeafSpec`` notice, Lightning's ``PossibleUserWarning`` hints). Warnings raised by scaleseg itself
and all errors still show. Forked DataLoader workers inherit the filters.
"""
from __future__ import annotations

import logging
import warnings

LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")
# UserWarnings of Lightning about situations scaleseg creates on purpose
EXPECTED_WARNINGS = (
    r".*Checkpoint directory .* exists and is not empty.*",
    r".*does not have many workers.*",
    r".*The number of training batches .* is smaller than the logging interval.*",
    r".*Experiment logs directory .* exists and is not empty.*",
)


_quiet = False  # set by the CLI; the Python API keeps the libraries' defaults


def quiet_vendor_output(verbose: bool = False) -> None:
    """Install the warning filters now and mark Lightning for :func:`silence_lightning` (idempotent);
    with ``verbose`` leave everything as the libraries set it."""
    global _quiet
    _quiet = not verbose
    if verbose:
        return
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for pattern in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def silence_lightning() -> None:
    """Lower Lightning's loggers to warnings. Call after Lightning is imported (its import sets them
    to INFO) and before a Trainer is built."""
    if not _quiet:
        for name in ("lightning.pytorch", "lightning.fabric"):  # their own default
            logging.getLogger(name).setLevel(logging.INFO)
        return
    from lightning.fabric.utilities.warnings import PossibleUserWarning

    warnings.filterwarnings("ignore", category=PossibleUserWarning)
    for name in LIGHTNING_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
