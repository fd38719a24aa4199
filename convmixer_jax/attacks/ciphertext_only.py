"""Ciphertext-only key recovery: the key from encrypted images alone (docs/security.md).

Every block of every image is encrypted with the same signed permutation of its
pb = M*M*C values. Natural images leave three kinds of evidence in the ciphertext:

1. **Flips.** Values of one block are positively correlated in natural images, and a
   flip (``1 - x``; in the normalized values ``-x``) changes the sign of the correlations
   of its position. The signs of the correlation matrix of the pb encrypted positions
   over all blocks give the flips up to one global sign
   (:func:`~convmixer_jax.attacks.kernel_algebra.correlation_signs`).
2. **Layout.** After undoing the flips, the positions still have to be put back in
   their (row, column, channel) slots. Two horizontally (vertically) adjacent blocks
   form a window of 2*pb values whose covariance in natural images is a property of
   the slots alone: :func:`block_template` estimates it, with its inverse, from public
   images. The Gaussian log-likelihood of the encrypted windows under a candidate layout
   is a sum of quadratic-assignment terms (``layout_search``), maximized over
   permutations from Frank-Wolfe starts and one constructive guess
   (:func:`signature_layout`), searched again when the best is reached only once. The
   window across a block border is what breaks the symmetries of the block (mirrors and
   rotations leave the correlations inside a block unchanged, but not the continuation of
   the right column into the next block's left column).
3. **Colour and sign.** What the second-order statistics cannot see is the order of
   the channels and the global sign (the whole image negated). A learned prior
   (:mod:`convmixer_jax.attacks.image_prior`) scores the 12 colour variants of the
   decrypted images, each image's score averaged over its own 12 variants and their
   mirrors (``image_prior.group_log_probs``); the log-probabilities of all images add
   up. For odd pb the flip count (floor(pb/2) ones) fixes the sign by itself.
   Images decoded from JPEGs add a cue of their own: only the right channel order puts
   the luma's 8 x 8 DCT coefficients back on a quantization lattice
   (:mod:`convmixer_jax.attacks.jpeg_trace`); its log evidence is added to the prior's.

With the encrypted model as well (``model=``), the kernel attack of
:mod:`convmixer_jax.attacks.from_model` proposes the key up to the block's dihedral
symmetries (its colour and sign decided by the model's own BatchNorm statistics on
public images) and the encrypted images pick the orientation by the likelihood above.

The result says how sure it is: a key is *determined* only when the flips, the layout
and the colour/sign decisions each clear a stated margin (:data:`SIGN_SIGMAS`,
:data:`LAYOUT_MARGIN`, :data:`COLOUR_MARGIN`); otherwise ``key`` is None and
``best_guess`` holds the most likely key with the reason.
"""

from __future__ import annotations

import dataclasses
import time
from importlib.resources import files

import numpy as np
from scipy.optimize import linear_sum_assignment

from convmixer_jax.attacks import from_model
from convmixer_jax.attacks.image_prior import (
    colour_variants,
    group_log_probs,
    invert_variant,
    load_image_prior,
)
from convmixer_jax.attacks.jpeg_trace import jpeg_log_evidence
from convmixer_jax.attacks.kernel_algebra import (
    balanced_flip,
    correlation_signs,
    decrypt_positions,
    dihedral_keys,
)
from convmixer_jax.attacks.layout_search import (
    iterated_local_search,
    local_search,
    merge_maxima,
    objective,
    search,
)
from convmixer_jax.scheme.blocks import normalized_blocks, normalized_images
from convmixer_jax.scheme.images import ImageError
from convmixer_jax.scheme.keys import InvalidKeyError, Key, block_len, flip_ones, validate_key

