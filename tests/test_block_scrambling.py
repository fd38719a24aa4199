"""Block scrambling (method.md, "Extension: block scrambling and Vision Transformers"): keys
with ``block_perm`` and ``grid``, the image transform against a loop-by-loop transcription of
method.md, commuting pixel and block keys, batches of keys, key files, the key space, and the
command line (keygen, keyspace, encrypt-images, decrypt-images)."""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convmixer_jax.scheme.images import (
    decrypt_images,
    encrypt_images,
    encrypt_images_reference,
)
from convmixer_jax.scheme.keys import (
    MAX_GRID_BLOCKS,
    InvalidKeyError,
    Key,
    fingerprint,
    generate_key,
    key_file_text,
    key_from_json,
    key_space,
    key_space_log2,
    key_space_text,
    key_to_json,
    load_key,
    make_key,
    random_keys,
    stack_keys,
    validate_key,
)
from tests.cli_helpers import ok, run

FAST = settings(max_examples=10, deadline=None, database=None)
# (block size, channels, grid): even and odd pb = M*M*C (2, 3, 4, 9, 12), one and three
# channels, square and oblong grids; few cases, so that the compiled transforms are reused
CASES = [
    (1, 3, (2, 3)),
    (2, 1, (1, 1)),
    (3, 1, (4, 4)),
    (2, 3, (3, 2)),
    (1, 2, (1, 4)),
    (2, 3, (4, 4)),
    (3, 1, (2, 3)),
    (2, 1, (2, 3)),
]


# ---------------------------------------------------------------- method.md, by hand


def encrypt_by_loops(x: np.ndarray, perm, flip, block_perm, m: int) -> np.ndarray:
    """method.md written out block by block: the output block at raster position
    b = r*gw + s is the input block at position block_perm[b] (b itself without block_perm),
    flattened with k = (i*M + j)*C + c, shuffled y[k] = v[perm[k]], flipped where flip[k]
    (255 - v for uint8, 1 - v for float)."""
    x = np.asarray(x)
    h, w, c = x.shape[-3:]
    gh, gw = h // m, w // m
    pb = m * m * c
    one = np.uint8(255) if x.dtype == np.uint8 else x.dtype.type(1)
    out = np.empty_like(x)
    for b in range(gh * gw):
        r, s = divmod(b, gw)
        src = b if block_perm is None else int(block_perm[b])
        sr, ss = divmod(src, gw)
        v = [
            x[..., sr * m + i, ss * m + j, ch]
            for i in range(m)
            for j in range(m)
            for ch in range(c)
        ]
        for k in range(pb):
            i, rest = divmod(k, m * c)
            j, ch = divmod(rest, c)
            z = v[int(perm[k])]
            out[..., r * m + i, s * m + j, ch] = one - z if flip[k] else z
    return out


def scramble_by_loops(x: np.ndarray, block_perm, m: int) -> np.ndarray:
    """Only the block key: the output block b is the input block block_perm[b]."""
    x = np.asarray(x)
    h, w, _ = x.shape[-3:]
    gw = w // m
    out = np.empty_like(x)
    for b in range(len(block_perm)):
        (r, s), (sr, ss) = divmod(b, gw), divmod(int(block_perm[b]), gw)
        out[..., r * m : (r + 1) * m, s * m : (s + 1) * m, :] = x[
            ..., sr * m : (sr + 1) * m, ss * m : (ss + 1) * m, :
        ]
    return out


def pixel_key(key: Key) -> Key:
    """The same perm and flip without block scrambling."""
    return make_key(key.perm, key.flip, key.block_size, key.channels)


def images_for(key: Key, n: int, seed: int) -> np.ndarray:
    gh, gw = key.grid
    m, c = key.block_size, key.channels
    return np.random.default_rng(seed).integers(0, 256, (n, gh * m, gw * m, c), dtype=np.uint8)


# ---------------------------------------------------------------- the image transform


