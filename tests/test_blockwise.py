"""Block-wise image encryption: hand-computed answers, two independent references, inverses."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convmixer_jax.scheme.images import (
    ImageError,
    check_images,
    decrypt_images,
    encrypt_images,
    encrypt_images_reference,
)
from convmixer_jax.scheme.keys import InvalidKeyError, generate_key, make_key, stack_keys

FAST = settings(max_examples=25, deadline=None, database=None)
# (block size, channels) with pb = M*M*C >= 2, odd and even, and timm's patch 7 on RGB (pb = 147).
SHAPES = [(m, c) for m in range(1, 7) for c in range(1, 5) if m * m * c >= 2] + [(7, 3)]


@contextlib.contextmanager
def x64(enabled: bool = True):
    """Temporarily switch jax_enable_x64, restoring the previous value."""
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", enabled)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", old)


def encrypt_by_hand(x: np.ndarray, perm, flip, m: int) -> np.ndarray:
    """method.md written out element by element: for every block and every block index k,
    k = (i*M + j)*C + c, the output at (i, j, c) is the input at the (i', j', c') of
    perm[k], bit-flipped where flip[k] == 1."""
    x = np.asarray(x)
    h, w, c = x.shape[-3:]
    pb = m * m * c
    out = np.empty_like(x)
    one = np.uint8(255) if x.dtype == np.uint8 else x.dtype.type(1)
    for by in range(0, h, m):
        for bx in range(0, w, m):
            for k in range(pb):
                i, j, ch = k // (m * c), (k // c) % m, k % c
                s = int(perm[k])
                si, sj, sc = s // (m * c), (s // c) % m, s % c
                v = x[..., by + si, bx + sj, sc]
                if flip[k]:
                    v = one - v
                out[..., by + i, bx + j, ch] = v
    return out


def decrypt_by_hand(z: np.ndarray, perm, flip, m: int) -> np.ndarray:
    """Inverse of :func:`encrypt_by_hand`: undo the flip at k, put the value back at perm[k]."""
    z = np.asarray(z)
    h, w, c = z.shape[-3:]
    pb = m * m * c
    out = np.empty_like(z)
    one = np.uint8(255) if z.dtype == np.uint8 else z.dtype.type(1)
    for by in range(0, h, m):
        for bx in range(0, w, m):
            for k in range(pb):
                i, j, ch = k // (m * c), (k // c) % m, k % c
                s = int(perm[k])
                si, sj, sc = s // (m * c), (s // c) % m, s % c
                v = z[..., by + i, bx + j, ch]
                if flip[k]:
                    v = one - v
                out[..., by + si, bx + sj, sc] = v
    return out


# ---------------------------------------------------------------- hand-computed answers

WORKED_KEY = dict(perm=[2, 0, 3, 1], flip=[1, 0, 0, 1], block_size=2, channels=1)


def test_worked_example_float():
    key = make_key(**WORKED_KEY)
    a, b, c, d = np.float32(0.125), np.float32(0.3), np.float32(0.55), np.float32(0.9)
    x = np.array([[[[a], [b]], [[c], [d]]]], np.float32)  # (1, 2, 2, 1): [[a, b], [c, d]]
    one = np.float32(1)
    expected = np.array([[[[one - c], [a]], [[d], [one - b]]]], np.float32)  # [[1-c, a], [d, 1-b]]
    z = np.asarray(encrypt_images(x, key))
    assert z.dtype == np.float32 and z.shape == x.shape
    np.testing.assert_array_equal(z, expected)
    np.testing.assert_array_equal(encrypt_images_reference(x, key), expected)
    np.testing.assert_array_equal(
        encrypt_by_hand(x, WORKED_KEY["perm"], WORKED_KEY["flip"], 2), expected
    )
    np.testing.assert_array_equal(
        np.asarray(decrypt_images(z, key)), x
    )  # these values round-trip exactly


def test_worked_example_uint8_two_blocks():
    key = make_key(**WORKED_KEY)
    # two blocks side by side: [[a, b | e, f], [c, d | g, h]]; the same key on each
    a, b, c, d, e, f, g, h = 10, 20, 30, 40, 0, 255, 7, 128
    x = np.array([[a, b, e, f], [c, d, g, h]], np.uint8)[:, :, None]  # (2, 4, 1)
    expected = np.array([[255 - c, a, 255 - g, e], [d, 255 - b, h, 255 - f]], np.uint8)[:, :, None]
    assert expected[:, :, 0].tolist() == [[225, 10, 248, 0], [40, 235, 128, 0]]
    z = np.asarray(encrypt_images(x, key))
    assert z.dtype == np.uint8
    np.testing.assert_array_equal(z, expected)
    np.testing.assert_array_equal(np.asarray(decrypt_images(z, key)), x)


def test_uint8_known_answer_with_channels():
    # M = 2, C = 2, pb = 8; k = (i*2 + j)*2 + c. perm swaps k=1 (i=0, j=0, c=1) with
    # k=2 (i=0, j=1, c=0); flip covers k = 4..7, the whole second row of the block.
    key = make_key([0, 2, 1, 3, 4, 5, 6, 7], [0, 0, 0, 0, 1, 1, 1, 1], 2, 2)
    x = np.arange(16, dtype=np.uint8).reshape(2, 4, 2) * 7 + 3  # (H=2, W=4, C=2): two blocks
    z = np.asarray(encrypt_images(x, key))
    expected = x.copy()
    for bx in (0, 2):
        expected[0, bx + 0, 1] = x[0, bx + 1, 0]
        expected[0, bx + 1, 0] = x[0, bx + 0, 1]
        expected[1, bx : bx + 2, :] = 255 - x[1, bx : bx + 2, :]
    np.testing.assert_array_equal(z, expected)
    assert z[1, 0, 0] == 255 - 3 - 7 * 8  # hand value: x[1,0,0] = 8*7 + 3 = 59 -> 196
    assert z[1, 0, 0] == 196
    assert z[0, 0, 1] == x[0, 1, 0] == 3 + 7 * 2


def test_uint8_flip_is_255_minus_v_for_all_values():
    # M = 1, C = 2: perm = identity, flip = [1, 0]: channel 0 becomes 255 - v, channel 1 stays.
    key = make_key([0, 1], [1, 0], 1, 2)
    v = np.arange(256, dtype=np.uint8)
    x = np.stack([v, v[::-1]], axis=-1).reshape(16, 16, 2)
    z = np.asarray(encrypt_images(x, key))
    np.testing.assert_array_equal(z[..., 0].reshape(-1), 255 - np.arange(256))
    np.testing.assert_array_equal(z[..., 1], x[..., 1])
    np.testing.assert_array_equal(z[..., 0], x[..., 0] ^ 0xFF)


# ---------------------------------------------------------------- properties


@st.composite
def image_cases(draw, dtypes=("uint8", "float32", "float64")):
    m, c = draw(st.sampled_from(SHAPES))
    gh, gw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    batch = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**32 - 1))
    return m, c, gh * m, gw * m, batch, dtype, seed


def make_images(shape, dtype, rng):
    if dtype == "uint8":
        x = rng.integers(0, 256, shape, dtype=np.uint8)
        grid = x
    else:
        x = rng.uniform(0, 1, shape).astype(dtype)
        x.reshape(-1)[:2] = [0.0, 1.0][: x.size]  # the range ends are valid pixels
        grid = (rng.integers(0, 257, shape) / 256).astype(dtype)  # 1 - v is exact on this grid
    return x, grid


@given(image_cases())
@FAST
def test_encrypt_matches_references_and_inverts(case):
    m, c, h, w, batch, dtype, seed = case
    rng = np.random.default_rng(seed)
    key = generate_key(m, c, seed=seed)
    x, grid = make_images(batch + (h, w, c), dtype, rng)
    with x64(dtype == "float64"):
        z = np.asarray(encrypt_images(x, key))
        zg = np.asarray(encrypt_images(grid, key))
        back = np.asarray(decrypt_images(z, key))
        back_grid = np.asarray(decrypt_images(zg, key))
    assert z.dtype == np.dtype(dtype) and z.shape == x.shape
    assert back.dtype == np.dtype(dtype) and back.shape == x.shape
    np.testing.assert_array_equal(z, encrypt_images_reference(x, key))
    np.testing.assert_array_equal(z, encrypt_by_hand(x, key.perm, key.flip, m))
    np.testing.assert_array_equal(zg, encrypt_by_hand(grid, key.perm, key.flip, m))
    np.testing.assert_array_equal(back, decrypt_by_hand(z, key.perm, key.flip, m))
    np.testing.assert_array_equal(back_grid, grid)  # exact where 1 - (1 - v) == v
    if dtype == "uint8":
        np.testing.assert_array_equal(back, x)
    else:  # 1 - (1 - v) may round away the low bits of a tiny v
        np.testing.assert_allclose(back, x, rtol=0, atol=np.finfo(dtype).eps)
    if dtype == "uint8":  # pb/2 values of every block are flipped: never the identity
        assert not np.array_equal(z, x)


def test_encrypt_leaves_input_unchanged_and_accepts_jax_arrays():
    key = generate_key(2, 3, seed=0)
    x = np.random.default_rng(0).integers(0, 256, (2, 4, 6, 3), dtype=np.uint8)
    x0 = x.copy()
    z1 = np.asarray(encrypt_images(x, key))
    z2 = np.asarray(encrypt_images(jnp.asarray(x), key))
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(z1, z2)


@given(image_cases(dtypes=("uint8", "float32")), st.integers(2, 4))
@settings(max_examples=10, deadline=None, database=None)
def test_vmap_over_keys_equals_loop(case, n_keys):
    m, c, h, w, batch, dtype, seed = case
    rng = np.random.default_rng(seed)
    x, _ = make_images(batch + (h, w, c), dtype, rng)
    singles = [generate_key(m, c, seed=seed + i) for i in range(n_keys)]
    keys = stack_keys(singles)
    z = np.asarray(jax.vmap(encrypt_images, in_axes=(None, 0))(x, keys))
    assert z.shape == (n_keys,) + x.shape and z.dtype == x.dtype
    for i, k in enumerate(singles):
        np.testing.assert_array_equal(z[i], np.asarray(encrypt_images(x, k)))
        np.testing.assert_array_equal(z[i], encrypt_images_reference(x, k))
    back = np.asarray(jax.vmap(decrypt_images, in_axes=(0, 0))(z, keys))
    for i, k in enumerate(singles):
        np.testing.assert_array_equal(back[i], np.asarray(decrypt_images(z[i], k)))
    if dtype == "uint8":
        np.testing.assert_array_equal(back, np.broadcast_to(x, back.shape))
    # also under jit
    zj = np.asarray(jax.jit(jax.vmap(encrypt_images, in_axes=(None, 0)))(x, keys))
    np.testing.assert_array_equal(zj, z)


def test_batched_key_without_vmap_is_refused():
    keys = stack_keys([generate_key(2, 1, seed=s) for s in range(2)])
    x = np.zeros((4, 4, 1), np.uint8)
    with pytest.raises(InvalidKeyError):
        encrypt_images(x, keys)
    with pytest.raises(InvalidKeyError):
        decrypt_images(x, keys)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "shape,dtype",
    [
        ((5, 4, 3), np.uint8),  # H not divisible by 4
        ((4, 6, 3), np.uint8),  # W not divisible by 4
        ((2, 4, 7, 3), np.float32),
        ((4, 4, 1), np.uint8),  # wrong channels
        ((4, 4, 4), np.float32),
        ((4, 4), np.uint8),  # rank too low
        ((16,), np.float32),
        ((4, 4, 3), np.int32),  # bad dtypes
        ((4, 4, 3), np.int64),
        ((4, 4, 3), np.uint16),
        ((4, 4, 3), np.int8),
        ((4, 4, 3), np.bool_),
        ((4, 4, 3), np.complex64),
    ],
)
def test_bad_images_raise_image_error(shape, dtype):
    key = generate_key(4, 3, seed=0)
    x = np.zeros(shape, dtype)
    for fn in (encrypt_images, decrypt_images):
        with pytest.raises(ImageError):
            fn(x, key)
    with pytest.raises(ImageError):
        check_images(x, key)
    assert issubclass(ImageError, ValueError)


def test_divisibility_uses_the_key_block_size():
    x = np.zeros((6, 6, 1), np.uint8)
    with pytest.raises(ImageError, match="divisible"):
        encrypt_images(x, generate_key(4, 1, seed=0))
    assert np.asarray(encrypt_images(x, generate_key(2, 1, seed=0))).shape == (6, 6, 1)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, -0.01, 1.01, 255.0, -1e-7])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_check_images_value_range(bad, dtype):
    key = generate_key(2, 1, seed=0)
    x = np.full((2, 4, 4, 1), 0.5, dtype)
    check_images(x, key)
    x[1, 2, 3, 0] = bad
    with pytest.raises(ImageError):
        check_images(x, key)
    with pytest.raises(ImageError):
        check_images(jnp.asarray(x), key)
    check_images(x, key, check_values=False)  # shape checks only


def test_check_images_accepts_range_ends_and_uint8():
    key = generate_key(2, 1, seed=0)
    check_images(np.array([0.0, 1.0, 0.0, 1.0], np.float32).reshape(2, 2, 1), key)
    check_images(np.full((2, 2, 1), 255, np.uint8), key)
    check_images(np.zeros((0, 2, 2, 1), np.float32), key)  # an empty batch is fine
