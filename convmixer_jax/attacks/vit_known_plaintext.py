"""Known-plaintext recovery of a key with block scrambling (docs/method.md, "Extension:
block scrambling and Vision Transformers").

Such a key is a pixel key (one signed permutation of the pb = M*M*C values of a block,
the same for every block) and ``block_perm`` (gh*gw,): the encrypted image's block b is
the plain block ``block_perm[b]`` with the pixel key applied. The ConvMixer attack
(:func:`~convmixer_jax.attacks.known_plaintext.recover_key`) compares each plain block with
the encrypted block at the same place; here the blocks have moved, so they are first
matched up, and :func:`recover_scrambled_key_known_plaintext` returns the whole key when it
is the only one that explains the pairs.

How it works
------------
1. The pixel key moves a block's values and replaces some of them ``v`` by ``255 - v``
   (``1 - x`` in float), so the multiset of ``min(v, 255 - v)`` over the block's pb values
   does not change (the key's permutation runs over the channels too, so the multiset is
   over all of them). An encrypted block at b can only hold a plain block q with the same
   multiset in every pair: these are the *candidate* places of b.
2. Blocks whose values are identical in every pair (flat regions, repeated blocks) are
   one *content class*: the pairs cannot tell its members apart. The candidates form a
   bipartite graph between the encrypted and the plain classes, whose members must be
   paired one to one (``block_perm`` is a permutation); edges that no such pairing uses
   are dropped (a maximum flow and the strongly connected components of its residual
   graph).
3. An encrypted class with one candidate class left is a known plain/encrypted block pair.
   All of them go to :func:`~convmixer_jax.attacks.known_plaintext.recover_key`, which
   gives every pixel position's options (plain position and flip) left by some key that
   explains them.
4. A remaining candidate (encrypted class, plain class) is dropped unless each of its pb
   encrypted values is explained by one of its position's options. New known pairs go
   back to step 3, until nothing changes.

A block is determined when it has one candidate plain block; the key is returned only
when the pixel key is determined, every block is, and encrypting the plain images with
the key gives the encrypted images back. Every step drops only what no key can use, so a
returned key is the only one the pairs support; blocks the pairs cannot tell apart and
pixel positions they leave open are counted instead, never guessed.

NumPy and SciPy only.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.sparse import csr_array
from scipy.sparse.csgraph import connected_components, maximum_flow

from convmixer_jax.attacks.known_plaintext import (
    FLOAT_TOLERANCE,
    RecoveryResult,
    check_pair,
    raw_candidates,
    recover_key,
)
from convmixer_jax.scheme.blocks import from_blocks, grid_shape, to_blocks
from convmixer_jax.scheme.images import (
    ImageError,
    check_not_empty,
    encrypt_images_reference,
)
from convmixer_jax.scheme.keys import InvalidKeyError, Key, check_grid, make_key


@dataclasses.dataclass(frozen=True, eq=False)
class ScrambledKnownPlaintextResult:
    """What plain/encrypted pairs reveal about a key with block scrambling.

    Attributes:
      key: the key (``perm``, ``flip``, ``block_perm`` on ``grid``) when ``determined``,
        else None.
      determined: the pairs admit exactly this key: every pixel position and every block
        determined, and the key encrypts the plain images to the encrypted ones.
      consistent: False when no key with block scrambling explains the pairs; ``reason``
        then says why.
      reason: why the key is not determined ('' when it is).
      undetermined_positions: pixel positions (of pb) whose plain position and flip are
        not unique (pb when no block could be paired).
      undetermined_blocks: blocks (of gh*gw) with more than one candidate place.
      perm, flip: (pb,) int64, the pixel key where determined, else -1.
      block_perm: (gh*gw,) int64; ``block_perm[b]`` is the plain block at encrypted
        position b where determined, else -1.
      block_candidates: (gh*gw,) int64, how many plain positions remain for each encrypted
        block position.
      pixel: the pixel-key recovery from the paired blocks, or None when none was paired.
      block_size, channels, grid, pairs: M, C, (gh, gw) and the number of image pairs.
    """

    key: Key | None
    determined: bool
    consistent: bool
    reason: str
    undetermined_positions: int
    undetermined_blocks: int
    perm: np.ndarray
    flip: np.ndarray
    block_perm: np.ndarray
    block_candidates: np.ndarray
    pixel: RecoveryResult | None
    block_size: int
    channels: int
    grid: tuple[int, int]
    pairs: int


# --------------------------------------------------------------------------- checks


def _checked(plain, encrypted, block_size: int, grid) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays as (N, H, W, C) after the checks; one-line errors."""
    plain, encrypted, _ = check_pair(plain, encrypted, block_size)
    if plain.ndim == 3:
        plain, encrypted = plain[None], encrypted[None]
    check_not_empty(plain.shape)
    if not len(plain):
        raise ImageError("no image pairs given; pass at least one plain/encrypted pair")
    h, w = plain.shape[1:3]
    if grid is not None:
        gh, gw = check_grid(grid)
        if (gh, gw) != grid_shape(h, w, block_size):
            raise InvalidKeyError(
                f"the grid {gh} x {gw} does not fit {h} x {w} images in {block_size} x "
                f"{block_size} blocks ({h // block_size} x {w // block_size}); pass the "
                "key's grid with images of its size, or leave grid out"
            )
    return plain, encrypted


