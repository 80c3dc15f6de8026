"""Issue #14's fault table, through the CLI: each case exits with a defined code and one error line
naming the thing, and a run folder that existed keeps its last checkpoint and metrics.json intact.

Faults are real: a second process holding the run lock, SIGKILL and SIGINT, the kernel refusing
writes (RLIMIT_FSIZE, and a size-limited tmpfs where user namespaces allow mounting one), the
allocator failing under RLIMIT_AS, a learning rate that overflows the loss, broken image files.
"""
from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import scaleseg
from scaleseg.cli import main
from scaleseg.config import load_config

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY = [
    "model.backbone=test_resnet", "model.head_channels=8", "data.dataset=scalescenes", "data.num_images=8",
    "data.image_size=[32,64]", "data.crop_size=[32,64]", "data.scale_range=[1.0,1.0]", "data.color_jitter=0",
    "train.batch_size=4", "train.num_workers=0", "train.accelerator=cpu", "train.progress=false",
    "train.log_every_n_steps=1", "eval.num_workers=0", "eval.batch_size=4", "optim.lr=0.05",
]
EPOCHS = ["train.epochs=2"]  # the YAML says 3: a resume must keep the run's own 2


# --------------------------------------------------------------------------------------------------
# helpers


def write_config(folder: Path) -> Path:
    path = folder / "tiny.yaml"
    path.write_text("name: tiny\nseed: 3\ntrain:\n  epochs: 3\n")
    return path


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """``scaleseg ARGS`` in this process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def env() -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", PYTHONPATH=SRC)


def cli_process(*args: str, preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scaleseg.cli", *map(str, args)], capture_output=True, text=True,
                          env=env(), timeout=900, preexec_fn=preexec)


def one_error(err: str, code: int, got: int, *names: str) -> str:
    """The single 'scaleseg: ...' error line of ``err``; asserts the exit code, no traceback, the names."""
    assert got == code, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("scaleseg: error") or line.startswith("scaleseg: interrupted")]
    assert len(lines) == 1, err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(run: Path) -> dict[str, str]:
    return {name: digest(run / name) for name in ("checkpoints/last.ckpt", "metrics.json", "config.yaml", "model.safetensors")}


def assert_intact(run: Path, before: dict[str, str]) -> None:
    """Last checkpoint, metrics, config and weights unchanged, and they still load."""
    assert snapshot(run) == before
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 2
    scaleseg.from_pretrained(run)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """(config file, run folder) of a finished 2-epoch tiny run (8 images, batch 4: 2 steps per epoch)."""
    root = tmp_path_factory.mktemp("finished")
    config = write_config(root)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(config), *TINY, *EPOCHS, f"output_dir={root / 'run'}", "--quiet"])
    assert exit_info.value.code == 0
    return config, root / "run"


@pytest.fixture
def run_copy(finished, tmp_path) -> tuple[Path, Path]:
    config, run = finished
    shutil.copytree(run, tmp_path / "run")
    return config, tmp_path / "run"


def run_args(config: Path, run: Path, *extra: str) -> list[str]:
    return ["train", str(config), *TINY, *EPOCHS, f"output_dir={run}", "--quiet", *extra]


# --------------------------------------------------------------------------------------------------
# 1. one writer per run folder


def test_row01_second_train_on_a_running_folder_is_refused(tmp_path, capsys):
    import scaleseg.engine.train  # noqa: F401 - imported before the first run starts: the second is quick

    config, run = write_config(tmp_path), tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "scaleseg.cli", *run_args(config, run, "seed=1", "train.epochs=1000")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env())
    try:
        deadline = time.time() + 600
        while time.time() < deadline and first.poll() is None:
            try:
                if json.loads((run / "run.lock").read_text())["pid"] == first.pid and (run / "config.yaml").is_file():
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read()
        config_before = (run / "config.yaml").read_bytes()
        code, _, err = cli(capsys, *run_args(config, run, "seed=2"))
        one_error(err, 2, code, run, f"in use by pid {first.pid}", "another 'scaleseg train'")
        assert first.poll() is None  # the first run goes on, its record untouched
        assert (run / "config.yaml").read_bytes() == config_before
        assert load_config(run / "config.yaml").seed == 1
        assert json.loads((run / "run.lock").read_text())["pid"] == first.pid
    finally:
        first.kill()
        first.wait()


def test_row01_stale_lock_of_a_killed_process_is_taken_over(tmp_path, capfd):
    config, run = write_config(tmp_path), tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from scaleseg.engine.runfolder import RunLock; "
                               f"RunLock({str(run)!r}).acquire(); print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, env=env())
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert json.loads((run / "run.lock").read_text())["pid"] == holder.pid  # left behind by the kill
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(config), *TINY, "train.epochs=1", f"output_dir={run}", "--quiet"])
    out, err = capfd.readouterr()
    assert exit_info.value.code == 0, err
    assert f"taking over the stale lock of pid {holder.pid}" in err
    assert (run / "metrics.json").is_file() and not (run / "run.lock").exists()
    # 14. quiet: no vendor tips, device lines or deprecation warnings; a closing summary
    for noise in ("💡", "GPU available", "LeafSpec", "litlogger", "Trainer.fit` stopped"):
        assert noise not in err + out, noise
    assert "best mIoU" in out and str(run / "model.safetensors") in out and "last mIoU" in out


# --------------------------------------------------------------------------------------------------
# 2, 3, 6. the run's record


def test_row02_resume_of_a_finished_run_says_so_and_changes_nothing(run_copy, capsys):
    config, run = run_copy
    before = snapshot(run)
    code, _, err = cli(capsys, "train", config, *TINY, f"output_dir={run}", "--resume", "auto", "--quiet")
    assert code == 0
    assert "already finished (2 epochs" in err  # 6. the run's own epochs (2), not the YAML's 3
    assert_intact(run, before)
    assert not (run / "resumes").exists()


def test_row03_resume_that_changes_the_model_is_refused_and_writes_nothing(run_copy, capsys):
    config, run = run_copy
    before = snapshot(run)
    for change, key in (("model.backbone=resnet18", "model.backbone"), ("optim.lr=0.01", "optim.lr"),
                        ("train.epochs=5", "train.epochs")):
        code, _, err = cli(capsys, "train", config, f"output_dir={run}", "--resume", "auto", change, "--quiet")
        one_error(err, 2, code, key, str(run), "--force")
        assert_intact(run, before)
        assert not (run / "resumes").exists()
    # keys that do not change what is trained may differ
    code, _, err = cli(capsys, "train", config, f"output_dir={run}", "--resume", "auto", "eval.batch_size=1", "--quiet")
    assert code == 0 and "already finished" in err


def test_row06_resume_restores_the_runs_overrides(run_copy, capsys):
    config, run = run_copy
    from scaleseg.engine.runfolder import resume_config

    cli_cfg = load_config(config, [f"output_dir={run}"])  # no overrides: the YAML alone says 3 epochs
    cfg, ignored = resume_config(cli_cfg, [f"output_dir={run}"])
    assert cli_cfg.train.epochs == 3 and cfg.train.epochs == 2
    assert cfg.model.backbone == "test_resnet" and cfg.data.num_images == 8 and cfg.optim.lr == 0.05
    assert "train.epochs" in ignored and "model.backbone" in ignored


# --------------------------------------------------------------------------------------------------
# 4, 5, 12. predict


def predicted_labels(model, image: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    x = (x - torch.tensor(model.mean).view(1, 3, 1, 1)) / torch.tensor(model.std).view(1, 3, 1, 1)
    with torch.no_grad():
        return model(x).argmax(1)[0].numpy()


def test_row04_sixteen_bit_and_float_images_by_their_real_range(finished, tmp_path, capsys):
    config, run = finished
    model = scaleseg.from_pretrained(run)
    rng = np.random.RandomState(0)
    wide = (rng.randint(0, 65536, (32, 64))).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    code, out, err = cli(capsys, "predict", config, *TINY, "--checkpoint", run / "model.safetensors",
                         tmp_path / "g16.png", "--out", tmp_path / "pred", "--quiet")
    assert code == 0, err
    eight = np.rint(wide / 257.0).astype(np.uint8)  # 0..65535 → 0..255, not clipped at 255
    expected = predicted_labels(model, np.repeat(eight[..., None], 3, axis=2))
    np.testing.assert_array_equal(np.array(Image.open(tmp_path / "pred" / "g16_label.png")), expected)
    # a float image outside [0, 1] is refused in one line
    Image.fromarray(rng.rand(32, 64).astype(np.float32) * 4).save(tmp_path / "f.tif")
    code, _, err = cli(capsys, "predict", config, *TINY, "--checkpoint", run / "model.safetensors",
                       tmp_path / "f.tif", "--out", tmp_path / "pred", "--quiet")
    one_error(err, 2, code, "f.tif", "float image with values in [")


def test_row05_inputs_with_the_same_stem_get_distinct_outputs(finished, tmp_path, capsys):
    config, run = finished
    model = scaleseg.from_pretrained(run)
    images = {}
    for i, name in enumerate(("x.png", "x.bmp", "y.png")):
        images[name] = np.random.RandomState(i).randint(0, 255, (32, 64, 3), np.uint8)
        Image.fromarray(images[name]).save(tmp_path / name)
    code, out, err = cli(capsys, "predict", config, *TINY, "--checkpoint", run / "model.safetensors",
                         tmp_path / "x.png", tmp_path / "x.bmp", tmp_path / "y.png", "--out", tmp_path / "pred", "--quiet")
    assert code == 0, err
    assert "3 images" in out
    for name, label in (("x.png", "x.png_label.png"), ("x.bmp", "x.bmp_label.png"), ("y.png", "y_label.png")):
        np.testing.assert_array_equal(np.array(Image.open(tmp_path / "pred" / label)), predicted_labels(model, images[name]))
    assert len(list((tmp_path / "pred").glob("*_label.png"))) == 3


def test_row12_corrupt_file_in_predict(finished, tmp_path, capsys):
    config, run = finished
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a.png", "c.png"):
        Image.fromarray(np.random.RandomState(0).randint(0, 255, (32, 64, 3), np.uint8)).save(inputs / name)
    (inputs / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    args = ["predict", config, *TINY, "--checkpoint", run / "model.safetensors", inputs, "--quiet", "--batch-size", "4"]
    code, _, err = cli(capsys, *args, "--out", tmp_path / "strict")
    one_error(err, 2, code, inputs / "b.png")
    assert sorted(p.name for p in (tmp_path / "strict").glob("*_label.png")) == ["a_label.png"]  # done before b stays
    code, out, err = cli(capsys, *args, "--out", tmp_path / "skip", "--skip-bad")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "skip").glob("*_label.png")) == ["a_label.png", "c_label.png"]
    assert f"{inputs / 'b.png'}: cannot decode" in err and "skipped 1" in out


# --------------------------------------------------------------------------------------------------
# 7, 8, 15. one-line errors for bad values and paths


def test_row07_yaml_12_floats_through_the_cli(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("optim:\n  lr: 1e-3\ntrain:\n  precision: 32\n")
    code, out, _ = cli(capsys, "config", config, "optim.weight_decay=5e-4")
    assert code == 0
    cfg = load_config(None, [])
    import yaml

    printed = yaml.safe_load(out)
    assert printed["optim"]["lr"] == 0.001 and printed["optim"]["weight_decay"] == 0.0005
    assert printed["train"]["precision"] == "32" and cfg.train.precision == "32"
    code, out, _ = cli(capsys, "config", config, "train.precision=32")
    assert code == 0 and "precision: '32'" in out


def test_row08_bad_values_and_paths_are_one_line(run_copy, tmp_path, capsys):
    config, run = run_copy
    before = snapshot(run)
    code, _, err = cli(capsys, "train", config, f"output_dir={run}", "--resume", "auto", "optim.lr=-1", "--quiet")
    one_error(err, 2, code, "optim.lr", "> 0")
    assert_intact(run, before)
    if not torch.cuda.is_available():
        code, _, err = cli(capsys, "train", config, *TINY, "train.accelerator=gpu", f"output_dir={tmp_path / 'gpu'}", "--quiet")
        one_error(err, 2, code, "train.accelerator", "train.accelerator=cpu")
        assert not (tmp_path / "gpu").exists()  # a refused command writes nothing
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for command in ("predict", "eval"):
        extra = [run / "model.safetensors"] if command == "predict" else []
        code, _, err = cli(capsys, command, config, *TINY, "--checkpoint", run / "model.safetensors", *extra,
                           "--out", a_file / "sub", "--quiet")
        one_error(err, 2, code, a_file, "is a file")
    code, _, err = cli(capsys, "train", config, *TINY, f"output_dir={a_file}", "--quiet")
    one_error(err, 2, code, a_file, "is a file")


def test_row08_nonfinite_loss_stops_with_the_step_the_terms_and_a_checkpoint(tmp_path, capsys):
    config, run = write_config(tmp_path), tmp_path / "run"
    code, _, err = cli(capsys, *run_args(config, run, "optim.lr=1e8"))
    line = one_error(err, 1, code, "non-finite loss at step", "ce=", "optim.lr=1e+07", "--force")
    saved = run / "checkpoints" / "last_finite.ckpt"
    assert str(saved) in line
    ckpt = torch.load(saved, weights_only=True)
    step = int(line.split("at step ")[1].split()[0])
    assert ckpt["global_step"] == step
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_row08_out_of_memory_is_one_line_with_a_hint(finished, tmp_path):
    config, run = finished
    Image.fromarray(np.zeros((600, 800, 3), np.uint8)).save(tmp_path / "big.png")
    script = (
        "import resource, sys, torch, scaleseg.engine.evaluate\n"
        "vm = int(next(l for l in open('/proc/self/status') if l.startswith('VmSize')).split()[1]) * 1024\n"
        "resource.setrlimit(resource.RLIMIT_AS, (vm + 2**30, vm + 2**30))\n"
        "from scaleseg.cli import main\nmain(sys.argv[1:])\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, "predict", str(config), *TINY, "--checkpoint",
                           str(run / "model.safetensors"), str(tmp_path / "big.png"), "--out", str(tmp_path / "pred"),
                           "--scales", "6.0", "--quiet"], capture_output=True, text=True, env=env(), timeout=900)
    one_error(proc.stderr, 1, proc.returncode, "out of memory", "eval.mode=slide", "--scales")


def test_row15_small_items(tmp_path, capsys):
    code, out, _ = cli(capsys, "--version")
    assert code == 0 and out.strip() == f"scaleseg {scaleseg.__version__}"
    code, _, err = cli(capsys, "predict", "c.yaml", "--checkpoint", "x", "--out", "y", "in/", "--batch-size", "0")
    assert code == 2 and "--batch-size" in err and ">= 1" in err
    assert load_config(None, ["train.precision=32"]).train.precision == "32"
    # --debug adds the traceback to the one line
    code, _, err = cli(capsys, "config", "missing.yaml", "--debug")
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1] == "scaleseg: error: config file not found: missing.yaml"


def test_row14_verbose_shows_what_quiet_hides(finished, tmp_path):
    config, run = finished
    args = ["eval", config, *TINY, "--checkpoint", run / "model.safetensors", "--out", tmp_path / "ev", "--quiet"]
    verbose = cli_process(*args, "-v")  # without -v these lines are absent (see the stale-lock test)
    assert verbose.returncode == 0, verbose.stderr
    assert "GPU available" in verbose.stderr and "mIoU" in verbose.stdout


# --------------------------------------------------------------------------------------------------
# 9. full disk


def limit_file_size(size: int):
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return preexec


def test_row09_a_failing_checkpoint_write_names_the_file_before_validation(run_copy):
    config, run = run_copy
    before = snapshot(run)
    size = (run / "checkpoints" / "last.ckpt").stat().st_size
    proc = cli_process(*run_args(config, run, "train.epochs=3", "--resume", "auto", "--force"),
                       preexec=limit_file_size(size // 2))
    one_error(proc.stderr, 1, proc.returncode, "file size limit exceeded while writing", run / "checkpoints" / "last_step.ckpt")
    assert_intact(run, before)
    assert not list(run.rglob(".*.tmp*"))  # the partial write was removed
    # the epoch trained, validation never started (the checkpoint comes first)
    rows = (run / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    last = [dict(zip(header, r.split(","))) for r in rows[1:] if r.split(",")[header.index("step")] in ("4", "5")]
    assert last and all(not row["val/mIoU"] for row in last)


def test_row09_full_tmpfs_stops_before_the_epoch(run_copy, tmp_path):
    config, run = run_copy
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare to mount a tmpfs without root")
    mount = tmp_path / "disk"
    mount.mkdir()
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {mount}"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {probe.stderr.decode().strip()}")
    used = sum(p.stat().st_size for p in run.rglob("*") if p.is_file())
    size_kb = (used + (run / "checkpoints" / "last.ckpt").stat().st_size // 2) // 1024
    inner = mount / "run"
    command = " ".join([sys.executable, "-m", "scaleseg.cli", *map(str, run_args(config, inner, "train.epochs=3",
                                                                                   "--resume", "auto", "--force"))])
    script = (f"mount -t tmpfs -o size={size_kb}k tmpfs {mount} && cp -a {run} {inner} && "
              f"{command}; code=$?; tar -C {mount} -cf {tmp_path / 'after.tar'} run; exit $code")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env(), timeout=900)
    line = one_error(proc.stderr, 1, proc.returncode, "free for", inner / "checkpoints", "stopped before training it")
    assert "epoch 2" in line
    after = tmp_path / "after"
    after.mkdir()
    subprocess.run(["tar", "-C", str(after), "-xf", str(tmp_path / "after.tar")], check=True)
    assert snapshot(after / "run") == snapshot(run)


# --------------------------------------------------------------------------------------------------
# 10. Ctrl-C


def test_row10_ctrl_c_writes_a_resumable_checkpoint_and_exits_130(finished, tmp_path, capsys):
    config, reference = finished
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "scaleseg.cli", *run_args(config, run, "train.checkpoint_every_n_steps=1")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    step_ckpt = run / "checkpoints" / "last_step.ckpt"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        try:
            if step_ckpt.exists() and torch.load(step_ckpt, weights_only=True)["global_step"] >= 1:
                break
        except Exception:  # noqa: BLE001 - file being replaced
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=900)
    one_error(err, 130, proc.returncode, "interrupted", str(step_ckpt), "--resume auto", f"output_dir={run}")
    assert proc.returncode == 130
    stopped_at = torch.load(step_ckpt, weights_only=True)["global_step"]
    assert stopped_at < 4, "training ended before the interrupt; the test proves nothing"
    assert not (run / "metrics.json").exists()
    stale = run / "checkpoints" / ".last.ckpt.tmp999999"  # 15. a partial write of a killed process
    stale.write_bytes(b"partial")
    # resume without repeating the overrides: the run's own config (2 epochs, tiny model) continues
    code, _, err = cli(capsys, "train", config, f"output_dir={run}", "--resume", "auto", "--quiet")
    assert code == 0, err
    assert not stale.exists()
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    mine, theirs = load_file(str(run / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert json.loads((run / "metrics.json").read_text())["mIoU"] == json.loads((reference / "metrics.json").read_text())["mIoU"]
    assert load_config(run / "resumes" / "1.yaml").train.epochs == 2
    assert (run / "resumes" / "1.yaml").read_text() == (run / "config.yaml").read_text()
    # 15. one TensorBoard and CSV history across the resume
    assert [p.name for p in (run / "tensorboard").iterdir()] == ["version_0"]
    assert [p.name for p in (run / "csv").iterdir()] == ["version_0"]
    rows = (run / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    steps = [int(r.split(",")[header.index("step")]) for r in rows[1:] if r.split(",")[header.index("train/loss")]]
    assert steps == [0, 1, 2, 3]  # every step once, none twice


# --------------------------------------------------------------------------------------------------
# 11. bad data found before training


def bad_folder_dataset(root: Path) -> list[str]:
    """A folder dataset (classes a, b; raw ignore id 11) with five kinds of bad files; returns them."""
    for split in ("train", "val"):
        (root / "img" / split).mkdir(parents=True)
        (root / "lab" / split).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((32, 48, 3), 60 * i, np.uint8)).save(root / "img" / split / f"{i}.png")
            Image.fromarray((np.arange(32 * 48).reshape(32, 48) % 2).astype(np.uint8)).save(root / "lab" / split / f"{i}.png")
    data = (root / "img/train/0.png").read_bytes()
    (root / "img/train/0.png").write_bytes(data[: len(data) // 2])
    Image.fromarray(np.full((32, 48), 7, np.uint8)).save(root / "lab/train/1.png")
    Image.fromarray(np.zeros((16, 48), np.uint8)).save(root / "lab/train/2.png")
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(root / "lab/val/3.png")
    (root / "img/val/0.png").write_bytes(b"this is not an image")
    return ["img/train/0.png", "lab/train/1.png", "lab/train/2.png", "lab/val/3.png", "img/val/0.png"]


FOLDER = ["data.dataset=folder", "data.image_dir=img/{split}", "data.mask_dir=lab/{split}", "data.classes=[a,b]",
          "data.ignore_index=11", "data.num_images=null", "data.image_size=null", "data.crop_size=[32,48]"]


def test_row11_bad_files_are_all_reported_before_training(tmp_path, capsys):
    root = tmp_path / "mine"
    bad = bad_folder_dataset(root)
    config = write_config(tmp_path)
    args = [*TINY, *FOLDER, f"data.root={root}"]
    code, _, err = cli(capsys, "train", config, *args, f"output_dir={tmp_path / 'run'}", "--quiet")
    line = one_error(err, 2, code, "5 bad files in 8 image/label pairs", "data.check=false")
    assert not (tmp_path / "run").exists()  # refused before anything was written
    table = err[: err.index(line)]
    for name in bad:
        assert name in table, name
    assert "ignore id 11" in table and "truncated" in table and "mode RGB" in table and "48×16" in table
    # check-data: the same table and one summary line, the second time from the cache
    code, out, err2 = cli(capsys, "check-data", config, *args)
    one_error(err2, 2, code, "5 bad files", "8 of 8 verdicts cached")  # cached by the train above
    for name in bad:
        assert name in err2
    Image.fromarray((np.arange(32 * 48).reshape(32, 48) % 2).astype(np.uint8)).save(root / "lab/train/1.png")  # fix one
    code, out, err3 = cli(capsys, "check-data", config, *args, "--split", "train")
    one_error(err3, 2, code, "2 bad files in 4 image/label pairs of split train", "3 of 4 verdicts cached")
    assert "lab/train/1.png" not in err3


def test_check_data_on_a_good_dataset_and_a_generated_one(tmp_path, capsys):
    root = tmp_path / "mine"
    bad_folder_dataset(root)
    shutil.rmtree(root / "lab" / "val")
    shutil.copytree(root / "lab" / "train", root / "lab" / "val")
    for split in ("train", "val"):
        for i in range(4):
            Image.fromarray(np.full((32, 48, 3), 9, np.uint8)).save(root / "img" / split / f"{i}.png")
            Image.fromarray(np.ones((32, 48), np.uint8)).save(root / "lab" / split / f"{i}.png")
    config = write_config(tmp_path)
    code, out, err = cli(capsys, "check-data", config, *TINY, *FOLDER, f"data.root={root}", "--no-cache")
    assert code == 0, err
    assert "8 image/label pairs of splits train, val are readable and valid" in out
    code, out, err = cli(capsys, "check-data", config, *TINY)
    assert code == 0 and "generated, nothing to check" in out


def csv_rows(run: Path) -> list[dict[str, str]]:
    """The run's CSV history without the wall-clock columns (``time/*``), which differ between any two runs."""
    import csv

    with open(run / "csv" / "version_0" / "metrics.csv", newline="") as fh:
        return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in csv.DictReader(fh)]