#: A flip is decided when its support in the correlation signs exceeds this many
#: standard deviations of what uncorrelated values (noise) would give.
SIGN_SIGMAS = 6.0
#: nats by which the chosen layout must beat every other local maximum found (other
#: than its own colour variants) and every exchange of two positions.
LAYOUT_MARGIN = 5.0
#: starts of the layout search that must end in the chosen layout (or one of its
#: dihedral copies, which the polish maps onto it).
MIN_HITS = 2
#: nats by which the chosen colour/sign variant must beat the next one. With the JPEG
#: trace the channel order leads by hundreds of nats and the margin is the prior's sign
#: alone; at 3 nats a security report claimed one negated key (docs/security.md).
COLOUR_MARGIN = 8.0
#: with the model, nats by which the images' colour evidence must prefer another variant
#: to the model's to withhold the claim.
CONTRADICTION_MARGIN = 3.0
#: covariance regularizations of the template, from the smooth objective the search
#: starts on to the one it ends on (values are normalized to [-1, 1]).
TEMPLATE_REGS = (1.0, 0.1, 0.01)


def _pairs(grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, gh, gw, pb) -> horizontal and vertical windows of two blocks, (n, 2*pb) each."""
    pb = grid.shape[-1]
    h = np.concatenate([grid[:, :, :-1], grid[:, :, 1:]], -1).reshape(-1, 2 * pb)
    v = np.concatenate([grid[:, :-1], grid[:, 1:]], -1).reshape(-1, 2 * pb)
    return h, v


@dataclasses.dataclass(frozen=True, eq=False)
class BlockTemplate:
    """Second-order statistics of natural images at the scale of one block pair.

    precisions: one (horizontal, vertical) pair per regularization in ``regs``; each is the
      (2*pb, 2*pb) inverse covariance of the normalized values of two adjacent blocks.
    """

    block_size: int
    channels: int
    regs: tuple[float, ...]
    precisions: tuple[tuple[np.ndarray, np.ndarray], ...]
    public_images: int
    windows: int


def block_template(
    public_images, block_size: int, *, regs=TEMPLATE_REGS, max_windows: int = 400_000, seed: int = 0
) -> BlockTemplate:
    """Estimate the block-pair template from public natural images.

    Windows are taken at every offset 0..M-1 of the block grid (natural images are
    stationary), at most ``max_windows`` of each kind (a seeded subset).

    Args:
      public_images: (N, H, W, C) uint8 or float in [0, 1], at the scale of the images to
        be attacked (natural images of the same size; resize them first if needed).
      block_size: M.
    """
    x = np.asarray(public_images)
    if x.ndim != 4:
        raise ImageError(f"public images must be (N, H, W, C), got shape {x.shape}")
    m, c = block_size, x.shape[-1]
    pb = block_len(m, c)
    rng = np.random.default_rng(seed)
    hs, vs = [], []
    for o in range(m):
        sub = x[:, o:, o:]
        hh, ww = (sub.shape[1] // m) * m, (sub.shape[2] // m) * m
        if hh < 2 * m or ww < 2 * m:
            continue
        h, v = _pairs(normalized_blocks(sub[:, :hh, :ww], m))
        hs.append(h[rng.permutation(len(h))[: max_windows // m]])
        vs.append(v[rng.permutation(len(v))[: max_windows // m]])
    if not hs or sum(len(h) for h in hs) < 4 * pb:
        raise ImageError(
            f"{len(x)} public images of {x.shape[1]} x {x.shape[2]} give too few "
            f"{m} x {m} block pairs for a template; pass more (or larger) public images"
        )
    covs = [np.cov(np.concatenate(d), rowvar=False) for d in (hs, vs)]
    eye = np.eye(2 * pb)
    precs = tuple(tuple(np.linalg.inv(cv + r * eye) for cv in covs) for r in regs)
    return BlockTemplate(
        m, c, tuple(float(r) for r in regs), precs, int(len(x)), int(sum(len(h) for h in hs))
    )


def _terms(
    prec_h: np.ndarray, prec_v: np.ndarray, signed_grid: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Stacked (A, B), (8, pb, pb): f(p) = sum A[t,u,v] B[t,p u,p v] is the Gaussian
    log-likelihood (nats, up to a constant) of the centered encrypted windows under layout p.

    prec_h, prec_v: (2*pb, 2*pb) template precisions; signed_grid: (N, gh, gw, pb)
    normalized encrypted blocks with the flips undone (up to the global sign)."""
    pb = signed_grid.shape[-1]
    a_list, b_list = [], []
    for prec, d in zip((prec_h, prec_v), _pairs(signed_grid), strict=True):
        d = d - d.mean(0)
        s = d.T @ d
        for i in range(2):
            for j in range(2):
                blk = (slice(i * pb, (i + 1) * pb), slice(j * pb, (j + 1) * pb))
                a_list.append(-0.5 * prec[blk])
                b_list.append(s[blk])
    return np.stack(a_list), np.stack(b_list)


