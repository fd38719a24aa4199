"""Streaming data: row readers equal the whole-split arrays, Grain batches, the training
iterator's saved position, streaming top-1/top-5 evaluation, and evaluate's flat memory."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convmixer_jax.data import DataError, load_local, load_split, open_split
from convmixer_jax.data.pipeline import batches, train_batches
from convmixer_jax.data.sources import ArrayRows, CifarBinaryRows, ImageFolderRows, Rows
from convmixer_jax.files.resize import eval_resize


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("CONVMIXER_JAX_CACHE", str(cache))
    return cache


def write_mixed_tree(root: Path, rng, sizes=((12, 10),)) -> Path:
    """root/test/{bird,ant}/<i>.{png,jpg}: 3 images per class, PNG and JPEG alternating,
    sizes cycled from ``sizes``."""
    k = 0
    for cls in ("bird", "ant"):  # written unsorted; read sorted
        d = root / "test" / cls
        d.mkdir(parents=True)
        for i in range(3):
            h, w = sizes[k % len(sizes)]
            k += 1
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(d / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def check_reader(rows: Rows, want: np.ndarray) -> None:
    """Every way of indexing ``rows`` gives ``want``'s values, exactly."""
    assert rows.shape == want.shape and rows.dtype == np.uint8 and len(rows) == len(want)
    np.testing.assert_array_equal(np.asarray(rows), want)
    np.testing.assert_array_equal(rows[1], want[1])
    np.testing.assert_array_equal(rows[-1], want[-1])
    np.testing.assert_array_equal(rows[1:4], want[1:4])
    picked = np.array([3, 0, 3, -2])
    np.testing.assert_array_equal(rows[picked], want[picked])
    assert rows[[]].shape == (0, *want.shape[1:])
    with pytest.raises(IndexError):
        rows[len(want)]


# ---------------------------------------------------------------- row readers


