"""The wrong-key attack (the paper's sweep, ``attacks.wrong_keys`` and ``convmixer-jax attack``):
the images and weights strategies and a Python loop agree exactly, on one device and with the
key axis sharded over four."""

import json

import jax
import numpy as np
import pytest

from convmixer_jax import cli
from convmixer_jax.attacks.wrong_keys import (
    draw_attack_keys,
    wrong_key_accuracies,
    wrong_key_accuracies_loop,
)
from convmixer_jax.model.convmixer import ConvMixer
from convmixer_jax.scheme.images import encrypt_images
from convmixer_jax.scheme.keys import generate_key, stack_keys
from convmixer_jax.scheme.params import decrypt_params, encrypt_params


@pytest.fixture(scope="module")
def cfg(make_tiny_config):
    """ConvMixer-12/1, kernel 3, patch 2, 4 classes, 8 x 8 RGB."""
    return make_tiny_config(dim=12, num_classes=4)


@pytest.fixture(scope="module")
def setup(cfg, tinted_images, calibrated_variables):
    # per-image colour and gradient so that a random model's predictions differ between images;
    # BatchNorm statistics calibrated on the images so that the random model's predictions
    # depend on its input (otherwise every comparison is vacuous)
    images = tinted_images(45)
    variables = calibrated_variables(cfg, images, seed=3, passes=40)
    labels = np.argmax(np.asarray(ConvMixer(cfg).apply(variables, images / 255.0)), 1)
    assert len(set(labels.tolist())) > 1
    secret = generate_key(2, 3, seed=11)
    enc = encrypt_params(variables, secret)
    return variables, secret, enc, images, labels


def test_strategies_and_loop_agree(cfg, setup):
    _, secret, enc, images, labels = setup
    wrong = draw_attack_keys(5, 7, 2, 3)
    keys = stack_keys([secret] + [wrong[i] for i in range(7)])
    a = wrong_key_accuracies(
        cfg, enc, images, labels, keys, strategy="images", key_chunk=3, batch_size=16
    )
    b = wrong_key_accuracies(
        cfg, enc, images, labels, keys, strategy="weights", key_chunk=3, batch_size=16
    )
    c = wrong_key_accuracies_loop(cfg, enc, images, labels, keys, batch_size=16)
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(b, c)
    assert a[0] == 1.0  # the right key reproduces the plain model's predictions
    assert a[1:].max() < 1.0 and len(set(a[1:].tolist())) > 1


def test_weights_strategy_equals_encrypted_images_logits(cfg, setup):
    _, secret, enc, images, _ = setup
    k = generate_key(2, 3, seed=99)
    model = ConvMixer(cfg)
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


def test_cli_attack_strategies_identical_and_existing_output_kept(
    tmp_path, monkeypatch, capsys, png_tree, tiny_model_dir
):
    monkeypatch.setenv("CONVMIXER_JAX_CACHE", str(tmp_path / "cache"))
    png_tree(tmp_path / "data")
    model = tiny_model_dir  # ConvMixer-8/1, kernel 3, patch 2, 3 classes, 8 x 8, seed 0
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
