"""Wrong-key attack: the images and weights strategies and a Python loop agree exactly."""

import json
import shutil

import jax
import numpy as np
import pytest

from convmixer_jax import cli
from convmixer_jax.attacks.wrong_keys import (
    draw_attack_keys,
    wrong_key_accuracies,
    wrong_key_accuracies_loop,
)
from convmixer_jax.model.convmixer import ConvMixer, ConvMixerConfig
from convmixer_jax.scheme.images import encrypt_images
from convmixer_jax.scheme.keys import generate_key, stack_keys
from convmixer_jax.scheme.params import decrypt_params, encrypt_params
from convmixer_jax.training.loop import init_variables

CFG = ConvMixerConfig(dim=12, depth=1, kernel_size=3, patch_size=2, num_classes=4, image_size=8)


@pytest.fixture(scope="module")
def setup():
    variables = init_variables(CFG, 3)
    # Sharper head so that predictions depend on the input (non-vacuous comparisons).
    rng = np.random.default_rng(0)
    # per-image colour and gradient so that a random model's predictions differ between images
    base = rng.uniform(0, 1, (45, 1, 1, 3)) * np.linspace(0.2, 1.0, 8)[None, :, None, None]
    images = np.clip(255 * (base + rng.uniform(-0.1, 0.1, (45, 8, 8, 3))), 0, 255).astype(np.uint8)
    # Calibrate BatchNorm statistics on the images so that the random model's
    # predictions depend on its input (otherwise every comparison is vacuous).
    model = ConvMixer(CFG)
    step = jax.jit(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[1]["batch_stats"]
    )
    for _ in range(40):
        variables = {**variables, "batch_stats": step(variables, images / 255.0)}
    variables = jax.tree.map(np.asarray, variables)
    labels = np.argmax(np.asarray(model.apply(variables, images / 255.0)), 1)
    assert len(set(labels.tolist())) > 1
    secret = generate_key(2, 3, seed=11)
    enc = encrypt_params(variables, secret)
    return variables, secret, enc, images, labels


def test_strategies_and_loop_agree(setup):
    _, secret, enc, images, labels = setup
    wrong = draw_attack_keys(5, 7, 2, 3)
    keys = stack_keys([secret] + [wrong[i] for i in range(7)])
    a = wrong_key_accuracies(
        CFG, enc, images, labels, keys, strategy="images", key_chunk=3, batch_size=16
    )
    b = wrong_key_accuracies(
        CFG, enc, images, labels, keys, strategy="weights", key_chunk=3, batch_size=16
    )
    c = wrong_key_accuracies_loop(CFG, enc, images, labels, keys, batch_size=16)
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(b, c)
    assert a[0] == 1.0  # the right key reproduces the plain model's predictions
    assert a[1:].max() < 1.0 and len(set(a[1:].tolist())) > 1


def test_weights_strategy_equals_encrypted_images_logits(setup):
    _, secret, enc, images, _ = setup
    k = generate_key(2, 3, seed=99)
    model = ConvMixer(CFG)
    x = images / 255.0
    lhs = model.apply(enc, np.asarray(encrypt_images(x.astype(np.float32), k)))
    rhs = model.apply(decrypt_params(enc, k), x.astype(np.float32))
    np.testing.assert_allclose(np.asarray(lhs), np.asarray(rhs), atol=1e-4)


def test_draw_attack_keys_reproducible_and_valid():
    a, b = draw_attack_keys(1, 4, 4, 3), draw_attack_keys(1, 4, 4, 3)
    np.testing.assert_array_equal(a.perm, b.perm)
    assert not np.array_equal(a.perm, draw_attack_keys(2, 4, 4, 3).perm)
    for i in range(4):
        assert sorted(a.perm[i].tolist()) == list(range(48)) and int(a.flip[i].sum()) == 24
    assert jax.device_get(a.perm).shape == (4, 48)


def _png_tree(root, n_per_class=6, classes=3, size=8):
    from PIL import Image

    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n_per_class):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                    d / f"{i}.png"
                )