def test_cifar_binary_rows_are_mapped_and_equal_load_split(tmp_path, cifar10_batches):
    files, expected = cifar10_batches(np.random.default_rng(0), (2, 1, 3, 1, 2), 4)
    root = tmp_path / "cifar" / "cifar-10-batches-bin"  # the release's own subfolder
    root.mkdir(parents=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    data_dir = str(tmp_path / "cifar")
    for split in ("train", "test"):
        opened = open_split(split, data_dir=data_dir)
        assert isinstance(opened.images, CifarBinaryRows)
        check_reader(opened.images, expected[split][0])
        np.testing.assert_array_equal(opened.labels, expected[split][1])
        assert opened.labels.dtype == np.int32
        x, y, classes = load_split(split, data_dir=data_dir)
        np.testing.assert_array_equal(x, expected[split][0])
        np.testing.assert_array_equal(y, expected[split][1])
        assert classes == opened.classes and len(classes) == 10
    # rows from several batch files, in a shuffled order
    rows = np.array([8, 0, 2, 5, 1, 7])
    train = open_split("train", data_dir=data_dir).images
    np.testing.assert_array_equal(train[rows], expected["train"][0][rows])
    # with --resize: every row through timm's transform, as load_split gives it
    resized = open_split("test", data_dir=data_dir, resize=12)
    want = np.stack([eval_resize(im, 12) for im in expected["test"][0]])
    check_reader(resized.images, want)
    np.testing.assert_array_equal(load_split("test", data_dir=data_dir, resize=12)[0], want)


def test_image_folder_rows_equal_load_split_with_and_without_resize(tmp_path, cache_in_tmp):
    root = write_mixed_tree(tmp_path / "data", np.random.default_rng(1))
    paths = sorted((root / "test" / "ant").iterdir()) + sorted((root / "test" / "bird").iterdir())
    want = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    opened = open_split("test", data_dir=str(root))
    assert isinstance(opened.images, ImageFolderRows) and opened.classes == ["ant", "bird"]
    check_reader(opened.images, want)
    np.testing.assert_array_equal(opened.labels, [0, 0, 0, 1, 1, 1])
    assert not cache_in_tmp.exists()  # streaming caches nothing
    np.testing.assert_array_equal(load_local(root, "test")[0], want)  # the eager reader agrees
    resized = open_split("test", data_dir=str(root), resize=8, crop_pct=0.9)
    check_reader(resized.images, np.stack([eval_resize(im, 8, 0.9) for im in want]))

    # cache=True (what load_split uses): one .npy, mapped; a damaged entry is rebuilt
    cached = open_split("test", data_dir=str(root), cache=True)
    assert isinstance(cached.images, ArrayRows) and isinstance(cached.images.array, np.memmap)
    check_reader(cached.images, want)
    (entry,) = cache_in_tmp.glob("*.npy")
    entry.write_bytes(entry.read_bytes()[:-5])
    np.testing.assert_array_equal(np.asarray(open_split("test", data_dir=str(root)).images), want)
    np.testing.assert_array_equal(load_split("test", data_dir=str(root))[0], want)
    np.testing.assert_array_equal(np.load(entry), want)  # rewritten whole


def test_a_tree_of_several_sizes_is_refused_without_resize(tmp_path):
    root = write_mixed_tree(tmp_path / "data", np.random.default_rng(2), ((9, 9), (6, 11)))
    for cache in (False, True):
        with pytest.raises(DataError, match="differ in size.*--resize"):
            open_split("test", data_dir=str(root), cache=cache)
    opened = open_split("test", data_dir=str(root), resize=6)
    assert opened.images.shape == (6, 6, 6, 3)


def test_take_is_a_view_that_reads_only_its_rows():
    class Counting(Rows):
        def __init__(self, array):
            self.array, self.shape, self.asked = array, array.shape, []

        def read(self, rows):
            self.asked.append(np.asarray(rows).tolist())
            return self.array[rows]

    array = np.arange(10 * 2 * 2 * 3, dtype=np.uint8).reshape(10, 2, 2, 3)
    source = Counting(array)
    view = source.take([7, 2, 9, 4])
    again = view.take([3, 0])
    assert source.asked == [] and view.shape == (4, 2, 2, 3) and len(again) == 2
    np.testing.assert_array_equal(again[:], array[[4, 7]])
    assert source.asked == [[4, 7]]
    np.testing.assert_array_equal(view[-1], array[4])
    assert source.asked[-1] == [4]
    wrapped = ArrayRows(array).take(np.array([1, 1, 0]))
    np.testing.assert_array_equal(np.asarray(wrapped), array[[1, 1, 0]])
    with pytest.raises(IndexError):
        source.take([10])


# ---------------------------------------------------------------- batches


def test_batches_in_order_last_short_for_readers_and_arrays(tmp_path):
    root = write_mixed_tree(tmp_path / "data", np.random.default_rng(3))
    opened = open_split("test", data_dir=str(root))
    want = np.asarray(opened.images)
    for images in (opened.images, want, ArrayRows(want)):
        out = list(batches(images, opened.labels, batch_size=4, threads=2, prefetch=1))
        assert [len(x) for x, _ in out] == [4, 2]
        np.testing.assert_array_equal(np.concatenate([x for x, _ in out]), want)
        np.testing.assert_array_equal(np.concatenate([y for _, y in out]), opened.labels)
    picked = [5, 0, 3]
    (x, y), (x2, y2) = batches(opened.images, opened.labels, batch_size=2, indices=picked)
    np.testing.assert_array_equal(np.concatenate([x, x2]), want[picked])
    np.testing.assert_array_equal(np.concatenate([y, y2]), opened.labels[picked])
    # an in-memory array is sliced, not copied
    first, labels = next(iter(batches(want, None, batch_size=4)))
    assert labels is None and np.shares_memory(first, want)


def test_a_damaged_image_is_raised_from_the_pipeline_naming_the_file(tmp_path):
    root = write_mixed_tree(tmp_path / "data", np.random.default_rng(4))
    bad = root / "test" / "bird" / "1.png"
    opened = open_split("test", data_dir=str(root))
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=str(bad)):
        list(batches(opened.images, opened.labels, batch_size=2))


