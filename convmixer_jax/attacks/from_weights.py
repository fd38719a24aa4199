"""Key recovery from an encrypted model's patch-embedding kernel (docs/security.md).

The encrypted patch embedding is ``E'[k] = s_k * E[perm[k]]``: the rows of the
(pb, dim) kernel matrix (pb = P*P*C, rows in (row, column, channel) order,
channel fastest) are permuted and sign-flipped (``s_k = -1`` where
``flip[k] == 1``; the paper's normalization mean = std = 0.5, so the bias is
unchanged). Three adversaries, from strongest to weakest knowledge:

- :func:`recover_key_with_reference`: the adversary holds the ORIGINAL plain
  weights (a public pretrained model was encrypted). Each encrypted row is a
  signed copy of one original row; matching rows by absolute cosine
  similarity gives the key exactly.
- :func:`recover_key_with_independent_reference`: the adversary holds an
  INDEPENDENTLY trained model of the same architecture. Its output channels
  (columns) are in another order and basis, so rows cannot be compared
  directly; what can be compared are quantities invariant to the column
  basis: the row correlation matrices ``C = D^-1 E E^T D^-1`` (D = row norms).
  Encryption acts on them as ``C' = S Pm C Pm^T S`` (Pm the permutation
  matrix, S = diag(s)), so recovering the key is a signed graph-matching
  (quadratic assignment) problem between C' and the reference's C.
- :func:`recover_key_from_structure`: the adversary holds only the encrypted
  model. Trained patch-embedding filters are smooth: the C rows of one pixel
  are strongly correlated, and rows of one channel at 4-neighbouring pixels
  are correlated. The absolute-correlation graph of the encrypted rows (invariant to
  the flips) reveals the P x P x C layout up to its symmetries.

What no Gram/correlation-based attack can see: a global sign (``S -> -S``
leaves ``C'`` unchanged, and ``flip -> 1 - flip`` keeps pb/2 ones; an odd pb has
no such twin), and, without a reference, the symmetries of the block that map the
correlation graph to itself (the 8 dihedral symmetries of the P x P grid, the C!
channel orders; :func:`~convmixer_jax.attacks.kernel_algebra.symmetric_keys`). Even a
reference or image statistics cannot separate some of them: the second-order
statistics of a stationary image ensemble are unchanged by the 180-degree rotation of
the block, and, when training used horizontal-flip augmentation, by the horizontal
mirror. The attacks choose among the symmetric keys by stated heuristics, by the
model's own stem BatchNorm statistics on public images
(:func:`~convmixer_jax.attacks.stem_statistics.rank_keys_by_batch_stats`), and finally
by the whole encrypted model's confidence on unlabeled public images
(:func:`~convmixer_jax.attacks.from_model.rerank_by_confidence`, which needs JAX); the
alternatives are returned in ``ModelRecovery.candidates`` so that they can be scored.

The kernel-only attacks are numpy/scipy and deterministic given their inputs and
``seed``; their cost grows with pb (quadratic assignments over the pb rows, from
several starts). Ranking by BatchNorm statistics runs the stem on the public images
once per candidate key, and the confidence re-ranking the whole model once per
candidate. :func:`~convmixer_jax.attacks.from_model.evaluate_recovery` and
:func:`~convmixer_jax.attacks.from_model.accuracy_with_key` measure an attack.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.optimize import linear_sum_assignment

from convmixer_jax.attacks.kernel_algebra import (
    balanced_flip,
    correlation_signs,
    decode_positions,
    kernel_rows,
    key_or_none,
    same_key,
    sign_by_flip_count,
    symmetric_keys,
)
from convmixer_jax.attacks.layout_search import qap_local_maximum
from convmixer_jax.attacks.stem_statistics import rank_keys_by_batch_stats
from convmixer_jax.scheme.keys import Key, validate_key


@dataclasses.dataclass(frozen=True)
class ModelRecovery:
    """The result of a key-recovery attack on an encrypted model.

    perm, flip: (pb,) the estimate (``perm[k]`` = original position of
      encrypted row k, ``flip[k]`` = 1 where the row was negated).

    similarity: (pb,) a per-row match quality in [0, 1] (its meaning depends
      on the attack; 1 = certain).

    key: the estimate as a valid :class:`Key` (perm a permutation, exactly
      pb/2 flips), or None when it is not one (only the plain-reference
      attack can return None; the other two always return a valid key).

    method: which attack produced it.

    notes: what the attack assumed and which choices were heuristic.

    candidates: keys the attack cannot tell apart from ``key`` with its
      invariants (``key`` is ``candidates[0]`` when there are any).
    """

    perm: np.ndarray
    flip: np.ndarray
    similarity: np.ndarray
    key: Key | None
    method: str = "reference"
    notes: str = ""
    candidates: tuple = ()

    def fraction_correct(self, true_key: Key) -> float:
        """Fraction of the pb positions whose (perm, flip) both match ``true_key``."""
        ok = (self.perm == np.asarray(true_key.perm)) & (self.flip == np.asarray(true_key.flip))
        return float(np.mean(ok))


# ---------------------------------------------------------------- helpers


def _correlation(rows: np.ndarray) -> np.ndarray:
    """(n, d) -> (n, n) cosine similarities of the rows."""
    u = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-30)
    return u @ u.T


def _abs_offdiag(c: np.ndarray) -> np.ndarray:
    """|c| with a zero diagonal."""
    a = np.abs(c)
    np.fill_diagonal(a, 0.0)
    return a


# ------------------------------------------------------ (a) a reference kernel


def recover_key_with_reference(encrypted_kernel, reference_kernel) -> ModelRecovery:
    """Estimate the key from an encrypted stem kernel and the ORIGINAL plain kernel.

    Both: (P, P, C, dim) stem kernels (``params['stem']['kernel']``). Each
    encrypted row is matched to the reference row of largest absolute cosine; the
    sign of that cosine gives the flip. ``key`` is None when the matches do not
    form a valid key (which happens only when the reference is not the original).
    """
    enc = np.asarray(encrypted_kernel, np.float64)
    ref = np.asarray(reference_kernel, np.float64)
    if enc.shape != ref.shape or enc.ndim != 4:
        raise ValueError(
            f"kernels must both be (P, P, C, dim) of one shape; got {enc.shape} and {ref.shape}"
        )
    p, _, c, d = enc.shape
    e = enc.reshape(-1, d)
    r = ref.reshape(-1, d)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-30)
    r = r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-30)
    cos = e @ r.T  # (pb, pb): encrypted row k vs reference row j
    perm = np.argmax(np.abs(cos), axis=1).astype(np.int32)
    sim = cos[np.arange(len(perm)), perm]
    flip = (sim < 0).astype(np.uint8)
    key = key_or_none(perm, flip, p, c)
    return ModelRecovery(
        perm=perm,
        flip=flip,
        similarity=np.abs(sim),
        key=key,
        method="reference",
        notes="row matching against the original weights",
    )


def _row_signature(a: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """Per-row features invariant to the key and to the column basis: the sorted
    absolute correlations with the other rows and the log row norm (centred)."""
    ln = np.log(np.maximum(norms, 1e-30))
    return np.concatenate([-np.sort(-a, axis=1), (ln - ln.mean())[:, None]], axis=1)


def _global_sign_from_columns(dec_rows: np.ndarray, ref_rows: np.ndarray) -> float:
    """> 0 when the decrypted kernel's output channels match the reference's
    with positive orientation: columns are paired by linear assignment on
    absolute cosine and the signed cosines of the pairs are summed. (GELU after the
    stem makes a channel and its negation different features, so matched
    channels of two trained models tend to agree in sign.)"""
    x = dec_rows / np.maximum(np.linalg.norm(dec_rows, axis=0, keepdims=True), 1e-30)
    y = ref_rows / np.maximum(np.linalg.norm(ref_rows, axis=0, keepdims=True), 1e-30)
    cos = x.T @ y
    r, c = linear_sum_assignment(-np.abs(cos))
    return float(np.sum(cos[r, c]))


def _profile_agreement(enc_abs: np.ndarray, ref_abs: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """(pb,): for each encrypted row k, the correlation between its absolute-correlation
    profile ``enc_abs[k]`` (pb,) and that of its matched reference row, read in the same
    order (``ref_abs[perm[k]][perm]``); 0 for a constant profile."""
    return np.array(
        [
            np.corrcoef(enc_abs[k], ref_abs[perm[k]][perm])[0, 1] if enc_abs[k].std() > 0 else 0.0
            for k in range(len(perm))
        ]
    )


def recover_key_with_independent_reference(
    encrypted_kernel,
    reference_kernel,
    *,
    seed: int = 0,
    n_starts: int = 8,
    use_structure: bool = True,
    global_sign: str = "columns",
    norm_weight: float = 1.0,
) -> ModelRecovery:
    """Estimate the key with an independently trained reference model's stem kernel.

    encrypted_kernel, reference_kernel: (P, P, C, dim) and (P, P, C, dim_ref)
      stem kernels (dim_ref may differ). The reference is plain (rows in
      block order) but its output channels are unrelated to the encrypted
      model's.

    Invariant to the column basis (so comparable between the two models):
    the row correlation matrices C_enc (of the encrypted rows) and C_ref, and
    the relative row norms. The true key makes ``C_enc[k, l] ~= s_k s_l
    C_ref[perm[k], perm[l]]`` up to how much the two trainings differ.

    Algorithm: (1) permutation: maximize ``sum |C_enc[k,l]| |C_ref[p(k),p(l)]|
    - norm_weight * sum (log-norm mismatch)^2`` (a quadratic assignment
    problem) by iterated linear assignment and pair exchanges, from several
    starts: a linear assignment of per-row signatures (sorted absolute correlations,
    log norm), the layouts found by :func:`recover_key_from_structure` (all
    their symmetric variants; ``use_structure``) and ``n_starts`` random
    permutations drawn from ``seed``; the best objective wins. (2) signs:
    maximize ``sum s_k s_l C_enc[k,l] C_ref[p(k),p(l)]`` (leading eigenvector,
    then single flips), which fixes the flips up to a global sign. (3) the
    global sign, which no basis-invariant quantity can see: with
    ``global_sign='columns'`` (default) from the orientation of the output
    channels, matched between the decrypted and the reference kernel by
    linear assignment; ``'keep'`` leaves the arbitrary one. (4) exactly pb/2
    flips: the pb/2 rows with the strongest evidence for a flip are flipped.
    (5) the 96 block symmetries of the result
    (:func:`~convmixer_jax.attacks.kernel_algebra.symmetric_keys`) are
    scored with the objective (plus the signed term ``sum s_k s_l C_enc[k,l]
    C_ref[p(k),p(l)]``) and the best with the chosen global sign is returned.

    Returns a ModelRecovery whose ``key`` is always valid; ``similarity[k]``
    is the correlation between row k's absolute-correlation profile and that of its
    matched reference row; ``candidates``: the 96 symmetric keys by
    decreasing objective, each followed by its global-sign complement (for
    :func:`~convmixer_jax.attacks.from_model.rerank_by_confidence`).
    """
    enc_rows, p, c = kernel_rows(encrypted_kernel, "encrypted_kernel")
    ref_rows, ref_p, ref_c = kernel_rows(reference_kernel, "reference_kernel")
    if (p, c) != (ref_p, ref_c):
        raise ValueError(f"kernels must share P and C; got {(p, c)} and {(ref_p, ref_c)}")
    if global_sign not in ("columns", "keep"):
        raise ValueError(f"global_sign must be 'columns' or 'keep', got {global_sign!r}")
    n = len(enc_rows)
    # row correlations (signed, and absolute with a zero diagonal), row norms, and the
    # centred log norms of both kernels
    enc_corr, ref_corr = _correlation(enc_rows), _correlation(ref_rows)
    enc_abs, ref_abs = _abs_offdiag(enc_corr), _abs_offdiag(ref_corr)
    enc_norms, ref_norms = np.linalg.norm(enc_rows, axis=1), np.linalg.norm(ref_rows, axis=1)
    enc_log_norms = np.log(np.maximum(enc_norms, 1e-30))
    enc_log_norms -= enc_log_norms.mean()
    ref_log_norms = np.log(np.maximum(ref_norms, 1e-30))
    ref_log_norms -= ref_log_norms.mean()
    unary = (
        -norm_weight * (enc_log_norms[:, None] - ref_log_norms[None, :]) ** 2 * (enc_abs.sum() / n)
    )

    enc_signature = _row_signature(enc_abs, enc_norms)
    ref_signature = _row_signature(ref_abs, ref_norms)
    cost = ((enc_signature[:, None, :] - ref_signature[None, :, :]) ** 2).sum(-1)
    starts = [linear_sum_assignment(cost)[1]]
    if use_structure:
        structure = recover_key_from_structure(encrypted_kernel, seed=seed)
        starts += [
            np.asarray(k.perm) for k in structure.candidates if np.all(k.flip == structure.key.flip)
        ]
    rng = np.random.default_rng(seed)
    starts += [rng.permutation(n) for _ in range(n_starts)]
    best, best_val = None, -np.inf
    for start in starts:
        perm, val = qap_local_maximum(enc_abs, ref_abs, start, unary)
        if val > best_val + 1e-9:
            best, best_val = perm, val

    perm = best
    signs, support = correlation_signs(enc_corr * ref_corr[np.ix_(perm, perm)])
    # signed refinement: with the signs known, match signed correlations.
    enc_signed = enc_corr * np.outer(signs, signs)
    np.fill_diagonal(enc_signed, 0.0)
    ref_offdiag = ref_corr.copy()
    np.fill_diagonal(ref_offdiag, 0.0)
    refined, _ = qap_local_maximum(enc_signed, ref_offdiag, perm, unary)
    if not np.array_equal(refined, perm):
        perm = refined
        signs, support = correlation_signs(enc_corr * ref_corr[np.ix_(perm, perm)])

    notes = ["permutation and relative signs from basis-invariant row correlations"]
    decrypted = np.zeros_like(enc_rows)
    decrypted[perm] = enc_rows * signs[:, None]
    if global_sign == "columns":
        orient = _global_sign_from_columns(decrypted, ref_rows)
        if orient < 0:
            signs = -signs  # the support s_k (W s)_k does not change with the global sign
        notes.append(
            f"global sign from output-channel orientation (matched signed-cosine sum {orient:+.3f})"
        )
    else:
        notes.append("global sign arbitrary (not observable from correlations)")
    signs = sign_by_flip_count(signs, notes)
    flip = balanced_flip(-signs * (np.abs(support) + 1e-12))
    if int(np.sum(signs < 0)) != n // 2:
        notes.append(
            f"sign estimate had {int(np.sum(signs < 0))} flips; balanced to pb/2 = {n // 2}"
        )

    key = validate_key(Key(perm.astype(np.int32), flip, p, c))
    # The block symmetries of this key, ranked by the objective (the chosen
    # global sign first: the objective cannot see it). The reference may not
    # resolve all of them: for stationary image statistics the 180-degree
    # rotation leaves every second-order statistic unchanged, and with
    # horizontal-flip augmentation so does the mirror.
    cands = symmetric_keys(key)  # the first half keeps key's global sign

    def objective(k):
        q = np.asarray(k.perm)
        sg = 1.0 - 2.0 * np.asarray(k.flip, np.float64)
        return float(
            np.sum(enc_abs * ref_abs[np.ix_(q, q)])
            + unary[np.arange(n), q].sum()
            + np.sum(enc_corr * np.outer(sg, sg) * ref_offdiag[np.ix_(q, q)])
        )

    score = np.array([objective(k) for k in cands])
    # by decreasing objective, each layout followed by its global-sign twin (even pb; the sign
    # is the least reliable part: re-rankers should see both)
    half = len(cands) // 2
    order = (
        list(np.argsort(-score, kind="stable"))
        if n % 2
        else [j for i in np.argsort(-score[:half], kind="stable") for j in (i, i + half)]
    )
    cands = tuple(cands[i] for i in order)
    if not same_key(cands[0], key):
        notes.append("a block symmetry of the matching scored higher and was taken")
        key = cands[0]
    return ModelRecovery(
        perm=key.perm,
        flip=key.flip,
        similarity=np.clip(
            np.nan_to_num(_profile_agreement(enc_abs, ref_abs, np.asarray(key.perm))), 0, 1
        ),
        key=key,
        method="independent-reference",
        notes="; ".join(notes),
        candidates=cands,
    )


# --------------------------------------------------- (b) encrypted model only


def _group_rows(a: np.ndarray, size: int) -> np.ndarray:
    """Partition n rows into n/size groups of ``size`` maximizing the summed
    within-group affinity ``a`` (greedy seeding, then best-improvement swaps).
    Returns (n,) group labels."""
    n = len(a)
    if size == 1:
        return np.arange(n)
    label = -np.ones(n, np.int64)
    for g in range(n // size):
        free = np.flatnonzero(label < 0)
        sub = a[np.ix_(free, free)]
        x, y = np.unravel_index(int(np.argmax(sub)), sub.shape)
        members = [free[x], free[y]]
        while len(members) < size:
            free = np.flatnonzero((label < 0) & ~np.isin(np.arange(n), members))
            members.append(free[int(np.argmax(a[np.ix_(free, members)].sum(1)))])
        label[members] = g
    for _ in range(10 * n):
        onehot = np.eye(n // size)[label]
        s = a @ onehot  # s[u, g]: affinity of row u to group g
        own = s[np.arange(n), label]
        su = s[:, label]  # su[u, v] = s[u, label[v]]
        delta = su + su.T - 2 * a - own[:, None] - own[None, :]
        delta[label[:, None] == label[None, :]] = -np.inf
        x, y = np.unravel_index(int(np.argmax(delta)), delta.shape)
        if delta[x, y] <= 1e-12:
            break
        label[x], label[y] = label[y], label[x]
    return label


def _pixel_affinity(a: np.ndarray, members: np.ndarray) -> np.ndarray:
    """(n_pix, n_pix) affinity of pixel groups (rows ``members`` (n_pix, C)):
    the summed absolute-correlation of their rows matched channel to channel (the
    best of the C! matchings). Same-channel rows of neighbouring pixels are
    correlated, cross-channel ones much less, so matching sharpens the
    neighbour signal (summing all C*C pairs lets wrap-around and diagonal
    pairs win on narrow kernels)."""
    n_pix = len(members)
    w = np.zeros((n_pix, n_pix))
    for g in range(n_pix):
        for h in range(g + 1, n_pix):
            blk = a[np.ix_(members[g], members[h])]
            r, col = linear_sum_assignment(-blk)
            w[g, h] = w[h, g] = blk[r, col].sum()
    return w


def _grid_adjacency(p: int) -> np.ndarray:
    ij = np.stack(np.divmod(np.arange(p * p), p), 1)
    return (np.abs(ij[:, None, :] - ij[None, :, :]).sum(-1) == 1).astype(np.float64)


def _label_channels(a: np.ndarray, members: np.ndarray, adj: np.ndarray) -> np.ndarray:
    """Order the rows of each pixel group so that label l means the same
    channel everywhere: for grid-adjacent groups, same-channel rows are the
    most correlated. members: (n_pix, C) row indices; adj: (n_pix, n_pix)
    adjacency of the groups. Returns members reordered (column = label)."""
    n_pix, c = members.shape
    out = members.copy()
    done = np.zeros(n_pix, bool)
    done[0] = True
    order = [0]
    while len(order) < n_pix:  # breadth first from group 0
        cand = np.flatnonzero(~done & (adj[done].sum(0) > 0))
        if len(cand) == 0:
            cand = np.flatnonzero(~done)[:1]
        q = cand[int(np.argmax(adj[np.ix_(done, cand)].sum(0)))] if adj[done].sum() else cand[0]
        nb = np.flatnonzero(done & (adj[q] > 0))
        score = sum(a[np.ix_(out[q], out[m])] for m in nb) if len(nb) else np.eye(c)
        _, col = linear_sum_assignment(-score)  # row out[q][r] gets label col[r]
        new = np.empty(c, np.int64)
        new[col] = out[q]
        out[q] = new
        done[q] = True
        order.append(q)
    for _ in range(20):  # coordinate ascent with all neighbours
        changed = False
        for q in range(n_pix):
            nb = np.flatnonzero(adj[q] > 0)
            if not len(nb):
                continue
            score = sum(a[np.ix_(out[q], out[m])] for m in nb)
            _, col = linear_sum_assignment(-score)
            new = np.empty(c, np.int64)
            new[col] = out[q]
            if not np.array_equal(new, out[q]):
                out[q], changed = new, True
        if not changed:
            break
    return out


def _channel_order_heuristic(
    c_signed: np.ndarray, norms: np.ndarray, layout: np.ndarray, c: int
) -> tuple[np.ndarray, str]:
    """Map labels to physical channels. layout: (n_pix, C) row indices by label.
    For C = 3: the two labels whose rows are most correlated within a pixel are
    taken to be R and G (observed in trained CIFAR-10 stems: R-G filters are
    more alike than R-B or G-B), the one of them with the larger mean row norm
    is G (green carries the most luminance), the third label is B. For other C:
    labels in order of decreasing mean row norm."""
    lab_norm = norms[layout].mean(0)
    if c != 3:
        return np.argsort(
            np.argsort(-lab_norm, kind="stable"), kind="stable"
        ), "channels ordered by row norm"
    pair = {}
    for x, y in ((0, 1), (0, 2), (1, 2)):
        pair[(x, y)] = float(np.mean(np.abs(c_signed[layout[:, x], layout[:, y]])))
    (x, y) = max(pair, key=pair.get)
    b = 3 - x - y
    g, rr = (x, y) if lab_norm[x] >= lab_norm[y] else (y, x)
    phys = np.empty(3, np.int64)
    phys[rr], phys[g], phys[b] = 0, 1, 2
    return phys, (
        "channel order: most correlated label pair = {R, G}, larger norm = G "
        f"(pair correlations {pair[(0, 1)]:.3f}/{pair[(0, 2)]:.3f}/{pair[(1, 2)]:.3f})"
    )


def recover_key_from_structure(
    encrypted_kernel,
    *,
    seed: int = 0,
    n_starts: int = 200,
    stem_bias=None,
    stem_bn_mean=None,
    stem_bn_var=None,
    public_images=None,
    n_images: int = 64,
    activation: str = "gelu",
    gelu_approximate: bool = False,
) -> ModelRecovery:
    """Estimate the key from the encrypted stem kernel alone.

    encrypted_kernel: (P, P, C, dim). Assumed: the plain stem is a trained
    one, whose rows of one pixel (C channels) are the most correlated and
    whose same-channel rows of 4-neighbouring pixels are the next most
    correlated (true of the trained CIFAR-10 stems measured; a random kernel
    has no such structure and gives a random key).

    Steps, all on absolute correlations (invariant to the flips): (1) group the pb
    rows into P*P groups of C (same pixel); (2) place the groups on the P x P
    grid so that the summed channel-matched affinity
    (``_pixel_affinity``) of grid-adjacent groups is maximal (a
    quadratic assignment, ``n_starts`` starts from ``seed``); (3) label the
    rows within each group so that same-label rows of adjacent groups are the
    most correlated (same channel); (4) signs that make the within-pixel and
    same-channel neighbour correlations positive (up to a global sign).

    That fixes the key up to the block's symmetries, which correlations cannot
    resolve: the 8 dihedral symmetries of the grid, the C! channel orders, and
    the global sign (96 keys for P = 4, C = 3; all in ``candidates``). The
    returned ``key`` is chosen among them as follows:

    - If ``stem_bias``, ``stem_bn_mean``, ``stem_bn_var`` (the encrypted
      model's ``params['stem']['bias']`` and ``batch_stats['stem_bn']``) and
      ``public_images`` (N, H, W, C) natural images in [0, 1] or uint8 (any
      public images, not the client's) are given: the candidate whose stem
      statistics on the public images best match the model's BatchNorm
      running statistics
      (:func:`~convmixer_jax.attacks.stem_statistics.rank_keys_by_batch_stats`, with the
      model's ``activation``: 'gelu', exact or with ``gelu_approximate`` tanh, or 'relu').
    - Otherwise by heuristics: channel order by
      ``_channel_order_heuristic``; with ``stem_bias`` and
      ``stem_bn_mean`` the global sign that makes the output channels' DC
      gains (sum of their kernel column) correlate negatively with the
      BatchNorm running mean (an empirical prior observed on the trained
      stems, not a law), else arbitrary; the dihedral orientation is
      arbitrary (the grid solution's own). So without images expect the
      layout right only up to the grid symmetry (1 chance in 8).
    """
    rows, p, c = kernel_rows(encrypted_kernel, "encrypted_kernel")
    n = len(rows)
    corr = _correlation(rows)
    abs_corr = _abs_offdiag(corr)
    norms = np.linalg.norm(rows, axis=1)
    notes = []

    label = _group_rows(abs_corr, c)
    n_pix = p * p
    members = np.stack([np.flatnonzero(label == g) for g in range(n_pix)])  # (n_pix, C)
    affinity = _pixel_affinity(abs_corr, members)
    grid_adj = _grid_adjacency(p)
    rng = np.random.default_rng(seed)
    best, best_val = None, -np.inf
    for i in range(max(1, n_starts)):
        start = np.arange(n_pix) if i == 0 else rng.permutation(n_pix)
        pos, val = qap_local_maximum(affinity, grid_adj, start)
        if val > best_val + 1e-9:
            best, best_val = pos, val
    pos = best  # group g sits at grid position pos[g]
    adj = grid_adj[np.ix_(pos, pos)]
    layout = _label_channels(abs_corr, members, adj)  # (n_pix, C): row of group g with label l

    phys, note = _channel_order_heuristic(corr, norms, layout, c)
    notes.append(note)
    perm = np.empty(n, np.int64)
    for g in range(n_pix):
        perm[layout[g]] = pos[g] * c + phys
    # signs: within-pixel and same-channel neighbour pairs should be positive.
    ii, jj, ch = decode_positions(perm, p, c)
    dist = np.abs(ii[:, None] - ii[None, :]) + np.abs(jj[:, None] - jj[None, :])
    mask = ((dist == 0) | ((dist == 1) & (ch[:, None] == ch[None, :]))).astype(np.float64)
    signs, support = correlation_signs(corr, mask)

    # global sign heuristic from the bias and BatchNorm mean (images not needed)
    if stem_bias is not None and stem_bn_mean is not None:
        dc = (rows * signs[:, None]).sum(0)  # DC gain of each output channel with these signs
        bn_mean = np.asarray(stem_bn_mean, np.float64)
        # Empirical, not derived: in the trained CIFAR-10 stems measured, output
        # channels with a larger DC gain (true sign) have a smaller BatchNorm
        # running mean. A weak statistic (|corr| ~ 0.1-0.2); see docs/security.md.
        orient = (
            float(np.corrcoef(dc, bn_mean)[0, 1]) if dc.std() > 0 and bn_mean.std() > 0 else 0.0
        )
        if orient > 0:
            signs = -signs
        notes.append(
            f"global sign from corr(DC gain, BN mean) = {orient:+.3f} (empirical prior: < 0)"
        )
    else:
        notes.append("global sign arbitrary")
    signs = sign_by_flip_count(signs, notes)
    flip = balanced_flip(-signs * (np.abs(support) + 1e-12))
    key = validate_key(Key(perm.astype(np.int32), flip, p, c))
    cands = symmetric_keys(key)

    if (
        public_images is not None
        and stem_bias is not None
        and stem_bn_mean is not None
        and stem_bn_var is not None
    ):
        scores = rank_keys_by_batch_stats(
            encrypted_kernel,
            stem_bias,
            stem_bn_mean,
            stem_bn_var,
            cands,
            public_images,
            n_images=n_images,
            activation=activation,
            gelu_approximate=gelu_approximate,
        )
        order = np.argsort(scores, kind="stable")
        cands = [cands[i] for i in order]
        key = cands[0]
        notes.append(
            f"chosen among {len(cands)} symmetric keys by stem BatchNorm statistics on "
            f"public images (mismatch {scores[order[0]]:.4g}, next {scores[order[1]]:.4g})"
        )
    else:
        notes.append("dihedral orientation arbitrary")
    sim = np.clip(np.abs(support) / max(np.abs(support).max(), 1e-30), 0, 1)
    return ModelRecovery(
        perm=key.perm,
        flip=key.flip,
        similarity=sim,
        key=key,
        method="structure",
        notes="; ".join(notes),
        candidates=tuple(cands),
    )
