"""Ordinary image files: PNG/JPEG files and folders in, lossless PNG, a folder of
PNGs or .npy out. Every check compares VALUES: what encrypt-images writes, read back with
Pillow, must equal the array-level encryption (``scheme.images.encrypt_images``) of the
pixels Pillow decodes from the input, and decrypt-images must give those pixels back."""

from __future__ import annotations

import json
import os
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from convmixer_jax import cli
from convmixer_jax.files import image_files
from convmixer_jax.scheme import keys
from convmixer_jax.scheme.images import ImageError, decrypt_images, encrypt_images
from tests.cli_helpers import ok, run

M, C = 4, 3
RNG = np.random.default_rng(15)


# --------------------------------------------------------------------------- helpers


def tree(path: Path) -> dict:
    """Every entry under ``path`` (hidden ones too), with the bytes of files."""
    return {
        str(p.relative_to(path)): p.read_bytes()
        if p.is_file() and not p.is_symlink()
        else p.is_dir()
        for p in sorted(path.rglob("*"))
    }


def refused(capsys, argv, *, where: Path, words=(), code: int = 1) -> str:
    """``argv`` must fail with ``code`` and one stderr line naming ``words``, changing nothing
    under ``where``."""
    before = tree(where)
    rc, _, err = run(capsys, *argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == code, err
    assert (
        len(lines) == 1 and lines[0].startswith("convmixer-jax: error: ") and "Traceback" not in err
    ), err
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])
    assert tree(where) == before
    assert not [p for p in where.rglob("*") if ".cmj-" in p.name or p.name.endswith(".tmp")]
    return lines[0]


def pixels(img: np.ndarray, size=(8, 8), c: int = C) -> np.ndarray:
    return RNG.integers(0, 256, (*size, c), dtype=np.uint8) if img is None else img


def write_png(path: Path, array: np.ndarray) -> np.ndarray:
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path, format="PNG")
    return array


def write_jpeg(path: Path, array: np.ndarray) -> np.ndarray:
    """Save a JPEG and return the pixels Pillow decodes from it (not ``array``: JPEG is lossy)."""
    Image.fromarray(array).save(path, format="JPEG", quality=85)
    return read_image(path)