@given(st.sampled_from(CASES), st.integers(0, 2**31))
@FAST
def test_encryption_follows_method_md_and_decrypts_exactly(case, seed):
    m, c, grid = case
    key = generate_key(m, c, seed=seed, grid=grid)
    x = images_for(key, 2, seed)
    expected = encrypt_by_loops(x, key.perm, key.flip, key.block_perm, m)
    enc = np.asarray(encrypt_images(x, key))
    assert enc.dtype == np.uint8 and enc.shape == x.shape
    np.testing.assert_array_equal(enc, expected)
    np.testing.assert_array_equal(encrypt_images_reference(x, key), expected)
    np.testing.assert_array_equal(np.asarray(decrypt_images(enc, key)), x)


@given(st.sampled_from(CASES), st.integers(0, 2**31))
@FAST
def test_pixel_key_and_block_key_commute(case, seed):
    m, c, grid = case
    key = generate_key(m, c, seed=seed, grid=grid)
    x = images_for(key, 2, seed + 1)
    both = np.asarray(encrypt_images(x, key))
    pixel_first = scramble_by_loops(
        np.asarray(encrypt_images(x, pixel_key(key))), key.block_perm, m
    )
    blocks_first = np.asarray(
        encrypt_images(scramble_by_loops(x, key.block_perm, m), pixel_key(key))
    )
    np.testing.assert_array_equal(both, pixel_first)
    np.testing.assert_array_equal(both, blocks_first)


def test_float_images_follow_method_md():
    key = generate_key(2, 3, seed=4, grid=(2, 3))
    x = np.random.default_rng(4).random((2, 4, 6, 3), dtype=np.float32)
    enc = np.asarray(encrypt_images(x, key))
    assert enc.dtype == np.float32
    np.testing.assert_array_equal(enc, encrypt_by_loops(x, key.perm, key.flip, key.block_perm, 2))
    np.testing.assert_allclose(np.asarray(decrypt_images(enc, key)), x, rtol=0, atol=2**-23)


def test_a_scrambled_block_moves_whole():
    """A hand-made case: the block key [1, 0] on a 1 x 2 grid swaps the two blocks."""
    key = make_key([2, 0, 3, 1], [1, 0, 0, 1], 2, 1, block_perm=[1, 0], grid=(1, 2))
    a, b, c, d = 10, 20, 30, 40
    e, f, g, h = 1, 2, 3, 4
    x = np.array([[a, b, e, f], [c, d, g, h]], np.uint8)[..., None]
    # method.md's worked example, [[a, b], [c, d]] -> [[255-c, a], [d, 255-b]], per block,
    # with the blocks swapped
    expected = np.array([[255 - g, e, 255 - c, a], [h, 255 - f, d, 255 - b]], np.uint8)[..., None]
    np.testing.assert_array_equal(np.asarray(encrypt_images(x, key)), expected)
    np.testing.assert_array_equal(np.asarray(decrypt_images(expected, key)), x)


# one compiled draw for the whole module: random_keys is jitted with its sizes static
draw_keys = jax.jit(random_keys, static_argnums=(1, 2, 3), static_argnames="grid")


def test_random_keys_with_a_grid_and_vmap_over_them():
    keys = draw_keys(jax.random.key(5), 4, 2, 3, grid=(2, 3))
    assert keys.block_perm.shape == (4, 6) and keys.grid == (2, 3)
    np.testing.assert_array_equal(
        keys.block_perm, draw_keys(jax.random.key(5), 4, 2, 3, grid=(2, 3)).block_perm
    )
    assert len({tuple(r) for r in np.asarray(keys.block_perm).tolist()}) > 1
    x = images_for(generate_key(2, 3, seed=0, grid=(2, 3)), 3, 9)
    enc = np.asarray(jax.vmap(encrypt_images, in_axes=(None, 0))(x, keys))
    dec = np.asarray(jax.vmap(decrypt_images, in_axes=(0, 0))(enc, keys))
    for i in range(4):
        single = validate_key(jax.device_get(keys[i]))
        expected = encrypt_by_loops(x, single.perm, single.flip, single.block_perm, 2)
        np.testing.assert_array_equal(enc[i], expected)
        np.testing.assert_array_equal(dec[i], x)
    # a stack of generated keys maps the same way
    singles = [generate_key(2, 3, seed=s, grid=(2, 3)) for s in range(4)]
    batch = stack_keys(singles)
    enc = np.asarray(jax.vmap(encrypt_images, in_axes=(None, 0))(x, batch))
    for i, k in enumerate(singles):
        np.testing.assert_array_equal(enc[i], encrypt_by_loops(x, k.perm, k.flip, k.block_perm, 2))
    assert "grid=2x3" in repr(keys) and "perm" not in repr(keys)


