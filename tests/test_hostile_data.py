"""Hostile data: what a data tree, a CIFAR batch, a pipe, a resize option, the cache variable
or a PyTorch round trip can do wrong. Every refusal is one error line, a non-zero exit and no
file changed outside the declared output (``tests/hostile_helpers.py``); every accepted
input gives the values the ordinary path gives."""

from __future__ import annotations

import contextlib
import io
import os
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from convmixer_jax import cli
from convmixer_jax.scheme import keys
from tests.hostile_helpers import refused_in_process, tree_digests


def ok(capsys, *argv) -> str:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A cache of this test's own, outside the watched folders."""
    d = tmp_path / "cache"
    monkeypatch.setenv("CONVMIXER_JAX_CACHE", str(d))
    return d


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def png16_rgb(path: Path, h: int = 8, w: int = 8) -> None:
    """A 16-bit RGB PNG, every sample 40000 (Pillow reads such a file as 8-bit RGB)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    raw = b"".join(b"\0" + struct.pack(">H", 40000) * (3 * w) for _ in range(h))
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


# --------------------------------------------------------------------------- data trees


@pytest.mark.parametrize("kind", ["gray", "rgb"])
def test_16_bit_png_in_a_data_tree_is_refused(
    kind, tmp_path, capsys, cache, png_tree, tiny_model_dir
):
    """predict and encrypt-images refuse 16-bit PNGs; a data tree does too, naming the file
    (it was read clipped: 40000 as white)."""
    root = png_tree(tmp_path / "data")
    bad = root / "test" / "class1" / "deep.png"
    if kind == "gray":
        Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(bad)
    else:
        png16_rgb(bad)
    out = tmp_path / "result.json"
    line = refused_in_process(
        capsys,
        ["evaluate", tiny_model_dir, "--data-dir", root, "--quiet", "--out", out],
        watch=[root, tiny_model_dir, out],
        contains=str(bad),
    )
    assert "16-bit" in line and "8 bits per channel" in line, line
    assert ".npy" not in line, line  # a data tree holds images only: no .npy fix offered
    assert not cache.exists() or not list(cache.iterdir())  # nothing cached from the bad tree


def test_undecodable_image_in_a_data_tree_is_named_by_its_path(
    tmp_path, capsys, cache, png_tree, tiny_model_dir
):
    root = png_tree(tmp_path / "data")
    bad = root / "test" / "class0" / "zz.png"
    bad.write_bytes(b"\x89PNG not really")
    out = tmp_path / "result.json"
    line = refused_in_process(
        capsys,
        ["evaluate", tiny_model_dir, "--data-dir", root, "--quiet", "--out", out],
        watch=[root, tiny_model_dir, out],
        contains=str(bad),
    )
    assert "BytesIO" not in line and " at 0x" not in line, line


def test_data_tree_reads_8_bit_images_as_before(tmp_path, cache):
    """Gray, RGBA, palette and bilevel PNGs of a tree still read as Pillow's RGB conversion."""
    from convmixer_jax.data.local import load_local

    rng = np.random.default_rng(3)
    d = tmp_path / "data" / "train" / "a"
    d.mkdir(parents=True)
    rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb[..., 0]).save(d / "0.png")
    Image.fromarray(rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)).save(d / "1.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(d / "2.png")
    Image.fromarray(rgb[..., 0] > 127).save(d / "3.png")
    Image.fromarray(rgb).save(d / "4.jpg", quality=90)
    images, labels, classes = load_local(tmp_path / "data", "train")
    for i, f in enumerate(sorted(d.iterdir())):
        with Image.open(f) as im:
            np.testing.assert_array_equal(images[i], np.asarray(im.convert("RGB")), err_msg=f.name)
    assert images.shape == (5, 8, 8, 3) and classes == ["a"]


# --------------------------------------------------------------------------- CIFAR batches


@pytest.fixture
def cifar_root(tmp_path, cifar10_batches) -> Path:
    files, _ = cifar10_batches(np.random.default_rng(0))
    root = tmp_path / "cifar"
    root.mkdir()
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


@pytest.mark.parametrize("size", [0, 3073 * 2 + 5], ids=["empty", "truncated"])
def test_empty_or_truncated_cifar_batch_is_refused(
    size, tmp_path, capsys, cache, cifar_root, make_model_dir, make_tiny_config
):
    model = make_model_dir(
        tmp_path / "m32", make_tiny_config(image_size=32, num_classes=10), seed=0
    )
    batch = cifar_root / "test_batch.bin"
    batch.write_bytes(batch.read_bytes()[:size])
    out = tmp_path / "result.json"
    line = refused_in_process(
        capsys,
        ["evaluate", model, "--data-dir", cifar_root, "--quiet", "--out", out],
        watch=[cifar_root, model, out],
        contains=str(batch),
    )
    assert ("empty" if size == 0 else "truncated") in line, line
    assert "3,073-byte records" in line and "30,730,000 bytes" in line, line


# --------------------------------------------------------------------------- pipes


@contextlib.contextmanager
def fifo_fed_with(path: Path, data: bytes):
    """A FIFO at ``path`` that a thread fills with ``data`` once. A reader that opens it a
    second time would wait forever for a writer: it gets an end of file instead."""
    os.mkfifo(path)
    done = threading.Event()

    def write():
        with contextlib.suppress(BrokenPipeError), open(path, "wb") as f:
            f.write(data)
        while not done.wait(0.2):
            with contextlib.suppress(OSError):  # ENXIO: nobody waits to read
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        done.set()
        thread.join(2)
        if thread.is_alive():  # never opened for reading: release the writer
            with contextlib.suppress(OSError):
                os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
            thread.join(2)


@contextlib.contextmanager
def pipe_fed_with(data: bytes):
    """``/dev/fd/N`` of a pipe that a thread fills with ``data`` (as ``<(cat FILE)`` gives)."""
    r, w = os.pipe()

    def write():
        with open(w, "wb") as f:
            f.write(data)

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    try:
        yield f"/dev/fd/{r}"
    finally:
        thread.join(5)
        os.close(r)


def test_encrypt_images_reads_a_pipe(tmp_path, capsys):
    key = keys.generate_key(2, 3, seed=4)
    kf = tmp_path / "k.json"
    kf.write_text(keys.key_file_text(key))
    pixels = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    data = png_bytes(pixels)
    (tmp_path / "im.png").write_bytes(data)
    ok(capsys, "encrypt-images", "--key", kf, tmp_path / "im.png", "--out", tmp_path / "a.png")
    before = tree_digests(tmp_path)
    with pipe_fed_with(data) as name:
        ok(capsys, "encrypt-images", "--key", kf, name, "--out", tmp_path / "b.png")
    assert (tmp_path / "b.png").read_bytes() == (tmp_path / "a.png").read_bytes()
    after = tree_digests(tmp_path)
    assert {k: v for k, v in after.items() if not k.endswith("b.png") and k != str(tmp_path)} == {
        k: v for k, v in before.items() if k != str(tmp_path)
    }


def test_predict_reads_a_fifo_and_a_npy_pipe(tmp_path, capsys, tiny_model_dir):
    pixels = np.random.default_rng(2).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    data = png_bytes(pixels)
    (tmp_path / "im.png").write_bytes(data)
    ok(
        capsys,
        "predict",
        tiny_model_dir,
        tmp_path / "im.png",
        "--quiet",
        "--out",
        tmp_path / "a.npy",
    )
    with fifo_fed_with(tmp_path / "fifo", data) as fifo:
        ok(capsys, "predict", tiny_model_dir, fifo, "--quiet", "--out", tmp_path / "b.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), np.load(tmp_path / "a.npy"))
    buf = io.BytesIO()
    np.save(buf, pixels[None])
    with pipe_fed_with(buf.getvalue()) as name:
        ok(capsys, "predict", tiny_model_dir, name, "--quiet", "--out", tmp_path / "c.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "c.npy"), np.load(tmp_path / "a.npy"))


# --------------------------------------------------------------------------- resize options


@pytest.fixture
def one_png(tmp_path) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    pixels = np.random.default_rng(3).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(d / "im.png")
    return d / "im.png"


@pytest.mark.parametrize("crop", ["1e-9", "0.1", "1.5"])
def test_crop_pct_outside_its_range_is_refused(crop, tmp_path, capsys, tiny_model_dir, one_png):
    out = tmp_path / "logits.npy"
    line = refused_in_process(
        capsys,
        ["predict", tiny_model_dir, one_png, "--resize", "--crop-pct", crop, "--out", out],
        watch=[one_png.parent, tiny_model_dir, out],
        contains="[0.25, 1]",
    )
    assert "--crop-pct" in line, line


def test_crop_pct_outside_its_range_is_refused_in_a_data_tree(
    tmp_path, capsys, cache, png_tree, tiny_model_dir
):
    root = png_tree(tmp_path / "data")
    out = tmp_path / "result.json"
    refused_in_process(
        capsys,
        ["evaluate", tiny_model_dir, "--data-dir", root, "--resize", "--crop-pct", "1e-9"]
        + ["--quiet", "--out", out],
        watch=[root, tiny_model_dir, out],
        contains="[0.25, 1]",
    )


@pytest.mark.parametrize("command", ["encrypt-images", "evaluate"])
def test_absurd_resize_is_refused_before_any_work(
    command, tmp_path, capsys, cache, png_tree, tiny_model_dir, one_png
):
    """--resize 100000 (30 GB per image) is refused with the largest size allowed, not after
    memory ran out."""
    if command == "encrypt-images":
        kf = tmp_path / "k.json"
        kf.write_text(keys.key_file_text(keys.generate_key(2, 3, seed=4)))
        out = tmp_path / "enc.npy"
        argv = ["encrypt-images", "--key", kf, one_png, "--resize", "100000", "--out", out]
        watch = [one_png.parent, kf, out]
    else:
        root = png_tree(tmp_path / "data")
        out = tmp_path / "result.json"
        argv = ["evaluate", tiny_model_dir, "--data-dir", root, "--resize", "100000"]
        argv += ["--quiet", "--out", out]
        watch = [root, tiny_model_dir, out]
    line = refused_in_process(capsys, argv, watch=watch, contains="4096")
    assert "100000" in line and "--batch-size" not in line, line


def test_a_thin_image_is_not_blown_up(tmp_path, capsys, tiny_model_dir):
    """A 1 x 100000 image resized to 4096 would first become 4266 x 426,600,000 pixels."""
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(np.zeros((1, 100_000, 3), np.uint8)).save(d / "thin.png")
    out = tmp_path / "enc.npy"
    kf = tmp_path / "k.json"
    kf.write_text(keys.key_file_text(keys.generate_key(2, 3, seed=4)))
    refused_in_process(
        capsys,
        ["encrypt-images", "--key", kf, d / "thin.png", "--resize", "4096", "--out", out],
        watch=[d, kf, out],
        contains=str(d / "thin.png"),
    )


# --------------------------------------------------------------------------- the cache folder


def test_empty_cache_variable_means_the_default(tmp_path, monkeypatch, png_tree):
    """CONVMIXER_JAX_CACHE="" is unset (the XDG rule), not the current directory."""
    from convmixer_jax.data.local import cache_dir, load_local

    root = png_tree(tmp_path / "data")
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("CONVMIXER_JAX_CACHE", "")
    monkeypatch.chdir(cwd)
    assert cache_dir() == home / ".cache" / "convmixer-jax"
    load_local(root, "test")
    assert list(cwd.iterdir()) == []
    assert [p.suffix for p in (home / ".cache" / "convmixer-jax").iterdir()] == [".npz"]


# --------------------------------------------------------------------------- PyTorch round trip


def test_export_torch_then_import_torch_round_trips(tmp_path, capsys, tiny_model_dir):
    """import-torch takes export-torch's file back with equal values, and timm's ConvMixer
    takes it with strict=True and every tensor of timm's own shape."""
    torch = pytest.importorskip("torch")
    timm_convmixer = pytest.importorskip("timm.models.convmixer")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    import jax

    from convmixer_jax.files.model_dir import load_model

    weights, back = tmp_path / "w.safetensors", tmp_path / "back"
    before = tree_digests(tiny_model_dir)
    ok(capsys, "export-torch", tiny_model_dir, "--out", weights)
    ok(capsys, "import-torch", weights, "--out", back, "--image-size", 8)
    assert tree_digests(tiny_model_dir) == before
    config, variables, _ = load_model(tiny_model_dir)
    config2, variables2, _ = load_model(back)
    assert (config2.dim, config2.depth, config2.kernel_size, config2.patch_size) == (8, 1, 3, 2)
    assert (config2.num_classes, config2.channels, config2.image_size) == (3, 3, 8)
    assert jax.tree.structure(variables2) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(variables2), strict=True):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))

    model = timm_convmixer.ConvMixer(
        dim=8, depth=1, kernel_size=3, patch_size=2, num_classes=3, in_chans=3
    )
    sd = safetensors_torch.load_file(str(weights))
    own = model.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in own.items()}
    assert all(sd[k].dtype == v.dtype for k, v in own.items())
    model.load_state_dict(sd, strict=True)
    assert torch.equal(model.stem[0].weight, sd["stem.0.weight"])


def test_import_torch_takes_a_counter_of_shape_1(tmp_path, capsys, tiny_model_dir):
    """Files written with (1,)-shaped num_batches_tracked (PyTorch loads them too) import."""
    torch = pytest.importorskip("torch")
    timm_convmixer = pytest.importorskip("timm.models.convmixer")
    safetensors_torch = pytest.importorskip("safetensors.torch")

    model = timm_convmixer.ConvMixer(
        dim=8, depth=1, kernel_size=3, patch_size=2, num_classes=3, in_chans=3
    )
    sd = {
        k: v.reshape(1) if k.endswith("num_batches_tracked") else v
        for k, v in model.state_dict().items()
    }
    safetensors_torch.save_file(sd, str(tmp_path / "w.safetensors"))
    ok(
        capsys,
        "import-torch",
        tmp_path / "w.safetensors",
        "--out",
        tmp_path / "m",
        "--image-size",
        8,
    )
    assert torch.equal(model.head.bias, sd["head.bias"])
