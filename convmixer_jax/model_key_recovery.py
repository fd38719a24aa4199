"""Key recovery from an encrypted model and a plain reference model (threat: a
public pretrained model was encrypted, so the adversary holds the original weights).

The encrypted patch embedding is ``E'[k] = s_k * E[perm[k]]`` (rows of the
(pb, dim) kernel matrix). Given a reference kernel R of the same shape, each
encrypted row is matched to the reference row of largest absolute cosine
similarity; the sign of that similarity gives the flip. With the original
weights (R = E) every match is exact (|cos| = 1) and the key is recovered
exactly. With an independently trained reference the output channels of the
two kernels are not aligned, so this row matching alone does not apply
(docs/security.md).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from convmixer_jax.keys import Key, validate_key


@dataclasses.dataclass(frozen=True)
class ModelRecovery:
    """perm/flip estimates (pb,), the |cos| of each match, and a Key when the
    estimate is a valid key (perm a permutation, exactly pb/2 flips)."""

    perm: np.ndarray
    flip: np.ndarray
    similarity: np.ndarray
    key: Key | None

    def fraction_correct(self, true_key: Key) -> float:
        """Fraction of the pb positions whose (perm, flip) both match ``true_key``."""
        ok = (self.perm == np.asarray(true_key.perm)) & (self.flip == np.asarray(true_key.flip))
        return float(np.mean(ok))


def recover_key_with_reference(encrypted_kernel, reference_kernel) -> ModelRecovery:
    """Estimate the key from an encrypted stem kernel and a reference kernel.

    Both: (P, P, C, dim) stem kernels (``params['stem']['kernel']``).
    """
    enc = np.asarray(encrypted_kernel, np.float64)
    ref = np.asarray(reference_kernel, np.float64)
    if enc.shape != ref.shape or enc.ndim != 4:
        raise ValueError(f"kernels must both be (P, P, C, dim) of one shape; got {enc.shape} and {ref.shape}")
    p, _, c, d = enc.shape
    e = enc.reshape(-1, d)
    r = ref.reshape(-1, d)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-30)
    r = r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-30)
    cos = e @ r.T  # (pb, pb): encrypted row k vs reference row j
    perm = np.argmax(np.abs(cos), axis=1).astype(np.int32)
    sim = cos[np.arange(len(perm)), perm]
    flip = (sim < 0).astype(np.uint8)
    try:
        key = validate_key(Key(perm, flip, p, c))
    except ValueError:
        key = None
    return ModelRecovery(perm=perm, flip=flip, similarity=np.abs(sim), key=key)
