"""The ``convmixer-jax`` command line, run in-process on a tiny model.

End to end (keygen -> init-model -> encrypt-model -> encrypt-images -> predict
equals the plain model on plain images), decrypt/rekey of model directories,
keyspace, train/evaluate on a tiny local data set, and one test per bad input:
each must exit non-zero with one line ``convmixer-jax: error: ...`` naming the
problem and must leave the output path absent (or unchanged).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from convmixer_jax import cli
from convmixer_jax.files import atomic
from convmixer_jax.files import model_dir as model_io
from convmixer_jax.scheme import keys
from tests.cli_helpers import ok, run

REPO = Path(__file__).resolve().parents[1]
M, C = 2, 3  # block size = patch size, channels


@pytest.fixture(scope="module")
def tiny(arch_args, tiny_config):
    """The options that give the tiny architecture (patch ``M``, ``C`` channels), ending in
    ``--image-size 8 --channels 3``."""
    assert (tiny_config.patch_size, tiny_config.channels) == (M, C)
    return arch_args(tiny_config)


def assert_error(capsys, argv, *words, rc_expected=None):
    """Run ``argv``; expect a non-zero exit and one error line containing ``words``."""
    rc, out, err = run(capsys, *argv)
    assert rc != 0, out
    if rc_expected is not None:
        assert rc == rc_expected
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convmixer-jax: error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])
    return lines[0]


def tree_equal(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        jax.tree.leaves(
            jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)
        )
    )


def snapshot(path: Path) -> dict:
    """Relative path -> bytes of every file under ``path`` (or of the file itself)."""
    if path.is_file():
        return {"": path.read_bytes()}
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir):
    """A key, a second key, a tiny plain model (``tiny_model_dir``), its encrypted version
    and test images."""
    d = tmp_path_factory.mktemp("cli")
    for name, seed in (("key", 1), ("key2", 2)):
        assert (
            cli.main(
                [
                    "keygen",
                    "--block-size",
                    str(M),
                    "--channels",
                    str(C),
                    "--seed",
                    str(seed),
                    "--out",
                    str(d / f"{name}.json"),
                ]
            )
            == 0
        )
    assert (
        cli.main(
            ["encrypt-model", "--key", str(d / "key.json"), str(tiny_model_dir), str(d / "enc")]
        )
        == 0
    )
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 8, 8, C), dtype=np.uint8)
    np.save(d / "images.npy", images)
    np.save(d / "images_f32.npy", (images / 255.0).astype(np.float32))
    return SimpleNamespace(
        dir=d,
        key=d / "key.json",
        key2=d / "key2.json",
        plain=tiny_model_dir,
        enc=d / "enc",
        images=d / "images.npy",
        images_f32=d / "images_f32.npy",
        array=images,
    )


# --------------------------------------------------------------------------- the workflow


def test_encrypted_model_on_encrypted_images_equals_plain(env, tmp_path, capsys):
    for name in ("images", "images_f32"):
        src = getattr(env, name)
        ok(capsys, "encrypt-images", "--key", env.key, src, tmp_path / f"{name}_enc.npy")
        ok(
            capsys,
            "predict",
            env.enc,
            tmp_path / f"{name}_enc.npy",
            "--out",
            tmp_path / f"{name}_enc_logits.npy",
        )
        ok(capsys, "predict", env.plain, src, "--out", tmp_path / f"{name}_plain_logits.npy")
        enc = np.load(tmp_path / f"{name}_enc_logits.npy")
        plain = np.load(tmp_path / f"{name}_plain_logits.npy")
        assert enc.dtype == np.float32 and enc.shape == (5, 3)
        np.testing.assert_array_equal(enc.argmax(1), plain.argmax(1))
        np.testing.assert_allclose(enc, plain, atol=1e-4, rtol=1e-4)
    # the encryption does something: the plain model on encrypted images differs
    ok(capsys, "predict", env.plain, tmp_path / "images_enc.npy", "--out", tmp_path / "wrong.npy")
    assert not np.allclose(
        np.load(tmp_path / "wrong.npy"), np.load(tmp_path / "images_plain_logits.npy"), atol=1e-3
    )


def test_model_dir_records_fingerprint_never_key(env):
    meta = json.loads((env.enc / "config.json").read_text())
    key = keys.load_key(env.key)
    assert meta["format"] == "convmixer-jax-model" and meta["version"] == 1
    assert meta["encryption"] == {
        "key_fingerprint": keys.fingerprint(key),
        "block_size": M,
        "channels": C,
    }
    text = (env.enc / "config.json").read_text()
    assert "perm" not in text and "flip" not in text
    assert json.loads((env.plain / "config.json").read_text())["encryption"] is None


def test_handwritten_key_from_method_md(env, tmp_path, capsys):
    pb = M * M * C
    key_obj = {
        "format": "convmixer-jax-key",
        "version": 1,
        "block_size": M,
        "channels": C,
        "perm": list(range(pb))[::-1],
        "flip": [1, 0] * (pb // 2),
    }
    (tmp_path / "hand.json").write_text(json.dumps(key_obj))
    ok(capsys, "encrypt-model", "--key", tmp_path / "hand.json", env.plain, tmp_path / "enc")
    ok(capsys, "encrypt-images", "--key", tmp_path / "hand.json", env.images, tmp_path / "x.npy")
    # the written images are method.md's transform, block by block
    x = env.array
    enc = np.load(tmp_path / "x.npy")
    blocks = x.reshape(5, 4, M, 4, M, C).transpose(0, 1, 3, 2, 4, 5).reshape(5, 4, 4, pb)
    z = blocks[..., key_obj["perm"]]
    z = np.where(np.asarray(key_obj["flip"]) == 1, 255 - z, z)
    np.testing.assert_array_equal(
        enc, z.reshape(5, 4, 4, M, M, C).transpose(0, 1, 3, 2, 4, 5).reshape(x.shape)
    )
    ok(capsys, "predict", tmp_path / "enc", tmp_path / "x.npy", "--out", tmp_path / "a.npy")
    ok(capsys, "predict", env.plain, env.images, "--out", tmp_path / "b.npy")
    np.testing.assert_allclose(
        np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"), atol=1e-4, rtol=1e-4
    )


def test_decrypt_model_restores_plain_exactly(env, tmp_path, capsys):
    ok(capsys, "decrypt-model", "--key", env.key, env.enc, tmp_path / "dec")
    _, plain, _ = model_io.load_model(env.plain)
    config, dec, meta = model_io.load_model(tmp_path / "dec")
    assert meta["encryption"] is None and meta["seed"] == 0  # provenance kept
    assert tree_equal(plain, dec)


def test_rekey_equals_encrypt_with_new_key(env, tmp_path, capsys):
    ok(
        capsys,
        "rekey-model",
        "--old-key",
        env.key,
        "--new-key",
        env.key2,
        env.enc,
        tmp_path / "rekeyed",
    )
    ok(capsys, "encrypt-model", "--key", env.key2, env.plain, tmp_path / "direct")
    _, a, meta_a = model_io.load_model(tmp_path / "rekeyed")
    _, b, meta_b = model_io.load_model(tmp_path / "direct")
    assert tree_equal(a, b)
    assert meta_a["encryption"] == meta_b["encryption"]
    assert meta_a["encryption"]["key_fingerprint"] == keys.fingerprint(keys.load_key(env.key2))


def test_images_roundtrip_keeps_shape_and_dtype(env, tmp_path, capsys):
    rng = np.random.default_rng(1)
    cases = {
        "u8": env.array,
        "f64": rng.random((2, 4, 6, C)),
        "single": env.array[0],
        # 1 - (1 - x) == x exactly only for x on a grid as fine as that of 1 - x
        # (true of 8-bit data and of numpy's 53-bit uniforms in float64)
        "f16": (rng.integers(0, 257, (1, 2, 2, C)) / 256).astype(np.float16),
    }
    for name, x in cases.items():
        np.save(tmp_path / f"{name}.npy", x)
        ok(
            capsys,
            "encrypt-images",
            "--key",
            env.key,
            tmp_path / f"{name}.npy",
            tmp_path / f"{name}_e.npy",
        )
        ok(
            capsys,
            "decrypt-images",
            "--key",
            env.key,
            tmp_path / f"{name}_e.npy",
            tmp_path / f"{name}_d.npy",
        )
        e, dec = np.load(tmp_path / f"{name}_e.npy"), np.load(tmp_path / f"{name}_d.npy")
        assert e.shape == x.shape and e.dtype == x.dtype and dec.dtype == x.dtype
        assert not np.array_equal(e, x)
        np.testing.assert_array_equal(dec, x)


def test_keygen_prints_only_fingerprint(tmp_path, capsys):
    out = ok(capsys, "keygen", "--block-size", "4", "--channels", "3", "--out", tmp_path / "k.json")
    key = keys.load_key(tmp_path / "k.json")
    assert out.strip() == keys.fingerprint(key)
    assert (tmp_path / "k.json").stat().st_mode & 0o077 == 0  # secret: owner only
    # seeded keys are reproducible; unseeded ones are not
    ok(
        capsys,
        "keygen",
        "--block-size",
        "4",
        "--channels",
        "3",
        "--seed",
        "7",
        "--out",
        tmp_path / "s1.json",
    )
    ok(
        capsys,
        "keygen",
        "--block-size",
        "4",
        "--channels",
        "3",
        "--seed",
        "7",
        "--out",
        tmp_path / "s2.json",
    )
    ok(capsys, "keygen", "--block-size", "4", "--channels", "3", "--out", tmp_path / "k2.json")
    assert (tmp_path / "s1.json").read_text() == (tmp_path / "s2.json").read_text()
    assert (tmp_path / "k.json").read_text() != (tmp_path / "k2.json").read_text()


def test_keyspace(capsys):
    out = ok(capsys, "keyspace", "--block-size", "4", "--channels", "3")
    assert str(math.factorial(48) * math.comb(48, 24)) in out
    assert "log2 = 247.82" in out and "2^247.82" in out


def test_odd_block_length_keys_and_key_space(tmp_path, capsys):
    """Patch 7 on RGB (timm's ImageNet ConvMixers): pb = 147, flip has floor(147/2) = 73 ones."""
    ok(capsys, "keygen", "--block-size", "7", "--channels", "3", "--out", tmp_path / "k.json")
    key = json.loads((tmp_path / "k.json").read_text())
    assert (
        sorted(key["perm"]) == list(range(147))
        and sum(key["flip"]) == 73
        and len(key["flip"]) == 147
    )
    out = ok(capsys, "keyspace", "--block-size", "7", "--channels", "3")
    exact = math.factorial(147) * math.comb(147, 73)
    assert f"keys = pb! * C(pb, (pb-1)/2) = {exact}\n" in out
    assert f"log2 = {math.log2(exact):.2f}" in out
    # a model of that patch size is made and encrypted; pb = 1 is refused, it has no key but
    # the identity
    ok(
        capsys,
        "init-model",
        "--dim",
        "8",
        "--depth",
        "1",
        "--kernel-size",
        "3",
        "--patch-size",
        "7",
        "--image-size",
        "14",
        "--out",
        tmp_path / "m",
    )
    ok(
        capsys,
        "encrypt-model",
        "--key",
        tmp_path / "k.json",
        tmp_path / "m",
        "--out",
        tmp_path / "e",
    )
    assert_error(
        capsys,
        [
            "init-model",
            "--patch-size",
            "1",
            "--channels",
            "1",
            "--image-size",
            "4",
            "--out",
            tmp_path / "m1",
        ],
        "identity",
    )
    assert not (tmp_path / "m1").exists()


def test_init_model_preset_and_overrides(tmp_path, capsys):
    ok(
        capsys,
        "init-model",
        "--preset",
        "paper",
        "--dim",
        "8",
        "--depth",
        "1",
        "--image-size",
        "8",
        "--patch-size",
        "2",
        "--seed",
        "3",
        "--out",
        tmp_path / "m",
    )
    config, variables, meta = model_io.load_model(tmp_path / "m")
    assert (config.dim, config.depth, config.patch_size, config.image_size) == (8, 1, 2, 8)
    assert (config.kernel_size, config.num_classes, config.channels) == (
        9,
        10,
        3,
    )  # from the preset
    assert meta["seed"] == 3
    assert variables["params"]["stem"]["kernel"].shape == (2, 2, 3, 8)


def test_help_of_every_command(capsys):
    assert cli.main(["--help"]) == 0
    top = capsys.readouterr().out
    commands = [
        "keygen",
        "encrypt-images",
        "decrypt-images",
        "init-model",
        "encrypt-model",
        "decrypt-model",
        "rekey-model",
        "predict",
        "keyspace",
        "train",
        "evaluate",
    ]
    for c in commands:
        assert c in top
        assert cli.main([c, "--help"]) == 0
        assert "usage: convmixer-jax " + c in capsys.readouterr().out


def test_module_help_subprocess():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(
        [sys.executable, "-m", "convmixer_jax.cli", "--help"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "keygen" in r.stdout and "encrypt-model" in r.stdout


# --------------------------------------------------------------------------- train and evaluate


@pytest.fixture
def tiny_data(tmp_path, monkeypatch):
    """An image-folder data set of 8x8 PNGs, 3 classes (train 12, test 6)."""
    from PIL import Image

    monkeypatch.setenv("CONVMIXER_JAX_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for split, n in (("train", 4), ("test", 2)):
        for label, cls in enumerate(("a", "b", "c")):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                x = rng.integers(0, 64, (8, 8, 3)) + 80 * label
                Image.fromarray(x.astype(np.uint8)).save(root / split / cls / f"{i}.png")
    return root


def test_train_then_evaluate(env, tiny_data, tmp_path, capsys, tiny, arch_args, make_tiny_config):
    # the default recipe (strong) holds 5,000 images out: more than 8 is refused before any output
    assert_error(
        capsys,
        [
            "train",
            "--data-dir",
            tiny_data,
            "--epochs",
            "1",
            *tiny,
            "--limit-train",
            "8",
            "--workdir",
            tmp_path / "work",
            "--out",
            tmp_path / "model",
        ],
        "holds 5000 training images out",
        "--holdout N with N < 8",
    )
    assert not (tmp_path / "work").exists() and not (tmp_path / "model").exists()
    ok(
        capsys,
        "train",
        "--data-dir",
        tiny_data,
        "--epochs",
        "1",
        "--batch-size",
        "4",
        *tiny,
        "--workdir",
        tmp_path / "work",
        "--limit-train",
        "8",
        "--holdout",
        "3",
        "--limit-test",
        "5",
        "--quiet",
        "--out",
        tmp_path / "model",
    )
    config, _, meta = model_io.load_model(tmp_path / "model")
    assert meta["encryption"] is None and meta["recipe"] == "strong"  # the default recipe
    assert (
        meta["train_config"]["batch_size"] == 4
    )  # --batch-size: the former name of --train-batch-size
    assert meta["train_config"]["augment"] == ["crop", "flip", "randaugment"] and meta[
        "weights"
    ] in ("ema", "raw")
    assert meta["classes"] == sorted(p.name for p in (tiny_data / "train").iterdir())
    assert (
        meta["train_config"]["epochs"] == 1
        and meta["train_images"] == 5
        and meta["test_images"] == 5
    )
    assert meta["holdout"]["images"] == 3
    assert 0.0 <= meta["test_accuracy"] <= 1.0
    # train draws the run's curves into its workdir; plot-training redraws them
    assert (tmp_path / "work" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = json.loads(
        ok(capsys, "plot-training", tmp_path / "work", "--out", tmp_path / "c.png").strip()
    )
    last = json.loads((tmp_path / "work" / "train_log.json").read_text())["epochs"][-1]
    assert (
        out["epochs"] == 1 and "test_accuracy" not in out
    )  # a hold-out run never scores test per epoch
    assert (
        out["val_accuracy"] == last["val_accuracy"]
        and out["val_accuracy_ema"] == last["val_accuracy_ema"]
    )
    ok(capsys, "encrypt-model", "--key", env.key, tmp_path / "model", tmp_path / "enc")

    def evaluate(*extra):
        out = ok(capsys, "evaluate", *extra, "--data-dir", tiny_data, "--batch-size", "4")
        return json.loads(out.strip().splitlines()[-1])

    plain = evaluate(tmp_path / "model")
    assert plain["images"] == 6 and not plain["encrypted_images"] and not plain["model_encrypted"]
    assert plain["key_fingerprint"] is None
    right = evaluate(tmp_path / "enc", "--key", env.key)
    assert right["accuracy"] == plain["accuracy"]
    assert right["encrypted_images"] and right["model_encrypted"]
    assert right["key_fingerprint"] == keys.fingerprint(keys.load_key(env.key))
    assert evaluate(tmp_path / "model", "--limit", "3")["images"] == 3
    # training into an existing output is refused before any work
    before = snapshot(tmp_path / "model")
    assert_error(
        capsys,
        [
            "train",
            "--data-dir",
            tiny_data,
            "--epochs",
            "1",
            "--batch-size",
            "4",
            *tiny,
            "--workdir",
            tmp_path / "work2",
            "--out",
            tmp_path / "model",
        ],
        "already exists",
        "--force",
    )
    assert snapshot(tmp_path / "model") == before and not (tmp_path / "work2").exists()
    # data that do not fit the model
    assert_error(
        capsys,
        [
            "train",
            "--data-dir",
            tiny_data,
            "--recipe",
            "fast",
            "--epochs",
            "1",
            "--batch-size",
            "4",
            *arch_args(make_tiny_config(image_size=16)),
            "--workdir",
            tmp_path / "w3",
            "--out",
            tmp_path / "m3",
        ],
        "16x16",
        "--image-size",
    )
    assert not (tmp_path / "m3").exists()
    assert_error(
        capsys,
        ["evaluate", tmp_path / "model", "--data-dir", tmp_path / "nowhere"],
        "does not exist",
    )
    # evaluate --out writes the JSON it prints
    ok(
        capsys,
        "evaluate",
        tmp_path / "model",
        "--data-dir",
        tiny_data,
        "--quiet",
        "--out",
        tmp_path / "ev.json",
    )
    assert json.loads((tmp_path / "ev.json").read_text())["accuracy"] == plain["accuracy"]
    # data whose classes are not the model's: other names, or another count
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_data, other)
    (other / "test" / "c").rename(other / "test" / "z")
    assert_error(
        capsys,
        ["evaluate", tmp_path / "model", "--data-dir", other, "--out", tmp_path / "ev2.json"],
        "class 2 is 'z' in the data but 'c' in the model",
    )
    shutil.rmtree(other / "test" / "z")
    assert_error(
        capsys,
        ["evaluate", tmp_path / "model", "--data-dir", other],
        "has 2 classes but the model has 3",
    )
    assert_error(
        capsys,
        [
            "attack",
            tmp_path / "enc",
            "--data-dir",
            other,
            "--num-keys",
            "2",
            "--out",
            tmp_path / "a.json",
        ],
        "has 2 classes but the model has 3",
    )
    assert not (tmp_path / "ev2.json").exists() and not (tmp_path / "a.json").exists()


def test_train_init_from_warm_starts_and_counts_both_stages(env, tiny_data, tmp_path, capsys, tiny):
    import jax

    from convmixer_jax.training.loop import init_variables

    common = ["--data-dir", tiny_data, "--recipe", "fast", "--batch-size", "4", "--quiet"]
    ok(
        capsys,
        "train",
        *common,
        "--epochs",
        "2",
        "--lr",
        "0.01",
        *tiny,
        "--workdir",
        tmp_path / "w0",
        "--out",
        tmp_path / "m0",
    )
    _, start, start_meta = model_io.load_model(tmp_path / "m0")
    # a second stage with a vanishing learning rate stays at the starting weights,
    # which a fresh initialization (same seed) does not
    ok(
        capsys,
        "train",
        *common,
        "--epochs",
        "1",
        "--lr",
        "1e-9",
        "--init-from",
        tmp_path / "m0",
        "--workdir",
        tmp_path / "w1",
        "--out",
        tmp_path / "m1",
    )
    config, warm, meta = model_io.load_model(tmp_path / "m1")
    fresh = init_variables(config, 0)
    pairs = list(
        zip(
            jax.tree.leaves(warm["params"]),
            jax.tree.leaves(start["params"]),
            jax.tree.leaves(fresh["params"]),
            strict=True,
        )
    )
    assert max(float(np.max(np.abs(w - s))) for w, s, _ in pairs) < 1e-6
    assert max(float(np.max(np.abs(s - f))) for _, s, f in pairs) > 1e-3
    assert meta["epochs"] == 3 and meta["epochs_planned"] == 3 and meta["stage_epochs"] == [2, 1]
    assert meta["init_from"]["model"] == str(tmp_path / "m0") and meta["init_from"]["epochs"] == 2
    stage2 = json.loads((tmp_path / "w1" / "train_log.json").read_text())
    assert stage2["init_from"]["model"] == str(tmp_path / "m0")
    assert meta["train_seconds"] == pytest.approx(
        start_meta["train_seconds"] + sum(e["train_seconds"] for e in stage2["epochs"])
    )
    # export-model of the second stage counts both stages too
    ok(capsys, "export-model", "--workdir", tmp_path / "w1", "--out", tmp_path / "m1e")
    _, _, emeta = model_io.load_model(tmp_path / "m1e")
    assert emeta["epochs"] == 3 and emeta["epochs_planned"] == 3
    assert emeta["train_seconds"] == pytest.approx(meta["train_seconds"])
    # a third stage lists every stage, not the second's total and its own
    ok(
        capsys,
        "train",
        *common,
        "--epochs",
        "1",
        "--lr",
        "1e-9",
        "--init-from",
        tmp_path / "m1",
        "--workdir",
        tmp_path / "w4",
        "--out",
        tmp_path / "m4",
    )
    _, _, meta4 = model_io.load_model(tmp_path / "m4")
    assert meta4["epochs"] == 4 and meta4["stage_epochs"] == [2, 1, 1]
    # the architecture is the starting model's: a different one is refused, as is an encrypted start
    assert_error(
        capsys,
        [
            "train",
            *common,
            "--epochs",
            "1",
            "--init-from",
            tmp_path / "m0",
            "--dim",
            "16",
            "--workdir",
            tmp_path / "w2",
            "--out",
            tmp_path / "m2",
        ],
        "another architecture",
        "--dim 16",
    )
    ok(capsys, "encrypt-model", "--key", env.key, tmp_path / "m0", tmp_path / "m0enc")
    assert_error(
        capsys,
        [
            "train",
            *common,
            "--epochs",
            "1",
            "--init-from",
            tmp_path / "m0enc",
            "--workdir",
            tmp_path / "w3",
            "--out",
            tmp_path / "m3",
        ],
        "encrypted",
        "plain model",
    )
    assert not (tmp_path / "m2").exists() and not (tmp_path / "m3").exists()


# --------------------------------------------------------------------------- bad inputs


BAD_IMAGES = {
    "size": (np.zeros((2, 7, 8, C), np.uint8), ["not divisible", "block size 2"]),
    "channels": (np.zeros((2, 8, 8, 4), np.uint8), ["4 channels", "key is for 3"]),
    "range": (np.full((1, 8, 8, C), 1.5, np.float32), ["[0, 1]", "1.5"]),
    "negative": (np.full((1, 8, 8, C), -0.1, np.float64), ["[0, 1]"]),
    "nan": (np.full((1, 8, 8, C), np.nan, np.float32), ["NaN"]),
    "int64": (np.zeros((1, 8, 8, C), np.int64), ["dtype int64", "uint8"]),
    "bool": (np.zeros((1, 8, 8, C), bool), ["dtype bool"]),
    "rank": (np.zeros((8, 8), np.uint8), ["(..., H, W, C)"]),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
@pytest.mark.parametrize("command", ["encrypt-images", "decrypt-images"])
def test_bad_images_refused(env, tmp_path, capsys, case, command):
    array, words = BAD_IMAGES[case]
    np.save(tmp_path / "in.npy", array)
    assert_error(
        capsys, [command, "--key", env.key, tmp_path / "in.npy", tmp_path / "out.npy"], *words
    )
    assert not (tmp_path / "out.npy").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.npy"]  # no temporary left behind


def test_predict_bad_images_refused(env, tmp_path, capsys):
    cases = {
        "size": (np.zeros((2, 4, 4, C), np.uint8), "4x4"),
        "channels": (np.zeros((2, 8, 8, 1), np.uint8), "1 channels"),
        "range": (np.full((1, 8, 8, C), 2.0, np.float32), "[0, 1]"),
        "rank": (np.zeros((8, 8, C), np.uint8), "(N, H, W, C)"),
    }
    for name, (array, word) in cases.items():
        np.save(tmp_path / f"{name}.npy", array)
        assert_error(
            capsys,
            ["predict", env.plain, tmp_path / f"{name}.npy", "--out", tmp_path / "out.npy"],
            word,
        )
        assert not (tmp_path / "out.npy").exists()


def _unreadable_files(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    (tmp_path / "garbage.npy").write_bytes(b"this is not an array")
    np.save(tmp_path / "object.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "truncated.npy", np.zeros((2, 8, 8, C), np.uint8))
    data = (tmp_path / "truncated.npy").read_bytes()
    (tmp_path / "truncated.npy").write_bytes(data[:-10])
    np.savez(tmp_path / "archive.npz", x=np.zeros((1, 8, 8, C), np.uint8))
    (tmp_path / "empty.npy").write_bytes(b"")
    return {
        "garbage": (tmp_path / "garbage.npy", "not a .npy file"),
        "object": (tmp_path / "object.npy", "object arrays"),
        "truncated": (tmp_path / "truncated.npy", "cannot read"),
        "archive": (tmp_path / "archive.npz", ".npz"),
        "empty": (tmp_path / "empty.npy", "not a .npy file"),
        "missing": (tmp_path / "missing.npy", "does not exist"),
    }


def test_unreadable_npy_refused(env, tmp_path, capsys):
    for path, word in _unreadable_files(tmp_path).values():
        assert_error(capsys, ["encrypt-images", "--key", env.key, path, tmp_path / "out.npy"], word)
        assert_error(capsys, ["predict", env.plain, path, "--out", tmp_path / "out.npy"], word)
        assert not (tmp_path / "out.npy").exists()


def _bad_keys(tmp_path: Path, good: Path) -> dict[str, tuple[Path, str]]:
    obj = json.loads(good.read_text())
    pb = M * M * C
    variants = {}

    def put(name, content, word):
        p = tmp_path / f"{name}.json"
        p.write_text(content if isinstance(content, str) else json.dumps(content))
        variants[name] = (p, word)

    put("malformed", '{"format": "convmixer-jax-key", "perm": [1, 2', "not valid JSON")
    put("not_object", "[1, 2, 3]", "JSON object")
    put("wrong_format", {**obj, "format": "something-else"}, "not a convmixer-jax key")
    put("wrong_version", {**obj, "version": 99}, "version")
    put("missing_field", {k: v for k, v in obj.items() if k != "flip"}, "'flip'")
    put(
        "dup_perm",
        {**obj, "perm": [0] + obj["perm"][1:] if obj["perm"][0] != 0 else [1] + obj["perm"][1:]},
        "not a permutation",
    )
    put("short_perm", {**obj, "perm": obj["perm"][:-1]}, "shape")
    flips = list(obj["flip"])
    flips[flips.index(0)] = 1
    put("flip_count", {**obj, "flip": flips}, f"expected exactly floor(pb/2) = {pb // 2}")
    put("flip_values", {**obj, "flip": [2] * (pb // 2) + [0] * (pb // 2)}, "only 0 and 1")
    swapped = list(obj["perm"])
    swapped[0], swapped[1] = swapped[1], swapped[0]
    put("tampered", {**obj, "perm": swapped}, "fingerprint")
    put("strings", {**obj, "perm": [str(v) for v in obj["perm"]]}, "list of integers")
    variants["missing"] = (tmp_path / "nokey.json", "does not exist")
    return variants


def test_bad_keys_refused(env, tmp_path, capsys):
    for path, word in _bad_keys(tmp_path, env.key).values():
        assert_error(
            capsys, ["encrypt-images", "--key", path, env.images, tmp_path / "out.npy"], word
        )
        assert_error(
            capsys, ["encrypt-model", "--key", path, env.plain, tmp_path / "out_model"], word
        )
        assert not (tmp_path / "out.npy").exists() and not (tmp_path / "out_model").exists()


def test_key_model_mismatch_refused(env, tmp_path, capsys):
    ok(capsys, "keygen", "--block-size", "4", "--channels", "3", "--out", tmp_path / "m4.json")
    ok(capsys, "keygen", "--block-size", "2", "--channels", "1", "--out", tmp_path / "c1.json")
    for key, words in (
        (tmp_path / "m4.json", ["block size 4", "patch size 2", "--block-size 2"]),
        (tmp_path / "c1.json", ["1 channels", "takes 3", "--channels 3"]),
    ):
        assert_error(capsys, ["encrypt-model", "--key", key, env.plain, tmp_path / "out"], *words)
        assert_error(
            capsys,
            ["rekey-model", "--old-key", env.key, "--new-key", key, env.enc, tmp_path / "out"],
            *words,
        )
        assert not (tmp_path / "out").exists()
    # evaluate with a key that does not fit the model is refused before any data are read
    assert_error(
        capsys,
        ["evaluate", env.enc, "--key", tmp_path / "m4.json", "--data-dir", tmp_path / "none"],
        "block size 4",
    )


def test_model_state_errors(env, tmp_path, capsys):
    fp = keys.fingerprint(keys.load_key(env.key))
    assert_error(
        capsys,
        ["encrypt-model", "--key", env.key2, env.enc, tmp_path / "out"],
        "already encrypted",
        fp,
        "rekey-model",
    )
    assert_error(
        capsys, ["decrypt-model", "--key", env.key2, env.enc, tmp_path / "out"], "fingerprint", fp
    )
    assert_error(
        capsys, ["decrypt-model", "--key", env.key, env.plain, tmp_path / "out"], "not encrypted"
    )
    assert_error(
        capsys,
        ["rekey-model", "--old-key", env.key2, "--new-key", env.key, env.enc, tmp_path / "out"],
        "fingerprint",
        fp,
    )
    assert_error(
        capsys,
        ["rekey-model", "--old-key", env.key, "--new-key", env.key2, env.plain, tmp_path / "out"],
        "not encrypted",
        "encrypt-model",
    )
    assert not (tmp_path / "out").exists()


def _damaged_models(tmp_path: Path, plain: Path) -> dict[str, tuple[Path, str]]:
    out = {"missing": (tmp_path / "no_such_model", "does not exist")}

    def copy(name):
        dst = tmp_path / name
        shutil.copytree(plain, dst)
        return dst

    (tmp_path / "a_file").write_text("x")
    out["file"] = (tmp_path / "a_file", "not a model directory")
    d = copy("no_config")
    (d / "config.json").unlink()
    out["no_config"] = (d, "no config.json")
    d = copy("bad_json")
    (d / "config.json").write_text("{not json")
    out["bad_json"] = (d, "not valid JSON")
    d = copy("wrong_format")
    meta = json.loads((plain / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**meta, "format": "other"}))
    out["wrong_format"] = (d, "'format'")
    d = copy("wrong_version")
    (d / "config.json").write_text(json.dumps({**meta, "version": 7}))
    out["wrong_version"] = (d, "version 7")
    d = copy("bad_model")
    (d / "config.json").write_text(json.dumps({**meta, "model": {**meta["model"], "dim": -1}}))
    out["bad_model"] = (d, "positive integer")
    d = copy("no_variables")
    shutil.rmtree(d / "variables")
    out["no_variables"] = (d, "variables")
    d = copy("corrupt_variables")
    for p in (d / "variables").rglob("*"):
        if p.is_file() and "METADATA" not in p.name:
            p.write_bytes(b"\0garbage")
    out["corrupt_variables"] = (d, "corrupt")
    d = copy("truncated_chunks")
    for p in (d / "variables").rglob("*"):
        if p.is_file() and p.parent.name == "d":
            p.write_bytes(p.read_bytes()[:5])
    out["truncated_chunks"] = (d, "corrupt")
    d = copy("empty_variables")
    shutil.rmtree(d / "variables")
    (d / "variables").mkdir()
    out["empty_variables"] = (d, "corrupt")
    d = copy("shape_mismatch")  # sealed again after the edit: the weights' shapes are checked
    wrong = {**meta, "model": {**meta["model"], "dim": 16}}
    wrong["model_sha256"] = model_io.model_digest(wrong)
    (d / "config.json").write_text(json.dumps(wrong))
    out["shape_mismatch"] = (d, "has shape")
    d = copy("edited_config")
    (d / "config.json").write_text(json.dumps({**meta, "model": {**meta["model"], "dim": 16}}))
    out["edited_config"] = (d, "was edited")
    return out


def test_damaged_model_dirs_refused(env, tmp_path, capsys):
    for path, word in _damaged_models(tmp_path, env.plain).values():
        assert_error(capsys, ["predict", path, env.images, "--out", tmp_path / "out.npy"], word)
        assert_error(
            capsys, ["encrypt-model", "--key", env.key, path, tmp_path / "out_model"], word
        )
        assert not (tmp_path / "out.npy").exists() and not (tmp_path / "out_model").exists()


def test_corrupt_model_one_line_in_a_real_process(env, tmp_path):
    """Orbax/TensorStore report late errors from their threads; none may reach stderr."""
    path, _ = _damaged_models(tmp_path, env.plain)["corrupt_variables"]
    environ = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "convmixer_jax.cli",
            "predict",
            str(path),
            str(env.images),
            "--out",
            str(tmp_path / "out.npy"),
        ],
        cwd=REPO,
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "corrupt" in r.stderr, r.stderr
    assert not (tmp_path / "out.npy").exists()


def test_existing_output_unchanged_without_force(env, tmp_path, capsys, tiny):
    sentinel = b"do not touch"
    for name in ("out.npy", "key.json"):
        (tmp_path / name).write_bytes(sentinel)
    ok(capsys, "init-model", *tiny, "--seed", "5", "--out", tmp_path / "model")
    model_before = snapshot(tmp_path / "model")
    cases = [
        (
            ["keygen", "--block-size", "2", "--channels", "3", "--out", tmp_path / "key.json"],
            tmp_path / "key.json",
        ),
        (
            ["encrypt-images", "--key", env.key, env.images, tmp_path / "out.npy"],
            tmp_path / "out.npy",
        ),
        (
            ["decrypt-images", "--key", env.key, env.images, tmp_path / "out.npy"],
            tmp_path / "out.npy",
        ),
        (["predict", env.plain, env.images, "--out", tmp_path / "out.npy"], tmp_path / "out.npy"),
        (["init-model", *tiny, "--seed", "1", "--out", tmp_path / "model"], tmp_path / "model"),
        (["encrypt-model", "--key", env.key, env.plain, tmp_path / "model"], tmp_path / "model"),
        (["decrypt-model", "--key", env.key, env.enc, tmp_path / "model"], tmp_path / "model"),
        (
            [
                "rekey-model",
                "--old-key",
                env.key,
                "--new-key",
                env.key2,
                env.enc,
                tmp_path / "model",
            ],
            tmp_path / "model",
        ),
    ]
    for argv, path in cases:
        before = snapshot(path)
        assert_error(capsys, argv, "already exists", "--force")
        assert snapshot(path) == before
    assert snapshot(tmp_path / "model") == model_before
    # with --force the output is replaced, and no temporary is left beside it
    ok(capsys, "encrypt-images", "--key", env.key, env.images, tmp_path / "out.npy", "--force")
    assert np.load(tmp_path / "out.npy").shape == env.array.shape
    ok(capsys, "encrypt-model", "--key", env.key, env.plain, tmp_path / "model", "--force")
    assert model_io.load_model_meta(tmp_path / "model")[1]["encryption"] is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key.json", "model", "out.npy"]


def test_usage_errors_exit_2(capsys):
    assert_error(capsys, ["keygen", "--block-size", "4"], "required", "--out", rc_expected=2)
    assert_error(
        capsys,
        ["keygen", "--block-size", "zero", "--channels", "3", "--out", "x"],
        "positive integer",
        rc_expected=2,
    )
    assert_error(capsys, ["no-such-command"], "invalid choice", rc_expected=2)
    for argv in (
        ["keygen", "--block-size", "4", "--channels", "3", "--seed", "-1", "--out", "x"],
        ["average-models", "a", "b", "--seed", "-3", "--out", "x"],
        ["attack", "m", "--num-keys", "2", "--seed", "-1", "--out", "x"],
    ):
        assert_error(capsys, argv, "--seed", "non-negative", rc_expected=2)
    assert_error(capsys, [], "required", rc_expected=2)
    assert_error(
        capsys, ["keyspace", "--block-size", "1", "--channels", "1"], "identity", rc_expected=1
    )


def test_model_io_save_load_roundtrip(tmp_path, make_tiny_config):
    from convmixer_jax.training.loop import init_variables

    config = make_tiny_config(mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    variables = init_variables(config, 0)
    model_io.save_model(tmp_path / "m", config, variables, extra={"note": "x"})
    config2, variables2, meta = model_io.load_model(tmp_path / "m")
    assert config2 == config and meta["note"] == "x" and tree_equal(variables, variables2)
    with pytest.raises(FileExistsError):
        model_io.save_model(tmp_path / "m", config, variables)
    with pytest.raises(ValueError, match="reserved"):
        model_io.save_model(tmp_path / "m2", config, variables, extra={"encryption": None})
    stem = {**variables["params"]["stem"], "kernel": np.zeros((2, 2, 3, 16), np.float32)}
    other = {**variables, "params": {**variables["params"], "stem": stem}}
    with pytest.raises(model_io.ModelDirError, match="shape"):
        model_io.save_model(tmp_path / "m3", config, other)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    # non-paper normalization: encrypt -> decrypt through directories round-trips
    key = keys.generate_key(2, 3, seed=0)
    model_io.encrypt_model_dir(tmp_path / "m", tmp_path / "e", key)
    model_io.decrypt_model_dir(tmp_path / "e", tmp_path / "d", key)
    _, dec, _ = model_io.load_model(tmp_path / "d")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), variables, dec)


def test_staged_output_dir_replaces_whole_or_not_at_all(tmp_path):
    out = tmp_path / "out"

    def results(d):
        files = snapshot(d)
        assert (
            atomic.RESULTS_MARKER in files
        )  # the folder says it is an output, so --force may replace it
        return {k: v for k, v in files.items() if k != atomic.RESULTS_MARKER}

    with atomic.staged_output_dir(out) as tmp:
        (tmp / "a.txt").write_text("first")
    assert results(out) == {"a.txt": b"first"}
    with pytest.raises(RuntimeError, match="midway"):
        with atomic.staged_output_dir(out) as tmp:
            (tmp / "b.txt").write_text("half")
            raise RuntimeError("midway")
    assert results(out) == {"a.txt": b"first"}
    with atomic.staged_output_dir(out) as tmp:
        (tmp / "b.txt").write_text("second")
    assert results(out) == {"b.txt": b"second"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_average_models_cli(env, tiny_data, tmp_path, capsys, tiny, arch_args, make_tiny_config):
    import functools

    import jax

    from convmixer_jax.data import load_split
    from convmixer_jax.training.averaging import average_variables, recalibrate_batch_stats
    from convmixer_jax.training.loop import TrainConfig, augment_batch

    common = ["--data-dir", tiny_data, "--recipe", "fast", "--batch-size", "4", "--quiet"]
    ok(
        capsys,
        "train",
        *common,
        "--epochs",
        "2",
        "--lr",
        "0.01",
        *tiny,
        "--workdir",
        tmp_path / "w0",
        "--out",
        tmp_path / "m0",
    )
    # the continuation uses the fast recipe (crop, flip, cutout) with batches of 4
    ok(
        capsys,
        "train",
        *common,
        "--epochs",
        "1",
        "--lr",
        "0.01",
        "--init-from",
        tmp_path / "m0",
        "--workdir",
        tmp_path / "w1",
        "--out",
        tmp_path / "m1",
    )
    out = json.loads(
        ok(
            capsys,
            "average-models",
            tmp_path / "m0",
            tmp_path / "m1",
            "--data-dir",
            tiny_data,
            "--quiet",
            "--seed",
            "3",
            "--out",
            tmp_path / "avg",
        )
        .strip()
        .splitlines()[-1]
    )
    config, avg, meta = model_io.load_model(tmp_path / "avg")
    _, v0, meta0 = model_io.load_model(tmp_path / "m0")
    _, v1, meta1 = model_io.load_model(tmp_path / "m1")
    train_x, _, _ = load_split("train", data_dir=str(tiny_data))
    cfg1 = TrainConfig.from_dict(meta1["train_config"])
    augment = functools.partial(augment_batch, cfg=cfg1)
    expect = recalibrate_batch_stats(
        config, average_variables([v0, v1]), train_x, batch_size=4, augment=augment, seed=3
    )
    for a, b in zip(jax.tree.leaves(avg), jax.tree.leaves(expect), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert meta["recalibration"]["augment"] == ["crop", "flip", "cutout"]
    assert meta["recalibration"]["batch_size"] == 4 and meta["recalibration"]["seed"] == 3
    # a copied starting model is still recognized as m1's ancestor (by what init_from recorded)
    shutil.copytree(tmp_path / "m0", tmp_path / "m0-copy")
    ok(
        capsys,
        "average-models",
        tmp_path / "m0-copy",
        tmp_path / "m1",
        "--data-dir",
        tiny_data,
        "--quiet",
        "--bn-images",
        "plain",
        "--bn-passes",
        "2",
        "--out",
        tmp_path / "avg-plain",
    )
    _, avg_plain, meta_plain = model_io.load_model(tmp_path / "avg-plain")
    expect = recalibrate_batch_stats(
        config, average_variables([v0, v1]), train_x, batch_size=4, passes=2
    )
    for a, b in zip(jax.tree.leaves(avg_plain), jax.tree.leaves(expect), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert (
        meta_plain["recalibration"]["augment"] == [] and meta_plain["recalibration"]["passes"] == 2
    )
    assert meta_plain["train_seconds"] == pytest.approx(
        meta1["train_seconds"] + meta_plain["recalibration"]["seconds"]
    )
    assert not np.allclose(
        avg_plain["batch_stats"]["stem_bn"]["var"], avg["batch_stats"]["stem_bn"]["var"]
    )
    assert meta["encryption"] is None and meta["epochs"] == 3 and meta["weights"] == [0.5, 0.5]
    assert out["test_accuracy"] == meta["test_accuracy"] and meta["test_images"] == 6
    assert [i["epochs"] for i in meta["averaged"]] == [2, 3]
    # m0 is m1's starting model: its seconds are already in m1's total
    assert meta["train_seconds"] == pytest.approx(
        meta1["train_seconds"] + meta["recalibration"]["seconds"]
    )
    assert meta["recalibration"]["train_images"] == 12
    # errors name the problem and write nothing
    base = ["--data-dir", tiny_data, "--quiet", "--out", tmp_path / "bad"]
    assert_error(capsys, ["average-models", tmp_path / "m0", *base], "at least two models")
    assert_error(
        capsys,
        ["average-models", tmp_path / "m0", tmp_path / "m1", "--weights", "1", *base],
        "one per model",
    )
    ok(capsys, "encrypt-model", "--key", env.key, tmp_path / "m0", tmp_path / "m0enc")
    assert_error(
        capsys, ["average-models", tmp_path / "m0", tmp_path / "m0enc", *base], "encrypted", "plain"
    )
    wide = arch_args(make_tiny_config(dim=16))
    ok(capsys, "init-model", *wide, "--seed", "0", "--out", tmp_path / "wide")
    assert_error(
        capsys,
        ["average-models", tmp_path / "m0", tmp_path / "wide", *base],
        "another architecture",
    )
    assert not (tmp_path / "bad").exists()
