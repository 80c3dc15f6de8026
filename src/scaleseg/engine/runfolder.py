"""A run folder (``output_dir``) has one writer, and its record is append-only.

- ``run.lock`` holds ``{pid, host, started, command}`` of the process that trains in the folder. It is
  an ``flock`` lock: the kernel drops it when its process dies, so the lock of a killed run is stale
  by construction and the next ``train`` takes it over (and says so). Where ``flock`` is unavailable
  the PID is checked instead (a lock of a dead PID on this host is taken over).
- ``config.yaml`` is the resolved config, written once when the run starts; each resume writes its
  resolved config to ``resumes/<N>.yaml``. :func:`latest_config_path` is the config in force.
- A resume restores the run's own config; an override that would change what is trained (anything
  but :data:`RESUME_FREE_KEYS`) is refused unless forced (:func:`check_resume_changes`).
- ``metrics.json`` is written when the run finishes and records the epochs it covers, so a resume of
  a finished run can say so and change nothing (:func:`finished_metrics`).

Only the launching process (global rank 0, not a DDP child re-executed by Lightning) touches the
folder's records (:func:`is_launching_process`).
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..config import Config, apply_overrides, from_dict, parse_yaml, to_dict, to_yaml
from ..errors import RunError, ScalesegError
from ..files import atomic_write_text, disk_full_error

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = "run.lock"
RESUMES = "resumes"

# Keys a resume may change freely: where things are, how fast they load, how often things are
# logged or validated. Every other key (model, loss, data augmentation, optimiser, seed, epochs,
# batch size, devices, precision, ...) changes what is trained, so changing it needs --force.
RESUME_FREE_KEYS = (
    "name", "output_dir", "data.root", "data.check", "train.num_workers", "train.progress",
    "train.log_every_n_steps", "train.checkpoint_every_n_steps", "train.val_every_n_epochs",
    "train.accelerator", "train.strategy", "train.val_scales", "eval.",
)

_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def is_launching_process() -> bool:
    """False in the other ranks of a distributed run (DDP children, torchrun / SLURM ranks > 0)."""
    return all(os.environ.get(name, "0") == "0" for name in _RANK_VARIABLES)


def ensure_folder(path: Path, what: str) -> None:
    """Raise a one-line error when ``path`` (or a parent) exists as a file instead of a folder."""
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise ScalesegError(f"{what} {path} cannot be created: {folder} is a file, not a folder")
            return


# --------------------------------------------------------------------------------------------------
# the lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder_text(info: dict[str, Any]) -> str:
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')} (since {info.get('started', '?')})"


class RunLock:
    """Exclusive lock on ``<folder>/run.lock``; use as a context manager or acquire()/release()."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.fd: int | None = None
        self.created_folder = False
        self.taken_over: dict[str, Any] | None = None  # the stale holder's record, if any

    def _record(self) -> bytes:
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().isoformat(timespec="seconds"),
                "command": " ".join(sys.argv)}
        return (json.dumps(info) + "\n").encode()

    @staticmethod
    def _read(fd: int) -> dict[str, Any] | None:
        data = os.pread(fd, 65536, 0)
        if not data.strip():
            return None
        try:
            info = json.loads(data)
        except ValueError:
            return {"pid": "?", "host": "?", "started": "?"}
        return info if isinstance(info, dict) else None

    def _refuse(self, info: dict[str, Any] | None) -> RunError:
        holder = _holder_text(info or {})
        return RunError(f"run folder {self.folder} is in use by {holder}: another 'scaleseg train' writes "
                        "there; wait for it to finish or set output_dir to another folder")

    def acquire(self) -> RunLock:
        ensure_folder(self.folder, "output_dir")
        self.created_folder = not self.folder.exists()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise disk_full_error(err, self.path) or RunError(f"cannot create run folder {self.folder}: {err.strerror}") from None
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if not self._lock(fd):
                    info = self._read(fd)
                    raise self._refuse(info)
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:  # the previous holder removed the file between our open and lock
                    os.close(fd)
                    continue
                self.taken_over = self._read(fd)
                os.ftruncate(fd, 0)
                os.pwrite(fd, self._record(), 0)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                raise
            self.fd = fd
            return self

    def _lock(self, fd: int) -> bool:
        """True when this process now holds the lock."""
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False
            except OSError as err:
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
        # no flock on this file system: the PID recorded in the file decides
        info = self._read(fd)
        if not info:
            return True
        mine = info.get("host") == socket.gethostname()
        pid = info.get("pid")
        return mine and isinstance(pid, int) and (pid == os.getpid() or not _pid_alive(pid))

    def release(self, remove_folder_if_empty: bool = False) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still holding it, so no one locks a removed file
        os.close(self.fd)
        self.fd = None
        if remove_folder_if_empty and self.created_folder:
            with contextlib.suppress(OSError):
                self.folder.rmdir()  # only when empty: a refused command leaves nothing behind

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, kind: Any, value: Any, tb: Any) -> None:
        self.release(remove_folder_if_empty=value is not None)


