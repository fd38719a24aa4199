"""Recovery of a block-scrambling key: the permutation of block positions that a ViT
absorbs into its position embedding (docs/security.md, docs/method.md "Extension: block
scrambling and Vision Transformers").

A key with block scrambling is a pixel key (the signed permutation of the pb = M*M*C values
of every block) plus ``block_perm`` (gh*gw,): the encrypted image's block b is the plain
block ``block_perm[b]``, and the encrypted ViT's patch row b of the position embedding is
the plain row ``block_perm[b]``. Three kinds of evidence recover ``block_perm``:

- **The encrypted model's position embedding** (:func:`block_perm_from_pos_embed`). A
  trained ViT's learned position embedding is smooth over the 2-D grid: rows of
  neighbouring positions are similar. The rows are placed on the grid by a quadratic
  assignment of their similarities to a template that decays with grid distance (spectral
  and random starts), the template is then re-estimated from the placement (the mean
  similarity at each grid offset) and the assignment solved again. The similarities
  cannot tell the grid's rotations and mirrors apart: the result is a set of candidates,
  8 for a square grid, 4 for another.
- **Encrypted queries** (:func:`solve_jigsaw`). Once the pixel key is known, the
  queries' blocks are the plain blocks in scrambled places, the same places in every
  query: a jigsaw whose evidence adds up over the queries. The compatibility of block i
  left of (or above) block j is the log-likelihood ratio, in nats, of their edge under
  "neighbours" versus "unrelated" (:func:`edge_evidence`); blocks are placed by growing
  the puzzle from its most compatible pairs, then by exchanges of two blocks (the
  quadratic-assignment searches of :mod:`~convmixer_jax.attacks.layout_search`).
- **Choosing among symmetric candidates** (:func:`choose_symmetry`): the queries decrypted
  with each candidate (the edges across blocks only join up when the blocks' contents and
  their places are rotated alike), then the encrypted model's confidence on public
  images encrypted with each candidate (:func:`model_confidence`), or, without a model,
  how well the decrypted queries fit the coarse layout of public images (light from above).
  One ambiguity remains by construction: a model trained with horizontal-flip
  augmentation is as confident on mirrored images, so the key and its mirror twin
  (:func:`mirrored_key`, which decrypts every query to its mirror image) tie; the result
  says when the key is determined only up to that mirror.

Two whole attacks combine them: :func:`recover_scrambled_key_from_model` (the encrypted
ViT, with encrypted queries and/or public images) and
:func:`recover_scrambled_key_ciphertext_only` (encrypted queries, public images and a
block template; the encrypted model's kernel may add the pixel key's candidates).

Every result says how sure it is: ``determined`` is True only when each decision clears a
stated threshold (:data:`POSITION_MARGIN`, :data:`POSITION_STRUCTURE`,
:data:`JIGSAW_MARGIN`, :data:`JIGSAW_HITS`, :data:`EDGE_MARGIN`,
:data:`CONFIDENCE_Z`); the best guess is returned either way.

NumPy and SciPy, apart from :func:`model_confidence` and the confidence ranking, which run
the model with JAX.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from convmixer_jax.attacks.kernel_algebra import (
    balanced_flip,
    correlation_signs,
    decrypt_positions,
    dihedral_keys,
    same_key,
)
from convmixer_jax.attacks.layout_search import iterated_local_search, local_search, search
from convmixer_jax.scheme.blocks import from_blocks, normalized_blocks, permute_blocks, to_blocks
from convmixer_jax.scheme.keys import Key, check_grid, flip_ones, make_key

#: nats (in the Gaussian model of the similarities around the fitted template) by which the
#: placement of the position rows must beat every exchange of two rows and every other
#: placement the search found (other than its grid symmetries).
POSITION_MARGIN = 8.0
#: how far the fit of the placed rows (the correlation of their similarities with the
#: fitted template) must exceed the best fit of the same search on rows whose columns were
#: shuffled independently (rows with no grid structure).
POSITION_STRUCTURE = 0.15
#: nats by which the jigsaw's placement must beat every exchange of two blocks.
JIGSAW_MARGIN = 10.0
#: growth seeds whose search must end in the chosen placement (one alone may be a fluke).
JIGSAW_HITS = 2
#: nats by which the decrypted queries' edges must prefer the chosen candidate's class of
#: candidates (those that differ by a rotation, mirror or colour change of the whole
#: image, which leave the edges unchanged) to every other candidate.
EDGE_MARGIN = 10.0
#: paired z-score (mean per-image difference over its standard error) by which the chosen
#: candidate must beat the next in confidence (or fit to public images).
CONFIDENCE_Z = 4.0
#: weight of "unrelated" in the likelihood of a neighbouring pair's edge in one image (an
#: object boundary can run along a block edge): it bounds what one image can say against
#: a pair.
OUTLIER_RATE = 0.05


# ----------------------------------------------------------------------------- symmetries


def dihedral_maps(height: int, width: int) -> list[np.ndarray | None]:
    """The 8 rotations and mirrors of a height x width grid of cells numbered in raster
    order: for each, the (height*width,) map ``g[u]`` = where cell u goes, or None when the
    symmetry does not map the grid onto itself (the quarter turns and transposes of a
    non-square grid). Order: identity, the three quarter turns, then the transpose and its
    three quarter turns (as :func:`~convmixer_jax.attacks.kernel_algebra.dihedral_images`)."""
    i, j = np.divmod(np.arange(height * width), width)
    out: list[np.ndarray | None] = []
    for transposed in (False, True):
        a, b, h, w = (j, i, width, height) if transposed else (i, j, height, width)
        for _ in range(4):
            out.append((a * w + b).astype(np.int64) if (h, w) == (height, width) else None)
            a, b, h, w = b, h - 1 - a, w, h  # a quarter turn
    return out


def grid_symmetries(grid) -> list[np.ndarray]:
    """The symmetries of a gh x gw grid of blocks as maps (gh*gw,) of block positions,
    identity first: 8 for a square grid, 4 (identity, half turn, two mirrors) otherwise."""
    gh, gw = check_grid(grid)
    return [g for g in dihedral_maps(gh, gw) if g is not None]


def _mirror_index(height: int, width: int) -> int:
    i, j = np.divmod(np.arange(height * width), width)
    want = i * width + (width - 1 - j)
    return next(
        e
        for e, g in enumerate(dihedral_maps(height, width))
        if g is not None and np.array_equal(g, want)
    )


def _transformed_key(key: Key, element: int) -> Key:
    """The key that decrypts every image encrypted with ``key`` to its image under dihedral
    symmetry ``element`` (an index of :func:`dihedral_maps`, which must map the key's grid
    onto itself): ``encrypt(g(x), result) == encrypt(x, key)``."""
    m, c = key.block_size, key.channels
    gh, gw = key.grid
    block = dihedral_maps(m, m)[element]
    cells = dihedral_maps(gh, gw)[element]
    perm = np.asarray(key.perm)
    new_perm = block[perm // c] * c + perm % c
    new_blocks = cells[np.asarray(key.block_perm)]
    return make_key(new_perm, np.asarray(key.flip), m, c, new_blocks, key.grid)


def global_symmetric_keys(key: Key) -> list[Key]:
    """The keys that decrypt each image to a rotation or mirror of what ``key`` decrypts it
    to (the symmetries of the key's grid; ``key`` first): 8 for a square grid, 4 otherwise.
    ``key`` must scramble blocks."""
    if not key.scrambles:
        raise ValueError("the key does not scramble blocks; pass a key with a block_perm")
    gh, gw = key.grid
    maps = dihedral_maps(gh, gw)
    return [_transformed_key(key, e) for e, g in enumerate(maps) if g is not None]


def mirrored_key(key: Key) -> Key:
    """The mirror twin of a key with block scrambling: it decrypts every image encrypted
    with ``key`` to that image's left-right mirror, so ``encrypt(mirror(x), twin) ==
    encrypt(x, key)``. A model trained with horizontal flips is as confident under both."""
    if not key.scrambles:
        raise ValueError("the key does not scramble blocks; pass a key with a block_perm")
    return _transformed_key(key, _mirror_index(*key.grid))


def same_scrambling_key(a: Key, b: Key) -> bool:
    """Whether two keys have the same perm, flip and block_perm."""
    return same_key(a, b) and np.array_equal(np.asarray(a.block_perm), np.asarray(b.block_perm))


def pixel_positions_right(estimate: Key, true_key: Key) -> float:
    """Fraction of the pb block positions whose perm and flip both match ``true_key``."""
    return float(
        np.mean(
            (np.asarray(estimate.perm) == np.asarray(true_key.perm))
            & (np.asarray(estimate.flip) == np.asarray(true_key.flip))
        )
    )


def blocks_placed_right(block_perm, true_block_perm) -> float:
    """Fraction of the gh*gw block positions whose place matches ``true_block_perm``."""
    return float(np.mean(np.asarray(block_perm) == np.asarray(true_block_perm)))


# ----------------------------------------------------------------------------- position embedding


@dataclasses.dataclass(frozen=True, eq=False)
class PositionRecovery:
    """The block permutation read off a position embedding's patch rows.

    Attributes:
      block_perm: (gh*gw,) the estimate (``candidates[0]``): row b belongs to grid
        position ``block_perm[b]``.
      candidates: the estimate under each symmetry of the grid (8 for a square grid, 4
        otherwise), which the rows cannot tell apart.
      fit: correlation of the rows' similarities with the fitted template at the placement.
      null_fits: (K,) the same search's fit on the rows with their columns shuffled.
      margin: nats by which the placement beats every exchange of two rows and every other
        placement found (0 when the rows do not fit the template at all).
      determined: whether ``margin`` >= :data:`POSITION_MARGIN` and ``fit`` exceeds the
        best null fit by :data:`POSITION_STRUCTURE`.
      reason: why not determined ('' when it is).
    """

    block_perm: np.ndarray
    candidates: tuple[np.ndarray, ...]
    fit: float
    null_fits: np.ndarray
    margin: float
    determined: bool
    reason: str


def patch_position_rows(params) -> tuple[np.ndarray, tuple[int, int]]:
    """``(rows (gh*gw, dim) float64, (gh, gw))``: the patch rows of a ViT's ``pos_embed``
    (1, T, dim) from its params or variables tree (the class token's row, if any, left out)."""
    from convmixer_jax.scheme.params import CLASS_TOKEN, POS_EMBED, position_grid

    tree = params["params"] if isinstance(params, dict) and "params" in params else params
    if not isinstance(tree, dict) or POS_EMBED not in tree:
        raise ValueError(
            f"the model has no '{POS_EMBED}'; block keys are read off a ViT's position embedding"
        )
    pos = np.asarray(tree[POS_EMBED], np.float64)
    if pos.ndim != 3 or pos.shape[0] != 1:
        raise ValueError(f"'{POS_EMBED}' has shape {pos.shape}, expected (1, T, dim)")
    offset, grid = position_grid(pos.shape[1], CLASS_TOKEN in tree)
    return pos[0, offset:], grid


def _row_similarity(rows: np.ndarray) -> np.ndarray:
    """(n, d) -> (n, n) cosine similarities of the centred rows, zero diagonal."""
    x = rows - rows.mean(0)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
    s = x @ x.T
    np.fill_diagonal(s, 0.0)
    return s


def _centred(t: np.ndarray) -> np.ndarray:
    """``t`` (n, n) minus the mean of its off-diagonal entries, zero diagonal."""
    off = ~np.eye(len(t), dtype=bool)
    out = t - t[off].mean()
    np.fill_diagonal(out, 0.0)
    return out


def _grid_xy(grid) -> np.ndarray:
    gh, gw = grid
    return np.stack(np.divmod(np.arange(gh * gw), gw), 1).astype(np.float64)


def _offset_classes(grid) -> np.ndarray:
    """(n, n) int: pairs of grid positions with the same offset up to the grid's
    symmetries share a class (|dr|, |dc|, sorted for a square grid)."""
    gh, gw = grid
    d = np.abs(_grid_xy(grid)[:, None] - _grid_xy(grid)[None]).astype(np.int64)
    if gh == gw:
        d = np.sort(d, -1)
    return d[..., 0] * max(gh, gw) + d[..., 1]


def _fitted_template(s: np.ndarray, q: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """The mean similarity of the rows placed at each offset class, as a template over
    grid positions (centred, zero diagonal)."""
    n = len(q)
    placed = np.zeros_like(s)
    placed[np.ix_(q, q)] = s
    off = ~np.eye(n, dtype=bool)
    flat, inverse = np.unique(classes[off], return_inverse=True)
    sums = np.bincount(inverse, weights=placed[off], minlength=len(flat))
    counts = np.bincount(inverse, minlength=len(flat))
    t = np.zeros_like(s)
    t[off] = (sums / np.maximum(counts, 1))[inverse]
    return _centred(t)


def _spectral_starts(s: np.ndarray, grid, angles: int = 12, neighbours: int = 4) -> list:
    """Placements from a 2-D spectral embedding of the rows' nearest-neighbour graph
    (the two leading non-trivial eigenvectors of its normalized Laplacian), rotated by
    ``angles`` angles and mirrored, each snapped to the grid by linear assignment."""
    n = len(s)
    off = ~np.eye(n, dtype=bool)
    w = np.exp((s - s[off].max()) / max(float(s[off].std()), 1e-12))
    np.fill_diagonal(w, 0.0)
    k = min(neighbours, n - 1)
    near = np.zeros_like(w, dtype=bool)
    np.put_along_axis(near, np.argsort(-w, 1)[:, :k], True, 1)
    w = np.where(near | near.T, w, 0.0)
    deg = np.maximum(w.sum(1), 1e-300)
    lap = np.eye(n) - w / np.sqrt(deg[:, None] * deg[None, :])
    _, vecs = np.linalg.eigh(lap)
    e = vecs[:, 1:3] / np.sqrt(deg)[:, None]
    e = (e - e.mean(0)) / np.maximum(e.std(0), 1e-300)
    xy = _grid_xy(grid)
    xy = xy - xy.mean(0)
    scale = np.maximum(xy.std(0), 1e-12)
    out = []
    for a in np.linspace(0.0, np.pi, angles, endpoint=False):
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        for mirror in (1.0, -1.0):
            z = (e @ rot) * np.array([1.0, mirror])
            z = z / np.maximum(z.std(0), 1e-300) * scale
            cost = ((z[:, None] - xy[None]) ** 2).sum(-1)
            out.append(linear_sum_assignment(cost)[1])
    return out


def _canonical(q: np.ndarray, maps: Sequence[np.ndarray]) -> bytes:
    """One name for a placement and its grid symmetries."""
    return min(g[q].tobytes() for g in maps)


def _value(t: np.ndarray, s: np.ndarray, q: np.ndarray) -> float:
    """sum over row pairs of s[b, b'] t[q b, q b'] (both orders)."""
    return float(np.sum(s * t[np.ix_(q, q)]))


def _place_rows(s: np.ndarray, grid, rng, starts: int, rounds: int = 2):
    """Place the rows on the grid: (placement q (n,), template (n, n), the distinct local
    maxima of the last round as placements)."""
    from convmixer_jax.attacks.layout_search import qap_local_maximum

    n = len(s)
    xy = _grid_xy(grid)
    t = _centred(-np.sqrt(((xy[:, None] - xy[None]) ** 2).sum(-1)))
    classes = _offset_classes(grid)
    init = _spectral_starts(s, grid) + [rng.permutation(n) for _ in range(starts)]
    found: list = []
    for _ in range(rounds):
        found = sorted((qap_local_maximum(s, t, q)[::-1] for q in init), key=lambda vq: -vq[0])
        t = _fitted_template(s, found[0][1], classes)
        init = [q for _, q in found]
    # polish under the last template: exchanges of two rows until none improves
    q = found[0][1]
    p, _, _ = local_search(t[None], s[None], np.argsort(q))
    return np.argsort(p), t, [q for _, q in found]


def _fit(s: np.ndarray, t: np.ndarray, q: np.ndarray) -> tuple[float, float]:
    """(correlation of the similarities with the template at placement q, the nats per
    unit of :func:`_value`: slope / (2 * residual variance) of s ~ t)."""
    n = len(q)
    iu = np.triu_indices(n, 1)
    x, y = t[np.ix_(q, q)][iu], s[iu]
    if x.std() < 1e-300 or y.std() < 1e-300:
        return 0.0, 0.0
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    r = float(np.corrcoef(x, y)[0, 1])
    return r, float(max(slope, 0.0) / (2.0 * max(resid.var(), 1e-300)))


def block_perm_from_pos_embed(
    pos_rows, grid, *, seed: int = 0, starts: int = 8, null_trials: int = 4
) -> PositionRecovery:
    """Recover a block permutation from the permuted patch rows of a position embedding.

    Args:
      pos_rows: (gh*gw, dim) the encrypted model's patch rows (:func:`patch_position_rows`):
        row b is the plain row ``block_perm[b]``.
      grid: (gh, gw), the grid of patches.
      seed: seeds the search's random starts and the null trials.
      starts: random starts besides the 24 spectral ones.
      null_trials: searches on rows with shuffled columns that calibrate ``fit``.

    Returns:
      a :class:`PositionRecovery`: the placement up to the grid's symmetries, with
      ``determined`` False when the rows carry no grid structure or the placement is not
      clearly the best.
    """
    gh, gw = check_grid(grid)
    rows = np.asarray(pos_rows, np.float64)
    n = gh * gw
    if rows.ndim != 2 or rows.shape[0] != n:
        raise ValueError(
            f"pos_rows must be ({n}, dim) for a {gh} x {gw} grid; got shape {rows.shape}"
        )
    if n < 4 or min(gh, gw) < 2:
        raise ValueError(f"a {gh} x {gw} grid is too small to place rows on; need at least 2 x 2")
    if not np.all(np.isfinite(rows)):
        raise ValueError("pos_rows holds non-finite values")
    rng = np.random.default_rng(seed)
    maps = grid_symmetries((gh, gw))
    s = _row_similarity(rows)
    q, t, maxima = _place_rows(s, (gh, gw), rng, starts)
    fit, nats = _fit(s, t, q)
    p = np.argsort(q)
    _, _, gains = local_search(t[None], s[None], p, max_iter=1)
    np.fill_diagonal(gains, -np.inf)
    best = _value(t, s, q)
    others = {}
    for r in maxima:
        name = _canonical(r, maps)
        if name != _canonical(q, maps):
            others[name] = max(others.get(name, -np.inf), _value(t, s, r))
    swap_margin = -float(gains.max()) * nats if n > 1 else np.inf
    runner_margin = (best - max(others.values())) * nats if others else np.inf
    margin = float(min(swap_margin, runner_margin)) if nats > 0 else 0.0
    nulls = []
    for _ in range(null_trials):
        shuffled = np.stack([rows[rng.permutation(n), j] for j in range(rows.shape[1])], 1)
        sn = _row_similarity(shuffled)
        qn, tn, _ = _place_rows(sn, (gh, gw), rng, max(2, starts // 4), rounds=2)
        nulls.append(_fit(sn, tn, qn)[0])
    null_fits = np.asarray(nulls)
    reasons = []
    ceiling = float(null_fits.max()) if len(null_fits) else -1.0
    if fit < ceiling + POSITION_STRUCTURE:
        reasons.append(
            f"the rows fit the grid with correlation {fit:.3f}, rows without grid structure "
            f"up to {ceiling:.3f} (needs {POSITION_STRUCTURE:g} more)"
        )
    if margin < POSITION_MARGIN:
        reasons.append(
            f"the placement is ahead of the next one by {margin:.1f} nats "
            f"(needs {POSITION_MARGIN:g})"
        )
    return PositionRecovery(
        block_perm=q.astype(np.int32),
        candidates=tuple(g[q].astype(np.int32) for g in maps),
        fit=fit,
        null_fits=null_fits,
        margin=margin,
        determined=not reasons,
        reason="; ".join(reasons),
    )


# ----------------------------------------------------------------------------- the jigsaw


def _as_unit(blocks) -> np.ndarray:
    x = np.asarray(blocks)
    return x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)


def _extrapolated_edges(x: np.ndarray) -> tuple[np.ndarray, ...]:
    """x (n, N, M, M, C) -> the right, left, bottom and top edges of every block, each
    (n, N, M*C), extrapolated half a pixel outwards from the two outermost rows/columns
    (the edge itself for M = 1), so that the edge of i and the edge of j meet where i and
    j touch."""
    n, count = x.shape[:2]
    if x.shape[2] < 2:
        right = left = bottom = top = x[:, :, 0, 0]
    else:
        right = 1.5 * x[:, :, :, -1] - 0.5 * x[:, :, :, -2]
        left = 1.5 * x[:, :, :, 0] - 0.5 * x[:, :, :, 1]
        bottom = 1.5 * x[:, :, -1] - 0.5 * x[:, :, -2]
        top = 1.5 * x[:, :, 0] - 0.5 * x[:, :, 1]
    return tuple(e.reshape(n, count, -1) for e in (right, left, bottom, top))


def _edge_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, N, K), (n, N, K) -> (n, n, N): sum over K of |b[j] - a[i]| for each image."""
    n, count, k = a.shape
    chunk = max(1, int(2e7) // (n * n * k))  # images at a time: about 160 MB of differences
    out = np.empty((n, n, count))
    for s in range(0, count, chunk):
        out[:, :, s : s + chunk] = np.abs(
            b[None, :, s : s + chunk] - a[:, None, s : s + chunk]
        ).sum(-1)
    return out


def edge_evidence(blocks) -> tuple[np.ndarray, np.ndarray]:
    """How well each block continues each other one, in nats.

    blocks: (N, n, M, M, C) uint8 or float in [0, 1]: N images' n blocks each, the same
      arrangement in every image (pixel-decrypted but still scrambled).

    Returns ``(horizontal, vertical)``, each (n, n): ``horizontal[i, j]`` is the
    log-likelihood ratio, summed over the images, that block j continues block i to its
    right (``vertical``: below it) rather than being unrelated. The edge difference of a
    pair in one image, between the extrapolated edges of both blocks, is modelled as
    Laplace noise per value: of the scale of best-matching pairs for neighbours, of the
    typical pair for unrelated blocks, with weight :data:`OUTLIER_RATE` of "unrelated"
    mixed into "neighbours". Both directions share their scales, so that rotating or
    mirroring all images together leaves the evidence of a placement unchanged.
    """
    x = _as_unit(blocks)
    if x.ndim != 5 or x.shape[2] != x.shape[3]:
        raise ValueError(f"blocks must be (N, n, M, M, C); got shape {x.shape}")
    count, n = x.shape[:2]
    x = np.moveaxis(x, 1, 0)  # (n, N, M, M, C)
    right, left, bottom, top = _extrapolated_edges(x)
    k = right.shape[-1]
    d = [_edge_distances(right, left), _edge_distances(bottom, top)]
    off = ~np.eye(n, dtype=bool)
    totals = [di.sum(-1) for di in d]
    typical = float(np.median(np.concatenate([t[off] for t in totals]))) / (count * k)
    best = []  # each block's best partner on each of its four sides
    for di, tot in zip(d, totals, strict=True):
        tot = np.where(off, tot, np.inf)
        j = np.argmin(tot, 1)
        i = np.argmin(tot, 0)
        best += [di[np.arange(n), j].ravel(), di[i, np.arange(n)].ravel()]
    close = float(np.median(np.concatenate(best))) / k
    b0 = max(typical, 1e-12)
    b1 = min(max(close, 1e-3 * b0, 1e-12), b0)
    out = []
    for di in d:
        ell = k * np.log(b0 / b1) - di * (1.0 / b1 - 1.0 / b0)
        llr = np.logaddexp(np.log1p(-OUTLIER_RATE) + ell, np.log(OUTLIER_RATE)).sum(-1)
        out.append(np.where(off, llr, 0.0))
    return out[0], out[1]


def _slot_adjacency(grid) -> np.ndarray:
    """(2, n, n): [0][u, v] = 1 where slot v is right of slot u, [1] where v is below u."""
    gh, gw = grid
    n = gh * gw
    a = np.zeros((2, n, n))
    u = np.arange(n)
    r, c = np.divmod(u, gw)
    a[0, u[c + 1 < gw], u[c + 1 < gw] + 1] = 1.0
    a[1, u[r + 1 < gh], u[r + 1 < gh] + gw] = 1.0
    return a


def placement_evidence(horizontal, vertical, block_perm, grid) -> float:
    """The nats of a placement under :func:`edge_evidence`'s matrices: the sum over
    neighbouring grid positions of the evidence that their blocks continue each other.
    block_perm: (n,), block b at position ``block_perm[b]``."""
    p = np.argsort(np.asarray(block_perm))  # p[u] = the block at position u
    a = _slot_adjacency(check_grid(grid))
    return float(np.sum(a[0] * horizontal[np.ix_(p, p)]) + np.sum(a[1] * vertical[np.ix_(p, p)]))


def _grow(horizontal, vertical, grid, first: int, second: int, across: bool) -> np.ndarray:
    """A placement p (n,) (p[u] = the block at position u) grown from the pair ``first``,
    ``second`` (side by side when ``across``, else one above the other): each step puts the
    free block with the most evidence next to the placed ones, at the free cell where that
    evidence is largest, within a gh x gw bounding box."""
    gh, gw = grid
    n = gh * gw
    # a canvas large enough to grow in any direction; n marks an empty cell, whose
    # evidence rows and columns are zero
    canvas = np.full((2 * gh + 1, 2 * gw + 1), n)
    h = np.zeros((n + 1, n + 1))
    h[:n, :n] = horizontal
    v = np.zeros((n + 1, n + 1))
    v[:n, :n] = vertical
    r0, c0 = gh, gw
    canvas[r0, c0] = first
    canvas[(r0, r0 + 1)[not across], (c0 + 1, c0)[not across]] = second
    free = np.ones(n, bool)
    free[[first, second]] = False
    for _ in range(n - 2):
        filled = canvas < n
        rows, cols = np.nonzero(filled)
        near = np.zeros_like(filled)
        near[1:] |= filled[:-1]
        near[:-1] |= filled[1:]
        near[:, 1:] |= filled[:, :-1]
        near[:, :-1] |= filled[:, 1:]
        rr, cc = np.nonzero(near & ~filled)
        ok = (np.maximum(rows.max(), rr) - np.minimum(rows.min(), rr) < gh) & (
            np.maximum(cols.max(), cc) - np.minimum(cols.min(), cc) < gw
        )
        rr, cc = rr[ok], cc[ok]
        idx = np.flatnonzero(free)
        score = (
            h[canvas[rr, cc - 1]][:, idx]
            + h[np.ix_(idx, canvas[rr, cc + 1])].T
            + v[canvas[rr - 1, cc]][:, idx]
            + v[np.ix_(idx, canvas[rr + 1, cc])].T
        )
        cell, k = np.unravel_index(int(np.argmax(score)), score.shape)
        canvas[rr[cell], cc[cell]] = idx[k]
        free[idx[k]] = False
    rows, cols = np.nonzero(canvas < n)
    return (
        canvas[rows.min() : rows.min() + gh, cols.min() : cols.min() + gw].ravel().astype(np.int64)
    )


def _checkerboard_ascent(horizontal, vertical, p: np.ndarray, grid, rounds: int = 20) -> np.ndarray:
    """Improve placement p (p[u] = the block at position u) by re-assigning at once all the
    blocks on the cells of one colour of a checkerboard: no two such cells touch, so given
    the other colour the best re-assignment is one linear assignment. Moves any cycle of
    blocks, which exchanges of two cannot; never lowers the evidence."""
    gh, gw = grid
    r, c = np.divmod(np.arange(gh * gw), gw)
    p = p.copy()
    for _ in range(rounds):
        changed = False
        for parity in (0, 1):
            cells = np.flatnonzero((r + c) % 2 == parity)
            blocks = p[cells]
            score = np.zeros((len(cells), len(cells)))
            for x, u in enumerate(cells):
                if c[u] > 0:
                    score[x] += horizontal[p[u - 1], blocks]
                if c[u] + 1 < gw:
                    score[x] += horizontal[blocks, p[u + 1]]
                if r[u] > 0:
                    score[x] += vertical[p[u - gw], blocks]
                if r[u] + 1 < gh:
                    score[x] += vertical[blocks, p[u + gw]]
            _, col = linear_sum_assignment(-score)
            if score[np.arange(len(cells)), col].sum() > score.trace() + 1e-9:
                p[cells] = blocks[col]
                changed = True
        if not changed:
            break
    return p


def _seed_pairs(horizontal, vertical, grid, count: int) -> list[tuple[int, int, bool]]:
    """Up to ``count`` pairs (i, j, side by side?) to grow the jigsaw from, each from another
    block i: its best partner to the right or below, the blocks whose best partner leads
    their second best by the most nats first."""
    gh, gw = grid
    n = gh * gw
    found = []
    for across, ev in ((True, horizontal), (False, vertical)):
        if (gw if across else gh) < 2:
            continue
        ev = np.where(np.eye(n, dtype=bool), -np.inf, ev)  # a block is not its own neighbour
        top2 = np.sort(ev, 1)[:, -2:]
        lead = top2[:, 1] - top2[:, 0]
        partner = np.argmax(ev, 1)
        found += [(float(lead[i]), i, int(partner[i]), across) for i in range(n)]
    found.sort(key=lambda t: -t[0])
    out, used = [], set()
    for _, i, j, across in found:
        if i not in used:
            used.add(i)
            out.append((i, j, across))
        if len(out) == count:
            break
    return out


def _shifts(p: np.ndarray, grid):
    """The placement p with its rows and columns rolled, every way but not at all."""
    gh, gw = grid
    g = p.reshape(gh, gw)
    for dr in range(gh):
        for dc in range(gw):
            if dr or dc:
                yield np.roll(np.roll(g, dr, 0), dc, 1).ravel()


@dataclasses.dataclass(frozen=True, eq=False)
class JigsawSolution:
    """The block permutation shared by N scrambled queries.

    Attributes:
      block_perm: (gh*gw,) the estimate: block b of the scrambled queries belongs at
        position ``block_perm[b]``.
      evidence: nats of the placement (:func:`placement_evidence`) against unrelated blocks.
      margin: nats by which the placement beats every exchange of two blocks.
      hits, seeds: how many of the growth seeds ended in the placement, of how many.
      determined: ``margin`` >= :data:`JIGSAW_MARGIN` and ``hits`` >= :data:`JIGSAW_HITS`.
      reason: why not determined ('' when it is).
    """

    block_perm: np.ndarray
    evidence: float
    margin: float
    hits: int
    seeds: int
    determined: bool
    reason: str


def solve_jigsaw(blocks, grid, *, seeds: int = 64, seed: int = 0) -> JigsawSolution:
    """Put scrambled blocks back in place, with the evidence of every query added up.

    Args:
      blocks: (N, gh*gw, M, M, C) uint8 or float in [0, 1]: the blocks of N queries in the
        scrambled order (block b of each query is the plain block at ``block_perm[b]``),
        pixel key already undone.
      grid: (gh, gw).
      seeds: growths (at most one per block), each from a block and its most distinctive
        partner.
      seed: seeds the search's kicks.

    Returns:
      a :class:`JigsawSolution`.
    """
    gh, gw = check_grid(grid)
    x = np.asarray(blocks)
    n = gh * gw
    if x.ndim != 5 or x.shape[1] != n:
        raise ValueError(
            f"blocks must be (N, {n}, M, M, C) for a {gh} x {gw} grid; got shape {x.shape}"
        )
    if n < 2:
        raise ValueError("a grid of one block has nothing to place")
    horizontal, vertical = edge_evidence(x)
    a = _slot_adjacency((gh, gw))
    b = np.stack([horizontal, vertical])
    sols = []
    for i, j, across in _seed_pairs(horizontal, vertical, (gh, gw), seeds):
        p, v, _ = local_search(a, b, _grow(horizontal, vertical, (gh, gw), i, j, across))
        sols.append((p, v))
    best = {}
    for q, w in sorted(sols, key=lambda t: -t[1]):
        best.setdefault(q.tobytes(), (q, w))
    p, v = next(iter(best.values()))
    for q0, _ in list(best.values())[:3]:
        for q in [q0, *_shifts(q0, (gh, gw))]:  # a right puzzle in the wrong place climbs back
            q, w, _ = local_search(a, b, _checkerboard_ascent(horizontal, vertical, q, (gh, gw)))
            if w > v + 1e-9 * max(1.0, abs(v)):
                p, v = q, w
    p, v = iterated_local_search(a, b, p, kicks=30, size=4, seed=seed)
    p = _checkerboard_ascent(horizontal, vertical, p, (gh, gw))
    p, v, gains = local_search(a, b, p)
    np.fill_diagonal(gains, -np.inf)
    margin = -float(gains.max())
    hits = sum(np.array_equal(q, p) for q, _ in sols)
    reasons = []
    if margin < JIGSAW_MARGIN:
        reasons.append(
            f"the placement is ahead of the best exchange of two blocks by {margin:.1f} nats "
            f"(needs {JIGSAW_MARGIN:g})"
        )
    if hits < JIGSAW_HITS:
        reasons.append(f"{hits} of {len(sols)} growth seeds end in it (needs {JIGSAW_HITS})")
    return JigsawSolution(
        block_perm=np.argsort(p).astype(np.int32),
        evidence=float(v),
        margin=margin,
        hits=hits,
        seeds=len(sols),
        determined=not reasons,
        reason="; ".join(reasons),
    )


def pixel_decrypted_blocks(encrypted, key: Key) -> np.ndarray:
    """(N, H, W, C) images encrypted with a key of ``key``'s pixel key -> (N, gh*gw, M, M, C)
    float64 in [0, 1]: their blocks with the pixel key undone, in the encrypted order
    (``key.block_perm`` is not used)."""
    m, c = key.block_size, key.channels
    grid = decrypt_positions(normalized_blocks(encrypted, m), key)  # (N, gh, gw, pb)
    count = grid.shape[0]
    return ((grid + 1.0) / 2.0).reshape(count, -1, m, m, c)


def unscrambled(encrypted, block_perm, block_size: int) -> np.ndarray:
    """(N, H, W, C) images whose blocks were scrambled by ``block_perm`` -> the same
    images with every block put back at its position (the pixel key left as it is)."""
    x = np.asarray(encrypted)
    c = x.shape[-1]
    blocks = to_blocks(x, block_size)
    return from_blocks(permute_blocks(blocks, np.argsort(np.asarray(block_perm))), block_size, c)


# ----------------------------------------------------------------------------- choosing a symmetry


@dataclasses.dataclass(frozen=True, eq=False)
class SymmetryChoice:
    """The candidate key the evidence prefers.

    Attributes:
      key: the chosen candidate (``ranked[0]``).
      ranked: the candidates the last stage ranked, best first.
      edge_margin: nats by which the decrypted queries' edges prefer the chosen class of
        candidates to any other (inf without queries or without other classes).
      confidence_z: paired z-score of the chosen candidate over the next (over the next but
        its mirror twin for ``up_to_mirror``); inf when one candidate was left.
      determined: the evidence singles out ``key``.
      up_to_mirror: the evidence singles out ``key`` and its mirror twin.
      reason: why not determined ('' when it is).
      notes: what was used.
    """

    key: Key
    ranked: tuple[Key, ...]
    edge_margin: float
    confidence_z: float
    determined: bool
    up_to_mirror: bool
    reason: str
    notes: str = ""


def model_confidence(config, encrypted_variables, *, batch_size: int = 256) -> Callable:
    """A function of images (N, H, W, C) uint8 -> (N,) the encrypted model's confidence on
    each: the negative entropy (nats) of its predicted class probabilities."""
    from convmixer_jax.model.inference import predict_logits

    def confidence(images: np.ndarray) -> np.ndarray:
        lg = predict_logits(config, encrypted_variables, images, batch_size=batch_size)
        lg = lg.astype(np.float64)
        lg -= lg.max(1, keepdims=True)
        logp = lg - np.log(np.exp(lg).sum(1, keepdims=True))
        return (np.exp(logp) * logp).sum(1)

    return confidence


def _paired_z(a: np.ndarray, b: np.ndarray) -> float:
    """Mean of a - b over its standard error (inf for a constant positive difference)."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if len(d) < 2:
        return 0.0
    sd = float(d.std(ddof=1))
    mean = float(d.mean())
    if sd < 1e-12:
        return math.inf if mean > 1e-12 else 0.0
    return mean / (sd / math.sqrt(len(d)))


def _edge_scores(candidates: Sequence[Key], queries) -> np.ndarray:
    """Nats of each candidate's placement of the queries' blocks (:func:`edge_evidence`
    of the queries with its pixel key undone)."""
    cache: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}
    out = np.empty(len(candidates))
    for i, k in enumerate(candidates):
        name = np.asarray(k.perm).tobytes() + np.asarray(k.flip).tobytes()
        if name not in cache:
            cache[name] = edge_evidence(pixel_decrypted_blocks(queries, k))
        out[i] = placement_evidence(*cache[name], k.block_perm, k.grid)
    return out


def _encrypted_for(candidates: Sequence[Key], images: np.ndarray) -> np.ndarray:
    """(K, N, H, W, C) uint8: ``images`` encrypted with each candidate."""
    import jax

    from convmixer_jax.scheme.images import encrypt_images
    from convmixer_jax.scheme.keys import stack_keys

    keys = stack_keys(list(candidates))
    return np.asarray(jax.vmap(encrypt_images, in_axes=(None, 0))(images, keys))


def _confidence_scores(candidates, confidence, public, start: int = 16, keep_min: int = 6):
    """Successive halving: every candidate on the first ``start`` public images, the better
    half on twice as many, ... all images for the last ones. Returns (indices by
    decreasing mean score, per-image scores of each index on the images it saw)."""
    public = np.asarray(public)
    if public.dtype != np.uint8:
        public = np.clip(np.rint(public * 255.0), 0, 255).astype(np.uint8)
    total = len(public)
    alive = list(range(len(candidates)))
    scores: dict[int, np.ndarray] = {i: np.zeros(0) for i in alive}
    seen = min(start, total) if len(alive) > keep_min else total
    while True:
        for lo in range(0, len(alive), 64):
            part = alive[lo : lo + 64]
            have = len(scores[part[0]])
            if have >= seen:
                continue
            imgs = public[have:seen]
            enc = _encrypted_for([candidates[i] for i in part], imgs)
            got = np.asarray(confidence(enc.reshape(-1, *enc.shape[2:]))).reshape(len(part), -1)
            for i, row in zip(part, got, strict=True):
                scores[i] = np.concatenate([scores[i], row])
        alive.sort(key=lambda i: -scores[i][:seen].mean())
        if seen >= total:
            return alive, scores
        alive = alive[: max(keep_min, math.ceil(len(alive) / 2))]
        seen = min(2 * seen, total) if len(alive) > keep_min else total


def _pooled(images: np.ndarray, block_size: int) -> np.ndarray:
    """(N, H, W, C) in [0, 1] -> (N, F): the mean of each block, of each 2 x 2 blocks when
    the grid's sides are even (a coarse image whose layout still shows up from down)."""
    x = _as_unit(images)
    n, h, w, c = x.shape
    k = block_size * (2 if (h // block_size) % 2 == 0 and (w // block_size) % 2 == 0 else 1)
    return x.reshape(n, h // k, k, w // k, k, c).mean((2, 4)).reshape(n, -1)


def _fit_scores(candidates, queries, public) -> tuple[list[int], dict[int, np.ndarray]]:
    """Per-query log-likelihood (nats, up to a constant) of the queries decrypted with each
    candidate under a Gaussian of the coarse images (:func:`_pooled`) fitted to the public
    images; indices by decreasing sum."""
    from convmixer_jax.scheme.images import decrypt_images

    m = candidates[0].block_size
    ref = _pooled(public, m)
    mean = ref.mean(0)
    cov = np.cov(ref, rowvar=False).reshape(ref.shape[1], ref.shape[1])
    cov += (1e-3 + 1e-2 * float(np.trace(cov)) / len(cov)) * np.eye(len(cov))
    prec = np.linalg.inv(cov)
    scores = {}
    for i, k in enumerate(candidates):
        f = _pooled(np.asarray(decrypt_images(np.asarray(queries), k)), m) - mean
        scores[i] = -0.5 * np.einsum("ni,ij,nj->n", f, prec, f)
    order = sorted(scores, key=lambda i: -scores[i].sum())
    return order, scores


def choose_symmetry(
    candidates: Sequence[Key],
    *,
    queries=None,
    public_images=None,
    confidence: Callable | None = None,
    confidence_start: int = 16,
) -> SymmetryChoice:
    """Choose among candidate keys with block scrambling that the key's other evidence
    cannot tell apart (a block permutation's grid symmetries, a pixel key's symmetries).

    Args:
      candidates: keys with block scrambling on one grid.
      queries: (N, H, W, C) images encrypted with the unknown key, or None. The candidates
        are first ranked by how well the queries' blocks, decrypted with each, join up at
        their edges (:func:`edge_evidence`); those tied with the best (the rotations,
        mirrors and colour changes of the whole image, which leave the edges as they are)
        go on to the next stage.
      public_images: (N, H, W, C) uint8 or float in [0, 1] unlabeled natural images, or
        None.
      confidence: with ``public_images``, a function of images encrypted with a candidate
        (N, H, W, C) uint8 -> (N,) scores, higher for a better key (:func:`model_confidence`
        of the encrypted model). The candidates are ranked by their mean score on the
        public images, by successive halving from ``confidence_start`` images. Without it,
        with ``public_images`` and ``queries``, by the fit of the decrypted queries to the
        public images' mean and spread at each pixel.

    Returns:
      a :class:`SymmetryChoice`. ``determined`` needs the edge margin of
      :data:`EDGE_MARGIN` (with queries) and a paired z-score of :data:`CONFIDENCE_Z` over
      the next candidate; ``up_to_mirror`` the same with the key's mirror twin set aside.
    """
    cands = list(candidates)
    if not cands:
        raise ValueError("no candidates to choose from")
    if any(not k.scrambles for k in cands):
        raise ValueError("every candidate must scramble blocks")
    notes, reasons = [], []
    edge_margin = math.inf
    if queries is not None:
        edges = _edge_scores(cands, queries)
        best = float(edges.max())
        tie = np.abs(edges - best) <= 1e-6 * max(1.0, abs(best))
        if not tie.all():
            edge_margin = best - float(edges[~tie].max())
        notes.append(
            f"edges of {len(queries)} queries: {int(tie.sum())} of {len(cands)} candidates tie "
            f"at {best:.1f} nats, {edge_margin:.1f} ahead of the rest"
        )
        if edge_margin < EDGE_MARGIN:
            reasons.append(
                f"the queries' edges prefer the best candidates by {edge_margin:.1f} nats "
                f"(needs {EDGE_MARGIN:g})"
            )
        order = [int(i) for i in np.argsort(-edges, kind="stable")]
        cands = [cands[i] for i in order if tie[i]] + [cands[i] for i in order if not tie[i]]
        alive = [cands[i] for i in range(int(tie.sum()))]
    else:
        alive = cands
    ranking, scores = None, None
    if public_images is not None and confidence is not None and len(alive) > 1:
        ranking, scores = _confidence_scores(alive, confidence, public_images, confidence_start)
        notes.append(f"{len(alive)} candidates ranked by the model's confidence on public images")
    elif public_images is not None and queries is not None and len(alive) > 1:
        ranking, scores = _fit_scores(alive, queries, public_images)
        notes.append(
            f"{len(alive)} candidates ranked by the decrypted queries' fit to public images"
        )
    if ranking is None:
        ranked = tuple(cands)  # the tied ones first
        z = math.inf if len(alive) == 1 else 0.0
        z_mirror = z
        if len(alive) == 2 and same_scrambling_key(alive[1], mirrored_key(alive[0])):
            z_mirror = math.inf
        if len(alive) > 1:
            reasons.append(f"{len(alive)} candidates are left and no evidence tells them apart")
    else:
        ranked = tuple(alive[i] for i in ranking)
        full = [i for i in ranking if len(scores[i]) == len(scores[ranking[0]])]
        top = full[0]
        z = _paired_z(scores[top], scores[full[1]]) if len(full) > 1 else math.inf
        twin = mirrored_key(alive[top])
        rest = [i for i in full[1:] if not same_scrambling_key(alive[i], twin)]
        z_mirror = _paired_z(scores[top], scores[rest[0]]) if rest else math.inf
        if z < CONFIDENCE_Z:
            second = alive[full[1]]
            what = " (its mirror twin)" if same_scrambling_key(second, twin) else ""
            reasons.append(
                f"the best candidate leads the next{what} by z = {z:.1f} (needs {CONFIDENCE_Z:g})"
            )
    edges_ok = edge_margin >= EDGE_MARGIN
    return SymmetryChoice(
        key=ranked[0],
        ranked=ranked,
        edge_margin=float(edge_margin),
        confidence_z=float(z),
        determined=not reasons,
        up_to_mirror=edges_ok and z_mirror >= CONFIDENCE_Z,
        reason="; ".join(reasons),
        notes="; ".join(notes),
    )


# ----------------------------------------------------------------------------- whole attacks


@dataclasses.dataclass(frozen=True, eq=False)
class ScrambledRecovery:
    """A key with block scrambling recovered by one of the whole attacks.

    Attributes:
      key: the key when determined, else None.
      best_guess: the most likely key found (always set).
      determined: every decision cleared its threshold.
      up_to_mirror: every decision cleared its threshold but the choice between the key
        and its mirror twin (:func:`mirrored_key`).
      reason: why not determined ('' when it is).
      method, notes, seconds: what ran and how long it took.
      position: the position-embedding step, if it ran; jigsaw: the jigsaw step, if it ran;
      choice: the symmetry choice.
    """

    key: Key | None
    best_guess: Key
    determined: bool
    up_to_mirror: bool
    reason: str
    method: str
    notes: str
    seconds: float
    position: PositionRecovery | None = None
    jigsaw: JigsawSolution | None = None
    choice: SymmetryChoice | None = None


def _scrambling_keys(pixel_keys: Sequence[Key], block_perms, grid) -> list[Key]:
    return [
        make_key(np.asarray(k.perm), np.asarray(k.flip), k.block_size, k.channels, bp, grid)
        for bp in block_perms
        for k in pixel_keys
    ]


def recover_scrambled_key_from_model(
    config,
    encrypted_variables,
    *,
    queries=None,
    public_images=None,
    seed: int = 0,
    batch_size: int = 256,
) -> ScrambledRecovery:
    """Recover a key with block scrambling from an encrypted ViT.

    The pixel key up to the block's symmetries from the patch-embedding kernel
    (:func:`~convmixer_jax.attacks.from_weights.recover_key_from_structure`, 96 candidates
    for 4 x 4 RGB blocks), the block key up to the grid's symmetries from the position
    embedding (:func:`block_perm_from_pos_embed`), then :func:`choose_symmetry` among
    their combinations, with ``queries`` (N, H, W, C) images encrypted with the key
    and ``public_images`` (N, H, W, C) unlabeled natural images (the model's confidence),
    either or both.
    """
    from convmixer_jax.attacks.from_weights import recover_key_from_structure
    from convmixer_jax.scheme.params import stem_of

    t0 = time.perf_counter()
    rows, grid = patch_position_rows(encrypted_variables)
    position = block_perm_from_pos_embed(rows, grid, seed=seed)
    stem, _ = stem_of(encrypted_variables)
    structure = recover_key_from_structure(np.asarray(stem["kernel"]), seed=seed)
    combos = _scrambling_keys(structure.candidates, position.candidates, grid)
    confidence = None
    if public_images is not None:
        confidence = model_confidence(config, encrypted_variables, batch_size=batch_size)
    choice = choose_symmetry(
        combos, queries=queries, public_images=public_images, confidence=confidence
    )
    reasons = []
    if not position.determined:
        reasons.append(f"position embedding: {position.reason}")
    if choice.reason:
        reasons.append(f"symmetry: {choice.reason}")
    determined = position.determined and choice.determined
    notes = [
        f"{len(structure.candidates)} pixel-key and {len(position.candidates)} block-key "
        "candidates",
        choice.notes,
    ]
    return ScrambledRecovery(
        key=choice.key if determined else None,
        best_guess=choice.key,
        determined=determined,
        up_to_mirror=position.determined and choice.up_to_mirror,
        reason="; ".join(reasons),
        method="model",
        notes="; ".join(n for n in notes if n),
        seconds=time.perf_counter() - t0,
        position=position,
        choice=choice,
    )


def _within_block_levels(template, signed: np.ndarray) -> list:
    """Layout-search levels (A, B), each (1, pb, pb), of the Gaussian likelihood of the
    blocks alone (no neighbouring block: scrambling separates them), from the template's
    covariance of one block at each of its regularizations."""
    pb = signed.shape[-1]
    d = signed - signed.mean(0)
    s = d.T @ d
    levels = []
    for reg, precisions in zip(template.regs, template.precisions, strict=True):
        covs = []
        for prec in precisions:
            cov = np.linalg.inv(prec) - reg * np.eye(2 * pb)
            covs += [cov[:pb, :pb], cov[pb:, pb:]]
        a = -0.5 * np.linalg.inv(np.mean(covs, 0) + reg * np.eye(pb))
        levels.append((a[None], s[None]))
    return levels


def _pixel_key_from_blocks(
    grid_values: np.ndarray, template, m: int, c: int, seed: int, starts: int
):
    """A pixel key from scrambled encrypted blocks (N, gh, gw, pb) in [-1, 1]: flips from
    the correlation signs, layout from the blocks' own covariance (up to the block's
    symmetries, which the jigsaw settles). Returns (key, sign support in noise sigmas)."""
    from convmixer_jax.attacks.ciphertext_only import signature_layout

    pb = grid_values.shape[-1]
    flat = grid_values.reshape(-1, pb)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.nan_to_num(np.corrcoef(flat, rowvar=False))
    s, support = correlation_signs(corr)
    noise = np.sqrt((pb - 1) / max(len(flat), 1))
    levels = _within_block_levels(template, flat * s)
    start = signature_layout(template, grid_values * s)
    sols = search(levels, starts=starts, seed=seed, initial=[start])
    a, b = levels[-1]
    p, _ = iterated_local_search(a, b, sols[0][0], seed=seed)
    flip = (s < 0).astype(np.uint8)
    if int(flip.sum()) != flip_ones(pb):
        flip = (1 - flip).astype(np.uint8)
    if int(flip.sum()) != flip_ones(pb):
        flip = balanced_flip(-s * (np.abs(support) + 1e-12))
    key = Key(np.argsort(p).astype(np.int32), flip, m, c)
    return key, support / noise


def recover_scrambled_key_ciphertext_only(
    encrypted,
    block_size: int,
    template,
    *,
    prior=None,
    public_images=None,
    pixel_key: Key | None = None,
    seed: int = 0,
    starts: int = 24,
) -> ScrambledRecovery:
    """Recover a key with block scrambling from encrypted queries alone.

    Args:
      encrypted: (N, H, W, C) uint8 or float in [0, 1], encrypted with one key that
        scrambles the blocks of its gh x gw = H/M x W/M grid.
      block_size: M.
      template: :func:`~convmixer_jax.attacks.ciphertext_only.block_template` of public
        natural images at the same scale.
      prior: the colour prior for the pixel key's channel order and sign (as in
        :func:`~convmixer_jax.attacks.ciphertext_only.recover_key_ciphertext_only`).
      public_images: (N, H, W, C) unlabeled natural images, which choose the orientation
        of the whole image; without them it stays undetermined.
      pixel_key: the pixel key up to the block's rotations and mirrors when known
        otherwise (e.g. from the encrypted model's kernel); else it is estimated from the
        blocks' own covariance.

    Steps: the pixel key up to the block's symmetries; :func:`solve_jigsaw` with it (the
    image comes together rotated or mirrored as the pixel layout is); the encrypted queries with
    their blocks put back, attacked by
    :func:`~convmixer_jax.attacks.ciphertext_only.recover_key_ciphertext_only` (now that
    neighbouring blocks are neighbours again); then the orientation of the whole image by
    :func:`choose_symmetry`.
    """
    from convmixer_jax.attacks.ciphertext_only import SIGN_SIGMAS, recover_key_ciphertext_only
    from convmixer_jax.scheme.blocks import grid_shape

    t0 = time.perf_counter()
    e = np.asarray(encrypted)
    if e.ndim == 3:
        e = e[None]
    if e.ndim != 4:
        raise ValueError(f"encrypted images must be (N, H, W, C); got shape {e.shape}")
    m, c = block_size, e.shape[-1]
    gh, gw = grid_shape(e.shape[1], e.shape[2], m)
    grid = (gh, gw)
    values = normalized_blocks(e, m)
    notes: list[str] = []
    if pixel_key is None:
        key0, sign_sigmas = _pixel_key_from_blocks(values, template, m, c, seed, starts)
        notes.append("pixel layout from the blocks' own covariance")
    else:
        key0, sign_sigmas = pixel_key, None
        notes.append("pixel key's candidates given")
    if sign_sigmas is not None and np.all(sign_sigmas < SIGN_SIGMAS):
        guess = make_key(key0.perm, key0.flip, m, c, np.arange(gh * gw), grid)
        return ScrambledRecovery(
            key=None,
            best_guess=guess,
            determined=False,
            up_to_mirror=False,
            reason="no flip is supported by the correlations: the images carry no structure",
            method="ciphertext",
            notes="; ".join(notes),
            seconds=time.perf_counter() - t0,
        )
    # a rotation or mirror of the pixel layout puts the jigsaw together as the same rotation
    # or mirror of the image, which the last step settles; only a quarter turn of a
    # non-square grid cannot fit, so that one is tried as well
    variants = dihedral_keys(key0)[: 1 if gh == gw else 2]
    jig = max(
        (solve_jigsaw(pixel_decrypted_blocks(e, k), grid, seed=seed) for k in variants),
        key=lambda sol: sol.evidence,
    )
    notes.append(f"jigsaw: {jig.evidence:.0f} nats, margin {jig.margin:.1f}")
    rec = recover_key_ciphertext_only(unscrambled(e, jig.block_perm, m), m, template, prior=prior)
    pixel = rec.best_guess
    candidates = global_symmetric_keys(make_key(pixel.perm, pixel.flip, m, c, jig.block_perm, grid))
    choice = choose_symmetry(candidates, queries=e, public_images=public_images)
    reasons = []
    if not jig.determined:
        reasons.append(f"jigsaw: {jig.reason}")
    if not rec.determined:
        reasons.append(f"pixel key: {rec.reason}")
    if choice.reason:
        reasons.append(f"orientation: {choice.reason}")
    base = jig.determined and rec.determined
    determined = base and choice.determined
    return ScrambledRecovery(
        key=choice.key if determined else None,
        best_guess=choice.key,
        determined=determined,
        up_to_mirror=base and choice.up_to_mirror,
        reason="; ".join(reasons),
        method="ciphertext" if pixel_key is None else "ciphertext+kernel",
        notes="; ".join(notes + [choice.notes]),
        seconds=time.perf_counter() - t0,
        jigsaw=jig,
        choice=choice,
    )