# ---------------------------------------------------------------- keys without block_perm

# method.md's worked key, as a key file of the ConvMixer paper's form (no new fields)
WORKED_TEXT = (
    '{"format": "convmixer-jax-key", "version": 1, "block_size": 2, "channels": 1, '
    '"perm": [2, 0, 3, 1], "flip": [1, 0, 0, 1], "fingerprint": "%s"}\n'
)
WORKED_CANONICAL = (
    '{"block_size":2,"channels":1,"flip":[1,0,0,1],'
    '"format":"convmixer-jax-key","perm":[2,0,3,1],"version":1}'
)


def test_a_key_without_block_perm_is_unchanged(tmp_path):
    expected_fp = hashlib.sha256(WORKED_CANONICAL.encode()).hexdigest()
    key = make_key([2, 0, 3, 1], [1, 0, 0, 1], 2, 1)
    assert not key.scrambles and key.block_perm is None and key.grid is None
    assert fingerprint(key) == expected_fp
    assert key_file_text(key) == WORKED_TEXT % expected_fp
    assert set(key_to_json(key)) == {"format", "version", "block_size", "channels", "perm", "flip"}
    path = tmp_path / "k.json"
    path.write_text(WORKED_TEXT % expected_fp)
    loaded = load_key(path)
    assert not loaded.scrambles and fingerprint(loaded) == expected_fp
    # the same outputs as method.md's worked example, block by block, at their own positions
    a, b, c, d, e, f, g, h = 10, 20, 30, 40, 1, 2, 3, 4
    x = np.array([[a, b, e, f], [c, d, g, h]], np.uint8)[..., None]
    enc = np.array([[255 - c, a, 255 - g, e], [d, 255 - b, h, 255 - f]], np.uint8)[..., None]
    np.testing.assert_array_equal(np.asarray(encrypt_images(x, loaded)), enc)
    np.testing.assert_array_equal(encrypt_images_reference(x, loaded), enc)
    # a key without a grid takes images of any size
    assert np.asarray(encrypt_images(np.zeros((6, 10, 1), np.uint8), loaded)).shape == (6, 10, 1)


def test_seeded_keys_without_a_grid_are_drawn_as_before():
    """generate_key(..., seed) without a grid: perm then flip from one NumPy generator."""
    g = np.random.default_rng(123)
    perm = g.permutation(12)
    flip = g.permutation(np.array([1] * 6 + [0] * 6, np.uint8))
    key = generate_key(2, 3, seed=123)
    np.testing.assert_array_equal(key.perm, perm)
    np.testing.assert_array_equal(key.flip, flip)
    # with a grid: the same perm and flip, then the block key from the same generator
    scrambling = generate_key(2, 3, seed=123, grid=(2, 2))
    np.testing.assert_array_equal(scrambling.perm, perm)
    np.testing.assert_array_equal(scrambling.flip, flip)
    np.testing.assert_array_equal(scrambling.block_perm, g.permutation(4))
    assert scrambling.grid == (2, 2) and scrambling.block_perm.dtype == np.int32