@contextlib.contextmanager
def hold_run_folder(folder: str | Path, active: bool = True) -> Iterator[RunLock | None]:
    """Lock ``folder`` for this process (when ``active``) and tell the user when a stale lock is taken over."""
    if not active:
        yield None
        return
    with RunLock(folder) as lock:
        if lock.taken_over:
            print(f"scaleseg: taking over the stale lock of {_holder_text(lock.taken_over)} in {folder}: "
                  "that process is gone", file=sys.stderr)
        yield lock


# --------------------------------------------------------------------------------------------------
# the record


def latest_config_path(folder: str | Path) -> Path | None:
    """``resumes/<N>.yaml`` with the largest N, else ``config.yaml``, else None."""
    folder = Path(folder)
    resumes = [p for p in (folder / RESUMES).glob("*.yaml") if p.stem.isdigit()]
    if resumes:
        return max(resumes, key=lambda p: int(p.stem))
    path = folder / "config.yaml"
    return path if path.is_file() else None


def read_run_config(path: Path) -> dict[str, Any]:
    try:
        data = parse_yaml(path.read_text())
    except (OSError, ValueError) as err:
        raise RunError(f"cannot read the run's config {path}: {err}") from None
    if not isinstance(data, dict):
        raise RunError(f"the run's config {path} is not a mapping of sections")
    return data


def write_run_config(folder: Path, cfg: Config, resumed: bool) -> Path:
    """``config.yaml`` for a new run; ``resumes/<N>.yaml`` (N = 1, 2, ...) for each resume."""
    if not resumed:
        return atomic_write_text(folder / "config.yaml", to_yaml(cfg))
    numbers = [int(p.stem) for p in (folder / RESUMES).glob("*.yaml") if p.stem.isdigit()]
    return atomic_write_text(folder / RESUMES / f"{max(numbers, default=0) + 1}.yaml", to_yaml(cfg))


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys; a list of sections (``stages``) by index: ``stages[1].lr``."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):
                out.update(flatten(item, f"{prefix}{key}[{i}]."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed_keys(old: Config, new: Config) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) for every key whose value differs."""
    a, b = flatten(to_dict(old)), flatten(to_dict(new))
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _free(key: str) -> bool:
    return any(key == f or (f.endswith(".") and key.startswith(f)) for f in RESUME_FREE_KEYS)


def check_resume_changes(old: Config, new: Config, force: bool) -> list[tuple[str, Any, Any]]:
    """Refuse (RunError) a resume that changes what is trained, unless ``force``; returns the changes."""
    changes = changed_keys(old, new)
    binding = [c for c in changes if not _free(c[0])]
    if binding and not force:
        shown = ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in binding[:4]) + (" ..." if len(binding) > 4 else "")
        raise RunError(f"--resume would change the model or training schedule of run {new.output_dir}: {shown}; "
                       "a resumed run keeps its own config. Pass --force to change it anyway, or train into a new output_dir")
    return changes


def resume_config(cli_cfg: Config, overrides: list[str]) -> tuple[Config, list[str]]:
    """The config a resume continues with: the run's own latest resolved config with only the
    command line's ``overrides`` applied, and the keys where the YAML file differs (ignored)."""
    folder = Path(cli_cfg.output_dir)
    path = latest_config_path(folder)
    if path is None:
        return cli_cfg, []
    data = read_run_config(path)
    data["output_dir"] = cli_cfg.output_dir  # the folder may have moved since
    try:
        cfg = from_dict(apply_overrides(data, list(overrides)))
    except ScalesegError as err:
        raise RunError(f"the run's config {path} with the overrides: {err}") from None
    ignored = [k for k, _, _ in changed_keys(cfg, cli_cfg)]
    return cfg, ignored


def finished_metrics(folder: Path, cfg: Config) -> dict[str, Any] | None:
    """The metrics of a run that already trained ``cfg.train.epochs`` epochs, else None."""
    path = folder / "metrics.json"
    if not path.is_file() or not (folder / "model.safetensors").is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    epochs = metrics.get("epochs") if isinstance(metrics, dict) else None
    if epochs is None:  # written before metrics recorded their epochs: finished at its own config
        record = latest_config_path(folder)
        epochs = read_run_config(record).get("train", {}).get("epochs") if record else None
    return metrics if isinstance(epochs, int) and epochs >= cfg.train.epochs else None


def refuse_fresh_start(folder: Path, ckpt_dir: Path) -> None:
    """A new run may not start in a folder that holds checkpoints or a finished model."""
    checkpoints = sorted(ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
    if checkpoints:
        shown = next((p for p in checkpoints if p.name == "last.ckpt"), checkpoints[-1])
        raise RunError(f"run folder {folder} already holds {shown}; pass --resume auto to continue it, "
                       "or set output_dir to a new folder")
    for name in ("model.safetensors", "metrics.json"):
        if (folder / name).exists():
            raise RunError(f"run folder {folder} holds a finished run ({folder / name}); set output_dir to a new folder")


def clear_unfinished_records(folder: Path) -> list[Path]:
    """Logs and configs of a run that died before its first checkpoint: nothing can resume them, so a
    new run in the folder replaces them (one history per folder)."""
    removed = []
    for name in ("tensorboard", "csv", RESUMES, "config.yaml"):
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
            removed.append(path)
        elif path.is_file():
            path.unlink()
            removed.append(path)
    return removed
