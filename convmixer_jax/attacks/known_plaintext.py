"""Known-plaintext key recovery for the block-wise encryption (method.md, "Images").

The scheme applies one keyed signed permutation to every block: ``z[k] = x[perm[k]]``,
then ``1 - z[k]`` (``255 - z[k]`` for uint8) where ``flip[k] == 1``. A plain image and
its encrypted version therefore say, block by block, which plain position ``j`` (and
which flip) each encrypted position ``k`` came from. :func:`recover_key` collects that
evidence over all blocks of all given pairs and returns the key when it is the only
one that explains the pairs.

How it works
------------
1. Both arrays are cut into blocks (flattened as ``k = (i*M + j)*C + c``,
   :func:`~convmixer_jax.scheme.blocks.block_rows`), giving ``P`` and ``E`` of shape
   (num_blocks, pb), raw values.
2. ``(k, j, f)`` is a *raw candidate* when ``E[:, k] == P[:, j]`` (f = 0) or
   ``E[:, k] == 1 - P[:, j]`` (f = 1) in every block: exact equality for uint8, a
   tolerance (:data:`FLOAT_TOLERANCE`, or 2 ulps of the dtype if larger) for float.
   Only the candidates still alive are compared against the next chunk of blocks,
   so the work shrinks from pb*pb*2 comparisons per block to about pb.
3. Equality up to complement is an equivalence between columns, so the bipartite graph
   "k may come from j" splits into complete bipartite components (one per class of
   columns equal up to complement). In a component, each encrypted position has a type
   ``tau`` (its column equals the class's value or its complement) and each plain
   position a side ``sigma``, and ``k <- j`` forces ``f = tau[k] xor sigma[j]``. If the
   class is self-complementary (float columns that are 0.5 everywhere), either flip fits.
4. A key is a bijection inside every component with exactly pb/2 flips overall. Inside a
   component the number of flips can only take the values ``2x + |J0| - |K0|`` (x = how
   many type-0 positions go to side 1), so a small subset-sum over components tells
   which flip counts each component may use. From that, each position's remaining
   options ``(j, f)`` follow in closed form. A position is *determined* when exactly
   one option remains; the key is returned when all pb are.

The result is exact (the candidate set equals the union of all keys that explain the
pairs) whenever equality up to complement is transitive on the data, which it always
is for uint8 and, for float, unless distinct columns differ by less than the tolerance.
In that last case a component that is not complete bipartite is reported as wholly
undetermined (never as a wrong key).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from convmixer_jax.scheme.blocks import block_rows
from convmixer_jax.scheme.images import ImageError, check_pixel_values
from convmixer_jax.scheme.keys import InvalidKeyError, Key, block_len, make_key

#: Absolute tolerance for float images (values in [0, 1]); raised to 2 ulps at 1 for
#: low-precision dtypes (float16), whose ``1 - x`` is itself rounded.
FLOAT_TOLERANCE = 1e-6

_CHUNK_ELEMENTS = 1 << 20  # compared values per chunk of blocks (bounds memory)


@dataclasses.dataclass(frozen=True)
class RecoveryResult:
    """What plain/encrypted pairs reveal about the key.

    key: the validated :class:`Key` when every position is determined and the pairs are
        consistent, else None.

    consistent: False when no key of this form (one signed permutation with exactly pb/2
        flips, applied to every block) explains the pairs; ``reason`` then says why, and
        the per-position fields below describe only the raw evidence.

    undetermined: number of the pb encrypted positions whose (j, flip) is not unique.

    perm, flip: (pb,) int arrays; perm[k] = j and flip[k] = f where unique, else -1.

    candidates: (pb, pb, 2) bool; candidates[k, j, f] when some key that explains the
        pairs has perm[k] = j and flip[k] = f.

    raw_candidates: (pb, pb, 2) bool; the per-column evidence before using that perm is a
        permutation and flip has pb/2 ones.
    """

    block_size: int
    channels: int
    num_blocks: int
    key: Key | None
    consistent: bool
    reason: str | None
    undetermined: int
    perm: np.ndarray
    flip: np.ndarray
    candidates: np.ndarray
    raw_candidates: np.ndarray

    @property
    def block_len(self) -> int:
        return self.block_size * self.block_size * self.channels

    @property
    def candidate_counts(self) -> np.ndarray:
        """(pb,) number of (j, flip) options left for each encrypted position."""
        return self.candidates.sum(axis=(1, 2))

    @property
    def perm_candidates(self) -> np.ndarray:
        """(pb, pb) bool: plain positions j that encrypted position k may come from."""
        return self.candidates.any(axis=2)

    @property
    def determined(self) -> bool:
        return self.key is not None


# --------------------------------------------------------------------------- checks


def check_pair(plain, encrypted, block_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Plain and encrypted images (N, H, W, C) or (H, W, C), checked to fit each other and
    the block size (one-line errors): ``(plain, encrypted, pb)`` as arrays."""
    plain, encrypted = np.asarray(plain), np.asarray(encrypted)
    if plain.shape != encrypted.shape:
        raise ImageError(
            f"the plain images have shape {plain.shape} but the encrypted images have shape "
            f"{encrypted.shape}; pass each plain image with its own encrypted version"
        )
    if plain.dtype != encrypted.dtype:
        raise ImageError(
            f"the plain images are {plain.dtype} but the encrypted images are {encrypted.dtype}; "
            "pass both in the same dtype (uint8, or float in [0, 1])"
        )
    if plain.ndim not in (3, 4):
        raise ImageError(
            f"images must be (N, H, W, C) or (H, W, C) arrays; got shape {plain.shape}"
        )
    h, w, c = plain.shape[-3:]
    if (
        isinstance(block_size, bool)
        or not isinstance(block_size, (int, np.integer))
        or block_size < 1
    ):
        raise InvalidKeyError(f"block size must be a positive integer, got {block_size!r}")
    if h % block_size or w % block_size:
        raise ImageError(f"image size {h}x{w} is not divisible by the block size {block_size}")
    pb = block_len(block_size, c)  # InvalidKeyError for pb = 1 (no key but the identity)
    check_pixel_values(plain)
    check_pixel_values(encrypted)
    return plain, encrypted, pb