def test_csprng_keys_with_a_grid():
    a, b = generate_key(2, 3, grid=(4, 4)), generate_key(2, 3, grid=(4, 4))
    for k in (a, b):
        assert k.scrambles and k.grid == (4, 4)
        assert sorted(k.block_perm.tolist()) == list(range(16))
    assert not np.array_equal(a.block_perm, b.block_perm)  # 16! choices
    assert fingerprint(a) != fingerprint(b)


def test_repr_names_the_grid_never_the_block_key():
    key = generate_key(2, 3, seed=1, grid=(4, 4))
    text = repr(key)
    assert "grid=4x4" in text and fingerprint(key)[:16] in text
    assert "perm" not in text and ", ".join(map(str, key.block_perm[:4].tolist())) not in text


# ---------------------------------------------------------------- key files and fingerprints


def test_json_round_trip_and_fingerprint_cover_the_block_key(tmp_path):
    canonical = (
        '{"block_perm":[1,2,0],"block_size":2,"channels":1,"flip":[1,0,0,1],'
        '"format":"convmixer-jax-key","grid":[1,3],"perm":[2,0,3,1],"version":1}'
    )
    key = make_key([2, 0, 3, 1], [1, 0, 0, 1], 2, 1, block_perm=[1, 2, 0], grid=(1, 3))
    assert fingerprint(key) == hashlib.sha256(canonical.encode()).hexdigest()
    obj = key_to_json(key)
    assert obj["block_perm"] == [1, 2, 0] and obj["grid"] == [1, 3]
    path = tmp_path / "k.json"
    path.write_text(key_file_text(key))
    back = load_key(path)
    assert back.grid == (1, 3) and back.block_perm.tolist() == [1, 2, 0]
    assert fingerprint(back) == fingerprint(key)
    # the fingerprint tells apart: no block key, another block key, another grid
    others = [
        make_key([2, 0, 3, 1], [1, 0, 0, 1], 2, 1),
        make_key([2, 0, 3, 1], [1, 0, 0, 1], 2, 1, block_perm=[2, 1, 0], grid=(1, 3)),
        make_key([2, 0, 3, 1], [1, 0, 0, 1], 2, 1, block_perm=[1, 2, 0], grid=(3, 1)),
    ]
    assert len({fingerprint(k) for k in [key, *others]}) == 4
    # an edited block key in a file is detected by the recorded fingerprint
    edited = json.loads(path.read_text())
    edited["block_perm"] = [2, 1, 0]
    path.write_text(json.dumps(edited))
    with pytest.raises(InvalidKeyError, match="fingerprint"):
        load_key(path)
    edited["grid"] = [3, 1]
    edited["block_perm"] = [1, 2, 0]
    path.write_text(json.dumps(edited))
    with pytest.raises(InvalidKeyError, match="fingerprint"):
        load_key(path)


def _set(field, value):
    def f(o):
        o[field] = value

    return f


def _delete(field):
    def f(o):
        del o[field]

    return f


