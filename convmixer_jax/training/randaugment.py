"""RandAugment on device: a batch of images, each with its own random ops, in one jitted call.

The op set and the magnitude scale follow torchvision's ``RandAugment``
(14 ops, ``num_magnitude_bins=31``): at magnitude ``m`` (0..30) an op of
strength ``s`` uses ``s * m / 30`` of its range, with a random sign for the
signed ops. Geometric ops sample the nearest pixel and fill with black.
Every image draws ``num_ops`` ops independently (an op may repeat).

All functions take float images in [0, 1] of shape (H, W, C); the batch
version is a ``vmap`` over them. Every op returns values in [0, 1].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MAX_MAGNITUDE = 30  # torchvision's num_magnitude_bins - 1

#: The op names, in the order of :func:`all_ops`'s output.
OPS = (
    "identity",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
    "rotate",
    "brightness",
    "color",
    "contrast",
    "sharpness",
    "posterize",
    "solarize",
    "autocontrast",
    "equalize",
)


def _gray(x: jax.Array) -> jax.Array:
    """(H, W, C) -> (H, W, 1) luminance (ITU-R 601-2 weights for RGB, the mean otherwise)."""
    if x.shape[-1] == 3:
        return (x @ jnp.array([0.299, 0.587, 0.114], x.dtype))[..., None]
    return jnp.mean(x, axis=-1, keepdims=True)


def _blend(degenerate: jax.Array, x: jax.Array, factor) -> jax.Array:
    """PIL ImageEnhance: ``degenerate + factor * (x - degenerate)``, clipped to [0, 1]."""
    return jnp.clip(degenerate + factor * (x - degenerate), 0.0, 1.0)


def affine_nearest(x: jax.Array, matrix: jax.Array) -> jax.Array:
    """Warp (H, W, C) by the 2x3 ``matrix`` mapping output (col, row, 1) to input
    (col, row), both about the image centre; nearest pixel, black outside."""
    h, w, _ = x.shape
    rows, cols = jnp.meshgrid(
        jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij"
    )
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    src = matrix @ jnp.stack([(cols - cx).ravel(), (rows - cy).ravel(), jnp.ones(h * w)])
    sc = jnp.round(src[0] + cx).astype(jnp.int32)
    sr = jnp.round(src[1] + cy).astype(jnp.int32)
    inside = (sc >= 0) & (sc < w) & (sr >= 0) & (sr < h)
    out = x[jnp.clip(sr, 0, h - 1), jnp.clip(sc, 0, w - 1)]
    return jnp.where(inside[:, None], out, 0.0).reshape(x.shape)


def equalize(x: jax.Array) -> jax.Array:
    """PIL ``ImageOps.equalize`` per channel on the 8-bit values of (H, W, C) in [0, 1]."""
    q = jnp.clip(jnp.round(x * 255.0), 0, 255).astype(jnp.int32)

    def one(channel):
        hist = jnp.zeros(256, jnp.int32).at[channel.ravel()].add(1)
        last = jnp.max(jnp.where(hist > 0, jnp.arange(256), 0))
        step = (jnp.sum(hist) - hist[last]) // 255
        cum = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(hist)[:-1]])
        lut = jnp.clip((cum + step // 2) // jnp.maximum(step, 1), 0, 255)
        return jnp.where(step > 0, lut[channel], channel)

    return jnp.stack([one(q[..., c]) for c in range(x.shape[-1])], axis=-1).astype(x.dtype) / 255.0


def _sharpen_degenerate(x: jax.Array) -> jax.Array:
    """PIL's SMOOTH filter (3x3, centre weight 5, total 13) inside, the border kept."""
    h, w, _ = x.shape
    p = jnp.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    s = sum(p[i : i + h, j : j + w] for i in range(3) for j in range(3)) + 4.0 * x
    smooth = s / 13.0
    inner = jnp.zeros((h, w, 1), bool).at[1:-1, 1:-1].set(True)
    return jnp.where(inner, smooth, x)


