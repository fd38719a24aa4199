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

from convmixer_jax.attacks.kernel_algebra import decrypt_positions, kernel_rows
from convmixer_jax.model.convmixer import activation_fn
from convmixer_jax.scheme.blocks import normalized_blocks


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

    For a candidate key, the plain blocks x of the images (normalized to ``2x - 1``,
    :func:`~convmixer_jax.scheme.blocks.normalized_blocks`) give the stem output
    ``act(x @ D + b)`` with D the (pb, dim) kernel decrypted by that key and ``act`` the
    model's activation (``model.convmixer.activation_fn``, in float32); its mean and
    variance per output channel are compared with ``stem_bn_mean`` /
    ``stem_bn_var`` (dim,), which the model accumulated on its (plain)
    training images. The true key reproduces them up to the difference
    between the public images and the training set.

    encrypted_kernel: (P, P, C, dim); stem_bias: (dim,); keys: candidate keys of block
    size P; public_images: (N, H, W, C) uint8 or float in [0, 1], H and W multiples of P,
    of which the first ``n_images`` are used. Returns (len(keys),) float64 mismatches:
    mean over channels of ((mean - bn_mean)^2 / bn_var + (log var - log bn_var)^2).
    Assumes the paper's normalization (mean = std = 0.5).
    """
    act = activation_fn(activation, gelu_approximate)
    rows, p, _ = kernel_rows(encrypted_kernel, "encrypted_kernel")
    blocks = normalized_blocks(np.asarray(public_images)[:n_images], p)
    x = blocks.reshape(-1, blocks.shape[-1])  # (n_blocks, pb)
    b = np.asarray(stem_bias, np.float64)
    bm = np.asarray(stem_bn_mean, np.float64)
    bv = np.maximum(np.asarray(stem_bn_var, np.float64), 1e-12)
    out = np.empty(len(keys))
    for i, k in enumerate(keys):
        decrypted = decrypt_positions(rows, k, axis=0)
        g = np.asarray(act(jnp.asarray(x @ decrypted + b, jnp.float32)), np.float64)
        m, v = g.mean(0), np.maximum(g.var(0), 1e-12)
        out[i] = float(np.mean((m - bm) ** 2 / bv + (np.log(v) - np.log(bv)) ** 2))
    return out


__all__ = ["rank_keys_by_batch_stats"]
