"""Local data sources: class-subfolder images and CIFAR-10 binaries, exact pixels, caching."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from convmixer_jax.data import (
    CIFAR10_CLASSES,
    DataError,
    load_cifar10_binary,
    load_image_folder,
    load_local,
    load_split,
)


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("CONVMIXER_JAX_CACHE", str(cache))
    return cache


def cache_files(cache):
    return sorted(cache.glob("*.npz")) if cache.exists() else []


# ---------------------------------------------------------------- image folders

CLASSES = ["truck", "airplane", "cat"]  # written unsorted; loaded sorted


def write_png_tree(root, rng, size=8):
    """root/{train,test}/<class>/*.png; returns {split: (images, labels)} in load order."""
    expected = {}
    for split, per_class in (("train", 3), ("test", 2)):
        imgs, labels = [], []
        for label, name in enumerate(sorted(CLASSES)):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(per_class):
                a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(a, "RGB").save(d / f"img_{i:02d}.png")
                imgs.append(a)
                labels.append(label)
        expected[split] = (np.stack(imgs), np.asarray(labels, np.int32))
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return expected


def test_png_tree_exact_pixels_labels_and_sorted_classes(tmp_path):
    root = tmp_path / "pngs"
    expected = write_png_tree(root, np.random.default_rng(0))
    for split in ("train", "test"):
        images, labels, classes = load_local(root, split)
        assert classes == ["airplane", "cat", "truck"]
        assert images.dtype == np.uint8 and labels.dtype == np.int32
        assert images.shape == expected[split][0].shape
        np.testing.assert_array_equal(images, expected[split][0])
        np.testing.assert_array_equal(labels, expected[split][1])
    # the same through the single entry point
    images, labels, classes = load_split("test", data_dir=str(root))
    np.testing.assert_array_equal(images, expected["test"][0])


def test_png_file_order_within_a_class_is_sorted(tmp_path):
    root = tmp_path / "order"
    d = root / "train" / "only"
    d.mkdir(parents=True)
    for name, value in (("b.png", 20), ("a.png", 10), ("c.PNG", 30)):
        Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(d / name)
    images, labels, classes = load_image_folder(root, "train")
    assert classes == ["only"]
    np.testing.assert_array_equal(images[:, 0, 0, 0], [10, 20, 30])
    np.testing.assert_array_equal(labels, [0, 0, 0])


def test_grayscale_and_rgba_are_converted_to_rgb(tmp_path):
    root = tmp_path / "modes"
    d = root / "test" / "x"
    d.mkdir(parents=True)
    gray = np.arange(16, dtype=np.uint8).reshape(4, 4) * 15
    Image.fromarray(gray, "L").save(d / "a_gray.png")
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 9, 99, 199, 255
    Image.fromarray(rgba, "RGBA").save(d / "b_rgba.png")
    images, _, _ = load_local(root, "test")
    assert images.shape == (2, 4, 4, 3)
    np.testing.assert_array_equal(images[0], np.repeat(gray[..., None], 3, axis=-1))
    np.testing.assert_array_equal(images[1], rgba[..., :3])


def test_jpeg_tree_decodes_like_pillow(tmp_path):
    root = tmp_path / "jpgs"
    rng = np.random.default_rng(1)
    paths = []
    for name in ("dog", "bird"):
        d = root / "train" / name
        d.mkdir(parents=True)
        for i, suffix in enumerate((".jpg", ".jpeg", ".JPG")):
            a = np.clip(rng.normal(128, 30, (8, 8, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(d / f"{i}{suffix}", format="JPEG", quality=95)
    for name in ("bird", "dog"):
        paths += sorted((root / "train" / name).iterdir())
    images, labels, classes = load_local(root, "train")
    assert classes == ["bird", "dog"]
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 1])
    want = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    np.testing.assert_array_equal(images, want)


def test_image_folder_cache_hit_and_invalidation(tmp_path, cache_in_tmp, monkeypatch):
    root = tmp_path / "pngs"
    expected = write_png_tree(root, np.random.default_rng(2))
    assert cache_files(cache_in_tmp) == []
    first = load_local(root, "train")
    files = cache_files(cache_in_tmp)
    assert len(files) == 1

    # second load: served from the cache, nothing is decoded
    def no_decode(*a, **k):
        raise AssertionError("image decoded on a cache hit")

    monkeypatch.setattr(Image, "open", no_decode)
    second = load_local(root, "train")
    np.testing.assert_array_equal(second[0], first[0])
    np.testing.assert_array_equal(second[1], first[1])
    assert second[2] == first[2]
    assert cache_files(cache_in_tmp) == files
    monkeypatch.undo()
    monkeypatch.setenv("CONVMIXER_JAX_CACHE", str(cache_in_tmp))

    # a changed file gives a new cache entry and the new pixels
    changed = np.full((8, 8, 3), 77, np.uint8)
    Image.fromarray(changed).save(root / "train" / "cat" / "img_01.png")
    third = load_local(root, "train")
    assert len(cache_files(cache_in_tmp)) == 2
    want = expected["train"][0].copy()
    want[4] = changed  # airplane x3, then cat img_00, img_01
    np.testing.assert_array_equal(third[0], want)

    # a renamed class is a different data set too (labels depend on names)
    (root / "train" / "truck").rename(root / "train" / "zebra")
    fourth = load_local(root, "train")
    assert fourth[2] == ["airplane", "cat", "zebra"]
    assert len(cache_files(cache_in_tmp)) == 3


def test_corrupt_cache_entry_is_rebuilt(tmp_path, cache_in_tmp):
    root = tmp_path / "pngs"
    expected = write_png_tree(root, np.random.default_rng(3))
    load_local(root, "test")
    (entry,) = cache_files(cache_in_tmp)
    entry.write_bytes(b"garbage")
    images, labels, _ = load_local(root, "test")
    np.testing.assert_array_equal(images, expected["test"][0])
    np.testing.assert_array_equal(labels, expected["test"][1])
    with np.load(entry) as z:  # rewritten with the right content
        np.testing.assert_array_equal(z["images"], expected["test"][0])


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_local(tmp_path / "missing", "train")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError):
        load_local(empty, "train")
    (empty / "train").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        load_local(empty, "train")
    (empty / "train" / "cat").mkdir()
    (empty / "train" / "cat" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no .jpg"):
        load_local(empty, "train")
    with pytest.raises(DataError, match="unknown split"):
        load_local(empty, "validation")
    # mixed sizes
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(empty / "train" / "cat" / "a.png")
    Image.fromarray(np.zeros((5, 4, 3), np.uint8)).save(empty / "train" / "cat" / "b.png")
    with pytest.raises(DataError, match="differ in size"):
        load_local(empty, "train")
    # undecodable file
    bad = tmp_path / "bad" / "train" / "cat"
    bad.mkdir(parents=True)
    (bad / "a.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="cannot decode"):
        load_local(tmp_path / "bad", "train")
    assert issubclass(DataError, ValueError)


# ---------------------------------------------------------------- CIFAR-10 binaries


@pytest.fixture
def write_cifar_binaries(cifar10_batches):
    """``write_cifar_binaries(d, rng, per_batch=(2, 3, 1, 2, 2), n_test=3)``: write
    data_batch_1..5.bin and test_batch.bin into ``d``; return the arrays in HWC order."""

    def write(d, rng, per_batch=(2, 3, 1, 2, 2), n_test=3):
        d.mkdir(parents=True, exist_ok=True)
        files, expected = cifar10_batches(rng, per_batch, n_test)
        for name, data in files.items():
            (d / name).write_bytes(data)
        return expected

    return write


def test_cifar_binary_exact_values_and_chw_to_hwc(tmp_path, write_cifar_binaries):
    root = tmp_path / "cifar"
    expected = write_cifar_binaries(root, np.random.default_rng(4))
    for split, n in (("train", 10), ("test", 3)):
        images, labels, classes = load_local(root, split)
        assert images.shape == (n, 32, 32, 3) and images.dtype == np.uint8
        assert labels.dtype == np.int32
        np.testing.assert_array_equal(images, expected[split][0])
        np.testing.assert_array_equal(labels, expected[split][1])
        assert classes == list(CIFAR10_CLASSES)
    assert CIFAR10_CLASSES[0] == "airplane" and CIFAR10_CLASSES[9] == "truck"


def test_cifar_binary_channel_layout_by_hand(tmp_path):
    # one record whose planes are constant: R = 1, G = 2, B = 3; pixel (y, x) of R plane = y
    d = tmp_path / "cifar-hand"
    d.mkdir()
    chw = np.zeros((3, 32, 32), np.uint8)
    chw[0] = np.arange(32, dtype=np.uint8)[:, None]  # R varies with the row
    chw[1] = np.arange(32, dtype=np.uint8)[None, :] + 100  # G varies with the column
    chw[2] = 250
    (d / "test_batch.bin").write_bytes(bytes([7]) + chw.tobytes())
    images, labels, _ = load_cifar10_binary(d, "test")
    assert images.shape == (1, 32, 32, 3)
    assert labels.tolist() == [7]
    assert images[0, 5, 9].tolist() == [5, 109, 250]
    assert images[0, 31, 0].tolist() == [31, 100, 250]


def test_cifar_binary_in_release_subfolder(tmp_path, write_cifar_binaries):
    root = tmp_path / "download"
    expected = write_cifar_binaries(root / "cifar-10-batches-bin", np.random.default_rng(5))
    images, labels, _ = load_local(root, "test")
    np.testing.assert_array_equal(images, expected["test"][0])
    np.testing.assert_array_equal(labels, expected["test"][1])


def test_cifar_binary_errors(tmp_path, write_cifar_binaries):
    root = tmp_path / "cifar"
    write_cifar_binaries(root, np.random.default_rng(6))
    # wrong size
    good = (root / "test_batch.bin").read_bytes()
    (root / "test_batch.bin").write_bytes(good[:-1])
    with pytest.raises(DataError, match="not a multiple"):
        load_local(root, "test")
    (root / "test_batch.bin").write_bytes(good + b"\x00" * 100)
    with pytest.raises(DataError):
        load_local(root, "test")
    # label out of range
    (root / "test_batch.bin").write_bytes(bytes([10]) + good[1:])
    with pytest.raises(DataError, match="labels"):
        load_local(root, "test")
    (root / "test_batch.bin").write_bytes(good)
    load_local(root, "test")
    # a missing batch
    (root / "data_batch_3.bin").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        load_local(root, "train")
    with pytest.raises(DataError, match="unknown split"):
        load_cifar10_binary(root, "val")
    with pytest.raises(DataError):
        load_cifar10_binary(tmp_path / "nothing", "test")


# ---------------------------------------------------------------- tensorflow-datasets


def test_tfds_source_with_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from convmixer_jax.data.tfds_source import load_tfds

    with tfds.testing.mock_data(num_examples=5):
        images, labels, classes = load_tfds("cifar10", "test", data_dir=str(tmp_path))
        source = tfds.data_source("cifar10", split="test", data_dir=str(tmp_path), download=False)
        want = [source[i] for i in range(len(source))]
    assert images.shape == (5, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == (5,) and labels.dtype == np.int32
    np.testing.assert_array_equal(images, np.stack([np.asarray(ex["image"]) for ex in want]))
    np.testing.assert_array_equal(labels, [int(ex["label"]) for ex in want])
    # mocked metadata has no label names file: tfds itself names the classes '0'..'9'
    assert classes in (list(CIFAR10_CLASSES), [str(i) for i in range(10)])


def test_tfds_missing_is_a_data_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name.startswith("tensorflow_datasets"):
            raise ImportError("no tfds here")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    from convmixer_jax.data.tfds_source import load_tfds

    with pytest.raises(DataError, match="tensorflow-datasets"):
        load_tfds("cifar10", "test")


@settings(max_examples=30, deadline=None)
@given(
    counts=st.lists(st.integers(1, 40), min_size=1, max_size=6),
    frac=st.floats(0.05, 0.9),
    seed=st.integers(0, 2**31 - 1),
)
def test_stratified_holdout_partitions_and_keeps_class_shares(counts, frac, seed):
    from convmixer_jax.data import stratified_holdout

    labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(len(counts)), counts))
    n = max(1, min(len(labels) - 1, round(frac * len(labels))))
    if len(labels) < 2:
        return
    keep, held = stratified_holdout(labels, n, seed)
    assert len(held) == n
    np.testing.assert_array_equal(np.sort(np.concatenate([keep, held])), np.arange(len(labels)))
    for c, k in enumerate(counts):
        share = k * n / len(labels)
        assert np.floor(share) <= np.sum(labels[held] == c) <= np.ceil(share)
    keep2, held2 = stratified_holdout(labels, n, seed)
    np.testing.assert_array_equal(held, held2)