def all_ops(x: jax.Array, magnitude: float, sign) -> jax.Array:
    """Every op of :data:`OPS` applied to one image: (H, W, C) -> (len(OPS), H, W, C).

    magnitude: 0..30 (may be a traced value); sign: +1 or -1 for the signed ops.
    """
    h, w, _ = x.shape
    f = magnitude / MAX_MAGNITUDE
    shear = sign * 0.3 * f
    tx = sign * (150.0 / 331.0) * w * f
    ty = sign * (150.0 / 331.0) * h * f
    theta = sign * jnp.deg2rad(30.0) * f
    enhance = 1.0 + sign * 0.9 * f
    bits = 8 - jnp.round(magnitude / (MAX_MAGNITUDE / 4)).astype(jnp.int32)
    threshold = 1.0 - f
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    one, zero = jnp.ones(()), jnp.zeros(())
    mats = {
        "shear_x": jnp.array([[one, shear, zero], [zero, one, zero]]),
        "shear_y": jnp.array([[one, zero, zero], [shear, one, zero]]),
        "translate_x": jnp.array([[one, zero, -tx], [zero, one, zero]]),
        "translate_y": jnp.array([[one, zero, zero], [zero, one, -ty]]),
        "rotate": jnp.array([[cos, sin, zero], [-sin, cos, zero]]),
    }
    q = jnp.clip(jnp.round(x * 255.0), 0, 255).astype(jnp.int32)
    drop = 8 - bits
    lo = jnp.min(x, axis=(0, 1), keepdims=True)
    hi = jnp.max(x, axis=(0, 1), keepdims=True)
    span = jnp.where(hi > lo, hi - lo, 1.0)
    out = {
        "identity": x,
        **{k: affine_nearest(x, m) for k, m in mats.items()},
        "brightness": _blend(jnp.zeros_like(x), x, enhance),
        "color": _blend(jnp.broadcast_to(_gray(x), x.shape), x, enhance),
        "contrast": _blend(jnp.full_like(x, jnp.mean(_gray(x))), x, enhance),
        "sharpness": _blend(_sharpen_degenerate(x), x, enhance),
        "posterize": ((q >> drop) << drop).astype(x.dtype) / 255.0,
        "solarize": jnp.where(x >= threshold, 1.0 - x, x),
        "autocontrast": jnp.where(hi > lo, (x - lo) / span, x),
        "equalize": equalize(x),
    }
    return jnp.stack([out[k] for k in OPS])


def rand_augment_image(rng: jax.Array, x: jax.Array, num_ops: int, magnitude: float) -> jax.Array:
    """``num_ops`` random ops of :data:`OPS` in sequence on one image (H, W, C) in [0, 1]."""
    for k in jax.random.split(rng, num_ops):
        k_op, k_sign = jax.random.split(k)
        op = jax.random.randint(k_op, (), 0, len(OPS))
        sign = jnp.where(jax.random.bernoulli(k_sign), 1.0, -1.0)
        x = all_ops(x, magnitude, sign)[op]
    return x


def rand_augment(
    rng: jax.Array, images: jax.Array, num_ops: int = 2, magnitude: float = 9
) -> jax.Array:
    """RandAugment of a batch: (N, H, W, C) float in [0, 1] -> the same shape, every image
    its own ops."""
    if not 0 <= magnitude <= MAX_MAGNITUDE:
        raise ValueError(f"magnitude must be in 0..{MAX_MAGNITUDE}, got {magnitude}")
    keys = jax.random.split(rng, images.shape[0])
    return jax.vmap(lambda k, im: rand_augment_image(k, im, num_ops, magnitude))(keys, images)


__all__ = [
    "OPS",
    "MAX_MAGNITUDE",
    "rand_augment",
    "rand_augment_image",
    "all_ops",
    "equalize",
    "affine_nearest",
]
