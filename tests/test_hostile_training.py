"""Training as a hostile user meets it: two runs on one workdir, ``--resume`` where there is
nothing (or something else) to resume, damaged checkpoints, a class count that disagrees
with the data, and interrupts at any step. Each refusal is one line, a non-zero exit, and
no change to any file outside the declared output."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from hostile_helpers import (
    assert_one_error_line,
    error_lines,
    refused_in_process,
    refused_subprocess,
    tree_digests,
)

from convmixer_jax import cli

REPO = Path(__file__).parents[1]
WORKER = str(Path(__file__).with_name("train_worker.py"))
sys.path.insert(0, str(Path(__file__).parent))


def _cache(tmp_path) -> str:
    """A private cache beside (not inside) the test's folder, which the cases watch."""
    return str(tmp_path.parent / (tmp_path.name + "-cache"))


def _env(tmp_path) -> dict:
    """A subprocess's environment: this source tree first, a private cache."""
    return dict(
        os.environ,
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        CONVMIXER_JAX_CACHE=_cache(tmp_path),
    )


@pytest.fixture()
def data(tmp_path, png_tree, monkeypatch):
    """A 3-class image-folder data set (8 x 8 PNGs, 10 per class per split)."""
    monkeypatch.setenv("CONVMIXER_JAX_CACHE", _cache(tmp_path))
    return png_tree(tmp_path / "data", n_per_class=10)


@pytest.fixture()
def train_args(arch_args, tiny_config, data):
    """``train_args(workdir, out, *more)``: a tiny ``train`` on ``data`` (30 images, batches
    of 6: 5 steps per epoch), one epoch unless ``more`` says otherwise."""

    def make(workdir, out, *more, arch=None):
        return [
            "train",
            "--data-dir",
            data,
            *(arch_args(tiny_config) if arch is None else arch),
            "--recipe",
            "fast",
            "--batch-size",
            "6",
            "--epochs",
            "1",
            "--quiet",
            *more,
            "--workdir",
            workdir,
            "--out",
            out,
        ]

    return make


def _run(capsys, argv) -> int:
    rc = cli.main([str(a) for a in argv])
    capsys.readouterr()
    return rc


# --------------------------------------------------------------------------- one writer per workdir