def _correlation(cov: np.ndarray) -> np.ndarray:
    """(n, n) covariance -> (n, n) correlation matrix."""
    d = np.sqrt(np.maximum(np.diag(cov), 1e-12))
    return cov / d[:, None] / d[None, :]


def _signatures(window_covs, pb: int) -> np.ndarray:
    """(pb, F): what a position's correlations say about its slot, whatever the layout: the
    sorted correlations with the other positions of its block and with those of the next
    block (right and below), and of the previous block's with it."""
    out = []
    for cov in window_covs:
        c = _correlation(cov)
        for i, j in ((0, 0), (0, 1), (1, 0)):
            out.append(np.sort(c[i * pb : (i + 1) * pb, j * pb : (j + 1) * pb], 1))
    return np.concatenate(out, 1)


def signature_layout(template: BlockTemplate, signed_grid: np.ndarray) -> np.ndarray:
    """A constructive layout guess p (pb,), a start for the search: each encrypted position
    is matched (one linear assignment) to the template slot whose sorted correlations
    are nearest to its own.

    Sorting makes a position's profile independent of where the other positions are, so
    it needs no layout; the profile still tells the block's corners, edges and interior
    apart and, through the next block, which side a slot faces. Slots the block's
    symmetries exchange get equal profiles: the search's exchanges settle them.
    """
    pb = signed_grid.shape[-1]
    reg = template.regs[-1]
    covs = [np.linalg.inv(prec) - reg * np.eye(2 * pb) for prec in template.precisions[-1]]
    st = _signatures(covs, pb)
    se = _signatures([np.cov(d, rowvar=False) for d in _pairs(signed_grid)], pb)
    cost = np.sum((st[:, None, :] - se[None, :, :]) ** 2, -1)  # (slot, encrypted position)
    return linear_sum_assignment(cost)[1]


def colour_key(key: Key, variant) -> Key:
    """The key whose decryption is ``apply_variant(decrypt(E, key), variant)``.

    variant: (negate, order) as in :mod:`~convmixer_jax.attacks.image_prior`.
    """
    neg, order = variant
    c = key.channels
    perm = np.asarray(key.perm)
    inv_order = np.argsort(np.asarray(order))
    new_perm = perm - perm % c + inv_order[perm % c]
    return Key(new_perm, np.asarray(key.flip) ^ np.uint8(bool(neg)), key.block_size, c)


def _layout_of(key: Key) -> np.ndarray:
    """p[u] = the encrypted position that holds plain slot u."""
    return np.argsort(np.asarray(key.perm))


def _key_from(
    p: np.ndarray, s: np.ndarray, m: int, c: int, support: np.ndarray | None = None
) -> Key:
    """The key of layout p with flips where s < 0 (the global sign flipped when that gives the
    right count; else the floor(pb/2) positions with the most evidence for a flip)."""
    flip = (s < 0).astype(np.uint8)
    if int(flip.sum()) != flip_ones(len(s)):
        flip = 1 - flip
    if int(flip.sum()) != flip_ones(len(s)):
        w = np.abs(support) if support is not None else np.ones(len(s))
        flip = balanced_flip(np.where(flip == 1, 1.0, -1.0) * w)
    return Key(np.argsort(p), flip, m, c)


