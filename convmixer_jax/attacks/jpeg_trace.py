"""The JPEG trace: which colour variant of a decrypted image was decoded from a JPEG.

A baseline JPEG codes the luma ``Y = 0.299 R + 0.587 G + 0.114 B - 128`` of each 8 x 8
block (aligned at the image's top-left corner) as DCT coefficients rounded to multiples
of a quantization table. The decoded pixels keep the luma's coefficients close to those
multiples: the residual is the decoder's rounding, a small fraction of the table's steps
(measured on the CIFAR-10 JPEG copy in ``docs/security.md``). The luma of a variant with
another channel order
mixes in chroma, which the coder quantized on another grid (and, with 4:2:0 subsampling,
at half the resolution), so its coefficients leave the lattice.

This makes the channel order of a block-wise encryption key visible in the ciphertext of
JPEG-decoded images, whatever a learned colour prior thinks of their colours. The sign
is another matter: ``255 - x`` negates every AC coefficient and moves DC by -8, so the
negative stays on the lattice whenever the DC step divides 8 (qualities 75 and up to
100 in libjpeg's tables among them).

The evidence is a Bayes factor. For one candidate image, two hypotheses about its luma
coefficients ``c`` (per frequency ``k``, over all blocks):

* *no trace*: ``c`` follows a Laplace law with scale ``b_k = mean |c_k|`` (never a JPEG,
  a JPEG resampled, cropped off the 8 x 8 grid or coded at a quality so high that the
  steps drown in the rounding);
* *JPEG at quality Q* (libjpeg's scaled standard tables, Q = 1..100): ``c = j q_k + e``
  with ``j q_k`` a draw of the same Laplace law rounded to the lattice and
  ``e ~ N(0, SIGMA^2)``, except for a fraction ``OUTLIERS`` that follow the Laplace law
  (clipped pixels, saturated blocks).

With prior 1/2 on *no trace* and 1/200 on each quality, :func:`jpeg_log_evidence` is
``log P(c | JPEG) / P(c | no trace)`` marginalized, ``log(1/2 + sum_Q BF_Q / 200)``:
about ``log 1/2`` for every variant of an image without a trace, so that it then leaves
the choice to the prior, and hundreds of nats apart between the variants of a JPEG.
The Laplace law is the null of each variant separately: how natural a variant's
coefficients look is the image prior's question, not this module's.

How often the trace alone, the colour prior alone and their sum get the variant of
held-out CIFAR-10 training images (JPEG copy), and what is left after a resampling that
wipes the trace (the sum then equals the prior), is measured by
``python benchmarks/jpeg_trace_accuracy.py --images 1000 --out
results/security/jpeg_trace.json``; ``docs/security.md`` (section 5) has the table.

Tables other than libjpeg's scaled ones (some cameras, MozJPEG's), other grid offsets and
chroma are not modelled; on such images the trace is absent and the result is the prior's.
"""

from __future__ import annotations

import functools

import numpy as np

from convmixer_jax.scheme.blocks import to_blocks

#: Annex K's luminance table (natural order), which libjpeg scales by quality.
STANDARD_LUMA = np.array(
    [
        16,
        11,
        10,
        16,
        24,
        40,
        51,
        61,
        12,
        12,
        14,
        19,
        26,
        58,
        60,
        55,
        14,
        13,
        16,
        24,
        40,
        57,
        69,
        56,
        14,
        17,
        22,
        29,
        51,
        87,
        80,
        62,
        18,
        22,
        37,
        56,
        68,
        109,
        103,
        77,
        24,
        35,
        55,
        64,
        81,
        104,
        113,
        92,
        49,
        64,
        78,
        87,
        103,
        121,
        120,
        101,
        72,
        92,
        95,
        98,
        112,
        100,
        103,
        99,
    ],
    np.float64,
).reshape(8, 8)
#: ITU-R BT.601 luma weights, as JPEG (JFIF) uses them.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])
QUALITIES = tuple(range(1, 101))
SIGMA = 0.6  # the coefficients' residual around the lattice (decode rounding)
OUTLIERS = 0.05  # coefficients off the lattice in a JPEG (clipping)
NO_TRACE_PRIOR = 0.5
MAX_BLOCKS = 128


