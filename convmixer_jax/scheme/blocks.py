"""The block contract: images cut into M x M blocks and put back (``docs/method.md``).

An (H, W, C) image with H and W multiples of M is a grid of ``gh x gw = H/M x W/M``
blocks. Block ``(bi, bj)`` holds the pixels ``[bi*M:(bi+1)*M, bj*M:(bj+1)*M, :]``,
flattened in (row, column, channel) order with the channel fastest: pixel
``(i, j, c)`` of the block is element ``k = (i*M + j)*C + c`` of a vector of
``M*M*C`` values. Blocks are listed row by row over the grid: block ``(bi, bj)`` is
block number ``b = bi*gw + bj`` (the numbering that block scrambling permutes,
:func:`permute_blocks`).

Every module of the package that cuts images into blocks calls this one. The
functions take one image (H, W, C) or any batch of them (..., H, W, C), of any
dtype, as NumPy or JAX arrays, and return the same kind of array with the same
dtype: the values are not changed, only moved. :func:`normalized_blocks` is the
one variant that changes values, for the attacks that compare blocks as vectors.
"""

from __future__ import annotations

import numpy as np


class BlockSizeError(ValueError):
    """Images whose height or width is not a multiple of the block size."""


def _xp(x):
    """NumPy for NumPy arrays and Python sequences, jax.numpy for JAX arrays and tracers."""
    if isinstance(x, np.ndarray) or not hasattr(x, "shape"):
        return np
    import jax.numpy as jnp

    return jnp


def grid_shape(height: int, width: int, block_size: int) -> tuple[int, int]:
    """(gh, gw) = (H/M, W/M), the block grid of an H x W image.

    Raises :class:`BlockSizeError` if M does not divide H and W.
    """
    m = int(block_size)
    if m < 1:
        raise BlockSizeError(f"the block size must be at least 1; got {m}")
    if height % m or width % m:
        raise BlockSizeError(
            f"images of {height} x {width} do not split into {m} x {m} blocks; "
            f"crop or pad the images to multiples of {m}"
        )
    return height // m, width // m


def to_blocks(images, block_size: int):
    """(..., H, W, C) -> (..., gh, gw, M*M*C): the raw values of every block.

    Element ``k = (i*M + j)*C + c`` of block ``(bi, bj)`` is pixel
    ``(bi*M + i, bj*M + j, c)``. NumPy in, NumPy out; JAX in, JAX out.
    """
    xp = _xp(images)
    x = xp.asarray(images)
    if x.ndim < 3:
        raise BlockSizeError(f"images must be (..., H, W, C) arrays; got shape {tuple(x.shape)}")
    *lead, h, w, c = x.shape
    m = int(block_size)
    gh, gw = grid_shape(h, w, m)
    x = x.reshape(*lead, gh, m, gw, m, c)
    r = len(lead)
    x = xp.moveaxis(x, r + 2, r + 1)  # (..., gh, gw, M, M, C)
    return x.reshape(*lead, gh, gw, m * m * c)


def from_blocks(blocks, block_size: int, channels: int):
    """(..., gh, gw, M*M*C) -> (..., gh*M, gw*M, C): the inverse of :func:`to_blocks`."""
    xp = _xp(blocks)
    b = xp.asarray(blocks)
    if b.ndim < 3:
        raise BlockSizeError(
            f"blocks must be (..., gh, gw, M*M*C) arrays; got shape {tuple(b.shape)}"
        )
    *lead, gh, gw, pb = b.shape
    m, c = int(block_size), int(channels)
    if pb != m * m * c:
        raise BlockSizeError(
            f"blocks of {pb} values are not {m} x {m} x {c}; pass the block size and channels "
            "the blocks were cut with"
        )
    r = len(lead)
    x = b.reshape(*lead, gh, gw, m, m, c)
    x = xp.moveaxis(x, r + 2, r + 1)  # (..., gh, M, gw, M, C)
    return x.reshape(*lead, gh * m, gw * m, c)


def permute_blocks(blocks, block_perm):
    """(..., gh, gw, pb) -> (..., gh, gw, pb): block scrambling of the grid positions.

    Blocks are numbered in raster order, ``b = r*gw + s``; the output's block b is the
    input's block ``block_perm[b]``, with ``block_perm`` (gh*gw,) a permutation of
    0..gh*gw-1. Its inverse permutation undoes it. NumPy in, NumPy out; JAX in, JAX out.
    """
    xp = _xp(blocks)
    b = xp.asarray(blocks)
    if b.ndim < 3:
        raise BlockSizeError(
            f"blocks must be (..., gh, gw, M*M*C) arrays; got shape {tuple(b.shape)}"
        )
    *lead, gh, gw, pb = b.shape
    order = xp.asarray(block_perm)
    if tuple(order.shape) != (gh * gw,):
        raise BlockSizeError(
            f"a block permutation of shape {tuple(order.shape)} does not fit a {gh} x {gw} grid; "
            f"it must have {gh * gw} entries"
        )
    flat = b.reshape(*lead, gh * gw, pb)
    return xp.take(flat, order, axis=len(lead)).reshape(*lead, gh, gw, pb)


def block_rows(images, block_size: int):
    """(..., H, W, C) -> (n_blocks, M*M*C): every block of every image as one row,
    images first, then grid rows, then grid columns (raw values)."""
    b = to_blocks(images, block_size)
    return b.reshape(-1, b.shape[-1])


def normalized_blocks(images, block_size: int) -> np.ndarray:
    """(..., H, W, C) uint8, or float in [0, 1] -> (..., gh, gw, M*M*C) float64 blocks
    with values ``2x - 1`` in [-1, 1] (uint8 are first scaled to [0, 1])."""
    x = np.asarray(images)
    x = x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)
    return to_blocks(x, block_size) * 2.0 - 1.0


def normalized_images(blocks, block_size: int, channels: int) -> np.ndarray:
    """The inverse of :func:`normalized_blocks`: (..., gh, gw, M*M*C) values in [-1, 1]
    -> (..., H, W, C) float64 in [0, 1], clipped."""
    x = from_blocks(np.asarray(blocks, np.float64), block_size, channels)
    return np.clip((x + 1.0) / 2.0, 0.0, 1.0)