def test_workers_give_the_same_batches_and_the_training_state_round_trips(tmp_path):
    root = write_mixed_tree(tmp_path / "data", np.random.default_rng(5))
    opened = open_split("test", data_dir=str(root))
    threads = list(batches(opened.images, opened.labels, batch_size=1))
    in_workers = list(batches(opened.images, opened.labels, batch_size=1, workers=2))
    assert len(in_workers) == len(threads) == 6
    for (x, y), (x2, y2) in zip(in_workers, threads, strict=True):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)

    def order(step):  # a function of the step alone, as a training loop's epoch order
        return np.random.default_rng(step).permutation(6)[:4]

    it = train_batches(opened.images, opened.labels, order, 4, steps=5)
    first = [next(it) for _ in range(2)]
    state = it.get_state()
    rest = list(it)
    assert len(rest) == 3
    for step, (x, y) in enumerate(first + rest):
        np.testing.assert_array_equal(x, np.asarray(opened.images)[order(step)])
        np.testing.assert_array_equal(y, opened.labels[order(step)])
    resumed = train_batches(opened.images, opened.labels, order, 4, steps=5)
    resumed.set_state(state)
    again = list(resumed)
    started = list(train_batches(opened.images, opened.labels, order, 4, steps=5, start_step=2))
    for (x, y), (x2, y2), (x3, y3) in zip(again, rest, started, strict=True):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(x3, x2)
        np.testing.assert_array_equal(y, y2)
        np.testing.assert_array_equal(y3, y2)
    with pytest.raises(ValueError, match="shape"):
        next(train_batches(opened.images, opened.labels, order, 3, steps=1))


# ---------------------------------------------------------------- streaming evaluation