def _worker(workdir, out, *extra, env):
    return subprocess.Popen(
        [sys.executable, WORKER, str(workdir), str(out), "3", *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _params(path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def test_a_second_train_on_a_held_workdir_is_refused_and_the_first_is_undisturbed(
    tmp_path, train_args
):
    env = _env(tmp_path)
    work = tmp_path / "work"
    first = _worker(work, tmp_path / "first.npz", "--hold", tmp_path / "go", env=env)
    try:
        # the first run has saved its first epoch and waits, holding the workdir
        line = first.stdout.readline()
        assert line.startswith("{"), (line, first.stderr.read() if first.poll() else "")
        # a save of the first run in flight (Orbax's temporary folder of its next checkpoint)
        in_flight = work / "checkpoints" / "2.orbax-checkpoint-tmp-1"
        in_flight.mkdir()
        (in_flight / "part").write_bytes(b"being written")
        for more in ((), ("--resume",)):
            refused_subprocess(
                train_args(work, tmp_path / "second", *more),
                watch=[tmp_path],
                contains="in use by another training run",
                env=env,
            )
        assert in_flight.exists()
        (tmp_path / "go").touch()
        out, err = first.communicate(timeout=300)
        assert first.returncode == 0, err
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    undisturbed = _worker(tmp_path / "alone", tmp_path / "alone.npz", env=env)
    _, err = undisturbed.communicate(timeout=300)
    assert undisturbed.returncode == 0, err
    held, alone = _params(tmp_path / "first.npz"), _params(tmp_path / "alone.npz")
    assert set(held) == set(alone)
    for k in alone:
        np.testing.assert_array_equal(held[k], alone[k], err_msg=k)


def test_the_lock_is_reentrant_and_leaves_nothing_behind(tmp_path):
    from convmixer_jax.training.workdir import LOCK_NAME, WorkdirError, locked_workdir

    work = tmp_path / "a" / "work"
    with locked_workdir(work):
        assert (work / LOCK_NAME).exists()
        with locked_workdir(work):  # the command line holds it, the training loop again
            pass
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from convmixer_jax.training.workdir import locked_workdir\n"
                "try:\n    locked_workdir(sys.argv[1]).__enter__()\n"
                "except ValueError as e:\n    print(e); sys.exit(3)",
                str(work),
            ],
            env=_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert probe.returncode == 3 and "in use by another training run" in probe.stdout
    assert not (tmp_path / "a").exists()  # made by the block, left empty: removed
    (tmp_path / "file").write_text("x")
    with pytest.raises(WorkdirError, match="is a file"):
        with locked_workdir(tmp_path / "file"):
            pass


# --------------------------------------------------------------------------- --resume


@pytest.mark.parametrize("exists", [False, True])
def test_resume_without_a_checkpoint_is_refused(tmp_path, capsys, train_args, exists):
    work = tmp_path / "work"
    if exists:
        work.mkdir()
    line = refused_in_process(
        capsys,
        train_args(work, tmp_path / "out", "--resume"),
        watch=[tmp_path],
        contains="holds no checkpoint to resume from",
    )
    assert "drop --resume" in line
    assert work.exists() == exists and not (tmp_path / "out").exists()


def test_resume_with_another_architecture_names_both_values(
    tmp_path, capsys, train_args, arch_args, make_tiny_config
):
    assert _run(capsys, train_args(tmp_path / "w", tmp_path / "m")) == 0
    line = refused_in_process(
        capsys,
        train_args(
            tmp_path / "w",
            tmp_path / "m2",
            "--resume",
            "--epochs",
            "2",
            arch=arch_args(make_tiny_config(dim=16)),
        ),
        watch=[tmp_path],
        contains="dim 8 in the checkpoint, 16 now",
    )
    assert "strict" not in line and "--workdir" in line


# --------------------------------------------------------------------------- damaged checkpoints


def _damage(checkpoint: Path, *, only=None) -> None:
    """Overwrite 20 bytes in the middle of every file of an Orbax checkpoint (named ``only``)."""
    for p in checkpoint.rglob(only or "*"):
        if p.is_file():
            data = bytearray(p.read_bytes().ljust(40, b" "))
            data[len(data) // 2 - 10 : len(data) // 2 + 10] = b"\x07" * 20
            p.write_bytes(bytes(data))


def test_a_damaged_checkpoint_is_one_line_naming_it(tmp_path, capsys, train_args):
    """Orbax logs damage, raises bare Exceptions, and its reader threads print tracebacks
    after a failed read: none of that reaches the user, who gets one line naming the
    checkpoint and what to do (real processes: Orbax writes to their stderr)."""
    import json

    work = tmp_path / "w"
    assert _run(capsys, train_args(work, tmp_path / "m")) == 0
    pristine = tree_digests(work)
    _damage(work / "checkpoints" / "1" / "state")  # the arrays and their index
    for argv in (
        train_args(work, tmp_path / "m2", "--resume"),
        ["export-model", "--workdir", work, "--out", tmp_path / "m3"],
    ):
        before = tree_digests(tmp_path)
        r = subprocess.run(
            [sys.executable, "-m", "convmixer_jax.cli", *map(str, argv)],
            env=_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 1, r.stderr
        line = assert_one_error_line(r.stderr, contains=str(work / "checkpoints" / "1"))
        assert r.stderr.strip() == line and "holds no older checkpoint" in line
        assert tree_digests(tmp_path) == before
    assert tree_digests(work) != pristine
    # a checkpoint saved without a recorded digest: Orbax's own errors, as one line
    log = json.loads((work / "train_log.json").read_text())
    del log["checkpoint_sha256"]
    (work / "train_log.json").write_text(json.dumps(log))
    _damage(work / "checkpoints" / "1", only="_CHECKPOINT_METADATA")
    refused_in_process(
        capsys,
        ["export-model", "--workdir", work, "--out", tmp_path / "m3"],
        watch=[tmp_path],
        contains="cannot read the checkpoint " + str(work / "checkpoints" / "1"),
    )


# --------------------------------------------------------------------------- classes


def test_the_class_count_follows_the_data(tmp_path, capsys, train_args, arch_args, tiny_config):
    from convmixer_jax.files.model_dir import load_model

    arch = arch_args(tiny_config)
    i = arch.index("--num-classes")
    without = arch[:i] + arch[i + 2 :]
    refused_in_process(
        capsys,
        train_args(tmp_path / "w", tmp_path / "m", arch=[*without, "--num-classes", "5"]),
        watch=[tmp_path],
        contains="the data have 3 classes",
    )
    assert not (tmp_path / "w").exists()
    assert _run(capsys, train_args(tmp_path / "w", tmp_path / "m", arch=without)) == 0
    config, _, meta = load_model(tmp_path / "m")
    assert config.num_classes == 3 and len(meta["classes"]) == 3


# ------------------------------------------------------------------ checkpoints and interrupts


def _stop_at(monkeypatch, step: int) -> None:
    """Interrupt the next training run (as Ctrl-C would) when it fetches batch ``step``."""
    from convmixer_jax.training import loop

    calls = {"n": 0}
    real = loop.from_process_rows

    def from_process_rows(local, mesh, n):
        if np.ndim(local) > 1:  # the images; the labels follow
            calls["n"] += 1
            if calls["n"] == step:
                raise KeyboardInterrupt
        return real(local, mesh, n)

    monkeypatch.setattr(loop, "from_process_rows", from_process_rows)


def _train(workdir, **kw):
    import train_worker as tw

    from convmixer_jax.training.loop import train

    train_data, test_data = tw.data()
    variables, history = train(
        tw.CONFIG,
        tw.recipe(3),
        train_data,
        test_data,
        workdir,
        progress=False,
        log=lambda message: None,
        **kw,
    )
    return tw.flat(variables), history


def test_a_run_resumed_inside_an_epoch_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    """4 steps per epoch, a checkpoint every 3 steps: interrupted at step 7, the run resumes
    from its checkpoint of step 6 (epoch 2, 2 steps done) and ends where the uninterrupted
    run ends, bit for bit, with the same log."""
    alone, alone_log = _train(tmp_path / "alone", checkpoint_every_steps=3)
    work = tmp_path / "work"
    with monkeypatch.context() as m:
        _stop_at(m, 8)
        with pytest.raises(KeyboardInterrupt) as stopped:
            _train(work, checkpoint_every_steps=3)
    mid = work / "checkpoints-mid-epoch" / "6"
    assert stopped.value.saved_checkpoint == mid and mid.is_dir()
    assert str(mid) in stopped.value.message and "--resume" in stopped.value.message
    assert not list(work.rglob("*orbax-checkpoint-tmp*"))
    resumed, resumed_log = _train(work, checkpoint_every_steps=3, resume=True)
    assert set(resumed) == set(alone)
    for k in alone:
        np.testing.assert_array_equal(resumed[k], alone[k], err_msg=k)
    for a, b in zip(resumed_log["epochs"], alone_log["epochs"], strict=True):
        assert a["train_loss"] == b["train_loss"] and a["test_accuracy"] == b["test_accuracy"]
    assert not (work / "checkpoints-mid-epoch").exists()  # superseded by the epochs' own


def _as_state_only_checkpoint(work, epoch: int) -> None:
    """Rewrite epoch checkpoint ``epoch`` of ``work`` in the layout written before the data
    iterator's position was saved (the training state alone, Orbax's item ``default``), with
    its digest in the log, as a run of that time left it."""
    import json

    import orbax.checkpoint as ocp

    from convmixer_jax.training.workdir import record_digest

    folder = (work / "checkpoints").absolute()
    mngr = ocp.CheckpointManager(folder)
    restored = mngr.restore(epoch, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    state = jax.tree.map(np.asarray, restored["state"])
    mngr.close()
    shutil.rmtree(folder / str(epoch))
    mngr = ocp.CheckpointManager(folder)
    mngr.save(epoch, args=ocp.args.StandardSave(state))
    mngr.wait_until_finished()
    mngr.close()
    assert sorted(p.name for p in (folder / str(epoch)).iterdir() if p.is_dir()) == ["default"]
    log = json.loads((work / "train_log.json").read_text())
    record_digest(log["checkpoint_sha256"], work, folder / str(epoch))
    (work / "train_log.json").write_text(json.dumps(log))


def test_a_checkpoint_of_the_state_alone_resumes_to_the_uninterrupted_run(tmp_path):
    """An epoch checkpoint without the data iterator's position (the older layout) resumes
    at its step, and the run ends where the uninterrupted run ends, bit for bit."""
    alone, alone_log = _train(tmp_path / "alone")
    work = tmp_path / "work"
    _train(work, max_epochs_this_run=1)
    assert sorted(p.name for p in (work / "checkpoints" / "1").iterdir() if p.is_dir()) == [
        "data",
        "state",
    ]
    _as_state_only_checkpoint(work, 1)
    resumed, resumed_log = _train(work, resume=True)
    for k in alone:
        np.testing.assert_array_equal(resumed[k], alone[k], err_msg=k)
    for a, b in zip(resumed_log["epochs"], alone_log["epochs"], strict=True):
        assert a["train_loss"] == b["train_loss"]


def test_a_data_position_that_contradicts_the_step_is_refused(tmp_path):
    import json

    from convmixer_jax.training.workdir import CheckpointError, record_digest

    work = tmp_path / "work"
    _train(work, max_epochs_this_run=1)
    data = work / "checkpoints" / "1" / "data"
    state_file = next(p for p in data.rglob("*") if p.is_file() and "next_index" in p.read_text())
    text = state_file.read_text()
    assert '"next_index": 4' in text, text
    state_file.write_text(text.replace('"next_index": 4', '"next_index": 3'))
    log = json.loads((work / "train_log.json").read_text())
    record_digest(log["checkpoint_sha256"], work, work / "checkpoints" / "1")
    (work / "train_log.json").write_text(json.dumps(log))
    with pytest.raises(CheckpointError, match="puts the data at batch 3 but its training state"):
        _train(work, resume=True)


def test_a_run_read_by_worker_processes_resumes_to_the_uninterrupted_one(tmp_path, monkeypatch):
    """With Grain worker processes the iterator's saved state is theirs: interrupted at step 7
    and resumed from the checkpoint of step 6, the run ends where the uninterrupted one ends."""
    import train_worker as tw

    from convmixer_jax.data.sources import ArrayRows, TakenRows

    (x, y), test_data = tw.data()
    reader = TakenRows(ArrayRows(x), np.arange(len(x)))  # read through the pipeline

    def run(workdir, **kw):
        from convmixer_jax.training.loop import train

        variables, _ = train(
            tw.CONFIG,
            tw.recipe(2),
            (reader, y),
            test_data,
            workdir,
            progress=False,
            log=lambda message: None,
            checkpoint_every_steps=3,
            workers=2,
            **kw,
        )
        return tw.flat(variables)

    alone = run(tmp_path / "alone")
    work = tmp_path / "work"
    with monkeypatch.context() as m:
        _stop_at(m, 8)
        with pytest.raises(KeyboardInterrupt):
            run(work)
    resumed = run(work, resume=True)
    for k in alone:
        np.testing.assert_array_equal(resumed[k], alone[k], err_msg=k)


def test_an_interrupt_before_the_first_checkpoint_leaves_nothing(tmp_path, monkeypatch):
    work = tmp_path / "out-work"
    _stop_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt) as stopped:
        _train(work)
    assert "nothing was saved" in stopped.value.message
    assert stopped.value.saved_checkpoint is None
    assert not work.exists()


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_train_says_what_was_saved_and_how_to_resume(
    tmp_path, data, arch_args, tiny_config, sig, code
):
    """The whole run's progress is one bar; the interrupt's line comes after it, names the
    checkpoint and the exact command that continues, which then finishes the run."""
    work, out = tmp_path / "w", tmp_path / "m"
    argv = [
        "train",
        "--data-dir",
        str(data),
        *arch_args(tiny_config),
        "--recipe",
        "fast",
        "--batch-size",
        "2",  # 15 steps per epoch: a checkpoint at step 10 of each (--checkpoint-minutes)
        "--epochs",
        "10",
        "--checkpoint-minutes",
        "1e-6",
        "--workdir",
        str(work),
        "--out",
        str(out),
    ]
    env = _env(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "convmixer_jax.cli", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (work / "checkpoints-mid-epoch" / "10").exists():
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.01)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err
    line = assert_one_error_line(err, contains="continue with: ")
    assert err.rstrip().endswith(line), err  # nothing drawn after it
    assert "/150" in err  # the bar counts the steps of all 10 epochs
    command = line.split("continue with: ", 1)[1]
    assert command == shlex.join(["convmixer-jax", *argv, "--resume"])
    assert not out.exists() and not list(work.rglob("*orbax-checkpoint-tmp*"))
    if sig == signal.SIGTERM:
        return  # the same path as SIGINT from here
    before = tree_digests(data)
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "convmixer_jax.cli",
            *shlex.split(command)[1:],
            "--quiet",
            "--checkpoint-minutes",  # (the last one counts) only the epochs' checkpoints
            "5",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr
    assert "resumed from epoch" in again.stdout and not error_lines(again.stderr)
    assert out.is_dir() and tree_digests(data) == before
