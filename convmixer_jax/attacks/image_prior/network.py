"""The variant classifier: its architecture, the trained prior as a value, and its scores.

A small CNN (3x3 conv -> LayerNorm -> GELU stages, then a dense head) maps an image
(S, S, C) float in [0, 1] to V logits, one per colour variant
(:mod:`~convmixer_jax.attacks.image_prior.variants`). :func:`variant_log_probs` scores
images, :func:`group_log_probs` averages the scores over the variant views of each image.
JAX and Flax are imported on first use.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from convmixer_jax.attacks.image_prior.variants import (
    Variant,
    apply_variant,
    check_variant,
    colour_variants,
    compose_variants,
)

HEADS = ("flatten", "gap")
PyTree = Any


@dataclasses.dataclass(frozen=True)
class PriorConfig:
    """Architecture of the variant classifier.

    Attributes:
      widths: output channels of the 3x3 conv stages; every stage after the first
        halves the grid (stride 2).
      convs_per_stage: 3x3 convolutions per stage.
      first_stride: stride of the first convolution (2 halves the input grid at once).
      num_variants: classifier outputs V.
      channels: input channels C.
      head: 'flatten' (dense over the last grid, keeps where things are: skies are
        on top) or 'gap' (global average pooling).
    """

    widths: tuple[int, ...] = (32, 64, 128)
    convs_per_stage: int = 1
    first_stride: int = 2
    num_variants: int = 12
    channels: int = 3
    head: str = "flatten"

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if not self.widths or min(self.widths) < 1:
            raise ValueError(f"widths must be positive, got {self.widths}")
        for name in ("convs_per_stage", "first_stride", "num_variants", "channels"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PriorConfig.{name} must be a positive integer, got {value!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PriorConfig:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown image prior config fields: {sorted(unknown)}")
        return cls(**{**d, **({"widths": tuple(d["widths"])} if "widths" in d else {})})


@functools.lru_cache(maxsize=8)
def variant_net(config: PriorConfig):
    """The Flax module of ``config`` (one instance per architecture):
    ``apply({'params': p}, x (N, S, S, C) float in [0, 1]) -> (N, V) logits``."""
    import flax.linen as nn
    import jax.numpy as jnp

    class VariantNet(nn.Module):
        """(N, S, S, C) float in [0, 1] -> (N, V) logits. Conv3x3 -> LayerNorm -> GELU stages."""

        cfg: PriorConfig

        @nn.compact
        def __call__(self, x):
            x = x * 2.0 - 1.0
            for s, width in enumerate(self.cfg.widths):
                for j in range(self.cfg.convs_per_stage):
                    stride = (2 if s > 0 else self.cfg.first_stride) if j == 0 else 1
                    conv = nn.Conv(
                        width, (3, 3), strides=stride, padding="SAME", name=f"conv{s}_{j}"
                    )
                    x = nn.gelu(nn.LayerNorm(name=f"norm{s}_{j}")(conv(x)))
            x = (
                x.reshape(x.shape[0], -1)
                if self.cfg.head == "flatten"
                else jnp.mean(x, axis=(1, 2))
            )
            return nn.Dense(self.cfg.num_variants, name="head")(x)

    return VariantNet(config)


@dataclasses.dataclass(frozen=True, eq=False)
class ImagePrior:
    """A trained variant classifier: a pure value.

    Attributes:
      config: the architecture.
      params: the Flax parameter tree (NumPy or JAX arrays).
      input_size: the side S images are resized to before scoring.
      variants: the V variants, in the order of the classifier's outputs
        (default :func:`~convmixer_jax.attacks.image_prior.variants.colour_variants` of
        ``config.channels``).
    """

    config: PriorConfig
    params: PyTree
    input_size: int = 32
    variants: tuple[Variant, ...] = ()

    def __post_init__(self):
        variants = self.variants or colour_variants(self.config.channels)
        variants = tuple(check_variant(v, self.config.channels) for v in variants)
        object.__setattr__(self, "variants", variants)
        if len(variants) != self.config.num_variants:
            raise ValueError(
                f"{len(variants)} variants for a classifier of {self.config.num_variants} outputs"
            )
        smallest = self.config.first_stride * 2 ** (len(self.config.widths) - 1)
        if not isinstance(self.input_size, (int, np.integer)) or self.input_size < smallest:
            raise ValueError(
                f"input_size {self.input_size!r} is too small for this architecture "
                f"(at least {smallest}); use fewer stages or a larger input_size"
            )


def as_unit_float(images) -> np.ndarray:
    """(N, H, W, C) uint8, or float in [0, 1] -> the same as float32 in [0, 1]."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C), got shape {images.shape}")
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"images must be uint8 or float in [0, 1], got {images.dtype}")
    return images.astype(np.float32, copy=False)


