"""Scrambled blocks put back in place: the jigsaw of a key's block permutation over
encrypted queries (docs/security.md, docs/method.md "Extension: block scrambling and
Vision Transformers").

Once the pixel key is known, the queries' blocks are the plain blocks in scrambled places,
the same places in every query: a jigsaw whose evidence adds up over the queries. The
compatibility of block i left of (or above) block j is the log-likelihood ratio, in nats,
of their edge under "neighbours" versus "unrelated" (:func:`edge_evidence`); blocks are
placed by growing the puzzle from its most compatible pairs, then by exchanges of two
blocks (the quadratic-assignment searches of
:mod:`~convmixer_jax.attacks.layout_search`) and slides of whole pieces, which exchanges
of two blocks cannot move one block at a time. Other evidence of the placement (the
encrypted ViT's position embedding) can be added to the edges' as a prior in nats.
:func:`solve_jigsaw` is determined only when the placement beats every exchange of two
blocks and every slide by :data:`JIGSAW_MARGIN` and :data:`JIGSAW_HITS` searches end in
it.

NumPy and SciPy.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.optimize import linear_sum_assignment

from convmixer_jax.attacks.kernel_algebra import decrypt_positions
from convmixer_jax.attacks.layout_search import iterated_local_search, local_search, objective
from convmixer_jax.scheme.blocks import from_blocks, normalized_blocks, permute_blocks, to_blocks
from convmixer_jax.scheme.keys import Key, check_grid

#: nats by which the jigsaw's placement must beat every exchange of two blocks (and every
#: slide of a piece).
JIGSAW_MARGIN = 10.0
#: searches (growth seeds, given starts) that must end in the chosen placement (one alone
#: may be a fluke).
JIGSAW_HITS = 2
#: slides of a piece that the polish of a placement tries in turn, at most.
ROLL_ROUNDS = 8
#: weight of "unrelated" in the likelihood of a neighbouring pair's edge in one image (an
#: object boundary can run along a block edge): it bounds what one image can say against
#: a pair.
OUTLIER_RATE = 0.05


def unit_floats(blocks) -> np.ndarray:
    """Images or blocks, uint8 or float in [0, 1] -> the same shape, float64 in [0, 1]."""
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
    x = unit_floats(blocks)
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


def slot_adjacency(grid) -> np.ndarray:
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
    a = slot_adjacency(check_grid(grid))
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
    for _, i, j, across in found if count > 0 else ():
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


def _region_rolls(p: np.ndarray, grid):
    """Every placement that differs from p (p[u] = the block at position u) by a cyclic
    shift of the blocks in one rectangle of the grid by one or two cells either way along
    its rows or its columns (a piece of the puzzle that slid, the blocks pushed out coming
    in at its other end), as (K, n) placements."""
    gh, gw = grid
    g = p.reshape(gh, gw)
    out = []
    for r1 in range(gh):
        for r2 in range(r1 + 1, gh + 1):
            for c1 in range(gw):
                for c2 in range(c1 + 1, gw + 1):
                    sub = g[r1:r2, c1:c2]
                    for axis, length in ((0, r2 - r1), (1, c2 - c1)):
                        for k in sorted({1, 2, length - 2, length - 1} & set(range(1, length))):
                            q = g.copy()
                            q[r1:r2, c1:c2] = np.roll(sub, k, axis)
                            out.append(q.ravel())
    return np.array(out, np.int64).reshape(-1, gh * gw)


def _best_roll(a: np.ndarray, b: np.ndarray, p: np.ndarray, grid) -> tuple[np.ndarray, float]:
    """The region roll of p (:func:`_region_rolls`) that raises f the most (or lowers it the
    least), and that change of f."""
    rolls = _region_rolls(p, grid)
    if not len(rolls):
        return p, -np.inf
    base = objective(a, b, p)
    values = np.zeros(len(rolls))
    for at, bt in zip(a, b, strict=True):  # only the pairs a term weighs (the edges: few)
        u, v = np.nonzero(at)
        for lo in range(0, len(rolls), 512):
            q = rolls[lo : lo + 512]
            values[lo : lo + 512] += bt[q[:, u], q[:, v]] @ at[u, v]
    i = int(np.argmax(values))
    return rolls[i], float(values[i] - base)


@dataclasses.dataclass(frozen=True, eq=False)
class JigsawSolution:
    """The block permutation shared by N scrambled queries.

    Attributes:
      block_perm: (gh*gw,) the estimate: block b of the scrambled queries belongs at
        position ``block_perm[b]``.
      evidence: nats of the placement (:func:`placement_evidence`) against unrelated blocks.
      margin: nats by which the placement beats every exchange of two blocks and every
        slide of a rectangle of blocks by a few cells.
      hits, seeds: how many of the searches (growth seeds and given starts) ended in the
        placement, of how many.
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


