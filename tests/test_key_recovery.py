"""Known-plaintext key recovery (convmixer_jax.attacks.known_plaintext,
``convmixer-jax recover-key``).

The encrypted images here come from an independent transcription of method.md written
below (one block and one position at a time), so a shared mistake with the library's
encrypt_images would show. The resolution logic is checked against exhaustive search
over every key for small blocks, on images drawn from tiny alphabets (many ties,
complements and, in float, self-complementary 0.5 columns).
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from convmixer_jax.attacks.known_plaintext import RecoveryResult, recover_key
from convmixer_jax.scheme import keys
from convmixer_jax.scheme.blocks import block_rows
from convmixer_jax.scheme.images import ImageError, decrypt_images, encrypt_images
from tests.cli_helpers import run

# ------------------------------------------------------- independent encryption (method.md)


def encrypt_loop(images: np.ndarray, perm, flip, m: int) -> np.ndarray:
    """Block by block, position by position: z[k] = x[perm[k]], then 1 - z[k] (255 - z[k])
    where flip[k]; k = (i*m + j)*c + ch inside a block."""
    x = np.asarray(images)
    out = np.empty_like(x)
    h, w, c = x.shape[-3:]
    full = np.uint8(255) if x.dtype == np.uint8 else x.dtype.type(1)
    for top in range(0, h, m):
        for left in range(0, w, m):
            for k in range(m * m * c):
                src = int(perm[k])
                si, sj, sc = src // (m * c), (src // c) % m, src % c
                di, dj, dc = k // (m * c), (k // c) % m, k % c
                v = x[..., top + si, left + sj, sc]
                out[..., top + di, left + dj, dc] = full - v if flip[k] else v
    return out


def random_key(rng: np.random.Generator, m: int, c: int) -> keys.Key:
    pb = m * m * c
    return keys.make_key(
        rng.permutation(pb), rng.permutation([1] * (pb // 2) + [0] * (pb - pb // 2)), m, c
    )


def assert_same_key(got: keys.Key | None, want: keys.Key):
    assert got is not None
    np.testing.assert_array_equal(np.asarray(got.perm), np.asarray(want.perm))
    np.testing.assert_array_equal(np.asarray(got.flip), np.asarray(want.flip))
    assert (got.block_size, got.channels) == (want.block_size, want.channels)


def assert_true_key_allowed(r: RecoveryResult, key: keys.Key):
    pb = r.block_len
    assert r.candidates[np.arange(pb), np.asarray(key.perm), np.asarray(key.flip)].all()


def test_independent_encryption_matches_library():
    rng = np.random.default_rng(0)
    key = random_key(rng, 2, 3)
    x = rng.integers(0, 256, (2, 4, 6, 3), dtype=np.uint8)
    np.testing.assert_array_equal(
        encrypt_loop(x, key.perm, key.flip, 2), np.asarray(encrypt_images(x, key))
    )


def test_block_flattening_order():
    # M = 2, C = 2, one block: value = 10*i + 5*j + c at row i, column j, channel c
    x = np.array([[[0, 1], [5, 6]], [[10, 11], [15, 16]]], np.uint8)
    np.testing.assert_array_equal(block_rows(x, 2), [[0, 1, 5, 6, 10, 11, 15, 16]])


# ---------------------------------------------------------------- exact recovery


@pytest.mark.parametrize("shape", [(32, 32, 3), (1, 32, 32, 3), (5, 32, 32, 3)])
def test_recovers_key_from_random_uint8_images(shape):
    rng = np.random.default_rng(sum(shape))
    key = random_key(rng, 4, 3)
    x = rng.integers(0, 256, shape, dtype=np.uint8)
    r = recover_key(x, encrypt_loop(x, key.perm, key.flip, 4), 4)
    assert r.consistent and r.reason is None and r.undetermined == 0
    assert r.num_blocks == (shape[0] if len(shape) == 4 else 1) * 64
    assert_same_key(r.key, key)
    np.testing.assert_array_equal(r.perm, key.perm)
    np.testing.assert_array_equal(r.flip, key.flip)
    assert (r.candidate_counts == 1).all() and r.perm_candidates.sum() == 48


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_recovers_key_from_float_images(dtype):
    rng = np.random.default_rng(1)
    key = random_key(rng, 4, 3)
    x = (rng.integers(0, 256, (2, 16, 16, 3)) / 255).astype(dtype)
    z = encrypt_loop(x, key.perm, key.flip, 4)
    assert z.dtype == dtype
    assert_same_key(recover_key(x, z, 4).key, key)
    if dtype != np.float16:  # the library's float path (JAX) too
        assert_same_key(recover_key(x, np.asarray(encrypt_images(x, key)), 4).key, key)


def test_float_continuous_values():
    rng = np.random.default_rng(2)
    key = random_key(rng, 2, 2)
    x = rng.random((3, 8, 8, 2), dtype=np.float32)
    assert_same_key(recover_key(x, encrypt_loop(x, key.perm, key.flip, 2), 2).key, key)


def _complement_free_distinct_columns(blocks: np.ndarray) -> bool:
    """Whether no two plain positions are equal, or complementary, in every block."""
    cols = [tuple(col) for col in blocks.T]
    canon = [min(col, tuple(255 - np.asarray(col))) for col in cols]
    return len(set(canon)) == len(canon)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    m=st.integers(1, 4),
    c=st.integers(1, 4),
    hb=st.integers(1, 3),
    wb=st.integers(1, 3),
    n=st.integers(1, 3),
    seed=st.integers(0, 2**32 - 1),
    levels=st.sampled_from([256, 4]),
)
def test_recovery_property(m, c, hb, wb, n, seed, levels):
    assume(m * m * c >= 2)  # odd pb too: floor(pb/2) flips
    rng = np.random.default_rng(seed)
    key = random_key(rng, m, c)
    x = (rng.integers(0, levels, (n, hb * m, wb * m, c)) * (255 // (levels - 1))).astype(np.uint8)
    r = recover_key(x, encrypt_loop(x, key.perm, key.flip, m), m)
    assert r.consistent
    assert_true_key_allowed(r, key)
    if r.key is not None:  # unique, so it must be the true key
        assert_same_key(r.key, key)
    else:
        assert r.undetermined > 0
    if _complement_free_distinct_columns(block_rows(x, m)):
        assert r.undetermined == 0
        assert_same_key(r.key, key)


# ---------------------------------------------------------------- against exhaustive search


def all_keys(pb: int):
    flips = np.array(
        [f for f in itertools.product((0, 1), repeat=pb) if sum(f) == pb // 2], np.int64
    )
    for perm in itertools.permutations(range(pb)):
        yield np.array(perm), flips


def brute_force(P: np.ndarray, E: np.ndarray, full) -> np.ndarray:
    """(pb, pb, 2) bool: options (k, j, f) used by some key with E = encrypt(P)."""
    pb = P.shape[1]
    out = np.zeros((pb, pb, 2), bool)
    for perm, flips in all_keys(pb):
        y = P[:, perm]
        z = np.where(flips[:, None, :] == 1, full - y[None], y[None])  # (num_flips, nb, pb)
        for f in flips[(z == E[None]).all(axis=(1, 2))]:
            out[np.arange(pb), perm, f] = True
    return out


ALPHABETS = {
    "uint8": (np.uint8, [0, 255, 100, 155, 7]),
    "float": (np.float64, [0.0, 1.0, 0.5, 0.25, 0.75]),
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.sampled_from([(1, 2), (1, 4), (2, 1), (1, 6)]),
    blocks=st.integers(1, 4),
    alphabet=st.sampled_from(sorted(ALPHABETS)),
    size=st.integers(1, 5),
    mixed=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_matches_exhaustive_search(shape, blocks, alphabet, size, mixed, seed):
    m, c = shape
    dtype, values = ALPHABETS[alphabet]
    rng = np.random.default_rng(seed)
    x = np.asarray(values[:size], dtype)[rng.integers(0, size, (blocks, m, m, c))]
    key = random_key(rng, m, c)
    z = encrypt_loop(x, key.perm, key.flip, m)
    if mixed:  # the last block under another key: often no key explains the pairs
        other = random_key(rng, m, c)
        z[-1] = encrypt_loop(x[-1], other.perm, other.flip, m)
    r = recover_key(x, z, m)
    P, E = block_rows(x, m), block_rows(z, m)
    expected = brute_force(P, E, dtype(255) if dtype == np.uint8 else 1.0)
    assert r.consistent == expected.any()
    if r.consistent:
        np.testing.assert_array_equal(r.candidates, expected)
        assert r.undetermined == int((expected.sum(axis=(1, 2)) != 1).sum())
        assert (r.key is not None) == (r.undetermined == 0)
    else:
        assert r.key is None and r.reason


def test_flip_count_resolves_a_complementary_pair():
    # M = 1, C = 4. Plain positions 0 and 1 are complements in every block; positions 2, 3
    # are distinct. perm = identity, flip = [0, 0, 1, 1]. The swap (k0 <- j1, k1 <- j0)
    # explains the columns too, but needs flips [1, 1, 1, 1]: four ones, not pb/2 = 2.
    x = np.array([[[[10, 245, 3, 90]]], [[[60, 195, 4, 91]]]], np.uint8)  # (2, 1, 1, 4)
    key = keys.make_key([0, 1, 2, 3], [0, 0, 1, 1], 1, 4)
    r = recover_key(x, encrypt_loop(x, key.perm, key.flip, 1), 1)
    assert r.raw_candidates[0, 1, 1] and r.raw_candidates[1, 0, 1]  # the columns allow the swap
    assert r.undetermined == 0
    assert_same_key(r.key, key)


# ---------------------------------------------------------------- ambiguous or inconsistent pairs


def test_flat_image_is_undetermined():
    rng = np.random.default_rng(3)
    key = random_key(rng, 4, 3)
    x = np.full((2, 32, 32, 3), 128, np.uint8)
    r = recover_key(x, encrypt_loop(x, key.perm, key.flip, 4), 4)
    assert r.consistent and r.key is None and r.undetermined == 48
    assert_true_key_allowed(r, key)
    assert (r.perm == -1).all()


def test_gray_image_leaves_channels_ambiguous():
    rng = np.random.default_rng(4)
    key = random_key(rng, 2, 3)
    gray = rng.integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
    x = np.repeat(gray, 3, axis=-1)  # R = G = B: the three channels of a pixel are interchangeable
    r = recover_key(x, encrypt_loop(x, key.perm, key.flip, 2), 2)
    assert r.consistent and r.key is None and r.undetermined == 12
    assert (r.candidate_counts == 3).all()
    assert_true_key_allowed(r, key)


def test_two_keys_are_inconsistent():
    rng = np.random.default_rng(5)
    a, b = random_key(rng, 4, 3), random_key(rng, 4, 3)
    x = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    z = np.stack([encrypt_loop(x[0], a.perm, a.flip, 4), encrypt_loop(x[1], b.perm, b.flip, 4)])
    r = recover_key(x, z, 4)
    assert not r.consistent and r.key is None and "matches no" in r.reason


def test_unrelated_images_are_inconsistent():
    rng = np.random.default_rng(6)
    x, z = rng.integers(0, 256, (2, 1, 8, 8, 3), dtype=np.uint8)
    r = recover_key(x, z, 4)
    assert not r.consistent and r.key is None


def test_bad_inputs():
    x = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(ImageError, match="shape"):
        recover_key(x, x[:1], 4)
    with pytest.raises(ImageError, match="dtype|float32"):
        recover_key(x, x.astype(np.float32), 4)
    with pytest.raises(ImageError, match="divisible"):
        recover_key(x, x, 3)
    with pytest.raises(keys.InvalidKeyError, match="identity"):
        recover_key(x[..., :1], x[..., :1], 1)  # pb = 1
    with pytest.raises(keys.InvalidKeyError, match="positive"):
        recover_key(x, x, 0)
    with pytest.raises(ImageError, match=r"\[0, 1\]"):
        recover_key(x.astype(np.float32) + 2, x.astype(np.float32), 4)
    with pytest.raises(ImageError, match="shape"):
        recover_key(x[0, 0], x[0, 0], 4)


# ---------------------------------------------------------------- command line


def assert_one_error(rc, err, *words):
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convmixer-jax: error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture
def pair(tmp_path):
    rng = np.random.default_rng(7)
    key = random_key(rng, 4, 3)
    x = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    z = encrypt_loop(x, key.perm, key.flip, 4)
    np.save(tmp_path / "p.npy", x)
    np.save(tmp_path / "e.npy", z)
    return key, x, z, tmp_path


def test_cli_recovers_key_that_decrypts(capsys, pair):
    key, x, z, d = pair
    out = d / "key.json"
    rc, stdout, err = run(
        capsys,
        "recover-key",
        "--plain",
        d / "p.npy",
        "--encrypted",
        d / "e.npy",
        "--block-size",
        4,
        "--out",
        out,
    )
    assert rc == 0, err
    got = keys.load_key(out)
    assert_same_key(got, key)
    assert stdout.strip() == keys.fingerprint(key)
    assert (out.stat().st_mode & 0o077) == 0  # a key file is private
    np.testing.assert_array_equal(np.asarray(decrypt_images(z, got)), x)
    # an existing output is refused without --force and replaced with it
    rc, _, err = run(
        capsys,
        "recover-key",
        "--plain",
        d / "p.npy",
        "--encrypted",
        d / "e.npy",
        "--block-size",
        4,
        "--out",
        out,
    )
    assert_one_error(rc, err, "--force")
    rc, _, err = run(
        capsys,
        "recover-key",
        "--plain",
        d / "p.npy",
        "--encrypted",
        d / "e.npy",
        "--block-size",
        4,
        "--out",
        out,
        "--force",
    )
    assert rc == 0, err
    assert json.loads(out.read_text())["fingerprint"] == keys.fingerprint(key)


def test_cli_undetermined_writes_nothing(capsys, tmp_path):
    rng = np.random.default_rng(8)
    key = random_key(rng, 4, 3)
    x = np.full((1, 32, 32, 3), 200, np.uint8)
    np.save(tmp_path / "p.npy", x)
    np.save(tmp_path / "e.npy", encrypt_loop(x, key.perm, key.flip, 4))
    out = tmp_path / "key.json"
    rc, stdout, err = run(
        capsys,
        "recover-key",
        "--plain",
        tmp_path / "p.npy",
        "--encrypted",
        tmp_path / "e.npy",
        "--block-size",
        4,
        "--out",
        out,
    )
    assert_one_error(rc, err, "48 of the 48 positions", "undetermined", "more image pairs")
    assert not stdout and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "e.npy",
        "p.npy",
    ]  # no temporary left either


def test_cli_inconsistent_and_bad_inputs(capsys, pair):
    key, x, z, d = pair
    z2 = z.copy()
    other = random_key(np.random.default_rng(9), 4, 3)
    z2[1] = encrypt_loop(x[1], other.perm, other.flip, 4)
    np.save(d / "e2.npy", z2)
    np.save(d / "short.npy", z[:1])
    np.save(d / "f.npy", z.astype(np.float32) / 255)
    out = d / "key.json"
    cases = [
        (
            ["--encrypted", d / "e2.npy", "--block-size", 4],
            ["not plain/encrypted images under one key of this block size"],
        ),
        (["--encrypted", d / "short.npy", "--block-size", 4], ["shape"]),
        (["--encrypted", d / "f.npy", "--block-size", 4], ["float32"]),
        (["--encrypted", d / "e.npy", "--block-size", 3], ["divisible"]),
        (["--encrypted", d / "missing.npy", "--block-size", 4], ["does not exist"]),
        (
            ["--encrypted", d / "e.npy", "--block-size", 2],
            ["not plain/encrypted"],
        ),  # key mixes 2x2 blocks
    ]
    for extra, words in cases:
        rc, stdout, err = run(capsys, "recover-key", "--plain", d / "p.npy", *extra, "--out", out)
        assert_one_error(rc, err, *words)
        assert not stdout and not out.exists()
    rc, _, err = run(
        capsys, "recover-key", "--plain", d / "p.npy", "--encrypted", d / "e.npy", "--out", out
    )
    assert rc == 2 and "--block-size" in err and not out.exists()


def test_multiple_block_size_gives_an_equivalent_key():
    # A key of block size 4 applied to every 4x4 block is also a key of block size 8 (the
    # same signed permutation in each 4x4 quarter, 4 * 24 = 96 = pb/2 flips): recovery at
    # block size 8 finds that key, and it decrypts the same images.
    rng = np.random.default_rng(10)
    key = random_key(rng, 4, 3)
    x = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    z = encrypt_loop(x, key.perm, key.flip, 4)
    r = recover_key(x, z, 8)
    assert r.key is not None and r.key.block_size == 8
    np.testing.assert_array_equal(np.asarray(decrypt_images(z, r.key)), x)