def read_image(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        a = np.asarray(im)
    return a[..., None] if a.ndim == 2 else a


def enc(x: np.ndarray, key) -> np.ndarray:
    """The array-level encryption of one (H, W, C) image."""
    return np.asarray(encrypt_images(x[None], key))[0]


def png_chunks(data: bytes) -> list[bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, out = 8, []
    while pos < len(data):
        n = struct.unpack(">I", data[pos : pos + 4])[0]
        out.append(data[pos + 4 : pos + 8])
        pos += 12 + n
    return out


def png16_rgb(path: Path, h: int = 8, w: int = 8) -> None:
    """A 16-bit RGB PNG (which Pillow would silently read as 8-bit RGB)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    raw = b"".join(b"\0" + bytes(range(w * 6)) for _ in range(h))
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def key_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("image-files-key")
    key = keys.generate_key(M, C, seed=15)
    (d / "k.json").write_text(keys.key_file_text(key))
    return d / "k.json", key


@pytest.fixture()
def work(tmp_path, key_pair):
    """tmp_path/w: an empty working folder (the key lives outside it, so trees compare cleanly)."""
    (tmp_path / "w").mkdir()
    return tmp_path / "w"


# --------------------------------------------------------------------------- values


def test_png_in_png_out_is_the_array_encryption_and_decrypts_exactly(work, key_pair, capsys):
    kf, key = key_pair
    x = write_png(work / "in.png", pixels(None, (16, 8)))
    out = ok(capsys, "encrypt-images", "--key", kf, work / "in.png", "--out", work / "enc.png")
    assert "enc.png" in out
    e = read_image(work / "enc.png")
    np.testing.assert_array_equal(e, enc(x, key))
    assert not np.array_equal(e, x)
    data = (work / "enc.png").read_bytes()
    assert set(png_chunks(data)) <= {b"IHDR", b"IDAT", b"IEND"}  # no metadata, no key
    ok(capsys, "decrypt-images", "--key", kf, work / "enc.png", "--out", work / "dec.png")
    np.testing.assert_array_equal(read_image(work / "dec.png"), x)
    # the library reads the PNG as a batch of one with its name
    images, names = image_files.load_image_inputs([work / "enc.png"])
    assert images.shape == (1, 16, 8, 3) and images.dtype == np.uint8 and names == ["enc.png"]


def test_folders_and_files_in_give_a_folder_of_pngs_with_the_names_kept(work, key_pair, capsys):
    kf, key = key_pair
    (work / "imgs").mkdir()
    (work / "more").mkdir()
    want = {
        "a.png": write_png(work / "imgs" / "a.png", pixels(None)),
        "b.png": write_jpeg(work / "imgs" / "b.jpg", pixels(None)),
        "c.png": write_jpeg(work / "imgs" / "c.JPEG", pixels(None)),
        "d.png": write_png(work / "more" / "d.png", pixels(None)),
    }
    (work / "imgs" / "notes.txt").write_text(
        "not an image"
    )  # ignored, as are subfolders and hidden files
    (work / "imgs" / "sub").mkdir()
    write_png(work / "imgs" / "sub" / "z.png", pixels(None))
    write_png(work / "imgs" / ".hidden.png", pixels(None))
    out = ok(
        capsys,
        "encrypt-images",
        "--key",
        kf,
        work / "imgs",
        work / "more" / "d.png",
        "--out",
        work / "enc",
    )
    assert "4 images" in out
    pngs = sorted(p.name for p in (work / "enc").iterdir() if not p.name.startswith("."))
    assert pngs == ["a.png", "b.png", "c.png", "d.png"]
    for name, x in want.items():
        np.testing.assert_array_equal(read_image(work / "enc" / name), enc(x, key), err_msg=name)
    ok(capsys, "decrypt-images", "--key", kf, work / "enc", "--out", work / "dec")
    for name, x in want.items():
        np.testing.assert_array_equal(read_image(work / "dec" / name), x, err_msg=name)
    # image files in, one .npy out: the stacked encryption, in the inputs' order
    ok(
        capsys,
        "encrypt-images",
        "--key",
        kf,
        work / "imgs",
        work / "more",
        "--out",
        work / "enc.npy",
    )
    np.testing.assert_array_equal(
        np.load(work / "enc.npy"), np.asarray(encrypt_images(np.stack(list(want.values())), key))
    )


def test_npy_in_png_out_for_one_uint8_image(work, key_pair, capsys):
    kf, key = key_pair
    x = pixels(None)
    np.save(work / "one.npy", x)
    np.save(work / "batch1.npy", x[None])
    ok(capsys, "encrypt-images", "--key", kf, work / "one.npy", "--out", work / "e1.png")
    ok(capsys, "encrypt-images", "--key", kf, work / "batch1.npy", "--out", work / "e2.png")
    for name in ("e1.png", "e2.png"):
        np.testing.assert_array_equal(read_image(work / name), enc(x, key))
    # and back to an array: decrypt-images PNG in, .npy out
    ok(capsys, "decrypt-images", "--key", kf, work / "e1.png", "--out", work / "d.npy")
    np.testing.assert_array_equal(np.load(work / "d.npy"), x[None])


@pytest.mark.parametrize(
    "array, out, words",
    [
        (np.full((8, 8, C), 0.5, np.float32), "e.png", ("float32", "change the values", ".npy")),
        (np.zeros((2, 8, 8, C), np.uint8), "e.png", ("one image", "2")),
        (np.zeros((2, 8, 8, C), np.uint8), "enc", ("folder", ".npy")),
    ],
)
def test_npy_in_to_a_png_it_cannot_hold_is_refused(work, key_pair, capsys, array, out, words):
    np.save(work / "in.npy", array)
    refused(
        capsys,
        ["encrypt-images", "--key", key_pair[0], work / "in.npy", "--out", work / out],
        where=work,
        words=words,
    )


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("name", ["enc.jpg", "enc.jpeg", "ENC.JPG", "enc.webp"])
def test_a_lossy_output_is_refused_and_nothing_written(work, key_pair, capsys, name):
    write_png(work / "in.png", pixels(None))
    line = refused(
        capsys,
        ["encrypt-images", "--key", key_pair[0], work / "in.png", "--out", work / name],
        where=work,
        words=("lossy", "use .png or .npy"),
    )
    if "jp" in name.lower():
        assert (
            "JPEG is lossy: it would change the encrypted pixels and the model would no longer "
            "compute the plain model's function; use .png or .npy" in line
        )
    assert sorted(os.listdir(work)) == ["in.png"]


def test_an_unknown_output_suffix_is_refused(work, key_pair, capsys):
    write_png(work / "in.png", pixels(None))
    refused(
        capsys,
        ["encrypt-images", "--key", key_pair[0], work / "in.png", "--out", work / "e.bmp"],
        where=work,
        words=(".bmp", "not a format", ".png"),
    )


def test_images_of_different_sizes_or_channels_are_refused(work, key_pair, capsys):
    (work / "imgs").mkdir()
    write_png(work / "imgs" / "a.png", pixels(None, (8, 8)))
    write_png(work / "imgs" / "b.png", pixels(None, (16, 8)))
    refused(
        capsys,
        ["encrypt-images", "--key", key_pair[0], work / "imgs", "--out", work / "enc"],
        where=work,
        words=("a.png", "b.png", "8x8", "16x8", "same size"),
    )
    write_png(work / "imgs" / "b.png", pixels(None, (8, 8), 1))
    refused(
        capsys,
        ["encrypt-images", "--key", key_pair[0], work / "imgs", "--out", work / "enc"],
        where=work,
        words=("a.png", "b.png", "grayscale", "RGB"),
    )


def test_an_existing_output_needs_force_and_force_replaces_only_what_the_command_writes(
    work, key_pair, capsys
):
    kf, key = key_pair
    x = write_png(work / "in.png", pixels(None))
    (work / "enc.png").write_bytes(b"do not touch")
    refused(
        capsys,
        ["encrypt-images", "--key", kf, work / "in.png", "--out", work / "enc.png"],
        where=work,
        words=("already exists", "--force"),
    )
    ok(capsys, "encrypt-images", "--key", kf, work / "in.png", "--out", work / "enc.png", "--force")
    np.testing.assert_array_equal(read_image(work / "enc.png"), enc(x, key))
    # folders: refused without --force, replaced with it, never when they hold anything else
    (work / "imgs").mkdir()
    y = write_png(work / "imgs" / "y.png", pixels(None))
    ok(capsys, "encrypt-images", "--key", kf, work / "imgs", "--out", work / "enc")
    refused(
        capsys,
        ["encrypt-images", "--key", kf, work / "imgs", "--out", work / "enc"],
        where=work,
        words=("already exists", "--force"),
    )
    ok(capsys, "encrypt-images", "--key", kf, work / "in.png", "--out", work / "enc", "--force")
    assert sorted(p.name for p in (work / "enc").glob("*.png")) == [
        "in.png"
    ]  # the old y.png went with the old folder
    (work / "enc" / "notes.txt").write_text("mine")
    refused(
        capsys,
        ["encrypt-images", "--key", kf, work / "imgs", "--out", work / "enc", "--force"],
        where=work,
        words=("notes.txt", "choose another"),
    )
    (work / "theirs").mkdir()
    (work / "theirs" / "a.csv").write_text("1,2")
    refused(
        capsys,
        ["encrypt-images", "--key", kf, work / "imgs", "--out", work / "theirs", "--force"],
        where=work,
        words=("did not write",),
    )
    # never an input, nor an image file of an input folder
    refused(
        capsys,
        ["encrypt-images", "--key", kf, work / "imgs", "--out", work / "imgs" / "y.png", "--force"],
        where=work,
        words=("destroy",),
    )
    refused(
        capsys,
        ["encrypt-images", "--key", kf, work / "imgs", "--out", work / "imgs", "--force"],
        where=work,
        words=("destroy",),
    )
    np.testing.assert_array_equal(read_image(work / "imgs" / "y.png"), y)


def _bad_inputs(work: Path) -> dict[str, tuple[list, tuple]]:
    (work / "empty").mkdir()
    (work / "a").mkdir()
    (work / "b").mkdir()
    write_png(work / "a" / "x.png", pixels(None))
    write_png(work / "b" / "x.png", pixels(None))
    write_png(work / "ok.png", pixels(None))
    write_png(work / "same.png", pixels(None))
    write_jpeg(work / "same.jpg", pixels(None))
    Image.fromarray(np.full((8, 8), 300, np.uint16)).save(work / "gray16.png")
    png16_rgb(work / "rgb16.png")
    (work / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (work / "text.png").write_bytes(b"hello")
    np.save(work / "x.npy", np.zeros((1, 8, 8, C), np.uint8))
    return {
        "empty folder": ([work / "empty"], ("holds no .png", "empty")),
        "duplicate names": ([work / "a", work / "b"], ("x.png", "rename")),
        "same stem": ([work / "same.png", work / "same.jpg"], ("same.png", "rename")),
        "16-bit gray": ([work / "gray16.png"], ("gray16.png", "8-bit")),
        "16-bit rgb": ([work / "rgb16.png"], ("rgb16.png", "16-bit", "8 bits")),
        "broken": ([work / "broken.png"], ("broken.png", "damaged")),
        "not an image": ([work / "text.png"], ("text.png", "not a PNG or JPEG")),
        "missing": ([work / "nope.png"], ("nope.png", "does not exist")),
        "npy with png": ([work / "x.npy", work / "ok.png"], ("cannot be mixed",)),
        "folder with npy": ([work / "a", work / "x.npy"], ("cannot be mixed",)),
        "two npy": ([work / "x.npy", work / "x.npy"], ("one .npy",)),
    }


def test_bad_inputs_get_one_line_and_nothing_written(work, key_pair, capsys):
    for case, (inputs, words) in _bad_inputs(work).items():
        refused(
            capsys,
            ["encrypt-images", "--key", key_pair[0], *inputs, "--out", work / "enc"],
            where=work,
            words=words,
        )
        assert not (work / "enc").exists(), case


def test_pixel_modes(tmp_path):
    """L is one channel, RGBA four, a palette image is read as its RGB colours, bilevel as 0/255."""
    gray = write_png(tmp_path / "gray.png", pixels(None, c=1))
    rgba = write_png(tmp_path / "rgba.png", pixels(None, c=4))
    Image.fromarray(pixels(None)).convert("P", palette=Image.Palette.ADAPTIVE).save(
        tmp_path / "pal.png"
    )
    Image.fromarray(pixels(None, c=1)[..., 0] > 127).save(tmp_path / "bw.png")
    for name, want in (("gray", gray), ("rgba", rgba)):
        images, _ = image_files.load_image_inputs([tmp_path / f"{name}.png"])
        np.testing.assert_array_equal(images[0], want)
    images, _ = image_files.load_image_inputs([tmp_path / "pal.png"])
    with Image.open(tmp_path / "pal.png") as im:
        np.testing.assert_array_equal(images[0], np.asarray(im.convert("RGB")))
    images, _ = image_files.load_image_inputs([tmp_path / "bw.png"])
    assert images.shape == (1, 8, 8, 1) and set(np.unique(images)) <= {0, 255}
    # a 4-channel key round-trips RGBA PNGs exactly through the files
    key4 = keys.generate_key(2, 4, seed=1)
    e = np.asarray(encrypt_images(rgba[None], key4))
    image_files.write_image_outputs(tmp_path / "e.png", e, None, force=False)
    back = image_files.load_image_inputs([tmp_path / "e.png"])[0]
    np.testing.assert_array_equal(np.asarray(decrypt_images(back, key4)), rgba[None])
    with pytest.raises(ImageError, match="2 channels|channels"):
        image_files.write_image_outputs(
            tmp_path / "la.png", np.zeros((1, 4, 4, 2), np.uint8), None, force=False
        )
    assert not (tmp_path / "la.png").exists()


# --------------------------------------------------------------------------- the command line


def test_the_old_positional_form_still_works(work, key_pair, capsys):
    kf, key = key_pair
    x = RNG.integers(0, 256, (2, 8, 8, C), dtype=np.uint8)
    np.save(work / "x.npy", x)
    np.save(work / "xf.npy", x.astype(np.float32) / 255)
    out = ok(capsys, "encrypt-images", "--key", kf, work / "x.npy", work / "e.npy")
    assert out.strip() == f"encrypted (2, 8, 8, 3) uint8 -> {work / 'e.npy'}"
    np.testing.assert_array_equal(np.load(work / "e.npy"), np.asarray(encrypt_images(x, key)))
    ok(capsys, "encrypt-images", "--key", kf, work / "xf.npy", work / "ef.npy")
    ef = np.load(work / "ef.npy")
    assert ef.dtype == np.float32 and ef.shape == x.shape
    ok(capsys, "decrypt-images", "--key", kf, work / "e.npy", work / "d.npy")
    np.testing.assert_array_equal(np.load(work / "d.npy"), x)
    # the same with --out
    ok(capsys, "encrypt-images", "--key", kf, work / "x.npy", "--out", work / "e2.npy")
    assert (work / "e2.npy").read_bytes() == (work / "e.npy").read_bytes()


def test_the_output_must_be_named_once(work, key_pair, capsys):
    kf = key_pair[0]
    write_png(work / "a.png", pixels(None))
    write_png(work / "b.png", pixels(None))
    np.save(work / "x.npy", pixels(None))
    # image inputs never lend their last one to the output: b.png stays an input, and untouched
    for argv in (
        ["encrypt-images", "--key", kf, work / "a.png", work / "b.png", "--force"],
        ["encrypt-images", "--key", kf, work / "a.png"],
        ["decrypt-images", "--key", kf, work / "x.npy"],
    ):
        line = refused(capsys, argv, where=work, code=2, words=("--out",))
        assert f"'convmixer-jax {argv[0]} --help'" in line
    # with --out every positional is an input
    refused(
        capsys,
        ["encrypt-images", "--key", kf, work / "x.npy", work / "x.npy", "--out", work / "z.npy"],
        where=work,
        words=("one .npy",),
    )
    assert cli.main(["encrypt-images", "--help"]) == 0
    assert "--out OUT" in capsys.readouterr().out


# --------------------------------------------------------------------------- property


@settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    m=st.sampled_from([2, 4]),
    c=st.sampled_from([1, 3]),
    hb=st.integers(1, 2),
    wb=st.integers(1, 2),
    n=st.integers(1, 2),
    seed=st.integers(0, 2**32 - 1),
)
def test_png_files_round_trip_and_hold_the_array_encryption(m, c, hb, wb, n, seed):
    key = keys.generate_key(m, c, seed=seed)
    images = np.random.default_rng(seed).integers(0, 256, (n, hb * m, wb * m, c), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as t:
        t = Path(t)
        (t / "in").mkdir()
        names = [f"img{i}.png" for i in range(n)]
        for name, x in zip(names, images, strict=True):
            write_png(t / "in" / name, x)
        loaded, got_names = image_files.load_image_inputs([t / "in"])
        np.testing.assert_array_equal(loaded, images)
        assert got_names == names
        e = np.asarray(encrypt_images(loaded, key))
        image_files.check_image_output(
            t / "enc",
            n_inputs=n,
            from_files=True,
            force=False,
            inputs={"IN": [t / "in"]},
            names=got_names,
            images=e,
        )
        image_files.write_image_outputs(t / "enc", e, got_names, force=False)
        for name, want in zip(names, e, strict=True):
            np.testing.assert_array_equal(
                read_image(t / "enc" / name), want
            )  # Pillow reads the encryption back
        back, _ = image_files.load_image_inputs([t / "enc"])
        np.testing.assert_array_equal(np.asarray(decrypt_images(back, key)), images)


def test_predict_on_a_folder_of_pngs_matches_the_array_path(
    tmp_path, capsys, make_model_dir, make_tiny_config
):
    """predict MODEL folder/ prints one line per image (sorted names, class indices when the
    model records no names); --out .npy / .json hold the same predictions; other suffixes are
    refused."""
    from convmixer_jax import cli
    from convmixer_jax.files.model_dir import load_model
    from convmixer_jax.model.inference import predict_logits

    model = make_model_dir(tmp_path / "m", make_tiny_config(image_size=4), seed=1)
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, im in zip(("b.png", "a.png", "c.png"), images, strict=True):
        Image.fromarray(im).save(folder / name)
    capsys.readouterr()
    assert cli.main(["predict", str(model), str(folder), "--top", "1", "--quiet"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    config, variables, _ = load_model(model)
    logits = predict_logits(config, variables, images[[1, 0, 2]])  # a, b, c
    assert [ln.split(":")[0] for ln in lines] == ["a.png", "b.png", "c.png"]
    assert [int(ln.split()[1]) for ln in lines] == list(np.argmax(logits, 1))
    assert (
        cli.main(["predict", str(model), str(folder), "--quiet", "--out", str(tmp_path / "l.npy")])
        == 0
    )
    np.testing.assert_allclose(np.load(tmp_path / "l.npy"), logits, rtol=1e-5, atol=1e-6)
    assert (
        cli.main(["predict", str(model), str(folder), "--quiet", "--out", str(tmp_path / "t.json")])
        == 0
    )
    doc = json.loads((tmp_path / "t.json").read_text())
    assert [p["image"] for p in doc["predictions"]] == ["a.png", "b.png", "c.png"]
    assert [p["top"][0]["index"] for p in doc["predictions"]] == list(np.argmax(logits, 1))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    np.testing.assert_allclose(
        [p["top"][0]["probability"] for p in doc["predictions"]], probs.max(1), rtol=1e-5
    )
    capsys.readouterr()
    assert cli.main(["predict", str(model), str(folder), "--out", str(tmp_path / "x.txt")]) == 2
    assert "--out" in capsys.readouterr().err and not (tmp_path / "x.txt").exists()
