"""Block-wise image encryption: pixel shuffling, bit flipping and, with a key that has
``block_perm``, block scrambling (method.md, "Images" and "Extension: block scrambling").

Every M x M block of every image is flattened in (row, column, channel) order,
channel fastest (``k = (i*M + j)*C + c``), shuffled with ``y[k] = x[perm[k]]``,
bit-flipped where ``flip[k] == 1`` (``255 - v`` for uint8, ``1 - x`` for
float), and put back in place: at its own position, or, when the key scrambles
blocks, the encrypted image's block b (raster order) is the plain block
``block_perm[b]``. The pixel key and the block key commute.

The blocks are those of the block contract (:mod:`convmixer_jax.scheme.blocks`).
The whole transform is one gather through an index of the image (plus one select
for the flip), compiled with ``jax.jit``: the index maps read off the contract are
static, and the index is built from them, ``perm`` and ``block_perm`` inside the
computation, so the functions ``vmap`` over a batch of keys (``Key`` leaves with a
leading axis).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from convmixer_jax.scheme.blocks import from_blocks, permute_blocks, to_blocks
from convmixer_jax.scheme.keys import InvalidKeyError, Key, check_key_grid, inverse_permutation


class ImageError(ValueError):
    """Images that do not fit a key or are out of range."""


@functools.lru_cache(maxsize=None)
def _block_layout(h: int, w: int, c: int, m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Static index maps of an (h, w, c) image cut into m x m blocks, read off the block
    contract (:mod:`convmixer_jax.scheme.blocks`) applied to the flat image positions
    o = (y*w + x)*c + ch.

    Returns, over the flat image positions o:
      base (h*w*c,) int32: the flat position of the first element of o's block;
      within (h*w*c,) int32: o's index k inside its block;
      offset (pb,) int32: the flat offset of element k of a block from its first element.
    Element k of the block holding o is at ``base[o] + offset[k]``: a block's elements lie
    at the same offsets from its first element wherever the block is.
    """
    position = to_blocks(np.arange(h * w * c, dtype=np.int32).reshape(h, w, c), m)  # (gh, gw, pb)
    offset = position[0, 0] - position[0, 0, 0]
    first = np.broadcast_to(position[..., :1], position.shape)
    k = np.broadcast_to(np.arange(position.shape[-1], dtype=np.int32), position.shape)
    return (
        from_blocks(first, m, c).reshape(-1),
        from_blocks(k, m, c).reshape(-1),
        offset,
    )


