"""EMA weights (train.ema_decay): the update formula, swapping for validation, checkpoints, resume."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from scaleseg.config import load_config
from scaleseg.engine.ema import CHECKPOINT_KEY, EMAWeights, check_no_ema, warmup_decay
from scaleseg.errors import CheckpointError, ConfigError

from test_train_integration import TINY, _config, final_state, scaleseg


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))


def _set(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
        model[1].running_mean.fill_(value)


def test_ema_update_swap_checkpoint_and_restore_by_hand():
    d = 0.95  # the warm-up caps the first updates' decay at (1 + n) / (10 + n): 0.1, 2/11, ...
    model = _net()
    pl = SimpleNamespace(model=model)
    cb = EMAWeights(d)
    cb.on_train_start(None, pl)
    _set(model, 2.0)
    cb.on_train_batch_end(None, pl, None, None, 0)  # first update copies the weights
    _set(model, 6.0)
    cb.on_train_batch_end(None, pl, None, None, 1)
    d1 = warmup_decay(d, 1)
    assert d1 == pytest.approx(2 / 11)
    ema = d1 * 2.0 + (1 - d1) * 6.0
    assert torch.allclose(cb.ema.module[0].weight, torch.full_like(model[0].weight, ema))
    assert torch.allclose(cb.ema.module[1].running_mean, torch.full((2,), ema))  # buffers averaged too

    cb.on_validation_start(None, pl)  # validation sees the EMA weights ...
    assert torch.allclose(model[0].weight, torch.full_like(model[0].weight, ema))
    ckpt = {"state_dict": {f"model.{k}": v.clone() for k, v in model.state_dict().items()}}
    cb.on_save_checkpoint(None, pl, ckpt)  # (a save while swapped keeps the training weights aside)
    cb.on_validation_end(None, pl)  # ... and training continues from its own
    assert torch.allclose(model[0].weight, torch.full_like(model[0].weight, 6.0))

    # the checkpoint's state_dict is the EMA; the training weights and the count ride along
    assert torch.allclose(ckpt["state_dict"]["model.0.weight"], torch.full((2, 1, 1, 1), ema))
    assert torch.allclose(ckpt[CHECKPOINT_KEY]["train_weights"]["0.weight"], torch.full((2, 1, 1, 1), 6.0))
    assert ckpt[CHECKPOINT_KEY]["n_averaged"] == 2

    # resume: Lightning loads state_dict (EMA) into the model, then the callback restores the rest
    model2 = _net()
    model2.load_state_dict({k[len("model."):]: v for k, v in ckpt["state_dict"].items()})
    pl2 = SimpleNamespace(model=model2)
    cb2 = EMAWeights(d)
    cb2.on_load_checkpoint(None, pl2, ckpt)
    cb2.on_train_start(None, pl2)
    assert torch.allclose(model2[0].weight, torch.full_like(model2[0].weight, 6.0))
    assert torch.allclose(cb2.ema.module[0].weight, torch.full_like(model2[0].weight, ema))
    assert int(cb2.ema.n_averaged) == 2
    _set(model2, 10.0)
    cb2.on_train_batch_end(None, pl2, None, None, 2)
    d2 = warmup_decay(d, 2)  # 3/12: the count survived the resume
    assert torch.allclose(cb2.ema.module[0].weight, torch.full_like(model2[0].weight, d2 * ema + (1 - d2) * 10.0))
    assert warmup_decay(d, 10_000) == d
    cb2.on_fit_end(None, pl2)  # the final model (model.safetensors) holds the EMA
    assert torch.allclose(model2[0].weight, cb2.ema.module[0].weight)


def test_ema_checkpoint_mismatches_are_one_line_errors():
    with pytest.raises(CheckpointError, match="trained without EMA"):
        EMAWeights(0.9).on_load_checkpoint(None, SimpleNamespace(model=_net()), {"state_dict": {}})
    with pytest.raises(CheckpointError, match="holds EMA weights"):
        check_no_ema({CHECKPOINT_KEY: {"decay": 0.9}})
    check_no_ema({"state_dict": {}})
    with pytest.raises(ConfigError, match="train.ema_decay"):
        load_config(None, ["train.ema_decay=1.0"])
    with pytest.raises(ConfigError, match="eval.infer_scale"):
        load_config(None, ["eval.infer_scale=0"])


def test_ema_run_resumes_exactly_and_exports_the_ema_weights(tmp_path):
    args = [*_config(tmp_path), *TINY, "train.epochs=2", "train.checkpoint_every_n_steps=1", "train.ema_decay=0.6"]
    full = tmp_path / "full"
    scaleseg("train", *args, f"output_dir={full}", "--quiet")
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "scaleseg.cli", "train", *args, f"output_dir={killed}", "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    step_ckpt = killed / "checkpoints" / "last_step.ckpt"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if step_ckpt.exists() and torch.load(step_ckpt, weights_only=True)["global_step"] >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "training ended before it could be killed; the test proves nothing"
    scaleseg("train", *args, f"output_dir={killed}", "--resume", "auto", "--quiet")

    (m_full, w_full), (m_killed, w_killed) = final_state(full), final_state(killed)
    assert m_full["confusion_matrix"] == m_killed["confusion_matrix"]
    for key in w_full:
        assert torch.equal(w_full[key], w_killed[key]), key
    # model.safetensors = the checkpoint's state_dict = the EMA, which differs from the training weights
    last = torch.load(full / "checkpoints" / "last.ckpt", weights_only=True)
    train_w = last[CHECKPOINT_KEY]["train_weights"]
    assert last[CHECKPOINT_KEY]["n_averaged"] == 8
    differs = 0
    for key, value in w_full.items():
        assert torch.equal(last["state_dict"][f"model.{key}"], value), key
        differs += int(value.is_floating_point() and not torch.equal(train_w[key], value))
    assert differs > 0
    # a run without EMA refuses to continue from EMA weights
    # (a resume of the same folder restores the run's own config, EMA included, so a new folder resumes
    # from the EMA run's checkpoint file)
    proc = scaleseg("train", *_config(tmp_path), *TINY, "train.epochs=3", f"output_dir={tmp_path / 'no_ema'}",
                    "--resume", str(full / "checkpoints" / "last.ckpt"), "--force", "--quiet", check=False)
    assert proc.returncode != 0 and "holds EMA weights" in proc.stderr




def test_init_weights_starts_training_from_a_file(tmp_path):
    first = tmp_path / "first"
    scaleseg("train", *_config(tmp_path), *TINY, "train.epochs=1", f"output_dir={first}", "--quiet")
    second = tmp_path / "second"
    # lr 1e-30 (lr must be > 0): float32 weights of magnitude > 1e-20 do not move, so the parameters stay
    # exactly what train.init_weights loaded (BN statistics still move)
    scaleseg("train", *_config(tmp_path), *TINY, "train.epochs=1", "optim.lr=1e-30", f"output_dir={second}",
             f"train.init_weights={first / 'model.safetensors'}", "--quiet")
    w1, w2 = final_state(first)[1], final_state(second)[1]
    params = [k for k in w1 if k.endswith("weight") and "bn" not in k and w1[k].ndim == 4]
    assert params and all(torch.equal(w1[k], w2[k]) for k in params)
    proc = scaleseg("train", *_config(tmp_path), *TINY, f"output_dir={tmp_path / 'third'}",
                    f"train.init_weights={tmp_path / 'missing.safetensors'}", "--quiet", check=False)
    assert proc.returncode != 0 and "missing.safetensors" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