MUTATIONS = {
    "block_perm without grid": _delete("grid"),
    "grid without block_perm": _delete("block_perm"),
    "block_perm duplicate": _set("block_perm", [0, 0, 1, 2, 3, 4]),
    "block_perm out of range": _set("block_perm", [0, 1, 2, 3, 4, 6]),
    "block_perm negative": _set("block_perm", [-1, 1, 2, 3, 4, 5]),
    "block_perm short": _set("block_perm", [0, 1, 2, 3, 4]),
    "block_perm long": _set("block_perm", list(range(7))),
    "block_perm float": _set("block_perm", [0.0, 1, 2, 3, 4, 5]),
    "block_perm bool": _set("block_perm", [False, True, 2, 3, 4, 5]),
    "block_perm not a list": _set("block_perm", "012345"),
    "block_perm nested": _set("block_perm", [[0, 1, 2, 3, 4, 5]]),
    "grid of one number": _set("grid", [6]),
    "grid of three numbers": _set("grid", [1, 2, 3]),
    "grid zero": _set("grid", [0, 3]),
    "grid negative": _set("grid", [-2, -3]),
    "grid float": _set("grid", [2.0, 3]),
    "grid bool": _set("grid", [True, 6]),
    "grid string": _set("grid", "2x3"),
    "grid not a list": _set("grid", {"gh": 2, "gw": 3}),
    "grid disagrees with block_perm": _set("grid", [2, 2]),
    "grid beyond the limit": _set("grid", [MAX_GRID_BLOCKS, 2]),
    "block_perm null": _set("block_perm", None),
    "grid null": _set("grid", None),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_tampered_or_partial_block_fields_are_refused(name, tmp_path):
    obj = key_to_json(generate_key(2, 1, seed=3, grid=(2, 3)))
    key_from_json(copy.deepcopy(obj))  # the unedited object is accepted
    MUTATIONS[name](obj)
    with pytest.raises(InvalidKeyError) as e:
        key_from_json(obj)
    assert "\n" not in str(e.value)
    # and as a key file, with or without its recorded fingerprint
    path = tmp_path / "k.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(InvalidKeyError):
        load_key(path)


def test_a_partial_key_file_names_the_missing_field(tmp_path):
    obj = json.loads(key_file_text(generate_key(2, 1, seed=3, grid=(2, 3))))
    del obj["grid"]
    path = tmp_path / "k.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(InvalidKeyError, match="'block_perm' without 'grid'"):
        load_key(path)


def test_validate_key_and_stack_keys_refuse_inconsistent_block_keys():
    perm, flip = [2, 0, 3, 1], [1, 0, 0, 1]
    with pytest.raises(InvalidKeyError, match="block_perm without grid"):
        make_key(perm, flip, 2, 1, block_perm=[1, 0])
    with pytest.raises(InvalidKeyError, match="grid without block_perm"):
        make_key(perm, flip, 2, 1, grid=(1, 2))
    with pytest.raises(InvalidKeyError, match="shape"):
        make_key(perm, flip, 2, 1, block_perm=[1, 0, 2], grid=(1, 2))
    with pytest.raises(InvalidKeyError, match="permutation"):
        make_key(perm, flip, 2, 1, block_perm=[1, 1], grid=(1, 2))
    with pytest.raises(InvalidKeyError, match="permutation"):
        make_key(perm, flip, 2, 1, block_perm=[1.0, 0.0], grid=(1, 2))
    with pytest.raises(InvalidKeyError, match="two positive integers"):
        make_key(perm, flip, 2, 1, block_perm=[0], grid=(0, 1))
    with pytest.raises(InvalidKeyError, match="limit"):
        generate_key(2, 1, grid=(MAX_GRID_BLOCKS + 1, 1))
    a = generate_key(2, 1, seed=0, grid=(2, 3))
    with pytest.raises(InvalidKeyError, match="same grid"):
        stack_keys([a, generate_key(2, 1, seed=1, grid=(3, 2))])
    with pytest.raises(InvalidKeyError, match="same grid"):
        stack_keys([a, generate_key(2, 1, seed=1)])
    batch = stack_keys([a, generate_key(2, 1, seed=1, grid=(2, 3))])
    assert batch.block_perm.shape == (2, 6) and batch.grid == (2, 3)
    np.testing.assert_array_equal(batch[0].block_perm, a.block_perm)
    with pytest.raises(InvalidKeyError):
        validate_key(batch)  # a batch is not a single key


# ---------------------------------------------------------------- images of another size


def test_grid_mismatch_is_one_line_naming_both_grids():
    key = generate_key(4, 3, seed=0, grid=(8, 8))
    x = np.zeros((2, 16, 16, 3), np.uint8)
    message = (
        "the key's block scrambling is bound to a 8 x 8 grid of 4 x 4 blocks (32 x 32 images), "
        "but these images are 16 x 16 (a 4 x 4 grid); make a key for this size with keygen "
        "--block-scrambling --image-size 16"
    )
    for fn in (encrypt_images, decrypt_images, encrypt_images_reference):
        with pytest.raises(InvalidKeyError) as e:
            fn(x, key)
        assert str(e.value) == message
    # a grid of the same number of blocks in another shape is refused too; the fix names it
    key = generate_key(2, 1, seed=0, grid=(2, 3))
    with pytest.raises(InvalidKeyError, match=r"a 3 x 2 grid\); .*--grid 3 2$"):
        encrypt_images(np.zeros((6, 4, 1), np.uint8), key)
    # under vmap over keys as well
    keys = stack_keys([key, generate_key(2, 1, seed=1, grid=(2, 3))])
    with pytest.raises(InvalidKeyError, match="2 x 3 grid"):
        jax.vmap(encrypt_images, in_axes=(None, 0))(np.zeros((6, 4, 1), np.uint8), keys)


# ---------------------------------------------------------------- the key space


@pytest.mark.parametrize(
    "m,c,grid",
    [(2, 1, (1, 1)), (2, 1, (2, 3)), (1, 3, (2, 2)), (3, 1, (4, 4)), (4, 3, (8, 8)), (2, 3, None)],
)
def test_key_space_counts(m, c, grid):
    pb = m * m * c
    pixel = math.factorial(pb) * math.comb(pb, pb // 2)
    blocks = 1 if grid is None else math.factorial(grid[0] * grid[1])
    assert key_space(m, c, grid) == pixel * blocks
    assert key_space_text(m, c, grid) == str(pixel * blocks)
    assert key_space_log2(m, c, grid) == pytest.approx(math.log2(pixel * blocks), rel=1e-12)
    assert key_space(m, c) == pixel


def test_key_space_counts_every_valid_key_by_brute_force():
    """pb = 2 (M = 1, C = 2) on a 1 x 3 grid: 2! * C(2, 1) * 3! = 24 distinct keys."""
    import itertools

    found = set()
    for perm in itertools.permutations(range(2)):
        for flip in itertools.product((0, 1), repeat=2):
            for bp in itertools.permutations(range(3)):
                try:
                    found.add(fingerprint(make_key(perm, flip, 1, 2, block_perm=bp, grid=(1, 3))))
                except InvalidKeyError:
                    pass
    assert len(found) == key_space(1, 2, (1, 3)) == 24


# ---------------------------------------------------------------- the command line


def error_line(capsys, *argv, rc_expected: int) -> str:
    rc, out, err = run(capsys, *argv)
    assert rc == rc_expected, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convmixer-jax: error: "), err
    return lines[0]


def test_cli_keygen_keyspace_and_images_round_trip(tmp_path, capsys):
    key_path = tmp_path / "k.json"
    out = ok(
        capsys,
        "keygen",
        "--block-size",
        "2",
        "--channels",
        "3",
        "--block-scrambling",
        "--image-size",
        "8",
        "--out",
        key_path,
    )
    key = load_key(key_path)
    assert key.grid == (4, 4) and sorted(key.block_perm.tolist()) == list(range(16))
    assert out.strip() == fingerprint(key)  # the fingerprint only, never the key
    assert key_path.stat().st_mode & 0o077 == 0
    ok(capsys, "keygen", "--block-size", "2", "--channels", "3", "--block-scrambling",
       "--grid", "2", "3", "--key-seed", "1", "--out", tmp_path / "g.json")  # fmt: skip
    assert load_key(tmp_path / "g.json").grid == (2, 3)

    x = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    ok(capsys, "encrypt-images", "--key", key_path, tmp_path / "x.npy", "--out", tmp_path / "e.npy")
    enc = np.load(tmp_path / "e.npy")
    np.testing.assert_array_equal(enc, encrypt_by_loops(x, key.perm, key.flip, key.block_perm, 2))
    ok(capsys, "decrypt-images", "--key", key_path, tmp_path / "e.npy", "--out", tmp_path / "d.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "d.npy"), x)
    # a folder of PNG files, names kept
    from PIL import Image

    (tmp_path / "png").mkdir()
    for i in range(2):
        Image.fromarray(x[i]).save(tmp_path / "png" / f"{i}.png")
    ok(capsys, "encrypt-images", "--key", key_path, tmp_path / "png", "--out", tmp_path / "ep")
    ok(capsys, "decrypt-images", "--key", key_path, tmp_path / "ep", "--out", tmp_path / "dp")
    for i in range(2):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "ep" / f"{i}.png")), enc[i])
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "dp" / f"{i}.png")), x[i])

    # images of another size: exit 1, one line naming both grids, nothing written
    np.save(tmp_path / "small.npy", x[:, :4, :4])
    for command in ("encrypt-images", "decrypt-images"):
        line = error_line(
            capsys, command, "--key", key_path, tmp_path / "small.npy", "--out",
            tmp_path / "bad.npy", rc_expected=1,
        )  # fmt: skip
        assert "a 4 x 4 grid of 2 x 2 blocks (8 x 8 images)" in line
        assert "these images are 4 x 4 (a 2 x 2 grid)" in line
        assert "--block-scrambling --image-size 4" in line
        assert not (tmp_path / "bad.npy").exists()


