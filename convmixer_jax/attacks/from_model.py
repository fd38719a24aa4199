"""Key recovery with the whole encrypted model: candidate keys from its patch-embedding
kernel (:mod:`.from_weights`), ranked by the model's confidence on unlabeled public
images, and the measures of an attack (docs/security.md).

Needs JAX (the model is run); the kernel-only attacks in :mod:`.from_weights` do not.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from convmixer_jax.attacks.from_weights import ModelRecovery, recover_key_from_structure
from convmixer_jax.scheme.keys import Key

# ------------------------------------------------------------- measurement


def evaluate_recovery(true_key: Key, recovery: ModelRecovery) -> dict:
    """How much of ``true_key`` an attack recovered.

    Returns fraction_both (positions with perm and flip right),
    fraction_perm, fraction_flip, exact (the whole key), exact_up_to_global_sign
    (perm right and flip right or complemented everywhere), valid_key, and
    true_key_in_candidates (None when the attack gave no candidates) with
    candidates (their number).
    """
    tp, tf = np.asarray(true_key.perm), np.asarray(true_key.flip)
    rp, rf = np.asarray(recovery.perm), np.asarray(recovery.flip)
    perm_ok, flip_ok = rp == tp, rf == tf
    inside = None
    if recovery.candidates:
        inside = any(
            np.array_equal(k.perm, tp) and np.array_equal(k.flip, tf) for k in recovery.candidates
        )
    return {
        "fraction_both": float(np.mean(perm_ok & flip_ok)),
        "fraction_perm": float(np.mean(perm_ok)),
        "fraction_flip": float(np.mean(flip_ok)),
        "exact": bool(np.all(perm_ok & flip_ok)),
        "exact_up_to_global_sign": bool(
            np.all(perm_ok) and (np.all(flip_ok) or not np.any(flip_ok))
        ),
        "valid_key": recovery.key is not None,
        "true_key_in_candidates": inside,
        "candidates": len(recovery.candidates),
    }


def accuracy_with_key(
    config, encrypted_variables, key: Key, images, labels, *, batch_size: int = 500
) -> float:
    """Accuracy of the encrypted model on ``images`` (N, H, W, C) uint8 or float
    in [0, 1] encrypted with ``key`` (e.g. a recovered one), labels (N,).
    With the true key this is the plain model's accuracy."""
    from convmixer_jax.model.inference import accuracy
    from convmixer_jax.scheme.images import encrypt_images

    return accuracy(
        config,
        encrypted_variables,
        np.asarray(encrypt_images(images, key)),
        labels,
        batch_size=batch_size,
    )


# ------------------------------------------- the whole encrypted model (JAX)


def rank_keys_by_confidence(
    config, encrypted_variables, keys, public_images, *, batch_size: int = 256
) -> np.ndarray:
    """Mean prediction entropy (nats, lower = more confident) of the encrypted
    model on ``public_images`` (N, H, W, C) uint8 or float in [0, 1], unlabeled,
    encrypted with each candidate key. The model sees the images it was
    trained on only under the right key; a key off by a block symmetry gives
    less confident predictions. Returns (len(keys),). Runs the whole model
    once per key, so its cost is that of ``len(keys)`` predictions on the images."""
    from convmixer_jax.model.inference import predict_logits
    from convmixer_jax.scheme.images import encrypt_images

    out = np.empty(len(keys))
    for i, k in enumerate(keys):
        lg = predict_logits(
            config,
            encrypted_variables,
            np.asarray(encrypt_images(public_images, k)),
            batch_size=batch_size,
        ).astype(np.float64)
        lg -= lg.max(1, keepdims=True)
        logp = lg - np.log(np.exp(lg).sum(1, keepdims=True))
        out[i] = float(-(np.exp(logp) * logp).sum(1).mean())
    return out


def negated_key(key: Key) -> Key | None:
    """The key whose decryption is the negative image (every flip complemented), or None
    for odd pb, where the complement has the wrong number of flips."""
    perm, flip = np.asarray(key.perm), np.asarray(key.flip)
    if len(flip) % 2:
        return None
    return Key(perm, (1 - flip).astype(flip.dtype), key.block_size, key.channels)