def ijg_luma_table(quality: int) -> np.ndarray:
    """libjpeg's luminance quantization table at ``quality`` (1..100), (8, 8) float64,
    natural (row-major) order, as Pillow writes it for ``quality=``."""
    q = int(quality)
    if not 1 <= q <= 100:
        raise ValueError(f"a JPEG quality is 1..100, got {quality!r}")
    scale = 5000 // q if q < 50 else 200 - 2 * q  # integer arithmetic, as in libjpeg
    return np.clip(np.floor((STANDARD_LUMA * scale + 50) / 100), 1, 255)


TABLES = np.stack([ijg_luma_table(q) for q in QUALITIES]).reshape(len(QUALITIES), 64)


def _as_uint8(images) -> np.ndarray:
    x = np.asarray(images)
    if x.dtype == np.uint8:
        return x
    return np.rint(np.clip(x.astype(np.float64), 0.0, 1.0) * 255.0).astype(np.uint8)


def luma_blocks(images) -> np.ndarray:
    """(N, H, W, C) uint8, or float in [0, 1] (rounded to 8 bits), C = 1 or 3 ->
    (B, 64) DCT-II (orthonormal, JPEG's scale) coefficients of the level-shifted luma of
    every whole 8 x 8 block (a partial block at the right or bottom edge is left out),
    blocks in image then raster order; coefficient ``u*8 + v`` is row frequency u,
    column frequency v."""
    from scipy.fft import dctn

    x = _as_uint8(images).astype(np.float64)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"images must be (N, H, W, 1 or 3), got shape {x.shape}")
    y = (x[..., 0] if x.shape[-1] == 1 else x @ LUMA_WEIGHTS) - 128.0
    n, h, w = y.shape
    gh, gw = h // 8, w // 8
    # the luma as a one-channel image: its 8 x 8 blocks hold pixel (i, j) at i*8 + j
    b = to_blocks(y[:, : gh * 8, : gw * 8, None], 8).reshape(n, gh, gw, 8, 8)
    return dctn(b, axes=(-2, -1), norm="ortho").reshape(-1, 64)


def _log_laplace_mass(lo, hi, b):
    """log P(lo < X < hi) for X ~ Laplace(0, b), lo < hi, stable in the tails (JAX)."""
    import jax.numpy as jnp

    same_side = (lo >= 0) | (hi <= 0)
    near = jnp.where(lo >= 0, lo, -hi)  # the end nearer zero, on the interval's side
    tail = jnp.log(0.5) - near / b + jnp.log(-jnp.expm1(-(hi - lo) / b))
    mid = jnp.log(
        jnp.maximum(1.0 - 0.5 * jnp.exp(-jnp.abs(hi) / b) - 0.5 * jnp.exp(-jnp.abs(lo) / b), 1e-30)
    )
    return jnp.where(same_side, tail, mid)


@functools.lru_cache(maxsize=None)
def _bayes_factors_fn():
    import jax
    import jax.numpy as jnp

    tables = jnp.asarray(TABLES, jnp.float32)[None, :, None, :]  # (1, Q, 1, 64)
    no_evidence = jnp.asarray(np.all(TABLES <= 1, axis=1))

    def fn(c, mask):
        # c: (V, B, 64) coefficients, mask: (B,) 1 for real blocks, 0 for padding
        w = mask[None, :, None]
        b = jnp.maximum(
            jnp.sum(jnp.abs(c) * w, axis=1, keepdims=True) / jnp.maximum(jnp.sum(w), 1.0), 1e-3
        )
        log_null = -jnp.log(2.0 * b) - jnp.abs(c) / b  # (V, B, 64)
        c4, b4, t = c[:, None], b[:, None], tables  # (V, 1, B, 64), (V, 1, 1, 64)
        j0 = jnp.round(c4 / t)
        terms = []
        for dj in (-1.0, 0.0, 1.0):  # the lattice points around c; farther ones are negligible
            centre = (j0 + dj) * t
            terms.append(
                _log_laplace_mass(centre - t / 2, centre + t / 2, b4)
                - 0.5 * ((c4 - centre) / SIGMA) ** 2
            )
        log_lattice = jax.nn.logsumexp(jnp.stack(terms), axis=0) - np.log(
            np.sqrt(2.0 * np.pi) * SIGMA
        )
        mixed = jnp.logaddexp(
            np.log1p(-OUTLIERS) + log_lattice, np.log(OUTLIERS) + log_null[:, None]
        )
        out = jnp.sum((mixed - log_null[:, None]) * w[:, None], axis=(2, 3))  # (V, Q)
        # a table of ones puts every rounded value on the lattice: no evidence either way
        return jnp.where(no_evidence[None], 0.0, out)

    return jax.jit(fn)


