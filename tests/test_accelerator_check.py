"""The accelerator script's dry run, end to end on the CPU: the data packed and unpacked, the
bench, the sweep and the strong recipe's training, and every number of its summary checked
against the files it comes from or a run of the same command here."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "benchmarks" / "accelerator_check.py"


def _script():
    """benchmarks/accelerator_check.py as a module."""
    spec = importlib.util.spec_from_file_location("accelerator_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CLASSES, TRAIN, TEST = (
    10,
    7,
    4,
)  # images per class: 70 to train (64 used), 40 to test (20 and 32 used)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The dry run on random 32 x 32 images, with the model of bench.py --tiny (ConvMixer-16/1,
    k 9, p 4, 10 classes): its init-model (a process of its own) and the steps share one JAX
    compilation cache, so the initializer and the training step are compiled once (and the
    sweep again below not at all)."""
    from PIL import Image

    tmp = tmp_path_factory.mktemp("accel")
    rng = np.random.default_rng(0)
    for split, n in (("train", TRAIN), ("test", TEST)):
        for c in range(CLASSES):
            d = tmp / "data" / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                # a random tint and contrast per image: even an untrained model's predictions
                # then differ between images and between keys (iid noise averages out)
                tint = rng.uniform(0, 255, (1, 1, 3))
                img = tint + rng.uniform(0.1, 1.0) * rng.normal(0, 60, (32, 32, 3))
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{i}.png")
    archive = tmp / "carry" / "data.tar.gz"
    packed = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "pack",
            "--data-dir",
            str(tmp / "data"),
            "--out",
            str(archive),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert packed.returncode == 0, packed.stderr
    env = dict(os.environ, **_script().dry_run_compilation_cache(tmp / "jax-cache"))
    made = subprocess.run(
        [
            sys.executable,
            "-m",
            "convmixer_jax.cli",
            "init-model",
            "--preset",
            "paper",
            "--dim",
            "16",
            "--depth",
            "1",
            "--seed",
            "1",
            "--out",
            str(tmp / "model"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    assert made.returncode == 0, made.stderr[-3000:]
    out = tmp / "out"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "run",
            "--dry-run",
            "--archive",
            str(archive),
            "--model",
            str(tmp / "model"),
            "--target",
            "0.0",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {
        "tmp": tmp,
        "out": out,
        "archive": archive,
        "packed": json.loads(packed.stdout),
        "env": env,
        "stdout": proc.stdout,
        "summary": json.loads((out / "summary.json").read_text()),
    }


def test_pack_holds_every_image_once(dry_run):
    with tarfile.open(dry_run["archive"]) as tar:
        names = sorted(m.name for m in tar.getmembers() if m.isfile())
    assert len(names) == dry_run["packed"]["files"] == CLASSES * (TRAIN + TEST)
    assert names[0].startswith("data/test/class0/") and all(n.startswith("data/") for n in names)
    assert dry_run["summary"]["data"]["archive_bytes"] == dry_run["archive"].stat().st_size


def test_everything_in_one_folder_and_printed(dry_run):
    files = {p.name for p in dry_run["out"].iterdir()}
    # the device tool brings back at most 8 files
    assert files == set(_script().OUT_FILES) and len(files) <= 8
    log = (dry_run["out"] / "steps.log").read_text()
    assert [line.split(":")[0] for line in log.splitlines() if line.startswith("===== ")] == [
        f"===== {name}" for name in ("env", "bench", "attack", "train", "export", "evaluate")
    ]
    assert dry_run["stdout"].startswith("device: cpu (cpu), 1 device(s)")
    assert (dry_run["out"] / "summary.md").read_text() in dry_run["stdout"]
    assert dry_run["summary"]["device"]["backend"] == "cpu"


def test_bench_numbers_are_bench_py_s(dry_run):
    b = json.loads((dry_run["out"] / "bench.json").read_text())["model"]
    s = dry_run["summary"]["bench"]
    assert s["tiny"] and s["batch"] == 8 == b["batch"]
    assert s["jax_train_images_per_s"] == b["results"]["jax_train"]["images_per_s"] > 0
    if b["train_ratio"] is not None:  # PyTorch installed (the torch extra)
        assert (
            s["train_ratio"]
            == b["results"]["jax_train"]["images_per_s"]
            / b["results"]["torch_train"]["images_per_s"]
        )
    assert s["train_ratio_compile"] is None  # torch.compile only where PyTorch sees an accelerator


def test_sweep_equals_the_attack_command(dry_run):
    tmp, s = dry_run["tmp"], dry_run["summary"]["sweep"]
    # a process of its own with the dry run's compilation cache, which holds the sweep's programs
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "convmixer_jax.cli",
            "attack",
            str(tmp / "model"),
            "--data-dir",
            str(tmp / "data"),
            "--num-keys",
            "3",
            "--key-seed",
            "1",
            "--key-chunk",
            "2",
            "--batch-size",
            "40",
            "--limit",
            "20",
            "--quiet",
            "--out",
            str(tmp / "again.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=dry_run["env"],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((tmp / "again.json").read_text())
    assert s["accuracies"] == again["accuracies"] and s["num_keys"] == 3 and s["test_images"] == 20
    assert len(set(s["accuracies"])) > 1, s["accuracies"]  # the keys are told apart
    assert s["median"] == float(np.median(again["accuracies"]))


def test_training_epochs_and_seconds_to_target_from_the_log(dry_run):
    """The default recipe (strong) holds 16 of the 64 images out and is timed by the EMA
    weights' validation accuracy; the final model's test accuracy is the one train printed."""
    t = dry_run["summary"]["train"]
    log = json.loads((dry_run["out"] / "train_log.json").read_text())
    epochs = log["epochs"]
    assert (
        t["epochs_done"] == len(epochs) == 2 and t["recipe"] == "strong" and t["train_images"] == 48
    )
    assert log["holdout"]["images"] == 16 and "test_accuracy" not in epochs[0]
    assert t["metric"] == "val_accuracy_ema" and t["accuracy"] == [
        e["val_accuracy_ema"] for e in epochs
    ]
    # --target 0.0 is met by the first epoch: its training seconds exactly
    assert t["to_target"] == {
        "target": 0.0,
        "metric": "val_accuracy_ema",
        "reached": True,
        "epoch": 1,
        "train_seconds": epochs[0]["train_seconds"],
    }
    assert not t["stopped_at_limit"] and t["returncode"] == 0
    # the newest checkpoint exported and scored on train's 32 test images: the same number
    # train printed for the model it saved (weights chosen by the same rule)
    log = (dry_run["out"] / "steps.log").read_text()
    train_out = log.split("----- train stdout\n")[1].split("=====")[0]
    printed = [json.loads(line) for line in train_out.splitlines() if line.startswith("{")][-1]
    f = t["final"]
    assert f == {"epoch": 2, "of": 2, "test_accuracy": printed["test_accuracy"], "test_images": 32}
    assert (
        f"the newest checkpoint (epoch 2 of 2) scores test accuracy {f['test_accuracy']:.4f} "
        "on 32 test images"
    ) in dry_run["stdout"]


def test_seconds_to_target_when_not_reached():
    seconds_to_target = _script().seconds_to_target
    epochs = [
        {"epoch": 1, "train_seconds": 2.0, "test_accuracy": 0.5},
        {"epoch": 2, "train_seconds": 3.0, "test_accuracy": 0.91},
    ]
    assert seconds_to_target(epochs, 0.9) == {
        "target": 0.9,
        "metric": "test_accuracy",
        "reached": True,
        "epoch": 2,
        "train_seconds": 5.0,
    }
    assert seconds_to_target(epochs, 0.95)["best"] == 0.91
    assert (
        seconds_to_target(epochs, 0.4, "val_accuracy")["reached"] is False
    )  # no such field in these epochs


def test_target_metric_follows_the_recipe():
    from convmixer_jax.training.loop import RECIPES

    target_metric = _script().target_metric
    assert target_metric(RECIPES["strong"].to_dict()) == "val_accuracy_ema"
    assert target_metric(RECIPES["paper"].to_dict()) == "test_accuracy"
    assert target_metric(dict(RECIPES["strong"].to_dict(), ema_decay=0.0)) == "val_accuracy"


def test_a_step_past_its_limit_is_stopped_with_its_children(tmp_path):
    """SIGTERM to the step's whole process group at the limit, SIGKILL after the grace: a child
    that ignores SIGTERM (as a compile worker may) does not hold the run."""
    step = _script().step
    pidfile = tmp_path / "child.pid"
    argv = [
        sys.executable,
        "-c",
        "import os, signal, subprocess, sys, time\n"
        "c = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(c.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(60)\n",
    ]
    r = step("slow", argv, tmp_path, timeout_s=3, grace_s=2)
    assert r["timed_out"] and r["seconds"] < 20 and r["returncode"] != 0
    assert _gone(int(pidfile.read_text()))
    log = (tmp_path / "steps.log").read_text()
    assert log.startswith("===== slow: ") and "----- slow stdout" in log


def _gone(pid: int, wait_s: float = 5.0) -> bool:
    """The process has exited: no such process, or a zombie waiting for its reaper."""
    import time

    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False
