"""The block contract (convmixer_jax.scheme.blocks) against the definition in docs/method.md."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convmixer_jax.scheme.blocks import (
    BlockSizeError,
    block_rows,
    from_blocks,
    grid_shape,
    normalized_blocks,
    normalized_images,
    to_blocks,
)


def blocks_by_definition(image: np.ndarray, m: int) -> np.ndarray:
    """(H, W, C) -> (gh, gw, M*M*C), element k = (i*M + j)*C + c, written as loops."""
    h, w, c = image.shape
    out = np.zeros((h // m, w // m, m * m * c), image.dtype)
    for bi in range(h // m):
        for bj in range(w // m):
            for i in range(m):
                for j in range(m):
                    for ch in range(c):
                        out[bi, bj, (i * m + j) * c + ch] = image[bi * m + i, bj * m + j, ch]
    return out


@st.composite
def image_batches(draw):
    m = draw(st.integers(1, 4))
    gh, gw, c = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    lead = draw(st.lists(st.integers(1, 2), max_size=2))
    seed = draw(st.integers(0, 2**31 - 1))
    x = np.random.default_rng(seed).integers(0, 256, (*lead, gh * m, gw * m, c), dtype=np.uint8)
    return x, m


@settings(max_examples=60, deadline=None)
@given(image_batches())
def test_to_blocks_is_the_definition_for_every_image_of_a_batch(case):
    x, m = case
    b = to_blocks(x, m)
    assert isinstance(b, np.ndarray) and b.dtype == x.dtype
    flat = x.reshape(-1, *x.shape[-3:])
    want = np.stack([blocks_by_definition(im, m) for im in flat])
    np.testing.assert_array_equal(b.reshape(want.shape), want)


@settings(max_examples=60, deadline=None)
@given(image_batches())
def test_from_blocks_inverts_to_blocks_numpy_and_jax(case):
    x, m = case
    c = x.shape[-1]
    np.testing.assert_array_equal(from_blocks(to_blocks(x, m), m, c), x)
    xf = jnp.asarray(x, jnp.float32) / 255.0
    bj = to_blocks(xf, m)
    assert not isinstance(bj, np.ndarray) and bj.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(bj), to_blocks(np.asarray(xf), m))
    np.testing.assert_array_equal(np.asarray(from_blocks(bj, m, c)), np.asarray(xf))


def test_one_image_and_rows():
    x = np.arange(4 * 6 * 2, dtype=np.int64).reshape(4, 6, 2)
    b = to_blocks(x, 2)
    assert b.shape == (2, 3, 8)
    # block (1, 2), pixel (i=1, j=0, c=1): image pixel (3, 4, 1)
    assert b[1, 2, (1 * 2 + 0) * 2 + 1] == x[3, 4, 1]
    rows = block_rows(np.stack([x, x + 1000]), 2)
    assert rows.shape == (12, 8)
    np.testing.assert_array_equal(rows[6 + 5], b[1, 2] + 1000)


def test_normalized_blocks_round_trip_and_range():
    x = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    g = normalized_blocks(x, 4)
    assert g.dtype == np.float64 and g.shape == (2, 2, 2, 48)
    np.testing.assert_allclose(g, to_blocks(x, 4) / 127.5 - 1.0)
    np.testing.assert_allclose(normalized_images(g, 4, 3), x / 255.0)
    assert normalized_images(g * 3, 4, 3).max() == 1.0  # clipped


@pytest.mark.parametrize("shape, m", [((5, 8, 3), 2), ((8, 6, 3), 4), ((8, 3), 2)])
def test_bad_shapes_are_refused_with_the_fix(shape, m):
    with pytest.raises(BlockSizeError, match="multiples|must be"):
        to_blocks(np.zeros(shape, np.uint8), m)


def test_grid_shape_and_wrong_block_length():
    assert grid_shape(32, 24, 8) == (4, 3)
    with pytest.raises(BlockSizeError, match="block size and channels"):
        from_blocks(np.zeros((2, 2, 12)), 2, 2)