def _batched_bayes_factors(coefficients: np.ndarray) -> np.ndarray:
    """(V, B, 64) with B <= MAX_BLOCKS -> (V, len(QUALITIES)) float64; B padded to a power
    of two (at least 16), so that few shapes are compiled."""
    v, n, _ = coefficients.shape
    size = max(16, 1 << max(0, n - 1).bit_length())
    c = np.zeros((v, size, 64), np.float32)
    c[:, :n] = coefficients
    mask = (np.arange(size) < n).astype(np.float32)
    return np.asarray(_bayes_factors_fn()(c, mask), np.float64)


def log_bayes_factors(coefficients) -> np.ndarray:
    """(B, 64) luma coefficients (the first MAX_BLOCKS used) -> (len(QUALITIES),)
    log P(c | JPEG at Q) / P(c | no trace)."""
    c = np.asarray(coefficients, np.float32)[:MAX_BLOCKS]
    if c.ndim != 2 or c.shape[1] != 64:
        raise ValueError(f"coefficients must be (B, 64), got shape {c.shape}")
    return _batched_bayes_factors(c[None])[0]


def _evidence(bf: np.ndarray) -> np.ndarray:
    """(..., Q) log Bayes factors -> (...) log(P(no trace) + P(JPEG) mean_Q BF_Q)."""
    from scipy.special import logsumexp

    return np.logaddexp(
        np.log(NO_TRACE_PRIOR), np.log((1 - NO_TRACE_PRIOR) / bf.shape[-1]) + logsumexp(bf, axis=-1)
    )


def jpeg_log_evidence(images, variants, *, max_blocks: int = MAX_BLOCKS) -> np.ndarray:
    """How much better "decoded from a JPEG" explains each colour variant of the images.

    images: (N, H, W, C) uint8 or float in [0, 1], C = 1 or 3; variants: ``(negate,
    order)`` as in :mod:`~convmixer_jax.attacks.image_prior`. Entry ``v`` scores the
    hypothesis that the images are ``apply_variant(jpeg_images, v)``, the indexing of
    :func:`~convmixer_jax.attacks.image_prior.network.variant_log_probs`, so the two add up.
    Only the first ``max_blocks`` (at most MAX_BLOCKS) 8 x 8 blocks are used. Returns (V,)
    float64: the log of ``1/2 + mean_Q BF_Q / 2`` (module docstring); all ``log 1/2``
    without a trace, and zeros for other channel counts or images smaller than one 8 x 8
    block.
    """
    from convmixer_jax.attacks.image_prior import apply_variant, invert_variant

    x = np.asarray(images)
    if x.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C), got shape {x.shape}")
    variants = [tuple(v) for v in variants]
    if x.shape[-1] not in (1, 3) or x.shape[1] < 8 or x.shape[2] < 8:
        return np.zeros(len(variants))
    per_image = (x.shape[1] // 8) * (x.shape[2] // 8)
    max_blocks = min(int(max_blocks), MAX_BLOCKS)
    x = _as_uint8(x[: max(1, -(-max_blocks // per_image))])
    c = np.stack([luma_blocks(apply_variant(x, invert_variant(v)))[:max_blocks] for v in variants])
    return _evidence(_batched_bayes_factors(c))


def jpeg_quality(images) -> int | None:
    """The libjpeg quality whose table best explains the images' luma, or None when no
    quality beats the no-trace hypothesis. images: as for :func:`luma_blocks`."""
    bf = log_bayes_factors(luma_blocks(images))
    best = int(np.argmax(bf))
    return QUALITIES[best] if float(_evidence(bf)) > np.log(NO_TRACE_PRIOR) + 1.0 else None