# --------------------------------------------------------------------------- classes


def _content_classes(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """blocks (n, N, pb) -> (class of each block (n,), first member of each class):
    blocks with identical values in every pair share a class."""
    _, first, inverse = np.unique(
        blocks.reshape(len(blocks), -1), axis=0, return_index=True, return_inverse=True
    )
    return inverse.reshape(-1), first


def _signatures(blocks: np.ndarray, tol: float | None) -> np.ndarray:
    """(n, N, pb) -> (n, N*pb): per pair, the sorted ``min(v, 255 - v)`` (``min(x, 1 - x)``)
    of each block: what the pixel key leaves unchanged."""
    if tol is None:
        v = blocks.astype(np.int64)
        folded = np.minimum(v, 255 - v)
    else:
        folded = np.minimum(blocks, 1.0 - blocks)
    return np.sort(folded, axis=-1).reshape(len(blocks), -1)


def _signature_edges(sig_e: np.ndarray, sig_p: np.ndarray, tol: float | None):
    """(ea, ec): the pairs (encrypted class, plain class) whose signatures agree (exactly,
    or within ``tol`` in every value)."""
    ue, ge = np.unique(sig_e, axis=0, return_inverse=True)
    up, gp = np.unique(sig_p, axis=0, return_inverse=True)
    ge, gp = ge.reshape(-1), gp.reshape(-1)
    width = 0.0 if tol is None else tol * sig_e.shape[1]
    sums_p = up.sum(axis=1)
    order = np.argsort(sums_p, kind="stable")
    sorted_sums = sums_p[order]
    members_e = [np.flatnonzero(ge == g) for g in range(len(ue))]
    members_p = [np.flatnonzero(gp == g) for g in range(len(up))]
    ea, ec = [], []
    for g, s in enumerate(ue.sum(axis=1)):  # only signatures of about the same sum can agree
        lo = np.searchsorted(sorted_sums, s - width, side="left")
        hi = np.searchsorted(sorted_sums, s + width, side="right")
        for h in order[lo:hi]:
            agree = (
                np.array_equal(ue[g], up[h])
                if tol is None
                else bool((np.abs(ue[g] - up[h]) <= tol).all())
            )
            if agree:
                a, c = np.meshgrid(members_e[g], members_p[h], indexing="ij")
                ea.append(a.reshape(-1))
                ec.append(c.reshape(-1))
    if not ea:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(ea), np.concatenate(ec)


# --------------------------------------------------------------------------- one-to-one


def _usable_edges(ea, ec, count_e, count_p) -> np.ndarray | None:
    """Bool mask over the edges (ea[i], ec[i]) used by some pairing of the blocks (each
    encrypted class a sends its count_e[a] blocks, each plain class c receives count_p[c]);
    None when no pairing exists."""
    n_a, n_c = len(count_e), len(count_p)
    total = int(count_e.sum())
    source, sink = n_a + n_c, n_a + n_c + 1
    rows = np.concatenate([np.full(n_a, source), ea, n_a + np.arange(n_c)])
    cols = np.concatenate([np.arange(n_a), n_a + ec, np.full(n_c, sink)])
    caps = np.concatenate([count_e, count_e[ea], count_p]).astype(np.int32)
    graph = csr_array((caps, (rows, cols)), shape=(n_a + n_c + 2,) * 2)
    result = maximum_flow(graph, source, sink)
    if int(result.flow_value) != total:
        return None
    flow = np.asarray(result.flow[ea, n_a + ec]).reshape(-1)
    # residual graph over the classes: a -> c along every edge, c -> a where flow runs
    r_rows = np.concatenate([ea, n_a + ec[flow > 0]])
    r_cols = np.concatenate([n_a + ec, ea[flow > 0]])
    residual = csr_array((np.ones(len(r_rows), np.int8), (r_rows, r_cols)), shape=(n_a + n_c,) * 2)
    _, component = connected_components(residual, directed=True, connection="strong")
    return (flow > 0) | (component[ea] == component[n_a + ec])


# --------------------------------------------------------------------------- pixel key


def _pixel_evidence(e_rep, p_rep, m: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    """Known block pairs (n, N, pb) as images (N, M, n*M, C) for recover_key."""

    def images(blocks):
        return from_blocks(np.moveaxis(blocks, 0, 1)[:, None], m, c)

    return images(p_rep), images(e_rep)


def _explained(options: np.ndarray, e_block, p_block, tol) -> bool:
    """Whether every encrypted value of e_block (N, pb) is the plain value of p_block at
    one of its position's ``options`` (pb, pb, 2), flipped as that option says."""
    return bool((raw_candidates(p_block, e_block, tol) & options).any(axis=(1, 2)).all())


def _reproduces(key: Key, plain: np.ndarray, encrypted: np.ndarray, tol) -> bool:
    got = encrypt_images_reference(plain, key)
    if tol is None:
        return bool(np.array_equal(got, encrypted))
    return bool(np.all(np.abs(got.astype(np.float64) - encrypted.astype(np.float64)) <= tol))


# --------------------------------------------------------------------------- entry point


def recover_scrambled_key_known_plaintext(
    plain, encrypted, block_size: int, grid=None
) -> ScrambledKnownPlaintextResult:
    """Recover a key with block scrambling from plain images and their encrypted versions.

    Args:
      plain, encrypted: (N, H, W, C) or (H, W, C) arrays of the same shape and dtype,
        uint8 or float in [0, 1]; ``encrypted[n]`` is ``plain[n]`` encrypted with the key
        sought (one that scrambles the blocks of the H/M x W/M grid).
      block_size: M; H and W must be multiples of it.
      grid: (gh, gw), optional: the key's grid, checked against the images' grid.

    Returns a :class:`ScrambledKnownPlaintextResult`: the key only when the pairs admit no
    other, else what they determine. Raises
    :class:`~convmixer_jax.scheme.images.ImageError` for mismatched or malformed arrays
    and :class:`~convmixer_jax.scheme.keys.InvalidKeyError` for a grid that does not fit
    the images or a block size and channel count that give no key.
    """
    plain, encrypted = _checked(plain, encrypted, block_size, grid)
    m, c = int(block_size), int(plain.shape[-1])
    n_pairs = len(plain)
    gh, gw = grid_shape(plain.shape[1], plain.shape[2], m)
    n_blocks, pb = gh * gw, m * m * c
    if plain.dtype == np.uint8:
        tol, work_p, work_e = None, plain, encrypted
    else:
        tol = max(FLOAT_TOLERANCE, 2 * float(np.finfo(plain.dtype).eps))
        work_p, work_e = plain.astype(np.float64), encrypted.astype(np.float64)

    def by_position(x):  # (N, H, W, C) -> (gh*gw, N, pb)
        return np.moveaxis(to_blocks(x, m).reshape(n_pairs, n_blocks, pb), 0, 1)

    blocks_p, blocks_e = by_position(work_p), by_position(work_e)
    raw_p, raw_e = by_position(plain), by_position(encrypted)
    class_p, first_p = _content_classes(blocks_p)
    class_e, first_e = _content_classes(blocks_e)
    count_p = np.bincount(class_p, minlength=len(first_p))
    count_e = np.bincount(class_e, minlength=len(first_e))
    rep_p, rep_e = blocks_p[first_p], blocks_e[first_e]
    ea, ec = _signature_edges(_signatures(rep_e, tol), _signatures(rep_p, tol), tol)

    pixel: RecoveryResult | None = None
    reason = ""
    consistent = True
    known = np.zeros(len(first_e), bool)  # encrypted classes already given to recover_key
    while True:
        usable = _usable_edges(ea, ec, count_e, count_p)
        if usable is None:
            consistent = False
            reason = (
                "the encrypted blocks cannot be paired one to one with plain blocks that hold "
                "the same values up to the pixel key"
            )
            break
        ea, ec = ea[usable], ec[usable]
        degree = np.bincount(ea, minlength=len(first_e))
        single = degree == 1
        if not single.any() or (single == known).all():
            break
        known = single
        partner = np.full(len(first_e), -1)
        partner[ea[single[ea]]] = ec[single[ea]]
        pairs = np.flatnonzero(single)
        pixel = recover_key(
            *_pixel_evidence(raw_e[first_e[pairs]], raw_p[first_p[partner[pairs]]], m, c), m
        )
        if not pixel.consistent:
            consistent = False
            reason = f"the paired blocks fit no pixel key: {pixel.reason}"
            break
        open_edges = np.flatnonzero(~single[ea])
        keep = np.ones(len(ea), bool)
        for i in open_edges:
            keep[i] = _explained(pixel.candidates, rep_e[ea[i]], rep_p[ec[i]], tol)
        ea, ec = ea[keep], ec[keep]

    degree = np.bincount(ea, minlength=len(first_e))
    options_of = np.zeros(len(first_e), np.int64)  # plain blocks each encrypted class may be
    np.add.at(options_of, ea, count_p[ec])
    block_candidates = options_of[class_e]
    block_perm = np.full(n_blocks, -1, np.int64)
    one = (degree == 1) & (options_of == 1)
    partner = np.full(len(first_e), -1)
    partner[ea[one[ea]]] = ec[one[ea]]
    placed = one[class_e]
    block_perm[placed] = first_p[partner[class_e[placed]]]
    if not consistent:
        block_perm[:] = -1
    undetermined_blocks = int((block_perm < 0).sum())

    if pixel is None:
        perm, flip = np.full(pb, -1, np.int64), np.full(pb, -1, np.int64)
        undetermined_positions = pb
    else:
        perm, flip = pixel.perm, pixel.flip
        undetermined_positions = pixel.undetermined if consistent else pb

    key = None
    if consistent and undetermined_positions == 0 and undetermined_blocks == 0:
        key = make_key(perm, flip, m, c, block_perm, (gh, gw))
        if not _reproduces(key, plain, encrypted, tol):
            key, consistent = None, False
            reason = "the only key the blocks allow does not encrypt the plain images as given"
    if consistent and key is None:
        parts = []
        if undetermined_positions:
            parts.append(f"{undetermined_positions} of {pb} pixel positions")
        if undetermined_blocks:
            parts.append(f"{undetermined_blocks} of {n_blocks} blocks")
        reason = (
            f"the pairs leave {' and '.join(parts)} undetermined (flat, gray or repeated "
            "blocks); add pairs"
        )
    return ScrambledKnownPlaintextResult(
        key=key,
        determined=key is not None,
        consistent=consistent,
        reason=reason,
        undetermined_positions=int(undetermined_positions),
        undetermined_blocks=undetermined_blocks,
        perm=np.asarray(perm, np.int64),
        flip=np.asarray(flip, np.int64),
        block_perm=block_perm,
        block_candidates=block_candidates,
        pixel=pixel,
        block_size=m,
        channels=c,
        grid=(gh, gw),
        pairs=n_pairs,
    )