def test_cli_keygen_refuses_incomplete_options(tmp_path, capsys):
    base = ["keygen", "--block-size", "4", "--channels", "3", "--out", tmp_path / "k.json"]
    line = error_line(capsys, *base, "--image-size", "32", rc_expected=2)
    assert "add --block-scrambling" in line
    line = error_line(capsys, *base, "--grid", "8", "8", rc_expected=2)
    assert "add --block-scrambling" in line
    line = error_line(capsys, *base, "--block-scrambling", rc_expected=2)
    assert "--image-size" in line and "--grid" in line
    line = error_line(capsys, *base, "--block-scrambling", "--image-size", "30", rc_expected=2)
    assert "--image-size 30 is not a multiple of --block-size 4" in line
    error_line(
        capsys, *base, "--block-scrambling", "--image-size", "32", "--grid", "8", "8",
        rc_expected=2,
    )  # fmt: skip
    line = error_line(capsys, *base, "--block-scrambling", "--grid", "1000", "1000", rc_expected=1)
    assert "limit" in line
    assert not (tmp_path / "k.json").exists()
    assert not any(Path(tmp_path).iterdir())


def test_cli_keyspace(capsys):
    out = ok(capsys, "keyspace", "--block-size", "4", "--channels", "3")
    assert "gh*gw" not in out and "block scrambling" not in out  # today's form
    assert f"keys = pb! * C(pb, pb/2) = {math.factorial(48) * math.comb(48, 24)}\n" in out
    assert "log2 = 247.82 (about 2^247.82)" in out
    exact = math.factorial(64) * math.factorial(48) * math.comb(48, 24)
    for grid_args in (["--image-size", "32"], ["--grid", "8", "8"]):
        out = ok(capsys, "keyspace", "--block-size", "4", "--channels", "3", *grid_args)
        assert "a 8 x 8 grid (32 x 32 images), gh*gw = 64 block positions" in out
        assert f"keys = (gh*gw)! * pb! * C(pb, pb/2) = {exact}\n" in out
        assert f"log2 = {math.log2(exact):.2f}" in out
        assert f"block positions log2 = {math.log2(math.factorial(64)):.2f}" in out
    out = ok(capsys, "keyspace", "--block-size", "3", "--channels", "1", "--grid", "2", "3")
    assert f"= {math.factorial(6) * math.factorial(9) * math.comb(9, 4)}\n" in out
    assert "C(pb, (pb-1)/2)" in out
    line = error_line(
        capsys, "keyspace", "--block-size", "4", "--channels", "3", "--image-size", "30",
        rc_expected=2,
    )  # fmt: skip
    assert "not a multiple of --block-size 4" in line
