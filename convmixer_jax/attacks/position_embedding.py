"""The block permutation of a key with block scrambling, read off the encrypted ViT's
position embedding (docs/security.md, docs/method.md "Extension: block scrambling and
Vision Transformers").

The encrypted ViT's patch row b of the position embedding is the plain row
``block_perm[b]``. A trained ViT's learned position embedding is smooth over the 2-D grid:
rows of neighbouring positions are similar. :func:`block_perm_from_pos_embed` places the
rows on the grid by a quadratic assignment of their similarities to a template that decays
with grid distance (spectral and random starts), re-estimates the template from the
placement (the mean similarity at each grid offset) and solves the assignment again. The
similarities cannot tell the grid's rotations and mirrors apart: the result is a set of
candidates, 8 for a square grid, 4 for another (:func:`grid_symmetries`; the rotations
and mirrors of the pixels of a block are :func:`dihedral_maps` of the block). It is
determined only when the placement clears :data:`POSITION_MARGIN` and the rows' fit to
the grid beats rows without grid structure by :data:`POSITION_STRUCTURE`.

NumPy and SciPy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from convmixer_jax.attacks.layout_search import local_search
from convmixer_jax.scheme.keys import check_grid

#: nats (in the Gaussian model of the similarities around the fitted template) by which the
#: placement of the position rows must beat every exchange of two rows and every other
#: placement the search found (other than its grid symmetries).
POSITION_MARGIN = 8.0
#: how far the fit of the placed rows (the correlation of their similarities with the
#: fitted template) must exceed the best fit of the same search on rows whose columns were
#: shuffled independently (rows with no grid structure).
POSITION_STRUCTURE = 0.15


# ----------------------------------------------------------------------------- symmetries of a grid


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


# ----------------------------------------------------------------------------- the rows


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
      similarity: (gh*gw, gh*gw) the rows' similarities (:func:`position_evidence`).
      template: (gh*gw, gh*gw) the template fitted over grid positions.
      nats: nats per unit of ``sum(similarity * template[q][:, q])`` for a placement q.
      maxima: the other placements (row b at ``maxima[i][b]``) the search ended in.
    """

    block_perm: np.ndarray
    candidates: tuple[np.ndarray, ...]
    fit: float
    null_fits: np.ndarray
    margin: float
    determined: bool
    reason: str
    similarity: np.ndarray | None = None
    template: np.ndarray | None = None
    nats: float = 0.0
    maxima: tuple[np.ndarray, ...] = ()

    @property
    def structured(self) -> bool:
        """Whether the rows carry grid structure: ``fit`` exceeds the best null fit by
        :data:`POSITION_STRUCTURE` (the placement may still not be clearly the best)."""
        ceiling = float(self.null_fits.max()) if len(self.null_fits) else -1.0
        return self.fit >= ceiling + POSITION_STRUCTURE


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
    own = _canonical(q, maps)
    others = {}
    for r in maxima:
        name = _canonical(r, maps)
        if name != own:
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
        similarity=s,
        template=t,
        nats=float(nats),
        maxima=_distinct(maxima, maps, own),
    )


def _distinct(placements, maps, own: bytes) -> tuple[np.ndarray, ...]:
    """The placements, one per class of grid symmetries, without the class ``own``."""
    seen, out = {own}, []
    for r in placements:
        name = _canonical(r, maps)
        if name not in seen:
            seen.add(name)
            out.append(np.asarray(r, np.int32))
    return tuple(out)


def position_evidence(position: PositionRecovery) -> tuple[np.ndarray, np.ndarray]:
    """``(a, b)``, each (1, n, n): the position embedding's evidence of a placement as a
    quadratic-assignment term (:mod:`~convmixer_jax.attacks.layout_search`'s form), in
    nats: ``sum a[u, v] * b[p[u], p[v]]`` for ``p[u]`` = the row placed at grid position u
    is ``position.nats`` times the rows' fit to the template at that placement (the
    Gaussian model of the similarities whose margin :class:`PositionRecovery` reports)."""
    if position.similarity is None or position.template is None:
        raise ValueError("the position recovery carries no evidence to combine")
    return (position.nats * position.template)[None], position.similarity[None]