def test_cli_attack_strategies_identical_and_reproduce(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CONVMIXER_JAX_CACHE", str(tmp_path / "cache"))
    _png_tree(tmp_path / "data")
    model = tmp_path / "m"
    assert (
        cli.main(
            [
                "init-model",
                "--dim",
                "8",
                "--depth",
                "1",
                "--kernel-size",
                "3",
                "--patch-size",
                "2",
                "--num-classes",
                "3",
                "--image-size",
                "8",
                "--seed",
                "0",
                "--out",
                str(model),
            ]
        )
        == 0
    )
    outs = {}
    for s in ("weights", "images"):
        out = tmp_path / f"{s}.json"
        assert (
            cli.main(
                [
                    "attack",
                    str(model),
                    "--data-dir",
                    str(tmp_path / "data"),
                    "--num-keys",
                    "5",
                    "--limit",
                    "15",
                    "--key-seed",
                    "5",
                    "--strategy",
                    s,
                    "--quiet",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        outs[s] = json.loads(out.read_text())
        assert (
            outs[s]["key_seed"] == 5 and outs[s]["seed"] == 0
        )  # keys from --key-seed, subset from --seed
    assert outs["weights"]["accuracies"] == outs["images"]["accuracies"]
    assert len(outs["weights"]["accuracies"]) == 5 and outs["weights"]["test_images"] == 15
    assert "perm" not in json.dumps(outs["weights"])
    # existing output is refused and left untouched
    before = (tmp_path / "weights.json").read_text()
    assert (
        cli.main(
            [
                "attack",
                str(model),
                "--data-dir",
                str(tmp_path / "data"),
                "--num-keys",
                "2",
                "--out",
                str(tmp_path / "weights.json"),
                "--quiet",
            ]
        )
        != 0
    )
    assert (tmp_path / "weights.json").read_text() == before

    rep = tmp_path / "rep"
    assert (
        cli.main(
            [
                "reproduce",
                "--checkpoint",
                str(model),
                "--data-dir",
                str(tmp_path / "data"),
                "--num-keys",
                "3",
                "--quiet",
                "--out",
                str(rep),
            ]
        )
        == 0
    )
    res = json.loads((rep / "results.json").read_text())
    for field in (
        "test_images",
        "baseline_plain",
        "encrypted_plain",
        "encrypted_encrypted",
        "identical_predictions",
        "wrong_keys",
        "key_space_log2",
        "epochs",
        "train_seconds",
        "device",
        "key_fingerprint",
    ):
        assert field in res, field
    assert res["test_images"] == 18 and res["identical_predictions"] == 18
    assert (
        res["identical_predictions_tta"] == 18
        and res["encrypted_encrypted_tta"] == res["baseline_plain_tta"]
    )
    assert "mirror TTA" in (rep / "table1.md").read_text()
    assert res["encrypted_encrypted"] == res["baseline_plain"]
    assert len(res["wrong_keys"]) == 3 and round(res["key_space_log2"], 2) == round(
        np.log2(float(np.prod(np.arange(1, 13, dtype=np.float64))) * 924), 2
    )
    assert {p.name for p in rep.iterdir()} >= {"results.json", "table1.md", "fig4.png", "fig5.png"}
    assert "perm" not in (rep / "results.json").read_text()
    # training options with --checkpoint would be ignored: refused, nothing written
    capsys.readouterr()
    assert (
        cli.main(
            [
                "reproduce",
                "--checkpoint",
                str(model),
                "--data-dir",
                str(tmp_path / "data"),
                "--epochs",
                "3",
                "--holdout",
                "2",
                "--quiet",
                "--out",
                str(tmp_path / "rep3"),
            ]
        )
        == 2
    )
    assert "--epochs, --holdout set how a model is trained" in capsys.readouterr().err
    assert not (tmp_path / "rep3").exists()
    # reproduce refuses an encrypted checkpoint
    key = tmp_path / "k.json"
    assert (
        cli.main(
            ["keygen", "--block-size", "2", "--channels", "3", "--seed", "1", "--out", str(key)]
        )
        == 0
    )
    assert cli.main(["encrypt-model", "--key", str(key), str(model), str(tmp_path / "enc")]) == 0
    capsys.readouterr()
    assert (
        cli.main(
            [
                "reproduce",
                "--checkpoint",
                str(tmp_path / "enc"),
                "--data-dir",
                str(tmp_path / "data"),
                "--num-keys",
                "1",
                "--quiet",
                "--out",
                str(tmp_path / "rep2"),
            ]
        )
        == 1
    )
    assert "encrypted" in capsys.readouterr().err
    assert not (tmp_path / "rep2").exists()
    # --out holding the checkpoint is refused even with --force (it would be deleted)
    nest = tmp_path / "nest"
    shutil.copytree(model, nest / "plain-model")
    before = sorted(str(p.relative_to(nest)) for p in nest.rglob("*"))
    assert (
        cli.main(
            [
                "reproduce",
                "--checkpoint",
                str(nest / "plain-model"),
                "--data-dir",
                str(tmp_path / "data"),
                "--num-keys",
                "1",
                "--quiet",
                "--force",
                "--out",
                str(nest),
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "contains --checkpoint" in err and "choose another output name" in err
    assert sorted(str(p.relative_to(nest)) for p in nest.rglob("*")) == before


def _run_attack_worker(n_devices):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).parents[1])
    if n_devices > 1:
        env["XLA_FLAGS"] = (
            env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n_devices}"
        ).strip()
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("attack_worker.py"))],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_key_axis_sharded_over_four_devices_gives_identical_accuracies():
    one, four = _run_attack_worker(1), _run_attack_worker(4)
    assert one["devices"] == 1 and four["devices"] == 4
    assert one["images"] == four["images"] == one["weights"] == four["weights"]
    assert len(set(one["images"])) > 1


def test_reproduce_from_scratch_trains_the_default_recipe(tmp_path, monkeypatch, capsys):
    """With no --checkpoint, reproduce trains the paper's architecture with the default
    recipe (strong: hold-out, EMA, RandAugment), one output per class of the data, and
    evaluates that model; a hold-out the data cannot give is refused before any output.
    The paper's preset is shrunk (width 8, depth 1; patch 4 on 32 x 32 as in the paper) so
    that the test compiles in seconds; what reproduce takes from it and what from the data
    is the same."""
    from convmixer_jax.model.convmixer import PRESETS

    monkeypatch.setitem(
        PRESETS,
        "paper",
        ConvMixerConfig(dim=8, depth=1, kernel_size=3, patch_size=4, num_classes=10, image_size=32),
    )
    monkeypatch.setenv("CONVMIXER_JAX_CACHE", str(tmp_path / "cache"))
    _png_tree(tmp_path / "data", n_per_class=4, classes=3, size=32)
    common = [
        "reproduce",
        "--data-dir",
        str(tmp_path / "data"),
        "--epochs",
        "1",
        "--train-batch-size",
        "3",
        "--num-keys",
        "2",
        "--key-seed",
        "4",
        "--quiet",
    ]
    assert cli.main([*common, "--out", str(tmp_path / "too-small")]) == 2
    assert "--holdout N with N < 12" in capsys.readouterr().err
    assert not (tmp_path / "too-small").exists() and not (tmp_path / "too-small-work").exists()
    rep = tmp_path / "rep"
    assert cli.main([*common, "--holdout", "3", "--out", str(rep)]) == 0
    res = json.loads((rep / "results.json").read_text())
    assert (
        res["train_config"]["augment"] == ["crop", "flip", "randaugment"]
        and res["train_config"]["ema_decay"] > 0
    )
    assert res["holdout"]["images"] == 3 and res["weights"] in ("ema", "raw") and res["epochs"] == 1
    assert "test_accuracy" not in res["train_log"][0] and "val_accuracy_ema" in res["train_log"][0]
    from convmixer_jax.files.model_dir import load_model

    config, variables, meta = load_model(rep / "plain-model")
    assert (config.dim, config.depth, config.patch_size, config.num_classes) == (8, 1, 4, 3)
    assert meta["classes"] == ["class0", "class1", "class2"] and meta["weights"] == res["weights"]
    # the saved model is the one evaluated
    from convmixer_jax.data import load_split
    from convmixer_jax.model.inference import predict_logits

    test_x, test_y, _ = load_split("test", data_dir=str(tmp_path / "data"))
    acc = float(
        np.mean(np.argmax(np.asarray(predict_logits(config, variables, test_x)), -1) == test_y)
    )
    assert res["baseline_plain"] == pytest.approx(acc) and res["identical_predictions"] == 12
