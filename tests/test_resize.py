"""timm's evaluation transform (shorter side to size / crop_pct, bicubic, centre crop) and
the commands that take images of any size with --resize."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from convmixer_jax.files.resize import eval_resize, resized_shape
from convmixer_jax.scheme.images import ImageError
from tests.cli_helpers import ok, run


@settings(max_examples=25, deadline=None)
@given(
    h=st.integers(3, 60),
    w=st.integers(3, 60),
    size=st.integers(1, 40),
    crop=st.sampled_from([0.875, 0.9, 0.96, 1.0]),
    c=st.sampled_from([1, 3, 4]),
    seed=st.integers(0, 2**31),
)
def test_eval_resize_shapes_and_a_flat_image_stays_flat(h, w, size, crop, c, seed):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
    out = eval_resize(image, size, crop)
    assert out.shape == (size, size, c) and out.dtype == np.uint8
    nh, nw = resized_shape(h, w, size, crop)
    assert min(nh, nw) == math.floor(size / crop)
    assert max(nh, nw) == int(min(nh, nw) * max(h, w) / min(h, w))
    flat = np.full((h, w, c), rng.integers(0, 256), np.uint8)
    assert np.array_equal(eval_resize(flat, size, crop), np.full((size, size, c), flat[0, 0, 0]))


def test_eval_resize_equals_torchvision_on_pil_images():
    """torchvision's Resize(floor(size / crop_pct), bicubic) + CenterCrop(size), which timm's
    evaluation transform is, gives the same pixels."""
    tv = pytest.importorskip("torchvision.transforms")
    rng = np.random.default_rng(0)
    for h, w, size in ((300, 451, 224), (64, 48, 28), (17, 17, 32), (224, 224, 224)):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ref = tv.Compose(
            [
                tv.Resize(math.floor(size / 0.96), interpolation=tv.InterpolationMode.BICUBIC),
                tv.CenterCrop(size),
            ]
        )(Image.fromarray(image))
        np.testing.assert_array_equal(eval_resize(image, size), np.asarray(ref))


def test_eval_resize_refuses_what_it_cannot_resize():
    with pytest.raises(ImageError, match="8-bit"):
        eval_resize(np.zeros((8, 8, 3), np.float32), 4)
    with pytest.raises(ImageError, match="crop_pct"):
        eval_resize(np.zeros((8, 8, 3), np.uint8), 4, 1.5)


def test_predict_and_encrypt_images_of_any_size(tmp_path, capsys, make_model_dir, make_tiny_config):
    """predict --resize on photos of several sizes = predict on the photos resized first; a client
    that encrypts with --resize gets the same predictions from the encrypted model."""
    config = make_tiny_config(patch_size=3, num_classes=4, image_size=12)
    make_model_dir(tmp_path / "m", config, seed=2)
    ok(
        capsys, "keygen", "--block-size", "3", "--channels", "3", "--out", tmp_path / "k.json"
    )  # odd pb = 27
    ok(
        capsys,
        "encrypt-model",
        "--key",
        tmp_path / "k.json",
        tmp_path / "m",
        "--out",
        tmp_path / "e",
    )
    rng = np.random.default_rng(1)
    photos, resized = tmp_path / "photos", tmp_path / "resized"
    photos.mkdir()
    resized.mkdir()
    for i, (h, w) in enumerate(((40, 30), (13, 25), (12, 12))):
        im = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(im).save(photos / f"p{i}.png")
        Image.fromarray(eval_resize(im, 12)).save(resized / f"p{i}.png")
    rc, _, err = run(capsys, "predict", tmp_path / "m", photos, "--quiet")
    assert (
        rc == 1 and "--resize" in err
    )  # different sizes without --resize: refused, naming the fix
    ok(
        capsys,
        "predict",
        tmp_path / "m",
        photos,
        "--resize",
        "--quiet",
        "--out",
        tmp_path / "a.npy",
    )
    ok(capsys, "predict", tmp_path / "m", resized, "--quiet", "--out", tmp_path / "b.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    ok(
        capsys,
        "encrypt-images",
        "--key",
        tmp_path / "k.json",
        photos,
        "--resize",
        "12",
        "--out",
        tmp_path / "enc",
    )
    ok(capsys, "predict", tmp_path / "e", tmp_path / "enc", "--quiet", "--out", tmp_path / "c.npy")
    np.testing.assert_allclose(
        np.load(tmp_path / "c.npy"), np.load(tmp_path / "a.npy"), rtol=1e-5, atol=1e-5
    )


def test_evaluate_a_class_tree_of_any_size(
    tmp_path, capsys, monkeypatch, make_model_dir, make_tiny_config
):
    """evaluate --resize on class folders of photos of several sizes scores the resized images."""
    import json

    from convmixer_jax.files.model_dir import load_model
    from convmixer_jax.model.inference import predict_logits

    monkeypatch.setenv("CONVMIXER_JAX_CACHE", str(tmp_path / "cache"))
    make_model_dir(tmp_path / "m", make_tiny_config(num_classes=2), seed=4)
    rng = np.random.default_rng(5)
    resized, labels = [], []
    for label, cls in enumerate(("cat", "dog")):
        (tmp_path / "data" / "test" / cls).mkdir(parents=True)
        for i, (h, w) in enumerate(((20, 11), (9, 9), (8, 30))):
            im = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(im).save(tmp_path / "data" / "test" / cls / f"{i}.png")
            resized.append(eval_resize(im, 8))
            labels.append(label)
    rc, _, err = run(capsys, "evaluate", tmp_path / "m", "--data-dir", tmp_path / "data")
    assert rc == 1 and "differ in size" in err and "--resize" in err
    out = json.loads(
        ok(
            capsys,
            "evaluate",
            tmp_path / "m",
            "--data-dir",
            tmp_path / "data",
            "--resize",
            "--quiet",
        ).strip()
    )
    config, variables, _ = load_model(tmp_path / "m")
    want = float(
        np.mean(
            np.argmax(predict_logits(config, variables, np.stack(resized)), 1) == np.array(labels)
        )
    )
    assert out["images"] == 6 and out["accuracy"] == want