@functools.lru_cache(maxsize=None)
def _block_positions(h: int, w: int, c: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Static maps of the block positions of an (h, w, c) image in m x m blocks, over the
    flat image positions o = (y*w + x)*c + ch.

    Returns block_of (h*w*c,) int32, the raster number ``b = r*gw + s`` of o's block, and
    block_base (gh*gw,) int32, the flat position of the first element of block b.
    """
    position = to_blocks(np.arange(h * w * c, dtype=np.int32).reshape(h, w, c), m)  # (gh, gw, pb)
    gh, gw, _ = position.shape
    number = np.broadcast_to(np.arange(gh * gw, dtype=np.int32).reshape(gh, gw, 1), position.shape)
    return from_blocks(number, m, c).reshape(-1), position[..., 0].reshape(-1)


def check_images(images, key: Key, *, check_values: bool = True) -> None:
    """Raise :class:`ImageError` unless ``images`` (..., H, W, C) fit ``key``.

    Checks rank, H and W divisible by the block size, C equal to the key's
    channels, dtype uint8 or floating, and (if ``check_values`` and the array
    is concrete) float values finite and inside [0, 1]. A key that scrambles
    blocks must have been made for H x W images: otherwise
    :class:`~convmixer_jax.scheme.keys.InvalidKeyError` names both grids.
    """
    shape = tuple(np.shape(images))
    if len(shape) < 3:
        raise ImageError(f"images must be (..., H, W, C) arrays; got shape {shape}")
    check_not_empty(shape)
    h, w, c = shape[-3:]
    m = key.block_size
    if h % m or w % m:
        raise ImageError(
            f"image size {h}x{w} is not divisible by the block size {m}; "
            f"crop or pad the images to a multiple of {m}"
        )
    if c != key.channels:
        raise ImageError(
            f"images have {c} channels but the key is for {key.channels}; "
            "use a key made with --channels equal to the images' channels"
        )
    check_key_grid(key, h, w)
    check_pixel_values(images, check_values=check_values)


def check_not_empty(shape) -> None:
    """Raise :class:`ImageError` if the images of an array of ``shape`` (..., H, W, C) have no
    pixels (an empty batch, N = 0, is allowed: it encrypts to an empty batch)."""
    if len(shape) >= 3 and any(int(n) == 0 for n in shape[-3:]):
        raise ImageError(
            f"the image array has shape {tuple(shape)}, which holds no pixels; "
            "pass at least one image of at least one pixel"
        )


def check_pixel_values(images, *, check_values: bool = True) -> None:
    """Raise :class:`ImageError` unless ``images`` are uint8, or floating with
    (if ``check_values`` and the array is concrete) finite values in [0, 1]."""
    dtype = np.dtype(images.dtype if hasattr(images, "dtype") else np.asarray(images).dtype)
    if dtype != np.uint8 and not np.issubdtype(dtype, np.floating):
        raise ImageError(f"images must be uint8 (0..255) or float in [0, 1]; got dtype {dtype}")
    if (
        check_values
        and np.issubdtype(dtype, np.floating)
        and not isinstance(images, jax.core.Tracer)
    ):
        arr = np.asarray(images)
        if arr.size:
            if not np.isfinite(arr).all():
                raise ImageError("images contain NaN or infinite values")
            lo, hi = float(arr.min()), float(arr.max())
            if lo < 0.0 or hi > 1.0:
                raise ImageError(
                    f"float images must lie in [0, 1]; found values in [{lo:g}, {hi:g}] "
                    "(divide 8-bit data by 255, or pass uint8 arrays)"
                )


def _check_key(key: Key) -> None:
    if np.ndim(key.perm) != 1 or (key.scrambles and np.ndim(key.block_perm) != 1):
        raise InvalidKeyError("pass a single key, or jax.vmap over a batch of keys")
    if key.scrambles != (key.grid is not None):
        raise InvalidKeyError(
            "the key has block_perm without grid (or grid without block_perm); "
            "block scrambling needs both"
        )
    if key.scrambles and np.shape(key.block_perm) != (key.grid[0] * key.grid[1],):
        raise InvalidKeyError(
            f"block_perm has shape {np.shape(key.block_perm)}, expected "
            f"({key.grid[0] * key.grid[1]},) for the key's {key.grid[0]} x {key.grid[1]} grid"
        )


def _flip_values(x: jax.Array, mask: jax.Array) -> jax.Array:
    """255 - v (uint8) or 1 - x (float) where mask."""
    if x.dtype == jnp.uint8:
        return x ^ (mask.astype(jnp.uint8) * jnp.uint8(0xFF))
    return jnp.where(mask, jnp.asarray(1, x.dtype) - x, x)


def _gather_blocks(flat: jax.Array, perm: jax.Array, layout, block_perm=None, positions=None):
    """y[k] = x[perm[k]] in every block, and with ``block_perm`` the output's block b taken
    from block ``block_perm[b]``; flat: (N, h*w*c) -> (N, h*w*c), one gather: both
    permutations are composed into the one index of the image."""
    base, within, offset = layout
    if block_perm is None:
        base = jnp.asarray(base)
    else:  # the first element of the source block of each position's block
        block_of, block_base = positions
        base = jnp.take(jnp.asarray(block_base), block_perm)[jnp.asarray(block_of)]
    src = base + jnp.take(jnp.asarray(offset), perm)[jnp.asarray(within)]
    return jnp.take(flat, src, axis=1)


def _layouts(h: int, w: int, c: int, key: Key):
    """The static maps of :func:`_block_layout`, and of :func:`_block_positions` when the
    key scrambles blocks (else None)."""
    layout = _block_layout(h, w, c, key.block_size)
    positions = _block_positions(h, w, c, key.block_size) if key.scrambles else None
    return layout, positions


@jax.jit
def _encrypt(images: jax.Array, key: Key) -> jax.Array:
    shape = images.shape
    h, w, c = shape[-3:]
    layout, positions = _layouts(h, w, c, key)
    flat = images.reshape((-1, h * w * c))
    y = _gather_blocks(flat, key.perm, layout, key.block_perm, positions)
    z = _flip_values(y, jnp.take(key.flip, jnp.asarray(layout[1])).astype(bool)[None, :])
    return z.reshape(shape)


@jax.jit
def _decrypt(images: jax.Array, key: Key) -> jax.Array:
    shape = images.shape
    h, w, c = shape[-3:]
    layout, positions = _layouts(h, w, c, key)
    flat = images.reshape((-1, h * w * c))
    # the flip depends only on the index inside a block, so it is undone before the blocks move
    y = _flip_values(flat, jnp.take(key.flip, jnp.asarray(layout[1])).astype(bool)[None, :])
    inv = inverse_permutation(key.perm)
    inv_blocks = None if key.block_perm is None else inverse_permutation(key.block_perm)
    return _gather_blocks(y, inv, layout, inv_blocks, positions).reshape(shape)


def _apply(fn, images, key: Key) -> jax.Array:
    """Run ``fn``, keeping a float64 input in float64 when called eagerly (JAX
    computes it in float32 unless x64 is enabled), so the output has the
    input's dtype. Under ``jit``/``vmap`` the usual JAX dtype rules apply."""
    if not hasattr(images, "dtype"):
        images = np.asarray(images)
    eager = not any(
        isinstance(v, jax.core.Tracer) for v in (images, key.perm, key.flip, key.block_perm)
    )
    if eager and np.dtype(images.dtype) == np.float64 and not jax.config.jax_enable_x64:
        with jax.enable_x64(True):
            return fn(jnp.asarray(images), key)
    return fn(jnp.asarray(images), key)


def encrypt_images(images, key: Key) -> jax.Array:
    """Encrypt images block by block with ``key``.

    images: (..., H, W, C) uint8 or float in [0, 1]; H, W divisible by
    ``key.block_size``; C == ``key.channels``; with a key that scrambles blocks,
    (H, W) == (gh*M, gw*M) for the key's grid (gh, gw).
    Returns an array of the same shape and dtype.
    ``jax.vmap(encrypt_images, in_axes=(None, 0))(images, keys)`` encrypts
    one set of images with each key of a batch.
    """
    check_images(images, key, check_values=False)
    _check_key(key)
    return _apply(_encrypt, images, key)


def decrypt_images(images, key: Key) -> jax.Array:
    """Inverse of :func:`encrypt_images` (flip again, then the inverse permutation; a
    scrambled block b goes back to position ``block_perm[b]``).

    Exact for uint8 images. For float images the flip is ``1 - x``, so
    ``decrypt_images(encrypt_images(x))`` equals ``x`` to within one float rounding
    (at most 2**-23) where a value was flipped (docs/method.md).
    """
    check_images(images, key, check_values=False)
    _check_key(key)
    return _apply(_decrypt, images, key)


def encrypt_images_reference(images: np.ndarray, key: Key) -> np.ndarray:
    """Plain NumPy transcription of method.md, for checks and small batches.

    images: (..., H, W, C) uint8 or float in [0, 1] -> a NumPy array of the same shape
    and dtype: the blocks of :func:`~convmixer_jax.scheme.blocks.to_blocks`, each
    shuffled (``y = x[perm]``) and flipped (``255 - v`` or ``1 - x`` where ``flip``),
    moved by :func:`~convmixer_jax.scheme.blocks.permute_blocks` when the key scrambles
    blocks, put back with :func:`~convmixer_jax.scheme.blocks.from_blocks`. It checks
    only that a scrambling key's grid fits the images, and runs eagerly;
    :func:`encrypt_images` computes the same.
    """
    m, c = key.block_size, key.channels
    perm, flip = np.asarray(key.perm), np.asarray(key.flip)
    x = np.asarray(images)
    y = to_blocks(x, m)[..., perm]
    if y.dtype == np.uint8:
        z = np.where(flip == 1, 255 - y, y).astype(np.uint8)
    else:
        z = np.where(flip == 1, 1 - y, y).astype(y.dtype)
    if key.scrambles:
        check_key_grid(key, *x.shape[-3:-1])
        z = permute_blocks(z, np.asarray(key.block_perm))
    return from_blocks(z, m, c)