@dataclasses.dataclass(frozen=True, eq=False)
class CiphertextRecovery:
    """What encrypted images alone reveal about the key.

    Attributes:
      key: the key when determined (every margin cleared), else None.
      best_guess: the most likely key found (always set).
      reason: why the key is not determined ('' when it is).
      sign_support: (pb,) support of each flip, in noise standard deviations.
      layout_margin: nats between the chosen layout and the best other one found.
      colour_margin: nats between the chosen colour/sign variant and the next (with the
        model: inf, or minus the lead of another variant when the images contradict it).
      colour_log_probs: (V,) summed log-probs of the colour variants under the prior
        (V = 0 without a prior), in the order of ``colour_variants``.
      jpeg_log_evidence: (V,) the JPEG trace's log evidence of the same variants, added
        to ``colour_log_probs`` for the choice (V = 0 when the images show no trace or
        the trace is off).
      colour_prior_guess: the key the colour prior alone would pick for the same layout
        (None without a prior, or with the model), to measure what the JPEG trace adds.
    """

    key: Key | None
    best_guess: Key
    reason: str
    num_images: int
    num_blocks: int
    sign_support: np.ndarray
    layout_margin: float
    colour_margin: float
    colour_log_probs: np.ndarray
    method: str
    seconds: float
    notes: str = ""
    jpeg_log_evidence: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
    colour_prior_guess: Key | None = None

    @property
    def determined(self) -> bool:
        return self.key is not None


def _colour_choice(best: Key, grid: np.ndarray, prior, notes: list[str], jpeg_trace: bool = True):
    """Pick the colour/sign variant of ``best`` by the prior and the JPEG trace.

    Returns (key, margin, prior log-probs (V,) or (0,), JPEG evidence (V,) or (0,), the
    key the prior alone picks or None).
    """
    c = best.channels
    pb = grid.shape[-1]
    variants = colour_variants(c)
    valid = []
    for v in variants:
        try:
            validate_key(colour_key(best, invert_variant(v)))
            valid.append(True)
        except InvalidKeyError:
            valid.append(False)  # odd pb: the negated key has the wrong flip count
    if not any(v[0] for v, ok in zip(variants, valid, strict=True) if ok) and len(variants) > 1:
        notes.append(f"global sign from the flip count (odd pb = {pb})")
    lp, ev, total = _colour_evidence(grid, best, prior, notes, jpeg_trace)
    if not len(lp):
        notes.append(
            "no colour prior for these images"
            + ("" if len(ev) else ": channel order and sign left as found")
        )

    def pick(score):
        masked = np.where(valid, score, -np.inf)
        order = np.argsort(-masked, kind="stable")
        j = int(order[0])
        margin = (
            float(masked[j] - masked[order[1]])
            if len(order) > 1 and np.isfinite(masked[order[1]])
            else np.inf
        )
        return validate_key(colour_key(best, invert_variant(variants[j]))), margin

    key, margin = pick(np.broadcast_to(np.asarray(total, np.float64), (len(variants),)))
    prior_key = pick(lp)[0] if len(lp) else None
    return key, margin, lp, ev, prior_key


def _colour_evidence(grid: np.ndarray, key: Key, prior, notes: list[str], jpeg_trace: bool):
    """The colour variants of the images decrypted with ``key``: the prior's summed
    log-probs (V,) or (0,), the JPEG trace's evidence (V,) or (0,), and their sum
    (0.0 when neither applies)."""
    m, c = key.block_size, key.channels
    images = normalized_images(decrypt_positions(grid, key), m, c)
    ev = _jpeg_evidence(images, colour_variants(c), notes) if jpeg_trace else np.zeros(0)
    lp = group_log_probs(prior, images).sum(0) if _prior_fits(prior, c) else np.zeros(0)
    return lp, ev, (lp if len(lp) else 0.0) + (ev if len(ev) else 0.0)


def _jpeg_evidence(images: np.ndarray, variants, notes: list[str]) -> np.ndarray:
    """The JPEG trace's log evidence of each variant (:mod:`~convmixer_jax.attacks.jpeg_trace`),
    or (0,) when the images show none."""
    ev = jpeg_log_evidence(images, variants)
    if np.ptp(ev) < 1e-9:
        return np.zeros(0)
    j = int(np.argmax(ev))
    notes.append(
        f"JPEG trace: the luma of channel order {variants[j][1]} lies on a JPEG lattice "
        f"({ev[j] - np.median(ev):.0f} nats over the median variant)"
    )
    return ev