def random_variables(config, seed: int) -> dict:
    """Variables of a ConvMixer of ``config`` drawn at random, N(0, 1) weights, zero biases
    and identity BatchNorm, without compiling its initializer (seconds on a CPU): a network
    whose predictions differ between the images of ``tinted_images``."""
    import jax
    import jax.numpy as jnp

    from convmixer_jax import ConvMixer

    s, c = config.image_size, config.channels
    shapes = jax.eval_shape(
        lambda: ConvMixer(config).init(jax.random.key(0), jnp.zeros((1, s, s, c)), train=False)
    )
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name in ("var", "scale"):
            return np.ones(leaf.shape, np.float32)
        if name in ("mean", "bias"):
            return np.zeros(leaf.shape, np.float32)
        return rng.normal(0, 1, leaf.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def ten_classes(make_tiny_config, tinted_images):
    """A tiny 10-class model with random weights, 40 images, random labels."""
    config = make_tiny_config(num_classes=10)
    labels = np.random.default_rng(0).integers(0, 10, 40).astype(np.int32)
    return config, random_variables(config, 0), tinted_images(40, seed=3), labels


def test_evaluate_batches_top1_equals_accuracy_and_top5_numpy(ten_classes):
    from convmixer_jax.model.inference import accuracy, evaluate_batches, predict_logits
    from convmixer_jax.scheme.images import encrypt_images
    from convmixer_jax.scheme.keys import generate_key

    config, variables, images, labels = ten_classes
    scores = evaluate_batches(config, variables, batches(images, labels, batch_size=16))
    assert scores["top1"] == accuracy(config, variables, images, labels, batch_size=16)
    logits = predict_logits(config, variables, images, batch_size=16)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    want5 = float(np.mean([labels[i] in top5[i] for i in range(len(labels))]))
    assert scores["top5"] == want5 and scores["images"] == 40 and scores["seconds"] > 0
    assert 0 < scores["top1"] < scores["top5"] < 1  # not a vacuous comparison
    # the transform is applied to each batch before the model
    key = generate_key(2, 3, seed=7)
    enc = evaluate_batches(
        config,
        variables,
        batches(images, labels, batch_size=16),
        transform=lambda x: np.asarray(encrypt_images(x, key)),
    )
    plain_of_enc = accuracy(config, variables, np.asarray(encrypt_images(images, key)), labels)
    assert enc["top1"] == plain_of_enc


def test_evaluate_command_streams_top1_as_before_and_top5(tmp_path, capsys, ten_classes, png_tree):
    from convmixer_jax import cli
    from convmixer_jax.data import subset
    from convmixer_jax.files.model_dir import save_model
    from convmixer_jax.model.inference import accuracy, predict_logits

    config, variables, _, _ = ten_classes
    model = save_model(tmp_path / "m", config, variables)
    root = png_tree(tmp_path / "data", n_per_class=2, classes=10, size=8)
    x, y, _ = load_split("test", data_dir=str(root))
    x, y = subset(x, y, 13, 5)
    assert (
        cli.main(
            ["evaluate", str(model), "--data-dir", str(root), "--limit", "13"]
            + ["--seed", "5", "--batch-size", "4", "--quiet"]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["images"] == 13
    assert result["accuracy"] == accuracy(config, variables, x, y, batch_size=4)
    top5 = np.argsort(-predict_logits(config, variables, x, batch_size=4), axis=1)[:, :5]
    assert result["top5_accuracy"] == float(np.mean((top5 == y[:, None]).any(axis=1)))


# ---------------------------------------------------------------- bounded memory

_RSS_SCRIPT = """
import json, resource, sys
from convmixer_jax import cli
peaks = []
for tree in sys.argv[2:]:
    argv = ["evaluate", sys.argv[1], "--data-dir", tree, "--resize", "32", "--quiet"]
    assert cli.main(argv + ["--batch-size", "50"]) == 0
    peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
print(json.dumps(peaks))
"""


def test_evaluate_peak_memory_does_not_grow_with_the_images(tmp_path, make_tiny_config):
    """One real process runs `evaluate` over 200 JPEGs of 256 x 256, then over 1,000: its
    peak RSS after the second is within 10 % of the peak after the first. Holding the
    split's files or images at once would add about 150 MB (the JPEGs are noise, ~150 KB
    each) to a peak of about 300 MB."""
    from convmixer_jax.files.model_dir import save_model

    config = make_tiny_config(image_size=32, patch_size=4, num_classes=2)
    model = save_model(tmp_path / "m", config, random_variables(config, 1))
    rng = np.random.default_rng(0)
    blobs = []
    for _ in range(8):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(
            buf, format="JPEG", quality=95, subsampling=0
        )
        blobs.append(buf.getvalue())
    trees = []
    for n in (200, 1000):
        for i in range(n):
            d = tmp_path / f"tree{n}" / "test" / f"c{i % 2}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{i:05d}.jpg").write_bytes(blobs[i % len(blobs)])
        trees.append(str(tmp_path / f"tree{n}"))
    assert sum(len(b) for b in blobs) / len(blobs) > 120_000
    run = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(model), *trees],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    small, large = json.loads(run.stdout.strip().splitlines()[-1])
    assert large < 1.10 * small, (small, large)


def test_tfds_rows_equal_the_examples(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    from convmixer_jax.data.tfds_source import load_tfds

    with tfds.testing.mock_data(num_examples=5):
        opened = open_split("test", tfds_data_dir=str(tmp_path), resize=16)
        source = tfds.data_source("cifar10", split="test", data_dir=str(tmp_path), download=False)
        want = np.stack([np.asarray(source[i]["image"]) for i in range(5)])
        check_reader(opened.images, np.stack([eval_resize(im, 16) for im in want]))
        np.testing.assert_array_equal(opened.labels, [int(source[i]["label"]) for i in range(5)])
        plain = open_split("test", tfds_data_dir=str(tmp_path))
        check_reader(plain.images, want)
        np.testing.assert_array_equal(load_tfds("cifar10", "test", data_dir=str(tmp_path))[0], want)
