"""Attacks on the position-key countermeasure (``scheme.position_keys``; docs/security.md).

A position-wise encrypted model holds, at every block position g, the same kernel E
under that position's key: ``K_g[r] = s_g[r] * E[perm_g[r]]`` (rows scaled by positive
factors for other input normalizations). Matching the rows of ``K_g`` to those of
``K_0`` up to sign gives the *relative* key of every position exactly, from the model
alone: the row q of ``K_0`` and the row ``src[g, q]`` of ``K_g`` come from the same row of
E, negated relative to each other where the two flips differ. With the relative keys
the provider rewrites every block of a query as if it were encrypted with ``keys[0]``
(:func:`align_to_first`), and the one-key attacks (``attacks.ciphertext_only``, the
kernel attack) apply unchanged; their key for position 0 gives every other position's
(:func:`keys_from_first`).
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from convmixer_jax.scheme.blocks import from_blocks, grid_shape, to_blocks
from convmixer_jax.scheme.keys import Key, stack_keys


def relative_keys(kernels) -> tuple[np.ndarray, np.ndarray, float]:
    """Relative keys from a position-wise stem kernel.

    kernels: (gh, gw, P, P, C, dim) or (G, pb, dim). Returns ``src`` (G, pb) int, ``negate``
    (G, pb) bool and the smallest margin between a matched row's absolute cosine and the next
    best (about 1 for a trained or random kernel; near 0 means rows are not unique and the
    match is not determined). Position g's ciphertext value at ``src[g, q]``, negated where
    ``negate[g, q]``, is the value that ``keys[0]`` puts at q.
    """
    k = np.asarray(kernels, np.float64)
    if k.ndim == 6:
        k = k.reshape(k.shape[0] * k.shape[1], -1, k.shape[-1])
    if k.ndim != 3:
        raise ValueError(
            f"kernels must be (gh, gw, P, P, C, dim) or (G, pb, dim), got shape {k.shape}"
        )
    unit = k / np.maximum(np.linalg.norm(k, axis=-1, keepdims=True), 1e-30)
    g_count, pb, _ = unit.shape
    src = np.empty((g_count, pb), np.int64)
    negate = np.empty((g_count, pb), bool)
    margin = np.inf
    for g in range(g_count):
        cos = unit[0] @ unit[g].T  # (q, r)
        _, cols = linear_sum_assignment(-np.abs(cos))
        src[g], negate[g] = cols, cos[np.arange(pb), cols] < 0
        if pb > 1:
            top2 = np.sort(np.abs(cos), axis=1)[:, -2:]
            margin = min(margin, float(np.min(top2[:, 1] - top2[:, 0])))
    return src, negate, margin


def align_to_first(encrypted, src: np.ndarray, negate: np.ndarray, block_size: int) -> np.ndarray:
    """(N, H, W, C) uint8 images encrypted with position keys -> the same images as if every
    block were encrypted with ``keys[0]``; exact. src, negate: (G, pb) from
    :func:`relative_keys`, G = (H/M) * (W/M) positions in row-major grid order."""
    e = np.asarray(encrypted)
    if e.dtype != np.uint8:
        raise ValueError(f"align_to_first takes uint8 images, got {e.dtype}")
    n, h, w, c = e.shape
    gh, gw = grid_shape(h, w, block_size)
    if gh * gw != src.shape[0]:
        raise ValueError(f"{src.shape[0]} relative keys for a grid of {gh} x {gw} blocks")
    blocks = to_blocks(e, block_size).reshape(n, gh * gw, -1)
    out = np.take_along_axis(blocks, np.broadcast_to(src[None], blocks.shape), axis=2)
    out = np.where(negate[None], 255 - out, out).astype(np.uint8)
    return from_blocks(out.reshape(n, gh, gw, -1), block_size, c)


def keys_from_first(key0: Key, src: np.ndarray, negate: np.ndarray) -> Key:
    """Every position's key from position 0's and the relative keys: perm/flip (G, pb)."""
    p0, f0 = np.asarray(key0.perm), np.asarray(key0.flip)
    keys = []
    for s, neg in zip(src, negate, strict=True):
        perm, flip = np.empty_like(p0), np.empty_like(f0)
        perm[s], flip[s] = p0, f0 ^ neg.astype(f0.dtype)
        keys.append(Key(perm, flip, key0.block_size, key0.channels))
    return stack_keys(keys)


def countermeasure_study(
    config,
    variables,
    eval_data,
    query_images: np.ndarray,
    template,
    prior,
    *,
    num_keys: int = 5,
    ns: Sequence[int] = (1, 2, 5, 10, 100),
    aligned_ns: Sequence[int] = (1, 2, 5),
    public_images=None,
    seed: int | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Accuracy of the position-key model and the attacks on it.

    For each of ``num_keys`` fresh sets of position keys: the position-wise encrypted model's
    predictions on position-wise encrypted images against the plain model's on plain images
    (``eval_data``: images (N, H, W, C) uint8 and labels (N,)); the one-key ciphertext-only
    attack on raw queries (N random ``query_images`` each) for N in ``ns`` (positions whose
    key it recovers, and whether it claims one); the relative keys read from the model, and
    the one-key attack on the aligned queries for N in ``aligned_ns`` and, with
    ``public_images``, with the aligned position-0 model at N = 1 (positions of the grid
    whose key is then exact). Keys come from the OS CSPRNG unless ``seed`` is set; only
    counts are returned.
    """
    from convmixer_jax.attacks.ciphertext_only import recover_key_ciphertext_only
    from convmixer_jax.model.inference import predict_logits
    from convmixer_jax.model.position_wise import position_wise_logits
    from convmixer_jax.scheme.params import stem_of, with_stem
    from convmixer_jax.scheme.position_keys import (
        encrypt_images_by_position,
        encrypt_params_by_position,
        generate_position_keys,
    )

    m, c = config.patch_size, config.channels
    test_images = np.asarray(query_images)
    h, w = test_images.shape[1:3]
    grid = (h // m, w // m)
    g_count = grid[0] * grid[1]
    ev_x, ev_y = np.asarray(eval_data[0]), np.asarray(eval_data[1])
    plain_pred = predict_logits(config, variables, ev_x).argmax(-1)
    rng = np.random.default_rng(None if seed is None else seed + 31)

    def queries(keys: Key, n: int, relative=None) -> np.ndarray:
        """``n`` query images drawn at random, encrypted with the position ``keys``; with
        ``relative`` = (src, negate), aligned to ``keys[0]``."""
        q = np.asarray(
            encrypt_images_by_position(
                test_images[rng.choice(len(test_images), n, replace=False)], keys
            )
        )
        return q if relative is None else align_to_first(q, *relative, m)

    def outcome(res, keys: Key, relative=None) -> dict:
        """Whether the attack claimed a key, and the positions whose key it got right (its
        key for position 0 gives every position's with ``relative``)."""
        found = res.best_guess if relative is None else keys_from_first(res.best_guess, *relative)
        return {"claimed": res.determined, "positions_exact": exact_positions_all(found, keys)}

    rows = []
    for t in range(num_keys):
        t0 = time.perf_counter()
        keys = generate_position_keys(m, c, grid, None if seed is None else seed + 100 + t)
        enc_vars = encrypt_params_by_position(
            variables, keys, grid, mean=config.mean, std=config.std
        )
        enc_x = np.asarray(encrypt_images_by_position(ev_x, keys))
        enc_pred = position_wise_logits(config, enc_vars, enc_x).argmax(-1)
        row = {
            "plain_accuracy": float(np.mean(plain_pred == ev_y)),
            "encrypted_accuracy": float(np.mean(enc_pred == ev_y)),
            "identical_predictions": int(np.sum(enc_pred == plain_pred)),
            "images": int(len(ev_y)),
            "plain_images_accuracy": float(
                np.mean(position_wise_logits(config, enc_vars, ev_x).argmax(-1) == ev_y)
            ),
        }
        stem, _ = stem_of(enc_vars)
        src, negate, margin = relative_keys(stem["kernel"])
        rebuilt = keys_from_first(Key(keys.perm[0], keys.flip[0], m, c), src, negate)
        row["relative_keys_exact"] = exact_positions_all(rebuilt, keys)
        row["relative_margin"] = margin
        relative = (src, negate)

        attacks = {
            f"raw_{n}": outcome(
                recover_key_ciphertext_only(queries(keys, n), m, template, prior=prior), keys
            )
            for n in ns
        }
        attacks.update(
            {
                f"aligned_{n}": outcome(
                    recover_key_ciphertext_only(
                        queries(keys, n, relative), m, template, prior=prior
                    ),
                    keys,
                    relative,
                )
                for n in aligned_ns
            }
        )
        if public_images is not None:
            # position 0's slice of the stem is a one-key encrypted model under keys[0]
            first = with_stem(
                enc_vars,
                {
                    **stem,
                    "kernel": np.asarray(stem["kernel"])[0, 0],
                    "bias": np.asarray(stem["bias"])[0, 0],
                },
                True,
            )
            attacks["aligned_model_1"] = outcome(
                recover_key_ciphertext_only(
                    queries(keys, 1, relative),
                    m,
                    template,
                    prior=prior,
                    model=(config, first),
                    public_images=public_images,
                ),
                keys,
                relative,
            )
        row["attacks"] = attacks
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        log(
            f"  position keys {t + 1}/{num_keys}: "
            f"identical {row['identical_predictions']}/{row['images']}, "
            f"relative keys {row['relative_keys_exact']}/{g_count}, "
            + ", ".join(f"{k} {v['positions_exact']}" for k, v in attacks.items())
        )
    return {
        "positions": g_count,
        "grid": list(grid),
        "num_keys": num_keys,
        "rows": rows,
        "key_source": "os-csprng" if seed is None else "seed",
    }


def exact_positions_all(found: Key, keys: Key) -> int:
    """Positions g where ``found[g]`` equals ``keys[g]``: keys perm/flip (G, pb), found the same
    or a single key (pb,) compared with every position's."""
    return int(
        np.sum(
            np.all(np.asarray(found.perm) == np.asarray(keys.perm), -1)
            & np.all(np.asarray(found.flip) == np.asarray(keys.flip), -1)
        )
    )


__all__ = [
    "relative_keys",
    "align_to_first",
    "keys_from_first",
    "countermeasure_study",
    "exact_positions_all",
]