def recover_key_ciphertext_only(
    encrypted,
    block_size: int,
    template: BlockTemplate,
    *,
    prior=None,
    model=None,
    public_images=None,
    starts: int | None = None,
    seed: int = 0,
    jpeg_trace: bool = True,
    progress: bool = False,
) -> CiphertextRecovery:
    """Recover the key from encrypted images alone.

    Args:
      encrypted: (N, H, W, C) or (H, W, C) uint8 or float in [0, 1], encrypted with one
        key of block size M (H, W multiples of M).
      block_size: M.
      template: :func:`block_template` of public natural images at the same scale.
      prior: an :class:`~convmixer_jax.attacks.image_prior.network.ImagePrior` for C channels, or
        None (then the channel order and, for even pb, the sign stay undetermined).
      model: optional ``(config, encrypted_variables)`` of the encrypted model; with
        ``public_images`` (unlabeled natural images) its kernel attack proposes the key.
      starts: layout-search starts (default 48 for pb <= 64, else 12).
      jpeg_trace: add the JPEG trace's evidence (:mod:`~convmixer_jax.attacks.jpeg_trace`)
        to the prior's for the channel order and sign (no effect on images without one).
    Returns:
      a :class:`CiphertextRecovery`.
    """
    t0 = time.perf_counter()
    e = np.asarray(encrypted)
    if e.ndim == 3:
        e = e[None]
    if e.ndim != 4:
        raise ImageError(f"encrypted images must be (N, H, W, C) or (H, W, C), got shape {e.shape}")
    m, c = block_size, e.shape[-1]
    if (template.block_size, template.channels) != (m, c):
        raise ImageError(
            f"the template is for {template.block_size} x {template.block_size} blocks of "
            f"{template.channels} channels, the images have {c} channels and block size {m}; "
            "build the template from public images of the same kind"
        )
    h, w = e.shape[1:3]
    if h % m or w % m:
        raise ImageError(
            f"images of {h} x {w} do not split into {m} x {m} blocks; "
            f"pass images whose height and width are multiples of {m}"
        )
    grid = normalized_blocks(e, m)
    n_img, gh, gw, pb = grid.shape
    if gh < 2 or gw < 2:
        raise ImageError(
            f"images of {gh} x {gw} blocks lack horizontally or vertically adjacent blocks; "
            f"pass images of at least {2 * m} x {2 * m} pixels"
        )
    flat = grid.reshape(-1, pb)
    n_blocks = len(flat)
    notes: list[str] = []
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.nan_to_num(np.corrcoef(flat, rowvar=False))
    s, support = correlation_signs(corr)
    noise = np.sqrt((pb - 1) / max(n_blocks, 1))
    sign_support = support / noise
    if np.all(sign_support < SIGN_SIGMAS):
        # no flip is supported: the images carry no structure (noise); no layout search.
        # With only some weak (a flat image), the search still gives a best guess, never claimed.
        guess = validate_key(_key_from(np.arange(pb), s, m, c, support))
        return _result(
            guess, grid, sign_support, np.inf, np.inf, np.zeros(0), "ciphertext", notes, t0
        )
    signed = grid * s
    levels = [_terms(ph, pv, signed) for ph, pv in template.precisions]
    a, b = levels[-1]

    if model is not None and public_images is not None:
        return _with_model(
            model, public_images, template, grid, sign_support, notes, t0, prior, jpeg_trace
        )

    sols = _layout_search(
        levels,
        starts or (48 if pb <= 64 else 12),
        seed,
        progress,
        notes,
        initial=[signature_layout(template, signed)],
    )
    # the block's dihedral symmetries of the best layouts, polished: the search can end in a
    # mirrored or rotated copy of the truth
    hits = {p.tobytes(): h for p, _, h in sols}
    found = {p.tobytes(): (p, v) for p, v, _ in sols}
    for p0, _, _ in sols[:2]:
        for k in dihedral_keys(_key_from(p0, s, m, c, support)):
            p, v, _ = local_search(a, b, _layout_of(k))
            found.setdefault(p.tobytes(), (p, v))
    ranked = sorted(found.values(), key=lambda t: -t[1])
    best_p, best_v = ranked[0]
    _, _, gains = local_search(a, b, best_p, max_iter=1)
    best = validate_key(_key_from(best_p, s, m, c, support))
    # the colour variants of the best layout are not alternatives to it
    same = {_layout_of(colour_key(best, (False, o))).tobytes() for _, o in colour_variants(c)}
    others = [v for p, v in ranked[1:] if p.tobytes() not in same]
    swap_margin = float(-np.max(gains + np.diag(np.full(pb, -np.inf)))) if pb > 1 else np.inf
    layout_margin = min([best_v - v for v in others] + [swap_margin])
    best_hits = hits.get(best_p.tobytes(), 0)
    if best_hits < MIN_HITS:
        notes.append(f"the best layout was reached from {best_hits} of the search's starts")
    key, colour_margin, lp, ev, prior_key = _colour_choice(best, grid, prior, notes, jpeg_trace)
    return _result(
        key,
        grid,
        sign_support,
        layout_margin,
        colour_margin,
        lp,
        "ciphertext",
        notes,
        t0,
        hits=best_hits,
        ev=ev,
        prior_key=prior_key,
    )


