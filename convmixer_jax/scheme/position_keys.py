"""A different key for every block position: the countermeasure docs/security.md measures.

The paper's scheme encrypts every block of every image with one key, which is what lets
the ciphertext-only attack pool the statistics of all blocks. The fix a reader proposes
first is a key per block position: position ``g = i * gw + j`` of the (gh, gw) block grid
is encrypted with ``keys[g]``. A ConvMixer's patch embedding shares one kernel over the
positions, so the encrypted model needs a position-wise embedding instead: at position
``g`` the kernel ``E`` encrypted with ``keys[g]`` (``params.encrypt_kernel``). The rest of
the network is unchanged, and the position-wise model on position-wise encrypted images
computes exactly what the plain model computes on plain images (position by position it
is the paper's identity); :class:`~convmixer_jax.model.position_wise.PositionWiseConvMixer`
runs it.

Shapes: ``keys`` is a :class:`~convmixer_jax.scheme.keys.Key` batch with perm and flip
(G, pb), G = gh * gw, in row-major grid order.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from convmixer_jax.scheme.blocks import BlockSizeError, from_blocks, grid_shape, to_blocks
from convmixer_jax.scheme.images import ImageError, decrypt_images, encrypt_images
from convmixer_jax.scheme.keys import InvalidKeyError, Key, generate_key, stack_keys
from convmixer_jax.scheme.params import encrypt_kernel, stem_of, with_stem

PyTree = Any


def generate_position_keys(
    block_size: int, channels: int, grid: tuple[int, int], seed: int | None = None
) -> Key:
    """``gh * gw`` independent keys (OS CSPRNG, or seeded for experiments): perm/flip (G, pb)."""
    gh, gw = (int(g) for g in grid)
    if gh < 1 or gw < 1:
        raise ValueError(f"the block grid must be at least 1 x 1, got {grid}")
    seeds = (
        [None] * (gh * gw)
        if seed is None
        else list(np.random.SeedSequence(seed).generate_state(gh * gw))
    )
    return stack_keys(
        [generate_key(block_size, channels, None if s is None else int(s)) for s in seeds]
    )


def _grid_of(images, keys: Key) -> tuple[int, int]:
    if np.ndim(keys.perm) != 2:
        raise InvalidKeyError("position keys are a batch of keys, perm of shape (G, pb)")
    h, w = images.shape[-3:-1]
    try:
        gh, gw = grid_shape(h, w, keys.block_size)
    except BlockSizeError as e:
        raise ImageError(str(e)) from None
    if gh * gw != keys.perm.shape[0]:
        raise InvalidKeyError(
            f"{keys.perm.shape[0]} position keys for a grid of {gh} x {gw} = {gh * gw} blocks; "
            "make one key per block position"
        )
    return gh, gw


def _by_position(fn, images, keys: Key):
    """Apply ``fn(block_images, key)`` to each position's blocks, (G, N, M, M, C) at once.

    ``images``: (N, H, W, C); returns the same shape, the blocks put back in place.
    """
    x = jnp.asarray(images)
    n, _, _, c = x.shape
    gh, gw = _grid_of(x, keys)
    m = keys.block_size
    rows = to_blocks(x, m).reshape(n, gh * gw, m * m * c)  # (N, G, pb)
    blocks = rows.transpose(1, 0, 2).reshape(gh * gw, n, m, m, c)
    out = jax.vmap(fn)(blocks, keys).reshape(gh * gw, n, m * m * c)
    return from_blocks(out.transpose(1, 0, 2).reshape(n, gh, gw, m * m * c), m, c)


def encrypt_images_by_position(images, keys: Key) -> jax.Array:
    """(N, H, W, C) uint8 or float in [0, 1] -> the same, block (i, j) encrypted with
    keys[i * gw + j]."""
    return _by_position(encrypt_images, images, keys)


def decrypt_images_by_position(images, keys: Key) -> jax.Array:
    """Inverse of :func:`encrypt_images_by_position`."""
    return _by_position(decrypt_images, images, keys)


def encrypt_params_by_position(
    params: PyTree, keys: Key, grid: tuple[int, int], *, mean=None, std=None
) -> PyTree:
    """The position-wise encrypted model: the stem kernel (P, P, C, dim) becomes
    (gh, gw, P, P, C, dim), position g's slice encrypted with ``keys[g]``, and the bias
    (dim,) becomes (gh, gw, dim). Nothing else changes. ``params``: a params or
    variables tree of a ConvMixer."""
    stem, nested = stem_of(params)
    gh, gw = (int(g) for g in grid)
    if np.ndim(keys.perm) != 2 or keys.perm.shape[0] != gh * gw:
        raise InvalidKeyError(f"need {gh * gw} position keys (perm (G, pb)) for a {gh} x {gw} grid")
    kernels, biases = jax.vmap(
        lambda k: encrypt_kernel(stem["kernel"], stem["bias"], k, mean, std)
    )(keys)
    return with_stem(
        params,
        {
            **stem,
            "kernel": kernels.reshape((gh, gw) + kernels.shape[1:]),
            "bias": biases.reshape(gh, gw, -1),
        },
        nested,
    )


__all__ = [
    "generate_position_keys",
    "encrypt_images_by_position",
    "decrypt_images_by_position",
    "encrypt_params_by_position",
]
