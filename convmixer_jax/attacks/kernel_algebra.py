"""The algebra of a block's pb positions, shared by the key-recovery attacks.

A key acts on the pb = M*M*C positions of a block, ``k = (i*M + j)*C + c``
(``docs/method.md``; :mod:`convmixer_jax.scheme.blocks` cuts images that way). The same
index set labels the rows of the patch embedding's kernel, (P, P, C, dim) read as a
(pb, dim) matrix with P = M, and the columns of the encrypted blocks. The attacks on the
weights (:mod:`.from_weights`), on the whole model (:mod:`.stem_statistics`,
:mod:`.from_model`) and on encrypted images (:mod:`.ciphertext_only`) all reason about
that index set in the same terms, written here once:

- the kernel as rows (:func:`kernel_rows`);
- flips: signs that make a signed correlation matrix agree (:func:`correlation_signs`),
  exactly pb/2 of them (:func:`balanced_flip`), the global sign an odd pb fixes by the
  flip count (:func:`sign_by_flip_count`);
- positions as (row, column, channel) (:func:`decode_positions`) and the symmetries of the
  block that correlations cannot see, as keys (:func:`dihedral_images`,
  :func:`symmetric_keys`, :func:`dihedral_keys`);
- undoing a key along the position axis of any array (:func:`decrypt_positions`);
- keys compared, or built only when valid (:func:`same_key`, :func:`key_or_none`).

NumPy only; this module imports no attack module.
"""

from __future__ import annotations

import itertools

import numpy as np

from convmixer_jax.scheme.keys import InvalidKeyError, Key, validate_key


def kernel_rows(kernel, name: str = "kernel") -> tuple[np.ndarray, int, int]:
    """A (P, P, C, dim) stem kernel -> (rows (pb, dim) float64, P, C), rows in the
    block's position order ``k = (i*P + j)*C + c``. ValueError for other shapes
    (``name`` says which argument)."""
    k = np.asarray(kernel, np.float64)
    if k.ndim != 4 or k.shape[0] != k.shape[1]:
        raise ValueError(f"{name} must be a (P, P, C, dim) stem kernel; got shape {k.shape}")
    p, _, c, d = k.shape
    return k.reshape(p * p * c, d), p, c


def correlation_signs(
    correlations: np.ndarray, weight: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Signs s (pb,) of +1.0/-1.0 maximizing ``s^T W s`` with W = correlations * weight
    (both (pb, pb); W symmetrized, zero diagonal): the leading eigenvector's signs, then
    single flips while they improve.

    Returns s and a per-position support ``s_k (W s)_k`` (pb,) float64 (> 0 where
    position k agrees with the others). The global sign is arbitrary (fixed so that
    s[0] = +1).
    """
    w = correlations * (1.0 if weight is None else weight)
    w = (w + w.T) / 2
    np.fill_diagonal(w, 0.0)
    _, vecs = np.linalg.eigh(w)
    s = np.where(vecs[:, -1] >= 0, 1.0, -1.0)
    for _ in range(4 * len(s)):
        g = s * (w @ s)
        k = int(np.argmin(g))
        if g[k] >= 0:
            break
        s[k] = -s[k]
    if s[0] < 0:
        s = -s
    return s, s * (w @ s)


def balanced_flip(evidence: np.ndarray) -> np.ndarray:
    """(pb,) evidence for a flip -> (pb,) uint8 with exactly floor(pb/2) ones, at the
    positions with the largest evidence (stable: ties go to the lower index)."""
    n = len(evidence)
    flip = np.zeros(n, np.uint8)
    flip[np.argsort(-np.asarray(evidence, np.float64), kind="stable")[: n // 2]] = 1
    return flip


def sign_by_flip_count(signs: np.ndarray, notes: list[str]) -> np.ndarray:
    """Signs (pb,) of +1/-1 -> the same or negated: for odd pb only the one of ``signs``
    and ``-signs`` with floor(pb/2) negatives can be a key's (a note is appended to
    ``notes`` when it negates). Even pb: ``signs`` unchanged."""
    n = len(signs)
    if n % 2 and int(np.sum(signs < 0)) == n - n // 2:
        notes.append(
            f"global sign from the flip count (odd pb = {n}: {n // 2} flips, not {n - n // 2})"
        )
        return -signs
    return signs


def decode_positions(positions, p: int, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block positions ``k = (i*P + j)*C + ch`` (any int array) -> (i, j, ch), each of the
    same shape."""
    positions = np.asarray(positions)
    return positions // (p * c), (positions // c) % p, positions % c