def _layout_search(
    levels, starts: int, seed: int, progress: bool, notes: list[str], initial=()
) -> list:
    """The layout search's distinct local maxima (p, f(p), hits), best first.

    When the best was reached from fewer than :data:`MIN_HITS` starts the landscape is
    not covered: two more searches run (another seed; and starting on the second level,
    less smoothed), their hits add up, and the best layout is kicked by an iterated local
    search. A layout only the kicks found has no hits, so it is never claimed.
    """
    sols = search(levels, starts=starts, seed=seed, initial=initial, progress=progress)
    if sols[0][2] >= MIN_HITS:
        return sols
    found = list(sols)
    for lv, sd in ((levels, seed + 1), (levels[1:] or levels, seed + 2)):
        found += search(lv, starts=starts, seed=sd, progress=progress)
    a, b = levels[-1]
    p, v = iterated_local_search(a, b, merge_maxima(found)[0][0], seed=seed)
    ranked = merge_maxima(found + [(p, v, 0)])
    notes.append(
        f"the first search reached its best layout from {sols[0][2]} start(s); searched again "
        f"and kicked: the best layout now has {ranked[0][2]} hit(s)"
    )
    return ranked


def _result(
    key,
    grid,
    sign_support,
    layout_margin,
    colour_margin,
    lp,
    method,
    notes,
    t0,
    hits: int = MIN_HITS,
    ev=None,
    prior_key=None,
) -> CiphertextRecovery:
    reasons = []
    if hits < MIN_HITS:
        reasons.append(
            f"only {hits} of the layout search's starts reached the best layout "
            f"(needs {MIN_HITS}); a better one may exist"
        )
    weak = int(np.sum(sign_support < SIGN_SIGMAS))
    if weak:
        reasons.append(
            f"{weak} of {grid.shape[-1]} flips are not supported by the correlations "
            f"(below {SIGN_SIGMAS:g} noise standard deviations)"
        )
    if layout_margin < LAYOUT_MARGIN:
        reasons.append(
            f"the layout is ahead of the next one by {layout_margin:.1f} nats "
            f"(needs {LAYOUT_MARGIN:g})"
        )
    if colour_margin < 0:
        reasons.append(
            f"the encrypted images' colour evidence contradicts the model's channel order / sign "
            f"by {-colour_margin:.1f} nats"
        )
    elif colour_margin < COLOUR_MARGIN:
        reasons.append(
            f"the channel order / sign is ahead of the next by {colour_margin:.1f} nats "
            f"(needs {COLOUR_MARGIN:g})"
        )
    return CiphertextRecovery(
        key=None if reasons else key,
        best_guess=key,
        reason="; ".join(reasons),
        num_images=int(grid.shape[0]),
        num_blocks=int(np.prod(grid.shape[:3])),
        sign_support=np.asarray(sign_support),
        layout_margin=float(layout_margin),
        colour_margin=float(colour_margin),
        colour_log_probs=np.asarray(lp),
        method=method,
        seconds=time.perf_counter() - t0,
        notes="; ".join(notes),
        jpeg_log_evidence=np.zeros(0) if ev is None else np.asarray(ev),
        colour_prior_guess=prior_key,
    )


