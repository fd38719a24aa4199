"""Training: exact resume after a kill, and data parallelism over 4 simulated CPU devices."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

WORKER = str(Path(__file__).with_name("train_worker.py"))
EPOCHS = 4


def run_worker(workdir, out, *extra, env_extra=None, wait=True):
    env = dict(os.environ)
    env.update(env_extra or {})
    env["PYTHONPATH"] = str(Path(__file__).parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, WORKER, str(workdir), str(out), str(EPOCHS), *extra]
    if not wait:
        return subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def load(out):
    with np.load(out) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    """One uninterrupted training run of the worker: its folder (work/, params.npz)."""
    d = tmp_path_factory.mktemp("full")
    run_worker(d / "work", d / "params.npz")
    return d


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run):
    return load(uninterrupted_run / "params.npz")


def _checkpoint_steps(workdir: Path):
    ckpt = workdir / "checkpoints"
    if not ckpt.exists():
        return []
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())


def test_resume_after_kill_reaches_same_parameters(tmp_path, uninterrupted):
    work = tmp_path / "work"
    proc = run_worker(work, tmp_path / "unused.npz", "--slow", wait=False)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and not _checkpoint_steps(work):
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        assert _checkpoint_steps(work), "no checkpoint appeared"
        time.sleep(0.7)  # kill somewhere inside the next epoch or its checkpoint write
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = _checkpoint_steps(work)
    assert done and max(done) < EPOCHS, f"the run was not interrupted (checkpoints {done})"
    run_worker(work, tmp_path / "resumed.npz", "--resume")
    resumed = load(tmp_path / "resumed.npz")
    assert set(resumed) == set(uninterrupted)
    for k in uninterrupted:
        np.testing.assert_array_equal(resumed[k], uninterrupted[k], err_msg=k)
    # and training did change the parameters (the comparison is not vacuous)
    init = tmp_path / "init.npz"
    assert any(np.abs(v).sum() > 0 for v in resumed.values())
    del init


def test_resume_refuses_to_overwrite_without_flag(tmp_path, uninterrupted_run):
    work = uninterrupted_run / "work"  # a finished run's workdir (not trained again here)
    before = sorted(str(p.relative_to(work)) for p in work.rglob("*"))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    proc = subprocess.run(
        [sys.executable, WORKER, str(work), str(tmp_path / "b.npz"), str(EPOCHS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode != 0
    assert "--resume" in proc.stderr
    assert sorted(str(p.relative_to(work)) for p in work.rglob("*")) == before
    assert not (tmp_path / "b.npz").exists()


def test_four_simulated_devices_match_one_device(tmp_path, uninterrupted):
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    run_worker(tmp_path / "work", tmp_path / "p4.npz", env_extra={"XLA_FLAGS": flags.strip()})
    multi = load(tmp_path / "p4.npz")
    assert int(multi.pop("n_devices")) == 4
    single = dict(uninterrupted)
    assert int(single.pop("n_devices")) == 1
    for k in single:
        np.testing.assert_allclose(multi[k], single[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_resume_with_a_different_recipe_is_refused(tmp_path):
    import dataclasses

    import train_worker as tw

    from convmixer_jax.training.loop import TrainConfig, train

    (x, y), test = tw.data()
    recipe = TrainConfig(epochs=2, batch_size=16, seed=1)
    train(
        tw.CONFIG,
        recipe,
        (x, y),
        test,
        tmp_path,
        progress=False,
        max_epochs_this_run=1,
        log=lambda m: None,
    )
    with pytest.raises(ValueError, match="different recipe"):
        train(
            tw.CONFIG,
            dataclasses.replace(recipe, lr=0.5),
            (x, y),
            test,
            tmp_path,
            resume=True,
            progress=False,
            log=lambda m: None,
        )


def test_resume_with_a_different_warm_start_is_refused(tmp_path):
    import train_worker as tw

    from convmixer_jax.training.loop import TrainConfig, init_variables, train

    (x, y), test = tw.data()
    recipe = TrainConfig(epochs=2, batch_size=16, seed=1)
    start = init_variables(tw.CONFIG, 5)
    train(
        tw.CONFIG,
        recipe,
        (x, y),
        test,
        tmp_path,
        progress=False,
        max_epochs_this_run=1,
        init_variables_=start,
        init_from={"model": "a", "epochs": 3},
        log=lambda m: None,
    )
    assert json.loads((tmp_path / "train_log.json").read_text())["init_from"] == {
        "model": "a",
        "epochs": 3,
    }
    with pytest.raises(ValueError, match="different init_from"):
        train(
            tw.CONFIG,
            recipe,
            (x, y),
            test,
            tmp_path,
            resume=True,
            progress=False,
            init_variables_=start,
            init_from={"model": "b", "epochs": 3},
            log=lambda m: None,
        )


def test_export_model_saves_the_newest_checkpoint(tmp_path):
    import train_worker as tw

    from convmixer_jax import cli
    from convmixer_jax.files.model_dir import load_model
    from convmixer_jax.training.loop import TrainConfig, train

    (x, y), test = tw.data()
    variables, _ = train(
        tw.CONFIG,
        TrainConfig(epochs=2, batch_size=16, seed=2),
        (x, y),
        test,
        tmp_path / "w",
        progress=False,
        log=lambda m: None,
    )
    assert (
        cli.main(["export-model", "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "m")])
        == 0
    )
    config, loaded, meta = load_model(tmp_path / "m")
    assert config == tw.CONFIG and meta["epochs"] == 2 and meta["epochs_planned"] == 2
    for a, b in zip(jax_leaves(loaded), jax_leaves(variables), strict=True):
        np.testing.assert_array_equal(a, b)
    assert (
        cli.main(
            ["export-model", "--workdir", str(tmp_path / "nothing"), "--out", str(tmp_path / "m2")]
        )
        == 1
    )
    assert not (tmp_path / "m2").exists()


def jax_leaves(tree):
    import jax

    return [np.asarray(v) for v in jax.tree_util.tree_leaves(tree)]


def test_ema_and_holdout(tmp_path):
    """The EMA follows its stated recursion; the hold-out is never trained on and is scored
    every epoch; export-model and train pick the weights by validation accuracy."""
    import jax
    import train_worker as tw

    from convmixer_jax import cli
    from convmixer_jax.data import stratified_holdout
    from convmixer_jax.files.model_dir import load_model
    from convmixer_jax.training.loop import TrainConfig, choose_weights, load_checkpoint, train

    (x, y), _ = tw.data()
    recipe = TrainConfig(
        epochs=2,
        batch_size=16,
        seed=3,
        lr=3e-3,
        ema_decay=0.9,
        holdout=16,
        holdout_seed=4,
        augment=("flip", "randaugment"),
        ra_magnitude=5,
    )
    variables, hist = train(
        tw.CONFIG, recipe, (x, y), None, tmp_path / "w", progress=False, log=lambda m: None
    )
    assert hist["train_images"] == 48 and hist["holdout"]["images"] == 16
    for e in hist["epochs"]:
        assert (
            0 <= e["val_accuracy"] <= 1
            and 0 <= e["val_accuracy_ema"] <= 1
            and "test_accuracy" not in e
        )
    # training on the 48 kept images without a hold-out takes the same steps: same raw weights
    keep, _ = stratified_holdout(y, 16, 4)
    plain, _ = train(
        tw.CONFIG,
        TrainConfig(**{**recipe.to_dict(), "holdout": 0, "ema_decay": 0.0}),
        (x[keep], y[keep]),
        None,
        tmp_path / "w2",
        progress=False,
        log=lambda m: None,
    )
    _, _, info = load_checkpoint(tmp_path / "w")
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager((tmp_path / "w" / "checkpoints").absolute())
    state = mngr.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    mngr.close()
    for a, b in zip(
        jax.tree.leaves(state["params"]), jax.tree.leaves(plain["params"]), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6)
    # the EMA differs from the raw weights but stays in their range
    ema = jax.tree.leaves(state["ema"]["params"])
    assert any(
        not np.allclose(a, b) for a, b in zip(ema, jax.tree.leaves(state["params"]), strict=True)
    )
    assert info["weights"] == choose_weights(hist)
    chosen = state["ema"] if info["weights"] == "ema" else state
    for a, b in zip(
        jax.tree.leaves(variables["params"]), jax.tree.leaves(chosen["params"]), strict=True
    ):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert (
        cli.main(["export-model", "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "m")])
        == 0
    )
    _, loaded, meta = load_model(tmp_path / "m")
    assert meta["weights"] == info["weights"] and meta["holdout"]["images"] == 16
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(a, b)


def test_choose_weights_uses_validation_only():
    from convmixer_jax.training.loop import choose_weights

    rec = {"recipe": {"ema_decay": 0.999}}
    assert (
        choose_weights(
            {
                **rec,
                "epochs": [{"val_accuracy": 0.8, "val_accuracy_ema": 0.81, "test_accuracy": 0.9}],
            }
        )
        == "ema"
    )
    assert (
        choose_weights({**rec, "epochs": [{"val_accuracy": 0.82, "val_accuracy_ema": 0.81}]})
        == "raw"
    )
    assert (
        choose_weights({"recipe": {"ema_decay": 0.0}, "epochs": [{"val_accuracy": 0.1}]}) == "raw"
    )