def dihedral_images(i, j, p: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The 8 images of grid coordinates (i, j) in a P x P grid under the symmetries of the
    square: the 4 rotations of (i, j), then the 4 of its transpose (identity first)."""
    out = []
    for transposed in (False, True):
        a, b = (j, i) if transposed else (i, j)
        for _ in range(4):
            out.append((a, b))
            a, b = b, p - 1 - a  # rotate by 90 degrees
    return out


def symmetric_keys(key: Key, *, channel_orders: bool = True, global_sign: bool = True) -> list[Key]:
    """Keys that differ from ``key`` by a symmetry of the block that correlation
    structure alone cannot resolve.

    The 8 dihedral symmetries of the P x P grid, the C! channel orders (only for C <= 4
    and ``channel_orders``), and the global sign (``flip -> 1 - flip``, with
    ``global_sign``; even pb only). ``key`` is first, no duplicates, the keys with
    ``key``'s global sign first: 96 keys for P = 4, C = 3 (48 of each sign), 48 for
    P = 7, C = 3 (odd pb: no sign twin).
    """
    key = validate_key(key)
    p, c = key.block_size, key.channels
    i, j, ch = decode_positions(key.perm, p, c)
    orders = (
        list(itertools.permutations(range(c))) if channel_orders and c <= 4 else [tuple(range(c))]
    )
    signs = (0, 1) if global_sign and (p * p * c) % 2 == 0 else (0,)
    out, seen = [], set()
    for g in signs:
        for sigma in orders:
            for a, b in dihedral_images(i, j, p):
                perm = (a * p + b) * c + np.asarray(sigma)[ch]
                flip = key.flip ^ np.uint8(g)
                tag = perm.tobytes() + flip.tobytes()
                if tag not in seen:
                    seen.add(tag)
                    out.append(validate_key(Key(perm, flip, p, c)))
    return out


def dihedral_keys(key: Key) -> list[Key]:
    """The distinct keys that differ from ``key`` by a rotation or mirror of the block's
    grid only (same channel order, same flips; ``key`` first)."""
    return symmetric_keys(key, channel_orders=False, global_sign=False)


def decrypt_positions(values, key: Key, axis: int = -1) -> np.ndarray:
    """Undo ``key`` along the position axis of ``values`` (float64, that axis of length
    pb): ``out[..., perm[k], ...] = (1 - 2 flip[k]) * values[..., k, ...]``.

    For normalized blocks (values ``2x - 1``) this is decryption; for the (pb, dim) rows
    of an encrypted kernel (``axis=0``) it gives the plain kernel's rows.
    """
    x = np.asarray(values, np.float64)
    sign_shape = [1] * x.ndim
    sign_shape[axis] = -1
    index = [slice(None)] * x.ndim
    index[axis] = np.asarray(key.perm)
    out = np.empty_like(x)
    out[tuple(index)] = x * (1.0 - 2.0 * np.asarray(key.flip, np.float64)).reshape(sign_shape)
    return out


def key_or_none(perm, flip, p: int, c: int) -> Key | None:
    """The validated key of ``perm``, ``flip`` (pb,) for P x P x C blocks, or None when
    they do not form one (perm not a permutation, or not floor(pb/2) flips)."""
    try:
        return validate_key(Key(np.asarray(perm), np.asarray(flip), p, c))
    except InvalidKeyError:
        return None


def same_key(a: Key, b: Key) -> bool:
    """Whether two keys have the same perm and flip."""
    return bool(np.array_equal(a.perm, b.perm) and np.array_equal(a.flip, b.flip))