def solve_jigsaw(
    blocks, grid, *, seeds: int = 64, seed: int = 0, prior=None, starts=()
) -> JigsawSolution:
    """Put scrambled blocks back in place, with the evidence of every query added up.

    Args:
      blocks: (N, gh*gw, M, M, C) uint8 or float in [0, 1]: the blocks of N queries in the
        scrambled order (block b of each query is the plain block at ``block_perm[b]``),
        pixel key already undone.
      grid: (gh, gw).
      seeds: growths (at most one per block), each from a block and its most distinctive
        partner (0: none, only ``starts``).
      seed: seeds the search's kicks.
      prior: other evidence of the placement in nats, as quadratic-assignment terms
        ``(a, b)``, each (T, gh*gw, gh*gw): ``sum a[t, u, v] * b[t, p[u], p[v]]`` for
        ``p[u]`` = the block at grid position u (e.g.
        :func:`~convmixer_jax.attacks.position_embedding.position_evidence`), added to the
        edges' evidence; None: the edges alone.
      starts: block permutations (gh*gw,) to search from as well as the growths (e.g.
        the placements the prior's own evidence suggests).

    Returns:
      a :class:`JigsawSolution` (``evidence`` includes the prior's nats).
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
    a = slot_adjacency((gh, gw))
    b = np.stack([horizontal, vertical])
    if prior is not None:
        pa, pb = (np.asarray(t, np.float64) for t in prior)
        if pa.shape[1:] != (n, n) or pb.shape != pa.shape:
            raise ValueError(f"prior terms must be (T, {n}, {n}); got {pa.shape} and {pb.shape}")
        a, b = np.concatenate([a, pa]), np.concatenate([b, pb])

    def climbed(q):
        """q polished by exchanges and checkerboard re-assignments of the edges (kept only
        while the whole evidence rises)."""
        q, w, _ = local_search(a, b, q)
        for _ in range(5):
            r, u, _ = local_search(a, b, _checkerboard_ascent(horizontal, vertical, q, (gh, gw)))
            if u <= w + 1e-9 * max(1.0, abs(w)):
                break
            q, w = r, u
        return q, w

    def polished(q):
        """climbed, then slides of pieces (which exchanges of two cannot move) while they
        raise the evidence."""
        q, w = climbed(q)
        for _ in range(ROLL_ROUNDS):
            r, gain = _best_roll(a, b, q, (gh, gw))
            if gain <= 1e-9 * max(1.0, abs(w)):
                break
            r, u = climbed(r)
            if u <= w + 1e-9 * max(1.0, abs(w)):
                break
            q, w = r, u
        return q, w

    sols = []
    for i, j, across in _seed_pairs(horizontal, vertical, (gh, gw), max(0, seeds)):
        p, v, _ = local_search(a, b, _grow(horizontal, vertical, (gh, gw), i, j, across))
        sols.append((p, v))
    for bp in starts:
        p, v, _ = local_search(a, b, np.argsort(np.asarray(bp)).astype(np.int64))
        sols.append((p, v))
    if not sols:
        raise ValueError("nothing to search from: no growth seeds and no starts")
    best: dict[bytes, list] = {}
    for q, w in sorted(sols, key=lambda t: -t[1]):
        best.setdefault(q.tobytes(), [q, w, 0])[2] += 1
    top = list(best.values())[:3]
    p, v = top[0][0], top[0][1]
    ends = []  # where each of the best local maxima ends when polished, and how many end there
    for q0, _, count in top:
        q, w = polished(q0)
        ends.append((q, count))
        if w > v + 1e-9 * max(1.0, abs(v)):
            p, v = q, w
        for q in _shifts(q0, (gh, gw)):  # a right puzzle in the wrong place climbs back
            q, w = climbed(q)
            if w > v + 1e-9 * max(1.0, abs(v)):
                p, v = q, w
    p, v = iterated_local_search(a, b, p, kicks=30, size=4, seed=seed)
    p, v = polished(p)
    _, _, gains = local_search(a, b, p)
    np.fill_diagonal(gains, -np.inf)
    margin = min(-float(gains.max()), -_best_roll(a, b, p, (gh, gw))[1])
    hits = sum(np.array_equal(q, p) for q, _ in sols)
    hits = max(hits, sum(count for q, count in ends if np.array_equal(q, p)))
    reasons = []
    if margin < JIGSAW_MARGIN:
        reasons.append(
            f"the placement is ahead of the best exchange of two blocks or slide of a piece "
            f"by {margin:.1f} nats (needs {JIGSAW_MARGIN:g})"
        )
    if hits < JIGSAW_HITS:
        reasons.append(f"{hits} of {len(sols)} searches end in it (needs {JIGSAW_HITS})")
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