def resize_images(images, size: int) -> np.ndarray:
    """(N, H, W, C) uint8 or float in [0, 1] -> (N, size, size, C) of the same dtype.

    Unchanged when already that size; an exact area average when H and W are
    multiples of ``size``; otherwise ``jax.image.resize`` (linear, antialiased).
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C), got shape {images.shape}")
    n, h, w, c = images.shape
    if (h, w) == (size, size):
        return images
    x = as_unit_float(images)
    if h % size == 0 and w % size == 0:
        out = x.reshape(n, size, h // size, size, w // size, c).mean(axis=(2, 4))
    else:
        import jax

        out = np.asarray(jax.image.resize(x, (n, size, size, c), "linear", antialias=True))
    out = np.clip(out, 0.0, 1.0)
    return (
        np.round(out * 255).astype(np.uint8)
        if images.dtype == np.uint8
        else out.astype(images.dtype)
    )


@functools.lru_cache(maxsize=8)
def _forward(config: PriorConfig):
    """The jitted ``(params, x (B, S, S, C)) -> (B, V)`` log-softmax, one per architecture."""
    import jax

    module = variant_net(config)
    return jax.jit(
        lambda params, x: jax.nn.log_softmax(module.apply({"params": params}, x), axis=-1)
    )


def _check_images(prior: ImagePrior, images) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != prior.config.channels:
        raise ValueError(
            f"images must be (N, H, W, {prior.config.channels}), got shape {images.shape}"
        )
    return images


def variant_log_probs(prior: ImagePrior, images, *, batch_size: int = 500) -> np.ndarray:
    """log P(variant | image) for every image and variant of ``prior``.

    images: (N, H, W, C) uint8, or float in [0, 1], any H, W (resized to the prior's
    ``input_size`` as in training). Returns (N, V) float64, each row a log-softmax.
    """
    images = _check_images(prior, images)
    x = as_unit_float(resize_images(images, prior.input_size))
    fwd = _forward(prior.config)
    n = x.shape[0]
    out = np.empty((n, prior.config.num_variants), np.float64)
    bs = max(1, min(int(batch_size), n)) if n else 1
    for lo in range(0, n, bs):
        chunk = x[lo : lo + bs]
        m = chunk.shape[0]
        if m < bs:  # one compiled shape
            chunk = np.concatenate([chunk, np.zeros((bs - m,) + chunk.shape[1:], chunk.dtype)])
        out[lo : lo + m] = np.asarray(fwd(prior.params, chunk), np.float64)[:m]
    return out


def group_log_probs(
    prior: ImagePrior, images, *, mirror: bool = True, batch_size: int = 500
) -> np.ndarray:
    """:func:`variant_log_probs` averaged over the views of each image that the task
    predicts consistently: every variant ``g`` applied to the image (and to its
    left-right mirror when ``mirror``).

    If an image is a natural image under variant ``v``, its view ``g`` is under
    ``compose(v, g)``; the view's log-probs are re-indexed to ``v`` and the views'
    log-probs averaged, then normalized again. This is test-time augmentation along
    the task's own group (as for rotation prediction); the classifier is not
    equivariant, so the views disagree and their average is the better vote
    (``benchmarks/image_prior_accuracy.py`` reports both).

    images: (N, H, W, C) as for :func:`variant_log_probs`. Returns (N, V) float64
    log-softmax rows.
    """
    images = _check_images(prior, images)
    x = as_unit_float(resize_images(images, prior.input_size))  # once; the views commute with it
    variants = [tuple(v) for v in prior.variants]
    index = {v: i for i, v in enumerate(variants)}
    total = np.zeros((x.shape[0], len(variants)), np.float64)
    views = 0
    for view in (x, x[:, :, ::-1]) if mirror else (x,):
        for g in variants:
            lp = variant_log_probs(prior, apply_variant(view, g), batch_size=batch_size)
            total += lp[:, [index[compose_variants(v, g)] for v in variants]]
            views += 1
    from scipy.special import logsumexp

    mean = total / views
    return mean - logsumexp(mean, axis=-1, keepdims=True)


__all__ = [
    "HEADS",
    "PriorConfig",
    "ImagePrior",
    "variant_net",
    "as_unit_float",
    "resize_images",
    "variant_log_probs",
    "group_log_probs",
]
