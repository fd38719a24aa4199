"""A candidate key judged by the encrypted model's stem BatchNorm statistics on public images.

The patch embedding's BatchNorm keeps the running mean and variance of the stem's
activations over the model's (plain) training images. Decrypting the encrypted kernel
with a candidate key and running public natural images through it predicts those
statistics; the true key reproduces them up to the difference between the public images
and the training set, a wrong orientation, channel order or sign does not. The
structure attack (:func:`~convmixer_jax.attacks.from_weights.recover_key_from_structure`)
ranks its symmetric candidates this way.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from convmixer_jax.attacks.ciphertext_only import block_grid
from convmixer_jax.attacks.from_weights import _kernel_rows
from convmixer_jax.model.convmixer import activation_fn


def image_blocks(images, block_size: int) -> np.ndarray:
    """(N, H, W, C) images -> (N * H/M * W/M, M*M*C) blocks in (row, column,
    channel) order, normalized to ``(x - 0.5) / 0.5`` (uint8 are scaled to [0, 1])."""
    g = block_grid(images, block_size)
    return g.reshape(-1, g.shape[-1])


def rank_keys_by_batch_stats(
    encrypted_kernel,
    stem_bias,
    stem_bn_mean,
    stem_bn_var,
    keys,
    public_images,
    *,
    n_images: int = 64,
    activation: str = "gelu",
    gelu_approximate: bool = False,
) -> np.ndarray:
    """Mismatch (lower = better) between the encrypted model's stem BatchNorm
    running statistics and the statistics each candidate key predicts on
    public natural images.

    For a candidate key, the plain blocks x of the images give the stem output
    ``act(x_n @ D + b)`` with D the kernel decrypted by that key and ``act`` the
    model's activation (``model.convmixer.activation_fn``, in float32); its mean and
    variance per output channel are compared with ``stem_bn_mean`` /
    ``stem_bn_var`` (dim,), which the model accumulated on its (plain)
    training images. The true key reproduces them up to the difference
    between the public images and the training set. Uses the first
    ``n_images`` images. Returns (len(keys),) mismatches:
    mean over channels of ((mean - bn_mean)^2 / bn_var + (log var - log bn_var)^2).
    Assumes the paper's normalization (mean = std = 0.5).
    """
    act = activation_fn(activation, gelu_approximate)
    e, p, c = _kernel_rows(encrypted_kernel, "encrypted_kernel")
    x = image_blocks(np.asarray(public_images)[:n_images], p)
    b = np.asarray(stem_bias, np.float64)
    bm = np.asarray(stem_bn_mean, np.float64)
    bv = np.maximum(np.asarray(stem_bn_var, np.float64), 1e-12)
    out = np.empty(len(keys))
    for i, k in enumerate(keys):
        dec = np.empty_like(e)
        dec[np.asarray(k.perm)] = e * (1.0 - 2.0 * np.asarray(k.flip, np.float64))[:, None]
        g = np.asarray(act(jnp.asarray(x @ dec + b, jnp.float32)), np.float64)
        m, v = g.mean(0), np.maximum(g.var(0), 1e-12)
        out[i] = float(np.mean((m - bm) ** 2 / bv + (np.log(v) - np.log(bv)) ** 2))
    return out


__all__ = ["image_blocks", "rank_keys_by_batch_stats"]
