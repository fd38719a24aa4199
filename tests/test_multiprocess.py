"""Two real processes (jax.distributed over a localhost coordinator, gloo on CPU) give
what one process gives: the wrong-key sweep of `attack` and of `reproduce` and the
accuracy of `evaluate` exactly, two training steps up to the order of the cross-device
sums; checkpoints move between one and two processes; only process 0 writes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import ok, run
from multiprocess_commands import commands

HERE = Path(__file__).parent
# Two training steps (batch 16 of 32 images) differ between one and two processes only by
# the order of the sums over the batch (BatchNorm statistics, gradients): measured at most
# 1.2e-7 here (one float32 rounding); the bound leaves room for other CPUs' summation orders.
PARAM_ATOL = 1e-5


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_trained_model):
    """A folder holding ``data`` (tiny PNGs of 3 classes) and ``model`` (a tiny model whose
    BatchNorm statistics fit them): copies of ``tiny_trained_model``, so that the runs below
    write beside them."""
    root = tmp_path_factory.mktemp("mp")
    shutil.copytree(tiny_trained_model.data_dir, root / "data")
    shutil.copytree(tiny_trained_model.model_dir, root / "model")
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _params(model_dir):
    import jax

    from convmixer_jax.files.model_dir import load_model

    _, variables, _ = load_model(model_dir)
    return {
        jax.tree_util.keystr(p): np.asarray(v)
        for p, v in jax.tree_util.tree_flatten_with_path(variables)[0]
    }


@pytest.fixture(scope="module")
def runs(root):
    """The commands in this process (one process) and in two worker processes, each in its own
    folder."""
    one = root / "one"
    one.mkdir()
    cwd = os.getcwd()
    os.chdir(one)
    try:
        from convmixer_jax import cli

        for argv in commands(root, "one"):
            assert cli.main(argv) == 0, argv
    finally:
        os.chdir(cwd)
    port, procs, folders = _free_port(), [], []
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))
    env.pop("XLA_FLAGS", None)  # one CPU device per process: the mesh spans the two processes
    for pid in range(2):
        folders.append(root / f"process{pid}")
        folders[-1].mkdir()
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(HERE / "multiprocess_worker.py"),
                    str(port),
                    str(pid),
                    "2",
                    str(root),
                ],
                cwd=folders[-1],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=400))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return {"one": one, "two": folders[0], "process1": folders[1], "stdout": [o for o, _ in outs]}


def test_sweeps_and_evaluation_equal_one_process(runs):
    a1 = json.loads((runs["one"] / "attack-one.json").read_text())
    a2 = json.loads((runs["two"] / "attack-two.json").read_text())
    assert a2["accuracies"] == a1["accuracies"] and len(a1["accuracies"]) == 6
    assert len(set(a1["accuracies"])) > 1  # the keys matter: not a vacuous comparison
    assert a1["device"] == "cpu: cpu x1" and a2["device"] == "cpu: cpu x2 in 2 processes"
    assert a2["model_key_fingerprint"] == a1["model_key_fingerprint"]
    e1 = json.loads((runs["one"] / "evaluate-one.json").read_text())
    e2 = json.loads((runs["two"] / "evaluate-two.json").read_text())
    assert e2["accuracy"] == e1["accuracy"] and e1["images"] == 30
    r1 = json.loads((runs["one"] / "reproduce-one" / "results.json").read_text())
    r2 = json.loads((runs["two"] / "reproduce-two" / "results.json").read_text())
    assert len(r1["wrong_keys"]) == 6 and len(set(r1["wrong_keys"])) > 1
    for field in (
        "wrong_keys",
        "baseline_plain",
        "encrypted_plain",
        "encrypted_encrypted",
        "identical_predictions",
        "key_fingerprint",
        "baseline_plain_tta",
    ):
        assert r2[field] == r1[field], field


def test_two_training_steps_equal_one_process_within_the_tolerance(root, runs, tiny_config):
    import jax

    from convmixer_jax.training.loop import init_variables

    p1, p2 = _params(runs["one"] / "trained-one"), _params(runs["two"] / "trained-two")
    assert p1.keys() == p2.keys()
    for k in p1:
        np.testing.assert_allclose(p2[k], p1[k], rtol=0, atol=PARAM_ATOL, err_msg=k)
    # not vacuous: the two steps moved the weights (train --seed 2 starts from init seed 2) far
    # more than the tolerance
    # the architecture of ``commands``' train (tiny_config)
    start = {
        jax.tree_util.keystr(p): np.asarray(v)
        for p, v in jax.tree_util.tree_flatten_with_path(init_variables(tiny_config, 2))[0]
    }
    assert max(float(np.max(np.abs(p1[k] - start[k]))) for k in p1) > 100 * PARAM_ATOL
    log1 = json.loads((root / "work-one" / "train_log.json").read_text())
    log2 = json.loads((root / "work-two" / "train_log.json").read_text())
    assert log1["train_images"] == log2["train_images"] == 32 and len(log2["devices"]) == 2
    assert abs(log2["epochs"][0]["train_loss"] - log1["epochs"][0]["train_loss"]) < 1e-5


def test_checkpoints_move_between_one_and_two_processes(capsys, root, runs):
    # two processes restored one process's checkpoint: the same weights, exactly
    resumed, trained = _params(runs["two"] / "resumed-two"), _params(runs["one"] / "trained-one")
    for k in trained:
        np.testing.assert_array_equal(resumed[k], trained[k], err_msg=k)
    # one process restores the two processes' checkpoint: the same weights, exactly
    ok(capsys, "export-model", "--workdir", root / "work-two", "--out", root / "exported-two")
    exported, two = _params(root / "exported-two"), _params(runs["two"] / "trained-two")
    for k in two:
        np.testing.assert_array_equal(exported[k], two[k], err_msg=k)


def test_only_process_zero_writes_and_reports(runs):
    assert sorted(p.name for p in runs["process1"].iterdir()) == []
    names = sorted(p.name.replace("-two", "-one") for p in runs["two"].iterdir())
    assert names == sorted(
        p.name for p in runs["one"].iterdir()
    )  # the same outputs, no temporaries
    # process 0 reports; process 1 prints nothing but gloo's own connection notice
    assert [line for line in runs["stdout"][1].splitlines() if not line.startswith("[Gloo]")] == []
    assert '"num_keys": 6' in runs["stdout"][0] and '"model": "trained-two"' in runs["stdout"][0]


@pytest.mark.parametrize(
    "options, says",
    [
        (["--num-processes", "2"], "go together"),
        (["--coordinator-address", "127.0.0.1:1234", "--num-processes", "2"], "go together"),
        (
            [
                "--coordinator-address",
                "127.0.0.1:1234",
                "--num-processes",
                "2",
                "--process-id",
                "2",
            ],
            "0..1",
        ),
        (
            ["--coordinator-address", "localhost", "--num-processes", "2", "--process-id", "0"],
            "HOST:PORT",
        ),
        (
            ["--coordinator-address", "h:70000", "--num-processes", "2", "--process-id", "1"],
            "HOST:PORT",
        ),
    ],
)
def test_bad_process_options_one_line_nothing_written(capsys, root, tmp_path, options, says):
    for argv in (["attack", root / "model", "--num-keys", "2"], ["evaluate", root / "model"]):
        out = tmp_path / "out.json"
        rc, _, err = run(
            capsys, *argv, "--data-dir", root / "data", "--quiet", "--out", out, *options
        )
        assert (
            rc == 2
            and says in err
            and err.count("\n") == 1
            and err.startswith("convmixer-jax: error:")
        )
        assert not out.exists()