def _with_model(
    model, public_images, template, grid, sign_support, notes, t0, prior=None, jpeg_trace=True
):
    """The kernel attack's key, its orientation chosen by the encrypted images."""
    config, enc_vars = model
    rec = from_model.recover_key_from_encrypted_model(config, enc_vars, public_images)
    if rec.key is None:
        raise ValueError(
            "the encrypted model's kernel gives no valid key; check that the model and "
            "the images were encrypted with the same block size"
        )
    # the dihedral copies of the model's key share its flips, so one set of terms scores them all
    sgn = 1.0 - 2.0 * np.asarray(rec.key.flip, np.float64)
    a, b = _terms(*template.precisions[-1], grid * sgn)
    scored = sorted(
        ((objective(a, b, _layout_of(k)), k) for k in dihedral_keys(rec.key)), key=lambda t: -t[0]
    )
    margin = scored[0][0] - scored[1][0] if len(scored) > 1 else np.inf
    notes.append(f"model: {rec.method}; {rec.notes}")
    best = scored[0][1]
    # The model decides the colour and sign; the images may still contradict it. Their
    # prior's log-probs of best's 12 colour variants (index 0: best as it is), plus their
    # JPEG trace: when another variant leads by CONTRADICTION_MARGIN, the key is not claimed.
    colour_margin = np.inf
    lp, ev, total = _colour_evidence(grid, best, prior, notes, jpeg_trace)
    if np.ndim(total) and len(total) > 1:
        lead = float(np.max(total[1:]) - total[0])
        if lead >= CONTRADICTION_MARGIN:
            colour_margin = -lead
            notes.append(
                f"the images' colour prior / JPEG trace prefer another channel order / sign by "
                f"{lead:.1f} nats"
            )
    return _result(
        best, grid, sign_support, margin, colour_margin, lp, "ciphertext+model", notes, t0, ev=ev
    )


def _prior_fits(prior, channels: int) -> bool:
    """Whether ``prior`` is a colour prior for images of ``channels`` channels."""
    return (
        prior is not None
        and getattr(prior, "config", None) is not None
        and prior.config.channels == channels
    )


def default_prior(channels: int):
    """The colour prior shipped with the package for RGB (trained on CIFAR-10 training images
    0..44,999; its held-out accuracy is in ``priors/cifar10-rgb-accuracy.json``), else None."""
    if channels != 3:
        return None
    return load_image_prior(files("convmixer_jax.attacks") / "priors" / "cifar10-rgb")


def match_scale(images, height: int, width: int, *, batch: int = 64) -> np.ndarray:
    """(N, h, w, C) uint8 or float in [0, 1] -> (N, height, width, C) uint8, resized with a
    bicubic filter (antialiased when shrinking) when the size differs."""
    x = np.asarray(images)
    if x.dtype != np.uint8:
        x = np.clip(np.rint(x.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    if x.shape[1:3] == (height, width):
        return x
    import jax

    out = np.empty((len(x), height, width, x.shape[-1]), np.uint8)
    for i in range(0, len(x), batch):
        part = jax.image.resize(
            x[i : i + batch].astype(np.float32),
            (len(x[i : i + batch]), height, width, x.shape[-1]),
            "cubic",
            antialias=True,
        )
        out[i : i + batch] = np.clip(np.rint(np.asarray(part)), 0, 255).astype(np.uint8)
    return out
