"""Model encryption: the keyed signed permutation of the patch-embedding rows.

With the patch-embedding kernel viewed as E (pb, dim), rows in block order,

    E'[k, :] = s_k * E[perm[k], :],   s_k = -1 where flip[k] == 1 else +1

(method.md, "Model"). Because the model normalizes ``x_n = (x - 0.5) / 0.5``,
bit flipping a pixel is a sign flip of its normalized value, so the encrypted
model on encrypted images computes exactly the plain model on plain images.

For any other per-channel normalization (mean m, std s) the same holds after
a per-row rescaling and a bias correction. Write c = channel of row k and
c' = channel of row perm[k] (shuffling may move values across channels):

    E'[k]   = s_k * (std[c] / std[c']) * E[perm[k]]
    bias'  += sum_k ((1 - mean[c] if flip[k] else mean[c]) - mean[c']) / std[c'] * E[perm[k]]

which reduces to the paper's transform for mean = std = 0.5.

All functions are pure (inputs are never modified) and ``vmap`` over a batch
of keys: ``jax.vmap(encrypt_params, in_axes=(None, 0))(params, keys)``.
They accept either a params tree (``{'stem': {'kernel', 'bias'}, ...}``) or a
variables tree (``{'params': ..., 'batch_stats': ...}``).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from convmixer_jax.scheme.keys import InvalidKeyError, Key, inverse_permutation

PyTree = Any


class KeyModelMismatch(InvalidKeyError):
    """The key's block size or channels differ from the model's patch embedding."""


def stem_of(tree: PyTree) -> tuple[dict, bool]:
    """The patch embedding of a ConvMixer tree: ``(stem, nested)``.

    ``tree``: a params tree (``{'stem': ...}``, then ``nested`` is False) or a variables
    tree (``{'params': {'stem': ...}, ...}``, ``nested`` True); ``stem`` is the
    ``{'kernel': (P, P, C, dim), 'bias': (dim,)}`` dict (or any leaves stored under
    ``'stem'``). Raises ValueError for a tree without a stem.
    """
    if "params" in tree and isinstance(tree["params"], dict) and "stem" in tree["params"]:
        return tree["params"]["stem"], True
    if "stem" in tree:
        return tree["stem"], False
    raise ValueError(
        "parameter tree has no patch embedding ('stem' with 'kernel' and 'bias'); "
        "pass ConvMixer params or variables"
    )


def with_stem(tree: PyTree, stem: dict, nested: bool) -> PyTree:
    """A new tree equal to ``tree`` but for its patch embedding, replaced by ``stem``;
    ``nested`` as :func:`stem_of` returned it. ``tree`` is not modified."""
    if nested:
        return {**tree, "params": {**tree["params"], "stem": stem}}
    return {**tree, "stem": stem}


def check_key_fits(kernel_shape: Sequence[int], key: Key) -> None:
    """Refuse a key whose block size / channels differ from a (P, P, C, dim) kernel."""
    p, p2, c, _ = kernel_shape
    if key.block_size != p:
        raise KeyModelMismatch(
            f"key block size {key.block_size} differs from the model's patch size {p}; "
            f"make a key with --block-size {p}"
        )
    if key.channels != c:
        raise KeyModelMismatch(
            f"key has {key.channels} channels but the model takes {c}; "
            f"make a key with --channels {c}"
        )


def _norm(mean, std, c):
    mean = np.full(c, 0.5) if mean is None else np.asarray(mean, np.float64)
    std = np.full(c, 0.5) if std is None else np.asarray(std, np.float64)
    if mean.shape != (c,) or std.shape != (c,):
        raise ValueError(f"mean and std must have {c} entries")
    return mean, std


def _is_paper_norm(mean, std) -> bool:
    return bool(np.all(mean == 0.5) and np.all(std == 0.5))


def encrypt_kernel(kernel, bias, key: Key, mean=None, std=None):
    """Encrypt a patch-embedding kernel (P, P, C, dim) and bias (dim,) -> (kernel', bias')."""
    p, _, c, d = kernel.shape
    check_key_fits(kernel.shape, key)
    pb = p * p * c
    mean, std = _norm(mean, std, c)
    e = jnp.asarray(kernel).reshape(pb, d)
    perm = jnp.asarray(key.perm)
    sign = 1 - 2 * jnp.asarray(key.flip).astype(e.dtype)
    e_perm = jnp.take(e, perm, axis=0)  # E[perm[k]]
    bias = jnp.asarray(bias)
    if _is_paper_norm(mean, std):
        return (e_perm * sign[:, None]).reshape(kernel.shape), bias
    ch = np.arange(pb) % c  # channel of row k
    ch_src = jnp.take(jnp.asarray(ch), perm)  # channel of row perm[k]
    std_j, mean_j = jnp.asarray(std, e.dtype), jnp.asarray(mean, e.dtype)
    scale = sign * jnp.asarray(std[ch], e.dtype) / std_j[ch_src]
    flipped_mean = jnp.where(jnp.asarray(key.flip) == 1, 1 - mean_j[ch], mean_j[ch])
    shift = (flipped_mean - mean_j[ch_src]) / std_j[ch_src]
    new_bias = bias + shift @ e_perm
    return (e_perm * scale[:, None]).reshape(kernel.shape), new_bias


def decrypt_kernel(kernel, bias, key: Key, mean=None, std=None):
    """Inverse of :func:`encrypt_kernel`."""
    p, _, c, d = kernel.shape
    check_key_fits(kernel.shape, key)
    pb = p * p * c
    mean, std = _norm(mean, std, c)
    e_enc = jnp.asarray(kernel).reshape(pb, d)
    perm = jnp.asarray(key.perm)
    inv = inverse_permutation(perm)
    sign = 1 - 2 * jnp.asarray(key.flip).astype(e_enc.dtype)
    bias = jnp.asarray(bias)
    if _is_paper_norm(mean, std):
        return jnp.take(e_enc * sign[:, None], inv, axis=0).reshape(kernel.shape), bias
    ch = np.arange(pb) % c
    ch_src = jnp.take(jnp.asarray(ch), perm)
    std_j, mean_j = jnp.asarray(std, e_enc.dtype), jnp.asarray(mean, e_enc.dtype)
    scale = sign * jnp.asarray(std[ch], e_enc.dtype) / std_j[ch_src]
    e_perm = e_enc / scale[:, None]  # E[perm[k]]
    flipped_mean = jnp.where(jnp.asarray(key.flip) == 1, 1 - mean_j[ch], mean_j[ch])
    shift = (flipped_mean - mean_j[ch_src]) / std_j[ch_src]
    return jnp.take(e_perm, inv, axis=0).reshape(kernel.shape), bias - shift @ e_perm


def encrypt_params(params: PyTree, key: Key, *, mean=None, std=None) -> PyTree:
    """A new tree whose patch embedding is encrypted with ``key``; nothing else changes.

    ``mean``/``std``: the model's input normalization (default 0.5/0.5, the paper's).
    """
    stem, nested = stem_of(params)
    k, b = encrypt_kernel(stem["kernel"], stem["bias"], key, mean, std)
    return with_stem(params, {**stem, "kernel": k, "bias": b}, nested)


def decrypt_params(params: PyTree, key: Key, *, mean=None, std=None) -> PyTree:
    """Inverse of :func:`encrypt_params`."""
    stem, nested = stem_of(params)
    k, b = decrypt_kernel(stem["kernel"], stem["bias"], key, mean, std)
    return with_stem(params, {**stem, "kernel": k, "bias": b}, nested)


def rekey_params(params: PyTree, old_key: Key, new_key: Key, *, mean=None, std=None) -> PyTree:
    """Move a model encrypted with ``old_key`` to ``new_key`` (the paper's key update)."""
    return encrypt_params(
        decrypt_params(params, old_key, mean=mean, std=std), new_key, mean=mean, std=std
    )