@pytest.mark.parametrize("when", ["mid-epoch", "last batch", "validation"])
def test_row10_interrupt_anywhere_resumes_to_the_uninterrupted_history(finished, tmp_path, capsys, monkeypatch, when):
    """Ctrl-C (the flag the SIGINT handler sets) after step 1, after the epoch's last batch (step 2),
    or inside epoch 0's validation: the resume point makes the resumed run log exactly the history of
    the uninterrupted run (epoch 0's validation included, nothing twice) and end with its checkpoints."""
    from scaleseg.engine import guards
    from scaleseg.errors import Interrupted

    config, reference = finished
    run = tmp_path / "run"
    if when == "validation":
        def stop(self, trainer, *args, **kwargs):
            if trainer.current_epoch == 0:
                raise Interrupted("interrupted during validation (simulated Ctrl-C)")
        monkeypatch.setattr(guards.RunGuard, "on_validation_batch_end", stop)
    else:
        at = {"mid-epoch": 1, "last batch": 2}[when]
        monkeypatch.setattr(guards.RunGuard, "_interrupted", lambda self, trainer: trainer.global_step == at)
    code, _, err = cli(capsys, *run_args(config, run))
    line = one_error(err, 130, code, "interrupted", "--resume auto")
    if when == "last batch":
        assert "before its validation" in line
    step = torch.load(run / "checkpoints" / "last_step.ckpt", weights_only=True)["global_step"]
    assert step == {"mid-epoch": 1, "last batch": 2, "validation": 2}[when]
    assert not any(row.get("val/mIoU") for row in csv_rows(run))
    monkeypatch.undo()
    code, _, err = cli(capsys, "train", config, f"output_dir={run}", "--resume", "auto", "--quiet")
    assert code == 0, err
    assert csv_rows(run) == csv_rows(reference)
    for name in ("best.ckpt", "last.ckpt"):
        mine = torch.load(run / "checkpoints" / name, weights_only=True)
        theirs = torch.load(reference / "checkpoints" / name, weights_only=True)
        assert mine["global_step"] == theirs["global_step"], name
        assert all(torch.equal(mine["state_dict"][k], theirs["state_dict"][k]) for k in theirs["state_dict"]), name
