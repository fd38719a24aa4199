"""Recovery of a key with block scrambling: its pixel key and the permutation of block
positions that a ViT absorbs into its position embedding (docs/security.md,
docs/method.md "Extension: block scrambling and Vision Transformers").

A key with block scrambling is a pixel key (the signed permutation of the pb = M*M*C values
of every block) plus ``block_perm`` (gh*gw,): the encrypted image's block b is the plain
block ``block_perm[b]``, and the encrypted ViT's patch row b of the position embedding is
the plain row ``block_perm[b]``. Three kinds of evidence recover ``block_perm``:

- **The encrypted model's position embedding**
  (:func:`~convmixer_jax.attacks.position_embedding.block_perm_from_pos_embed`): the
  block permutation up to the grid's rotations and mirrors.
- **Encrypted queries** (:func:`~convmixer_jax.attacks.jigsaw.solve_jigsaw`): their
  blocks, pixel key undone, put back together as a jigsaw, with the position embedding's
  evidence added to that of their edges when the model is at hand.
- **Choosing among symmetric candidates** (:func:`choose_symmetry`, here): the queries
  decrypted with each candidate (the edges across blocks only join up when the blocks'
  contents and their places are rotated alike), then the encrypted model's confidence on
  public images encrypted with each candidate (:func:`model_confidence`), or, without a
  model, how well the decrypted queries fit the coarse layout of public images (light
  from above). One ambiguity remains by construction: a model trained with
  horizontal-flip augmentation is as confident on mirrored images, so the key and its
  mirror twin (:func:`mirrored_key`, which decrypts every query to its mirror image) tie;
  the result says when the key is determined only up to that mirror.

The pixel key comes from the encrypted model's patch-embedding kernel when the kernel
shows a layout (:func:`kernel_structure`); a ViT's kernel stays close to its random
initialization for long, and then the queries' own blocks give the pixel key
(:func:`pixel_keys_from_queries`), checked on the queries put back together.

Two whole attacks combine them: :func:`recover_scrambled_key_from_model` (the encrypted
ViT, with encrypted queries and/or public images) and
:func:`recover_scrambled_key_ciphertext_only` (encrypted queries, public images and a
block template; the encrypted model's kernel may add the pixel key's candidates).

Every result says how sure it is: ``determined`` is True only when each decision clears a
stated threshold (the position embedding's and the jigsaw's, :data:`EDGE_MARGIN`,
:data:`CONFIDENCE_Z`, and the ciphertext-only attack's for a pixel key from the queries);
the best guess is returned either way.

NumPy and SciPy, apart from :func:`model_confidence` and the confidence ranking, which run
the model with JAX.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import numpy as np

from convmixer_jax.attacks.jigsaw import (
    JigsawSolution,
    edge_evidence,
    pixel_decrypted_blocks,
    placement_evidence,
    solve_jigsaw,
    unit_floats,
    unscrambled,
)
from convmixer_jax.attacks.kernel_algebra import (
    balanced_flip,
    correlation_signs,
    dihedral_keys,
    same_key,
    symmetric_keys,
)
from convmixer_jax.attacks.layout_search import iterated_local_search, search
from convmixer_jax.attacks.position_embedding import (
    PositionRecovery,
    block_perm_from_pos_embed,
    dihedral_maps,
    grid_symmetries,
    patch_position_rows,
)
from convmixer_jax.scheme.blocks import normalized_blocks
from convmixer_jax.scheme.keys import Key, flip_ones, make_key

#: nats by which the decrypted queries' edges must prefer the chosen candidate's class of
#: candidates (those that differ by a rotation, mirror or colour change of the whole
#: image, which leave the edges unchanged) to every other candidate.
EDGE_MARGIN = 10.0
#: paired z-score (mean per-image difference over its standard error) by which the chosen
#: candidate must beat the next in confidence (or fit to public images).
CONFIDENCE_Z = 4.0
#: how far :func:`kernel_structure`'s score must exceed its null for the pixel key's
#: candidates to come from the kernel rather than from the queries.
KERNEL_STRUCTURE = 0.05


# ----------------------------------------------------------------------------- symmetries of a key


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
    symmetry ``element`` (an index of
    :func:`~convmixer_jax.attacks.position_embedding.dihedral_maps`, which must map the key's
    grid onto itself): ``encrypt(g(x), result) == encrypt(x, key)``."""
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
    """Nats of each candidate's placement of the queries' blocks
    (:func:`~convmixer_jax.attacks.jigsaw.edge_evidence` of the queries with its pixel key
    undone)."""
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
    x = unit_floats(images)
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
        their edges (:func:`~convmixer_jax.attacks.jigsaw.edge_evidence`); those tied with
        the best (the rotations, mirrors and colour changes of the whole image, which leave
        the edges as they are) go on to the next stage.
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
      structured: the inputs carry the structure the attack reads (a position embedding
        with grid structure; images whose flips the correlations support); when False the
        best guess is no better than a random key.
      reason: why not determined ('' when it is).
      method, notes, seconds: what ran and how long it took.
      position: the position-embedding step, if it ran; jigsaw: the jigsaw step, if it ran;
      choice: the symmetry choice.
      kernel_structure: the patch-embedding kernel's layout score and its null
        (:func:`kernel_structure`), if the kernel was read.
    """

    key: Key | None
    best_guess: Key
    determined: bool
    up_to_mirror: bool
    reason: str
    method: str
    notes: str
    seconds: float
    structured: bool = True
    position: PositionRecovery | None = None
    jigsaw: JigsawSolution | None = None
    choice: SymmetryChoice | None = None
    kernel_structure: tuple[float, float] | None = None


def _scrambling_keys(pixel_keys: Sequence[Key], block_perms, grid) -> list[Key]:
    return [
        make_key(np.asarray(k.perm), np.asarray(k.flip), k.block_size, k.channels, bp, grid)
        for bp in block_perms
        for k in pixel_keys
    ]


def pixel_keys_from_queries(queries, template, *, seed: int = 0) -> tuple[list[Key], str]:
    """The pixel key's candidates from encrypted queries (N, H, W, C) alone, their blocks
    scrambled or not: flips from the blocks' correlation signs, the layout from their
    covariance under ``template``
    (:func:`~convmixer_jax.attacks.ciphertext_only.block_template` of natural images at the
    same scale). Returns the layout found with its symmetries (96 keys for 4 x 4 RGB
    blocks; none when the queries support no flip) and a note saying which."""
    from convmixer_jax.attacks.ciphertext_only import SIGN_SIGMAS

    m, c = template.block_size, template.channels
    key0, sigmas = _pixel_key_from_blocks(normalized_blocks(queries, m), template, m, c, seed, 24)
    if np.all(sigmas < SIGN_SIGMAS):
        return [], "the queries support no flip"
    return symmetric_keys(key0), "pixel-key candidates from the queries' blocks"


def _pixel_layout_check(queries, block_perm, template, pixel: Key) -> tuple[str, Key | None]:
    """Why the queries, their blocks put back by ``block_perm``, do not support ``pixel``'s
    class of block symmetries ('' when they do), and the pixel key they support clearly
    instead (or None): the ciphertext-only attack on them
    (:func:`~convmixer_jax.attacks.ciphertext_only.recover_key_ciphertext_only`, whose
    windows across block borders fix the layout) must support every flip and find its
    layout clearly, and that layout must be in the class."""
    from convmixer_jax.attacks.ciphertext_only import (
        LAYOUT_MARGIN,
        SIGN_SIGMAS,
        recover_key_ciphertext_only,
    )

    m = template.block_size
    rec = recover_key_ciphertext_only(
        unscrambled(queries, block_perm, m), m, template, starts=24, jpeg_trace=False
    )
    weak = int(np.sum(rec.sign_support < SIGN_SIGMAS))
    if weak:
        return f"{weak} flips of the queries put together are not supported", None
    if rec.layout_margin < LAYOUT_MARGIN or "layout search's starts" in rec.reason:
        return (
            "the queries put together do not single out a pixel layout "
            f"(margin {rec.layout_margin:.1f} nats, needs {LAYOUT_MARGIN:g}, from 2 starts)",
            None,
        )
    if not any(same_key(rec.best_guess, k) for k in symmetric_keys(pixel)):
        return "the queries put together support another pixel layout", rec.best_guess
    return "", None


def kernel_structure(encrypted_kernel, *, seed: int = 0, nulls: int = 3) -> tuple[float, float]:
    """How much layout a patch-embedding kernel (P, P, C, dim) shows: ``(score, null)``.

    ``score`` is the mean absolute correlation of the rows that the kernel attack
    (:func:`~convmixer_jax.attacks.from_weights.recover_key_from_structure`) puts in one
    pixel or at same-channel 4-neighbours, minus that of the other pairs; ``null`` the
    highest score of the same attack on ``nulls`` copies of the kernel whose columns were
    shuffled independently (rows without layout). A trained kernel scores well above its
    null; one still close to its random initialization does not, and its candidates are
    no better than random keys."""
    from convmixer_jax.attacks.from_weights import recover_key_from_structure
    from convmixer_jax.attacks.kernel_algebra import decode_positions, kernel_rows

    rows, p, c = kernel_rows(encrypted_kernel, "encrypted_kernel")

    def score(r) -> float:
        key = recover_key_from_structure(r.reshape(p, p, c, -1), seed=seed).key
        u = r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-30)
        a = np.abs(u @ u.T)
        i, j, ch = decode_positions(np.asarray(key.perm), p, c)
        dist = np.abs(i[:, None] - i[None]) + np.abs(j[:, None] - j[None])
        off = ~np.eye(len(r), dtype=bool)
        near = ((dist == 0) | ((dist == 1) & (ch[:, None] == ch[None]))) & off
        return float(a[near].mean() - a[off & ~near].mean())

    rng = np.random.default_rng(seed)
    shuffled = (np.stack([rng.permutation(col) for col in rows.T], 1) for _ in range(max(1, nulls)))
    return score(rows), max(score(x) for x in shuffled)


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

    Steps:

    1. The block key up to the grid's symmetries from the position embedding
       (:func:`~convmixer_jax.attacks.position_embedding.block_perm_from_pos_embed`).
    2. The pixel key up to the block's symmetries (96 candidates for 4 x 4 RGB blocks):
       from the patch-embedding kernel
       (:func:`~convmixer_jax.attacks.from_weights.recover_key_from_structure`) when the
       kernel shows a layout (:func:`kernel_structure` at least
       :data:`KERNEL_STRUCTURE` above its null); otherwise, with ``queries`` and
       ``public_images``, from the queries' own blocks (flips from their correlation
       signs, the layout from a block template of the public images), as a kernel still
       close to its random initialization carries no layout.
    3. With ``queries``: the block key again, from the queries' blocks with that pixel key
       undone, put together as a jigsaw whose evidence is their edges plus the position
       embedding's (:func:`~convmixer_jax.attacks.jigsaw.solve_jigsaw` with the position
       embedding as prior, started from its placements).
    4. :func:`choose_symmetry` among the pixel key's symmetries combined with the block
       key's symmetries: the queries' edges, then the model's confidence on
       ``public_images``. When the block key is not determined, its symmetries are not
       tried (the edges of a wrong placement say nothing): the model's confidence alone
       chooses the pixel key's symmetry under the most likely block key, which a wrong
       block key costs every candidate alike.

    Args:
      config: the ViT's config (needed with ``public_images``).
      encrypted_variables: the encrypted ViT's variables.
      queries: (N, H, W, C) images encrypted with the key, or None.
      public_images: (N, H, W, C) unlabeled natural images of the model's size, or None.

    Returns:
      a :class:`ScrambledRecovery`. ``determined`` needs a position embedding with grid
      structure, a block key that clears its margin (with queries the jigsaw's,
      :data:`~convmixer_jax.attacks.jigsaw.JIGSAW_MARGIN` and
      :data:`~convmixer_jax.attacks.jigsaw.JIGSAW_HITS`; without, the position
      embedding's), a pixel layout from the queries confirmed by the queries put back
      together (every flip supported and the layout clear, as the ciphertext-only attack
      claims them), and a determined symmetry choice.
    """
    from convmixer_jax.attacks.from_weights import recover_key_from_structure
    from convmixer_jax.attacks.position_embedding import position_evidence
    from convmixer_jax.scheme.params import stem_of

    t0 = time.perf_counter()
    rows, grid = patch_position_rows(encrypted_variables)
    gh, gw = grid
    position = block_perm_from_pos_embed(rows, grid, seed=seed)
    stem, _ = stem_of(encrypted_variables)
    kernel = np.asarray(stem["kernel"])
    m = kernel.shape[0]
    structure = recover_key_from_structure(kernel, seed=seed)
    score, null = kernel_structure(kernel, seed=seed)
    pixel, template = structure.key, None
    notes = [f"kernel layout {score:.3f} (rows without layout up to {null:.3f})"]
    if score >= null + KERNEL_STRUCTURE:
        notes.append("pixel key's candidates from the kernel")
    elif queries is not None and public_images is not None:
        from convmixer_jax.attacks.ciphertext_only import block_template

        try:
            template = block_template(public_images, m)
        except ValueError as err:
            notes.append(f"no pixel-key candidates from the queries ({err})")
        if template is not None:
            from_queries, note = pixel_keys_from_queries(queries, template, seed=seed)
            notes.append(note)
            if from_queries:
                pixel = from_queries[0]
            else:
                template = None
    confidence = None
    if public_images is not None:
        confidence = model_confidence(config, encrypted_variables, batch_size=batch_size)
    reasons = []
    if not position.structured:
        reasons.append(f"position embedding: {position.reason}")
    jig = None
    if queries is not None:
        position_prior = position_evidence(position)

        def jigsaw(k: Key) -> JigsawSolution:
            # a rotation or mirror of the pixel layout puts the jigsaw together as the same
            # rotation or mirror of the image; only a quarter turn of a non-square grid
            # cannot fit, so that one is tried as well
            return max(
                (
                    solve_jigsaw(
                        pixel_decrypted_blocks(queries, v),
                        grid,
                        seeds=16,
                        seed=seed,
                        prior=position_prior,
                        starts=[*position.candidates, *position.maxima[:8]],
                    )
                    for v in dihedral_keys(k)[: 1 if gh == gw else 2]
                ),
                key=lambda sol: sol.evidence,
            )

        jig = jigsaw(pixel)
        why = ""
        if jig.determined and template is not None:
            # a pixel layout from the queries is checked on the queries put back together;
            # when they clearly support another, the jigsaw is done again with that one
            why, other = _pixel_layout_check(queries, jig.block_perm, template, pixel)
            if other is not None:
                notes.append("the queries put together support another pixel layout: retried")
                pixel = other
                jig = jigsaw(pixel)
                if jig.determined:
                    why = _pixel_layout_check(queries, jig.block_perm, template, pixel)[0]
                else:
                    why = ""
        block_perm = jig.block_perm
        blocks_ok = position.structured and jig.determined and not why
        notes.append(
            f"jigsaw of the queries with the position embedding: {jig.evidence:.0f} nats, "
            f"margin {jig.margin:.1f}, {jig.hits} of {jig.seeds} searches end in it"
        )
        if not jig.determined:
            reasons.append(f"block key: {jig.reason}")
        if why:
            reasons.append(f"pixel key: {why}")
    else:
        block_perm, blocks_ok = position.block_perm, position.determined
        if position.structured and not position.determined:
            reasons.append(f"position embedding: {position.reason}")
    if blocks_ok:
        block_perms = [g[block_perm] for g in grid_symmetries(grid)]
        choice = choose_symmetry(
            _scrambling_keys(symmetric_keys(pixel), block_perms, grid),
            queries=queries,
            public_images=public_images,
            confidence=confidence,
        )
    else:
        choice = choose_symmetry(
            _scrambling_keys(symmetric_keys(pixel), [block_perm], grid),
            public_images=public_images,
            confidence=confidence,
        )
    if choice.reason:
        reasons.append(f"symmetry: {choice.reason}")
    determined = blocks_ok and choice.determined
    notes.append(choice.notes)
    return ScrambledRecovery(
        key=choice.key if determined else None,
        best_guess=choice.key,
        determined=determined,
        up_to_mirror=blocks_ok and choice.up_to_mirror,
        reason="; ".join(reasons),
        method="model",
        notes="; ".join(n for n in notes if n),
        seconds=time.perf_counter() - t0,
        structured=position.structured,
        position=position,
        jigsaw=jig,
        choice=choice,
        kernel_structure=(score, null),
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
    jpeg_trace: bool = True,
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
      jpeg_trace: let the JPEG quantization trace of JPEG-decoded images help choose the
        channel order and sign (as in
        :func:`~convmixer_jax.attacks.ciphertext_only.recover_key_ciphertext_only`).

    Steps: the pixel key up to the block's symmetries;
    :func:`~convmixer_jax.attacks.jigsaw.solve_jigsaw` with it (the image comes together
    rotated or mirrored as the pixel layout is); the encrypted queries with
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
            structured=False,
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
    rec = recover_key_ciphertext_only(
        unscrambled(e, jig.block_perm, m), m, template, prior=prior, jpeg_trace=jpeg_trace
    )
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
