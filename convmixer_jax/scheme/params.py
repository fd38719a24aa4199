"""Model encryption: the keyed signed permutation of the patch-embedding rows, and the
block key's permutation of a ViT's position embedding.

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

A key with block scrambling (``key.block_perm``, bound to a gh x gw grid) also permutes
the patch rows of a ViT's position embedding ``pos_embed`` (1, T, dim), whose last
gh*gw rows belong to the patch tokens in raster order (method.md, "Extension: block
scrambling and Vision Transformers")::

    pos'[off + b] = pos[off + block_perm[b]],   off = T - gh*gw

so the class token's row (``off`` = 1), when there is one, is unchanged. A ConvMixer
cannot absorb block scrambling: such a key is refused for a tree without ``pos_embed``.

All functions are pure (inputs are never modified) and ``vmap`` over a batch
of keys: ``jax.vmap(encrypt_params, in_axes=(None, 0))(params, keys)``.
They accept either a params tree (``{'stem': {'kernel', 'bias'}, ...}`` of a ConvMixer,
``{'patch_embed': ..., 'pos_embed': ..., ...}`` of a ViT) or a variables tree
(``{'params': ..., 'batch_stats': ...}``, ``{'params': ...}``).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from convmixer_jax.scheme.keys import InvalidKeyError, Key, inverse_permutation

PyTree = Any

#: Where each model family keeps its patch embedding (``kernel`` (P, P, C, dim), ``bias``):
#: the ConvMixer's ``stem``, the ViT's ``patch_embed`` (timm's names).
PATCH_EMBED_NAMES = ("stem", "patch_embed")
#: A ViT's learned position embedding (1, T, dim) and its class token (1, 1, dim).
POS_EMBED = "pos_embed"
CLASS_TOKEN = "cls_token"


class KeyModelMismatch(InvalidKeyError):
    """The key does not fit the model: its block size or channels differ from the model's
    patch embedding, or its block scrambling cannot be absorbed by the model (a ConvMixer,
    or a ViT whose grid of patches differs from the key's)."""


def _params_of(tree: PyTree) -> tuple[dict, bool]:
    """The params dict of ``tree`` and whether it was nested under ``'params'``."""
    if isinstance(tree, dict) and isinstance(tree.get("params"), dict):
        if any(name in tree["params"] for name in PATCH_EMBED_NAMES):
            return tree["params"], True
    if isinstance(tree, dict) and any(name in tree for name in PATCH_EMBED_NAMES):
        return tree, False
    raise ValueError(
        "parameter tree has no patch embedding ('stem' or 'patch_embed' with 'kernel' and "
        "'bias'); pass the params or variables of a ConvMixer or a ViT"
    )


def _embed_name(params: dict) -> str:
    return next(name for name in PATCH_EMBED_NAMES if name in params)


def stem_of(tree: PyTree) -> tuple[dict, bool]:
    """The patch embedding of a model's tree: ``(stem, nested)``.

    ``tree``: a params tree (``{'stem': ...}`` of a ConvMixer or ``{'patch_embed': ...}`` of
    a ViT; then ``nested`` is False) or a variables tree (``{'params': {...}, ...}``,
    ``nested`` True); ``stem`` is the ``{'kernel': (P, P, C, dim), 'bias': (dim,)}`` dict
    (or any leaves stored under that name). Raises ValueError for a tree without one.
    """
    params, nested = _params_of(tree)
    return params[_embed_name(params)], nested


def with_stem(tree: PyTree, stem: dict, nested: bool) -> PyTree:
    """A new tree equal to ``tree`` but for its patch embedding, replaced by ``stem``;
    ``nested`` as :func:`stem_of` returned it. ``tree`` is not modified."""
    params = tree["params"] if nested else tree
    new = {**params, _embed_name(params): stem}
    return {**tree, "params": new} if nested else new


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


#: Why a ConvMixer refuses a key with block scrambling (one line, with the way out).
CONVMIXER_SCRAMBLING = (
    "block scrambling cannot be absorbed by a ConvMixer: its depthwise convolutions see "
    "which blocks are neighbours; use a key made without --block-scrambling (or a ViT)"
)


def check_key_patch_grid(grid: tuple[int, int], key: Key) -> None:
    """Refuse a key with block scrambling bound to a grid other than the model's
    ``grid`` (gh, gw) of patches; a key without block scrambling fits any grid."""
    if not key.scrambles:
        return
    if key.grid is None:
        raise KeyModelMismatch("the key's block permutation has no grid; re-create the key")
    kg, mg = tuple(int(g) for g in key.grid), tuple(int(g) for g in grid)
    if kg != mg:
        m = key.block_size
        size = f"--image-size {mg[0] * m}" if mg[0] == mg[1] else f"--grid {mg[0]} {mg[1]}"
        raise KeyModelMismatch(
            f"the key scrambles a {kg[0]} x {kg[1]} grid of blocks but the model's position "
            f"embedding has a {mg[0]} x {mg[1]} grid of patches; make a key for the model "
            f"with keygen --block-scrambling {size}"
        )


def position_grid(pos_rows: int, class_token: bool) -> tuple[int, tuple[int, int]]:
    """``(offset, (g, g))``: where the patch rows of a ViT position embedding of
    ``pos_rows`` rows begin, and the (square) grid of patches they hold.

    The rows are ``[class row] + g*g patch rows``; the class row is there only with a
    class token (``class_token``) that is not timm's ``no_embed_class``. A count of rows that
    is no such layout raises :class:`KeyModelMismatch`.
    """
    for offset in (1, 0) if class_token else (0,):
        n = pos_rows - offset
        g = math.isqrt(max(n, 0))
        if n >= 1 and g * g == n:
            return offset, (g, g)
    raise KeyModelMismatch(
        f"the position embedding has {pos_rows} rows, which is no square grid of patches"
        + (" (after the class row)" if class_token else "")
        + "; pass the params of a ViT"
    )


def _pos_layout(params: dict, key: Key) -> int | None:
    """None when ``key`` leaves the position embedding alone; else the offset of its patch
    rows (after checking that the key's grid is the model's). Static shapes only."""
    if not key.scrambles:
        return None
    if POS_EMBED not in params:
        raise KeyModelMismatch(CONVMIXER_SCRAMBLING)
    shape = tuple(np.shape(params[POS_EMBED]))
    if len(shape) != 3 or shape[0] != 1:
        raise KeyModelMismatch(
            f"'{POS_EMBED}' has shape {shape}, expected (1, T, dim); pass the params of a ViT"
        )
    offset, grid = position_grid(shape[1], CLASS_TOKEN in params)
    check_key_patch_grid(grid, key)
    if np.shape(key.block_perm)[-1] != grid[0] * grid[1]:
        raise KeyModelMismatch(
            f"the key's block permutation has {np.shape(key.block_perm)[-1]} entries but its "
            f"grid {key.grid[0]} x {key.grid[1]} has {grid[0] * grid[1]} blocks; re-create the key"
        )
    return offset


def _permute_patch_rows(pos, offset: int, index):
    """``pos`` (1, T, d) with its patch rows (from ``offset``) gathered by ``index``:
    ``out[:, offset + b] = pos[:, offset + index[b]]``."""
    pos = jnp.asarray(pos)
    patches = jnp.take(pos[:, offset:], jnp.asarray(index), axis=1)
    return jnp.concatenate([pos[:, :offset], patches], axis=1) if offset else patches


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


def check_key_fits_params(tree: PyTree, key: Key) -> None:
    """Raise :class:`KeyModelMismatch` unless ``key`` can encrypt the model whose params or
    variables are ``tree`` (shapes only: no compute): block size and channels of the patch
    embedding, and, for a key with block scrambling, a ViT position embedding of the key's
    grid."""
    params, _ = _params_of(tree)
    check_key_fits(np.shape(params[_embed_name(params)]["kernel"]), key)
    _pos_layout(params, key)


def _transform(tree: PyTree, key: Key, mean, std, *, decrypt: bool) -> PyTree:
    params, nested = _params_of(tree)
    name = _embed_name(params)
    stem = params[name]
    check_key_fits(np.shape(stem["kernel"]), key)
    offset = _pos_layout(params, key)  # every check before any work
    kernel_fn = decrypt_kernel if decrypt else encrypt_kernel
    k, b = kernel_fn(stem["kernel"], stem["bias"], key, mean, std)
    new = {**params, name: {**stem, "kernel": k, "bias": b}}
    if offset is not None:
        index = inverse_permutation(key.block_perm) if decrypt else key.block_perm
        new[POS_EMBED] = _permute_patch_rows(params[POS_EMBED], offset, index)
    return {**tree, "params": new} if nested else new


def encrypt_params(params: PyTree, key: Key, *, mean=None, std=None) -> PyTree:
    """A new tree encrypted with ``key``: the patch embedding (kernel (P, P, C, dim), and
    the bias for a normalization other than the paper's), and, when the key scrambles
    blocks, the patch rows of the ViT's ``pos_embed`` (1, T, dim); nothing else changes.

    ``mean``/``std``: the model's input normalization (default 0.5/0.5, the paper's).
    Raises :class:`KeyModelMismatch` for a key that does not fit the model (block size,
    channels; block scrambling on a ConvMixer, or bound to another grid).
    """
    return _transform(params, key, mean, std, decrypt=False)


def decrypt_params(params: PyTree, key: Key, *, mean=None, std=None) -> PyTree:
    """Inverse of :func:`encrypt_params`."""
    return _transform(params, key, mean, std, decrypt=True)


def rekey_params(params: PyTree, old_key: Key, new_key: Key, *, mean=None, std=None) -> PyTree:
    """Move a model encrypted with ``old_key`` to ``new_key`` (the paper's key update);
    either key may scramble blocks (a ViT only)."""
    check_key_fits_params(params, old_key)
    check_key_fits_params(params, new_key)
    return encrypt_params(
        decrypt_params(params, old_key, mean=mean, std=std), new_key, mean=mean, std=std
    )
