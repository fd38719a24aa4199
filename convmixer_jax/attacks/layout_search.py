"""Quadratic assignment over block positions: the searches behind the key-recovery attacks.

The ciphertext-only attack (:mod:`convmixer_jax.attacks.ciphertext_only`) scores a
candidate layout ``p`` (``p[u]`` = the encrypted position that holds plain slot ``u``)
by a sum of quadratic-assignment terms

    f(p) = sum_t sum_{u,v} A[t, u, v] * B[t, p[u], p[v]]

with ``A`` (T, n, n) from a natural-image template (plain slots) and ``B`` (T, n, n)
from the encrypted images (encrypted positions). This module maximizes such an ``f``
over permutations: Frank-Wolfe on the doubly stochastic relaxation from several
starts, then best-improvement exchanges of two assignments, all vectorized over the
n x n exchanges (numpy; n = 48 for 4 x 4 RGB blocks, 147 for 7 x 7); and an iterated
local search that kicks a local maximum out of its basin (a random cycle of a few
assignments) and keeps the result when the exchanges then climb higher.

The kernel attacks (:mod:`convmixer_jax.attacks.from_weights`) match one symmetric pair
of correlation matrices, with a per-assignment term: :func:`qap_local_maximum`.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def objective(a: np.ndarray, b: np.ndarray, p: np.ndarray) -> float:
    """f(p) for a, b: (T, n, n), p: (n,) int."""
    return float(np.sum(a * b[:, p][:, :, p]))


def swap_gains(a: np.ndarray, b: np.ndarray, p: np.ndarray) -> np.ndarray:
    """(n, n): ``g[x, y] = f(p with p[x] and p[y] exchanged) - f(p)`` (diagonal 0).

    a, b: (T, n, n), any (not necessarily symmetric); p: (n,) permutation.
    """
    m = b[:, p][:, :, p]
    da = np.diagonal(a, axis1=1, axis2=2)  # (T, n)
    dm = np.diagonal(m, axis1=1, axis2=2)
    g = np.einsum("tuv,twv->uw", a, m)  # sum_v A[u, v] M[w, v]
    h = np.einsum("tvu,tvw->uw", a, m)  # sum_v A[v, u] M[v, w]
    gd, hd = np.diag(g), np.diag(h)
    out = g - gd[:, None] + g.T - gd[None, :] + h - hd[:, None] + h.T - hd[None, :]
    # The sums above run over every v, so the four entries where v is x or y were counted
    # with the wrong new values; take their contribution out and put the true one in.
    e = lambda spec, x, y: np.einsum(spec, x, y)  # noqa: E731  (sums over t)
    x_x = np.sum(da * dm, 0)  # A[x,x] M[x,x]
    am = np.sum(a * m, 0)  # A[x,y] M[x,y]
    counted = (
        e("tx,tyx->xy", da, m)
        - x_x[:, None]
        + e("txy,ty->xy", a, dm)
        - am  # row x
        + e("tyx,tx->xy", a, dm)
        - am.T
        + e("ty,txy->xy", da, m)
        - x_x[None, :]  # row y
        + e("tx,txy->xy", da, m)
        - x_x[:, None]
        + e("tyx,ty->xy", a, dm)
        - am.T  # column x
        + e("txy,tx->xy", a, dm)
        - am
        + e("ty,tyx->xy", da, m)
        - x_x[None, :]
    )  # column y
    amt = np.sum(a * m.transpose(0, 2, 1), 0)  # A[x,y] M[y,x]
    dd = da.T @ dm  # A[x,x] M[y,y]
    true = dd - x_x[:, None] + dd.T - x_x[None, :] + amt - am + amt.T - am.T
    out = out - counted + true
    np.fill_diagonal(out, 0.0)
    return out


def _gain_row(a: np.ndarray, m: np.ndarray, x: int, am: np.ndarray | None = None) -> np.ndarray:
    """(n,): row x of :func:`swap_gains`, ``g[y] = f(exchange x, y) - f``, from a: (T, n, n)
    and m = b[:, p][:, :, p] (T, n, n), in O(T n^2) (``am``: a * m, if already at hand)."""
    ax, mx = a[:, x, :], m[:, x, :]  # row x       (T, n)
    acx, mcx = a[:, :, x], m[:, :, x]  # column x    (T, n)
    am = a * m if am is None else am
    rowdot = np.sum(am, 2)  # sum_j A[y,j] M[y,j]   (T, n)
    coldot = np.sum(am, 1)  # sum_i A[i,y] M[i,y]
    da, dm = np.diagonal(a, axis1=1, axis2=2), np.diagonal(m, axis1=1, axis2=2)
    axx, mxx = a[:, x, x][:, None], m[:, x, x][:, None]
    # rows x and y over the columns j not in {x, y}: sum_j (A[x,j] - A[y,j]) (M[y,j] - M[x,j])
    r = (
        np.einsum("tyj,tj->ty", m, ax)
        - np.sum(ax * mx, 1)[:, None]
        - rowdot
        + np.einsum("tyj,tj->ty", a, mx)
        - (axx - acx) * (mcx - mxx)
        - (ax - da) * (dm - mx)
    )
    # columns x and y over the rows i not in {x, y}: sum_i (A[i,x] - A[i,y]) (M[i,y] - M[i,x])
    c = (
        np.einsum("ti,tiy->ty", acx, m)
        - np.sum(acx * mcx, 1)[:, None]
        - coldot
        + np.einsum("ti,tiy->ty", mcx, a)
        - (axx - ax) * (mx - mxx)
        - (acx - da) * (dm - mcx)
    )
    # the 2 x 2 block of rows and columns x, y
    d = axx * (dm - mxx) + da * (mxx - dm) + ax * (mcx - mx) + acx * (mx - mcx)
    g = np.sum(r + c + d, 0)
    g[x] = 0.0
    return g


def _update_gains(gains: np.ndarray, a: np.ndarray, m: np.ndarray, r: int, s: int) -> None:
    """Turn ``gains`` (n, n) of the layout whose m (T, n, n) is given into those after
    exchanging r and s, in place; ``m`` must already be the exchanged one.

    For a pair u, v disjoint from {r, s} only the four entries linking {u, v} to {r, s}
    change, which gives a rank-two update per term; rows and columns r, s are recomputed.
    """
    # the old m's columns / rows r, s are the new m's s, r
    ac, mc = a[:, :, r] - a[:, :, s], m[:, :, s] - m[:, :, r]
    ar, mr = a[:, r, :] - a[:, s, :], m[:, s, :] - m[:, r, :]
    d = np.sum(ac * mc + ar * mr, 0)
    cross = np.einsum("tu,tv->uv", ac, mc) + np.einsum("tu,tv->uv", ar, mr)
    gains += d[:, None] + d[None, :] - cross - cross.T
    am = a * m
    for x in (r, s):
        row = _gain_row(a, m, x, am)
        gains[x, :] = row
        gains[:, x] = row


def local_search(
    a: np.ndarray, b: np.ndarray, p: np.ndarray, max_iter: int | None = None
) -> tuple[np.ndarray, float, np.ndarray]:
    """Best-improvement exchanges from ``p`` until none improves f.

    The gains of all exchanges are computed once and then updated after each exchange in
    O(T n^2) (a rank-two change per term), not recomputed in O(T n^3).

    Returns the local maximum p, f(p) and the (n, n) gains of every exchange there (all <= 0).
    """
    p = np.array(p, np.int64)
    n = len(p)
    cur = objective(a, b, p)
    gains = swap_gains(a, b, p)
    m = b[:, p][:, :, p]
    for _ in range(max_iter or 20 * n):
        x, y = np.unravel_index(int(np.argmax(gains)), gains.shape)
        if gains[x, y] <= 1e-9 * max(1.0, abs(cur)):
            break
        p[x], p[y] = p[y], p[x]
        cur += float(gains[x, y])
        m[:, [x, y]] = m[:, [y, x]]
        m[:, :, [x, y]] = m[:, :, [y, x]]
        _update_gains(gains, a, m, int(x), int(y))
    return p, objective(a, b, p), swap_gains(a, b, p)


def iterated_local_search(
    a: np.ndarray, b: np.ndarray, p: np.ndarray, *, kicks: int = 100, size: int = 6, seed: int = 0
) -> tuple[np.ndarray, float]:
    """Escape the local maximum ``p`` (n,) by ``kicks`` random re-assignments of ``size``
    slots among themselves, each climbed by :func:`local_search`; an improvement is kept
    and kicked next. Returns the best p and f(p) (never worse than the start).

    Errors the exchanges cannot undo one at a time (a few slots that are all misplaced
    together, each single repair making the fit worse) are what the kicks reach.
    """
    rng = np.random.default_rng(seed)
    p, v, _ = local_search(a, b, p)
    n = len(p)
    size = min(size, n)
    for _ in range(kicks if n > 1 else 0):
        q = p.copy()
        sel = rng.choice(n, size, replace=False)
        q[sel] = q[rng.permutation(sel)]
        q, w, _ = local_search(a, b, q)
        if w > v + 1e-9 * max(1.0, abs(v)):
            p, v = q, w
    return p, v


def frank_wolfe(a: np.ndarray, b: np.ndarray, start: np.ndarray, iters: int = 50) -> np.ndarray:
    """A permutation from Frank-Wolfe ascent on doubly stochastic Q (n, n), Q[u, k] the
    weight of "slot u holds position k", from ``start``, projected back by linear
    assignment. f(Q) = sum_t tr(A_t^T Q B_t Q^T) is quadratic, so each line search is exact."""
    q = np.array(start, np.float64)
    for _ in range(iters):
        grad = np.sum(a @ q @ b.transpose(0, 2, 1) + a.transpose(0, 2, 1) @ q @ b, 0)
        rows, cols = linear_sum_assignment(-grad)
        s = np.zeros_like(q)
        s[rows, cols] = 1.0
        d = s - q
        dbd = d @ b @ d.T  # (T, n, n)
        qd = float(np.sum(a * dbd))
        lin = float(np.sum(a * (d @ b @ q.T + q @ b @ d.T)))
        if qd < 0:
            step = min(1.0, max(0.0, -lin / (2 * qd)))
        else:
            step = 1.0 if lin + qd > 0 else 0.0
        if step <= 1e-9:
            break
        q = q + step * d
    return linear_sum_assignment(-q)[1]


def search(
    levels: list[tuple[np.ndarray, np.ndarray]],
    *,
    starts: int = 24,
    keep: int = 6,
    seed: int = 0,
    initial=(),
    progress: bool = False,
) -> list[tuple[np.ndarray, float, int]]:
    """Maximize the last level's f over permutations, by continuation over ``levels``.

    ``starts`` Frank-Wolfe runs on the first level (the first from the uniform matrix,
    the others from random permutations mixed with it) are polished by exchanges; the
    best ``keep`` distinct ones are carried to each next level and polished there.
    Each permutation in ``initial`` is one more start, polished by exchanges on every
    level and never pruned.

    Args:
      levels: [(A, B), ...], each (T, n, n), from a smooth objective (first) to the one
        that counts (last).
      initial: (n,) permutations to start from as well (e.g. a constructive guess).
    Returns:
      the distinct local maxima of the last level, best first, as (p, f(p), hits):
      ``hits`` counts the starts that ended there (a maximum that only one start finds is
      a sign that the search has not covered the landscape).
    """
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    a, b = levels[0]
    n = a.shape[-1]
    sols = []
    for i in tqdm(range(starts), desc="layout search", disable=not progress, leave=False):
        q0 = np.full((n, n), 1.0 / n)
        if i:
            q0 = 0.5 * np.eye(n)[rng.permutation(n)] + 0.5 * q0
        p, v, _ = local_search(a, b, frank_wolfe(a, b, q0))
        sols.append((p, v))
    hits = [1] * len(sols)
    for level, (a, b) in enumerate(levels):
        if level:
            sols = [local_search(a, b, p)[:2] for p, _ in sols]
        ranked = merge_maxima([(p, v, h) for (p, v), h in zip(sols, hits, strict=True)])[:keep]
        sols, hits = [(p, v) for p, v, _ in ranked], [h for _, _, h in ranked]
    polished = []
    for p in initial:
        for a, b in levels:
            p, v, _ = local_search(a, b, p)
        polished.append((p, v, 1))
    return merge_maxima([(p, v, h) for (p, v), h in zip(sols, hits, strict=True)] + polished)


def merge_maxima(maxima) -> list[tuple[np.ndarray, float, int]]:
    """Distinct (p, f(p), hits), best first, from (p, f(p), hits) that may repeat a p (the
    hits of equal p add up)."""
    distinct: dict[bytes, list] = {}
    for p, v, h in maxima:
        distinct.setdefault(p.tobytes(), [p, v, 0])[2] += h
    return [tuple(t) for t in sorted(distinct.values(), key=lambda t: -t[1])]


def qap_local_maximum(
    a: np.ndarray,
    b: np.ndarray,
    perm: np.ndarray,
    unary: np.ndarray | None = None,
    max_iter: int = 200,
) -> tuple[np.ndarray, float]:
    """A local maximum of ``f(p) = sum_{u,v} a[u,v] b[p[u],p[v]] + sum_u unary[u,p[u]]``
    over permutations p, starting from ``perm``; returns (p (n,) int64, f(p)).

    a, b: (n, n) symmetric with zero diagonal; unary: (n, n) or None (zero). Iterated
    linear assignment on the gradient (Frank-Wolfe steps, kept while they improve f),
    then best-improvement exchanges of two assignments until none improves f.
    """
    n = len(perm)
    perm = np.array(perm, np.int64)
    u = np.zeros((n, n)) if unary is None else np.asarray(unary, np.float64)
    rows = np.arange(n)

    def value(q):
        return float(np.sum(a * b[np.ix_(q, q)]) + u[rows, q].sum())

    cur = value(perm)
    for _ in range(max_iter):
        grad = 2.0 * a @ b[perm] + u  # grad[x, m] = 2 sum_v a[x, v] b[p(v), m] + u[x, m]
        _, new = linear_sum_assignment(-grad)
        val = value(new)
        if val > cur + 1e-12 * max(1.0, abs(cur)):
            perm, cur = new.astype(np.int64), val
        else:
            break
    for _ in range(50 * n):
        m = b[np.ix_(perm, perm)]
        h = a @ m
        hd = np.diag(h)
        delta = 2.0 * (h + h.T - hd[:, None] - hd[None, :] + 2.0 * a * m)
        up = u[:, perm]  # up[x, y] = u[x, p(y)]
        ud = np.diag(up)
        delta += up + up.T - ud[:, None] - ud[None, :]
        np.fill_diagonal(delta, -np.inf)
        x, y = np.unravel_index(int(np.argmax(delta)), delta.shape)
        if delta[x, y] <= 1e-12 * max(1.0, abs(cur)):
            break
        perm[x], perm[y] = perm[y], perm[x]
        cur += float(delta[x, y])
    return perm, value(perm)
