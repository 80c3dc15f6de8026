"""End-to-end training through the CLI: exact resume after a kill, DDP on CPU, eval, predict."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

TINY = [
    "model.arch=deeplabv3plus", "model.backbone=test_resnet", "model.head_channels=16",
    "data.dataset=scalescenes", "data.num_images=16", "data.image_size=[64,128]",
    "data.crop_size=[48,96]", "data.scale_range=[0.75,1.25]",
    "train.batch_size=4", "train.num_workers=0", "train.accelerator=cpu", "train.progress=false",
    "train.log_every_n_steps=1", "eval.num_workers=0", "eval.batch_size=4", "optim.lr=0.05",
]


def scaleseg(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "scaleseg.cli", *args], capture_output=True, text=True, env=env, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"scaleseg {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def final_state(run: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((run / "metrics.json").read_text()), load_file(str(run / "model.safetensors"))


def test_resume_after_kill_equals_uninterrupted_run(tmp_path):
    full = tmp_path / "full"
    scaleseg("train", *_config(tmp_path), *TINY, "train.epochs=2", "train.checkpoint_every_n_steps=1", f"output_dir={full}", "--quiet")

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "scaleseg.cli", "train", *_config(tmp_path), *TINY, "train.epochs=2",
           "train.checkpoint_every_n_steps=1", f"output_dir={killed}", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    step_ckpt = killed / "checkpoints" / "last_step.ckpt"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if step_ckpt.exists() and torch.load(step_ckpt, weights_only=True)["global_step"] >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "training ended before it could be killed; the test proves nothing"
    assert not (killed / "metrics.json").exists()
    scaleseg("train", *_config(tmp_path), *TINY, "train.epochs=2", "train.checkpoint_every_n_steps=1",
             f"output_dir={killed}", "--resume", "auto", "--quiet")

    # last.ckpt holds the final state (16 images / batch 4 = 4 steps per epoch, 2 epochs)
    assert torch.load(full / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8
    (m_full, w_full), (m_killed, w_killed) = final_state(full), final_state(killed)
    assert m_full["confusion_matrix"] == m_killed["confusion_matrix"]
    assert m_full["mIoU"] == m_killed["mIoU"]
    assert w_full.keys() == w_killed.keys()
    for key in w_full:
        assert torch.equal(w_full[key], w_killed[key]), key


def _config(tmp_path: Path) -> list[str]:
    path = tmp_path / "tiny.yaml"
    if not path.exists():
        path.write_text("name: tiny\nseed: 3\n")
    return [str(path)]


def test_refuses_to_overwrite_an_existing_run(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    proc = scaleseg("train", *_config(tmp_path), *TINY, f"output_dir={run}", "--quiet", check=False)
    assert proc.returncode == 2
    assert "--resume auto" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_ddp_two_processes_train_and_match_single_process_eval(tmp_path):
    run = tmp_path / "ddp"
    scaleseg("train", *_config(tmp_path), *TINY, "train.epochs=1", "train.devices=2", "train.strategy=ddp",
             f"output_dir={run}", "--quiet")
    ddp = json.loads((run / "metrics.json").read_text())
    out = tmp_path / "eval1"
    scaleseg("eval", *_config(tmp_path), *TINY, "--checkpoint", str(run / "checkpoints" / "last.ckpt"), "--out", str(out), "--quiet")
    single = json.loads((out / "metrics.json").read_text())
    assert single["confusion_matrix"] == ddp["confusion_matrix"]
    # every validation pixel counted exactly once across the two ranks: 16 images of 64×128
    total = sum(map(sum, single["confusion_matrix"]))
    assert 0 < total <= 16 * 64 * 128

    out2 = tmp_path / "eval2"
    scaleseg("eval", *_config(tmp_path), *TINY, "train.devices=2", "train.strategy=ddp",
             "--checkpoint", str(run / "checkpoints" / "last.ckpt"), "--out", str(out2), "--quiet")
    assert json.loads((out2 / "metrics.json").read_text())["confusion_matrix"] == single["confusion_matrix"]