def rerank_by_confidence(
    recovery: ModelRecovery,
    config,
    encrypted_variables,
    public_images,
    *,
    top: int = 8,
    n_images: int = 256,
) -> ModelRecovery:
    """Re-rank the first ``top`` candidates of an attack, and their negatives
    (:func:`negated_key`), by :func:`rank_keys_by_confidence` on the first ``n_images``
    unlabeled ``public_images`` and return the recovery with the most confident one as
    ``key`` (the other candidates keep their order after them)."""
    if not recovery.candidates:
        raise ValueError("the recovery has no candidates to re-rank")
    head = list(recovery.candidates[: max(1, top)])

    # The BatchNorm ranking barely sees the global sign (a stem GELU of -x has similar
    # statistics), but the model's confidence does: the negative of each leading
    # candidate is re-ranked too (even pb only; for odd pb the flip count fixes the sign).
    def ident(k):
        return np.asarray(k.perm).tobytes(), np.asarray(k.flip).tobytes()

    seen = {ident(k) for k in head}
    for neg in filter(None, map(negated_key, list(head))):
        if ident(neg) not in seen:
            seen.add(ident(neg))
            head.append(neg)
    rest = tuple(k for k in recovery.candidates[max(1, top) :] if ident(k) not in seen)
    ent = rank_keys_by_confidence(
        config, encrypted_variables, head, np.asarray(public_images)[:n_images]
    )
    order = np.argsort(ent, kind="stable")
    cands = tuple(head[i] for i in order) + rest
    key = cands[0]
    nxt = f", next {ent[order[1]]:.4f}" if len(head) > 1 else ""
    notes = (
        recovery.notes + f"; best {len(head)} candidates re-ranked by prediction entropy on "
        f"{min(n_images, len(public_images))} unlabeled public images "
        f"({ent[order[0]]:.4f} nats{nxt})"
    )
    return dataclasses.replace(
        recovery,
        perm=key.perm,
        flip=key.flip,
        key=key,
        candidates=cands,
        method=recovery.method + "+confidence",
        notes=notes,
    )


def recover_key_from_encrypted_model(
    config,
    encrypted_variables,
    public_images=None,
    *,
    seed: int = 0,
    top: int = 8,
    n_images: int = 64,
    n_confidence_images: int = 256,
) -> ModelRecovery:
    """The strongest attack here that needs neither the key, nor plain
    weights, nor labels.

    encrypted_variables: the encrypted model's ``{'params', 'batch_stats'}``.

    public_images: optional (N, H, W, C) uint8 or float in [0, 1], unlabeled
      natural images of the task's kind (any public ones, not the client's).

    :func:`~convmixer_jax.attacks.from_weights.recover_key_from_structure` on the stem
    kernel; with images, its 96 symmetric candidates are ranked by stem BatchNorm
    statistics (:func:`~convmixer_jax.attacks.stem_statistics.rank_keys_by_batch_stats`,
    first ``n_images``) and the best ``top`` re-ranked by prediction confidence
    (:func:`rerank_by_confidence`, first ``n_confidence_images``). Without images: the
    structure attack with the bias / BatchNorm-mean sign heuristic. The statistics follow
    the model's activation (GELU or ReLU); the normalization must be the paper's
    (mean = std = 0.5), else ValueError.
    """
    for name in ("mean", "std"):
        val = getattr(config, name, None)
        if val is not None and not np.allclose(val, 0.5):
            raise ValueError(
                f"model normalization {name}={val}; these attacks assume the paper's 0.5/0.5"
            )
    stem, bn = encrypted_variables["params"]["stem"], encrypted_variables["batch_stats"]["stem_bn"]
    if public_images is None:
        return recover_key_from_structure(
            stem["kernel"], seed=seed, stem_bias=stem["bias"], stem_bn_mean=bn["mean"]
        )
    rec = recover_key_from_structure(
        stem["kernel"],
        seed=seed,
        stem_bias=stem["bias"],
        stem_bn_mean=bn["mean"],
        stem_bn_var=bn["var"],
        public_images=public_images,
        n_images=n_images,
        activation=config.activation,
        gelu_approximate=config.gelu_approximate,
    )
    return rerank_by_confidence(
        rec, config, encrypted_variables, public_images, top=top, n_images=n_confidence_images
    )