# --------------------------------------------------------------------------- evidence


def raw_candidates(P: np.ndarray, E: np.ndarray, tol: float | None = None) -> np.ndarray:
    """(pb, pb, 2) bool: ``[k, j, f]`` when ``E[:, k]`` equals ``P[:, j]`` (f = 0) or
    its complement (f = 1) in every block. ``tol`` None means exact (uint8)."""
    nb, pb = P.shape
    ek, ej, ef = (
        a.reshape(-1)
        for a in np.meshgrid(np.arange(pb), np.arange(pb), np.arange(2), indexing="ij")
    )
    one = np.uint8(255) if tol is None else 1.0
    start = 0
    while start < nb and ek.size:
        stop = min(nb, start + max(1, _CHUNK_ELEMENTS // ek.size))
        p, e = P[start:stop], E[start:stop]
        target = p[:, ej]
        target = np.where(ef.astype(bool), one - target, target)
        got = e[:, ek]
        ok = (
            (got == target).all(axis=0)
            if tol is None
            else (np.abs(got - target) <= tol).all(axis=0)
        )
        ek, ej, ef = ek[ok], ej[ok], ef[ok]
        start = stop
    cand = np.zeros((pb, pb, 2), bool)
    cand[ek, ej, ef] = True
    return cand


def _float_tolerance(dtype) -> float:
    return max(FLOAT_TOLERANCE, 2 * float(np.finfo(dtype).eps))


# --------------------------------------------------------------------------- resolution


def _components(adj: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Connected components of the bipartite graph adj[k, j] as (ks, js) index arrays."""
    pb = adj.shape[0]
    seen_k = np.zeros(pb, bool)
    seen_j = np.zeros(pb, bool)
    comps = []
    for k0 in range(pb):
        if seen_k[k0]:
            continue
        ks = np.zeros(pb, bool)
        ks[k0] = True
        js = np.zeros(pb, bool)
        while True:
            new_js = adj[ks].any(axis=0)
            new_ks = adj[:, new_js].any(axis=1) | ks
            if (new_js == js).all() and (new_ks == ks).all():
                break
            ks, js = new_ks, new_js
        seen_k |= ks
        seen_j |= js
        comps.append((np.flatnonzero(ks), np.flatnonzero(js)))
    for j in np.flatnonzero(~seen_j):
        comps.append((np.zeros(0, np.int64), np.array([j])))
    return comps


def _has_perfect_matching(adj: np.ndarray) -> bool:
    """Whether the square bipartite graph adj[k, j] has a perfect matching (augmenting paths)."""
    n = adj.shape[0]
    mate_j = np.full(n, -1)
    mate_k = np.full(n, -1)
    for k0 in range(n):
        parent = {}
        seen = np.zeros(n, bool)
        frontier, found = [k0], -1
        while frontier and found < 0:
            nxt = []
            for k in frontier:
                for j in np.flatnonzero(adj[k] & ~seen):
                    seen[j] = True
                    parent[j] = k
                    if mate_j[j] < 0:
                        found = j
                        break
                    nxt.append(mate_j[j])
                if found >= 0:
                    break
            frontier = nxt
        if found < 0:
            return False
        j = found
        while True:
            k = parent[j]
            prev = mate_k[k]
            mate_j[j], mate_k[k] = k, j
            if k == k0:
                break
            j = prev
    return True


@dataclasses.dataclass
class _Component:
    ks: np.ndarray
    js: np.ndarray
    kind: (
        str  # "signed": f = tau[k] ^ sigma[j]; "self": either flip; "loose": not complete bipartite
    )
    tau: np.ndarray | None = None
    sigma: np.ndarray | None = None

    def flip_counts(self) -> np.ndarray:
        """Bool vector over 0..n: the numbers of flips a bijection of this component can have."""
        n = len(self.ks)
        out = np.zeros(n + 1, bool)
        if self.kind != "signed":
            out[:] = True  # exact for "self"; a superset for "loose"
            return out
        a0, b0, b1 = (
            int((self.tau == 0).sum()),
            int((self.sigma == 0).sum()),
            int((self.sigma == 1).sum()),
        )
        for x in range(max(0, a0 - b0), min(a0, b1) + 1):
            out[2 * x + b0 - a0] = True
        return out

    def options(self, allowed: np.ndarray, raw: np.ndarray, out: np.ndarray) -> None:
        """Mark in ``out[k, j, f]`` every option used by some bijection of this component
        whose number of flips is allowed (``allowed``: bool over 0..n)."""
        ks, js, n = self.ks, self.js, len(self.ks)
        if self.kind == "loose":
            out[np.ix_(ks, js, [0, 1])] = raw[np.ix_(ks, js, [0, 1])]
            return
        counts = np.flatnonzero(allowed)
        if self.kind == "self":
            for f, possible in ((0, (counts <= n - 1).any()), (1, (counts >= 1).any())):
                if possible:
                    out[np.ix_(ks, js, [f])] = True
            return
        tau, sigma = self.tau, self.sigma
        a0, a1, b0 = int((tau == 0).sum()), int((tau == 1).sum()), int((sigma == 0).sum())
        xs = (counts - b0 + a0) // 2  # x = how many type-0 positions go to side 1
        k1_to_j0 = b0 - a0 + xs
        moves = {  # (tau, sigma) -> whether some allowed bijection maps a tau-k to a sigma-j
            (0, 1): (xs >= 1).any(),
            (0, 0): (a0 - xs >= 1).any(),
            (1, 0): (k1_to_j0 >= 1).any(),
            (1, 1): (a1 - k1_to_j0 >= 1).any(),
        }
        for (t, s), possible in moves.items():
            if possible:
                out[np.ix_(ks[tau == t], js[sigma == s], [t ^ s])] = True


def _classify(ks: np.ndarray, js: np.ndarray, raw: np.ndarray) -> _Component:
    sub = raw[np.ix_(ks, js, [0, 1])]  # (n, n, 2)
    if not sub.any(axis=2).all():
        return _Component(ks, js, "loose")
    if sub.all():
        return _Component(ks, js, "self")
    if (sub.sum(axis=2) != 1).any():
        return _Component(ks, js, "loose")
    f = sub[:, :, 1].astype(np.int64)  # the only flip of each edge
    sigma = f[0]  # with tau[0] = 0
    tau = f[:, 0] ^ sigma[0]
    if (f != (tau[:, None] ^ sigma[None, :])).any():
        return _Component(ks, js, "loose")
    return _Component(ks, js, "signed", tau, sigma)


def _sums(a: np.ndarray, b: np.ndarray, cap: int) -> np.ndarray:
    """Bool vector over 0..cap: the sums s + t with a[s] and b[t]."""
    return np.convolve(a.astype(np.int64), b.astype(np.int64))[: cap + 1] > 0


def _allowed_counts(comps: list[_Component], target: int) -> list[np.ndarray] | None:
    """For each component, its flip counts that fit some choice of the others summing to
    ``target``; None when no choice does."""
    counts = [c.flip_counts() for c in comps]
    variable = [i for i, v in enumerate(counts) if v.sum() > 1]
    rest = target - sum(int(v.argmax()) for v in counts if v.sum() == 1)
    if rest < 0:
        return None
    zero = np.zeros(rest + 1, bool)
    zero[0] = True
    prefix = [zero]  # prefix[i]: sums reachable with the first i variable components
    for i in variable:
        prefix.append(_sums(prefix[-1], counts[i], rest))
    if not prefix[-1][rest]:
        return None
    suffix = [zero]  # built backwards: suffix[i] covers variable components i..end
    for i in reversed(variable):
        suffix.insert(0, _sums(suffix[0], counts[i], rest))
    allowed = list(counts)
    for pos, i in enumerate(variable):
        others = _sums(prefix[pos], suffix[pos + 1], rest)
        t = np.arange(len(counts[i]))
        allowed[i] = counts[i] & (t <= rest) & others[np.clip(rest - t, 0, rest)]
    return allowed


def _resolve(raw: np.ndarray) -> tuple[np.ndarray | None, str | None]:
    """The options (k, j, f) used by some key that explains the evidence ``raw``, or
    (None, reason) when no key does."""
    pb = raw.shape[0]
    adj = raw.any(axis=2)
    lost = np.flatnonzero(~adj.any(axis=1))
    if lost.size:
        return None, (
            f"encrypted position {int(lost[0])} of the block matches no plain position "
            "(or its complement) in every block"
        )
    unused = np.flatnonzero(~adj.any(axis=0))
    if unused.size:
        return None, (
            f"plain position {int(unused[0])} of the block matches no encrypted position "
            "in every block"
        )
    comps = []
    for ks, js in _components(adj):
        if len(ks) != len(js):
            return None, (
                f"{len(ks)} encrypted positions (first {int(ks[0]) if len(ks) else '-'}) match "
                f"{len(js)} plain positions (first {int(js[0])}) and cannot be paired one to one"
            )
        comp = _classify(ks, js, raw)
        if comp.kind == "loose" and not _has_perfect_matching(adj[np.ix_(ks, js)]):
            return None, (
                f"{len(ks)} encrypted positions (first {int(ks[0])}) cannot be paired one to one "
                "with the plain positions they match"
            )
        comps.append(comp)
    allowed = _allowed_counts(comps, pb // 2)
    if allowed is None:
        return None, f"no pairing of the positions flips exactly pb/2 = {pb // 2} of them"
    out = np.zeros_like(raw)
    for comp, a in zip(comps, allowed, strict=True):
        comp.options(a, raw, out)
    return out, None


# --------------------------------------------------------------------------- entry point


def recover_key(plain, encrypted, block_size: int) -> RecoveryResult:
    """Recover the key from plain images and their encrypted versions.

    plain, encrypted: (N, H, W, C) or (H, W, C) arrays of the same shape and dtype, uint8
    or float in [0, 1]; ``encrypted[n]`` must be ``plain[n]`` encrypted with the key
    sought. Raises :class:`~convmixer_jax.scheme.images.ImageError` for mismatched or
    malformed arrays and :class:`~convmixer_jax.scheme.keys.InvalidKeyError` when the block
    size and channels give no valid key (odd pb).
    """
    plain, encrypted, pb = check_pair(plain, encrypted, block_size)
    c = plain.shape[-1]
    P, E = block_rows(plain, block_size), block_rows(encrypted, block_size)
    if plain.dtype == np.uint8:
        tol = None
    else:
        tol = _float_tolerance(plain.dtype)
        P, E = P.astype(np.float64), E.astype(np.float64)
    raw = raw_candidates(P, E, tol)
    resolved, reason = _resolve(raw)
    consistent = resolved is not None
    options = resolved if consistent else raw
    perm = np.full(pb, -1, np.int64)
    flip = np.full(pb, -1, np.int64)
    js_any = options.any(axis=2)
    fs_any = options.any(axis=1)
    one_j = js_any.sum(axis=1) == 1
    one_f = fs_any.sum(axis=1) == 1
    perm[one_j] = js_any[one_j].argmax(axis=1)
    flip[one_f] = fs_any[one_f].argmax(axis=1)
    undetermined = int((options.sum(axis=(1, 2)) != 1).sum())
    key = None
    if consistent and undetermined == 0:
        key = make_key(perm, flip, block_size, c)
    return RecoveryResult(
        block_size=int(block_size),
        channels=int(c),
        num_blocks=int(P.shape[0]),
        key=key,
        consistent=consistent,
        reason=reason,
        undetermined=undetermined,
        perm=perm,
        flip=flip,
        candidates=options,
        raw_candidates=raw,
    )
