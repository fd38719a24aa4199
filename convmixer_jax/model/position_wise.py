"""A ConvMixer whose patch embedding has its own kernel at every block position.

This is the model that position-wise keys need (``scheme.position_keys``): the stem's
kernel is (gh, gw, P, P, C, dim) and its bias (gh, gw, dim); everything after the stem
(and every parameter name) is the :class:`~convmixer_jax.model.convmixer.ConvMixer`'s,
so a plain model's variables run here once their stem is replaced.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from convmixer_jax.model.config import ConvMixerConfig
from convmixer_jax.model.convmixer import (
    after_stem,
    normalize_input,
    resolve_depthwise_impl,
    torch_like_conv_init,
)
from convmixer_jax.scheme.blocks import to_blocks


class PositionWisePatchEmbed(nn.Module):
    """``x``: (N, H, W, C) normalized images -> (dim, H/P, W/P, N); block (i, j) times
    kernel[i, j]."""

    patch_size: int
    dim: int
    grid: tuple[int, int]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        p, (gh, gw) = self.patch_size, self.grid
        pb = p * p * c
        kernel = self.param(
            "kernel", torch_like_conv_init(pb), (gh, gw, p, p, c, self.dim), jnp.float32
        )
        bias = self.param("bias", torch_like_conv_init(pb), (gh, gw, self.dim), jnp.float32)
        cols = to_blocks(x, p).transpose(1, 2, 3, 0)  # (gh, gw, pb, N)
        y = jnp.einsum("ghpd,ghpn->dghn", kernel.reshape(gh, gw, pb, self.dim), cols)
        return y + jnp.transpose(bias, (2, 0, 1))[..., None]


class PositionWiseConvMixer(nn.Module):
    """images (N, H, W, C) in [0, 1], H and W those of ``config.image_size`` -> logits
    (N, classes)."""

    config: ConvMixerConfig

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        cfg = self.config
        x = normalize_input(cfg, images)
        p = cfg.patch_size
        gh, gw = images.shape[1] // p, images.shape[2] // p
        x = PositionWisePatchEmbed(p, cfg.dim, (gh, gw), name="stem")(x)
        return after_stem(cfg, x, resolve_depthwise_impl(cfg.depthwise_impl, (gh, gw)), train)


@functools.lru_cache(maxsize=8)
def _apply_fn(config: ConvMixerConfig):
    module = PositionWiseConvMixer(config)
    return jax.jit(lambda variables, x: module.apply(variables, x))


def position_wise_logits(
    config: ConvMixerConfig, variables: dict, images, *, batch_size: int = 500
) -> np.ndarray:
    """Logits (N, classes) of the position-wise model ``variables`` on images (N, H, W, C)
    uint8 or float in [0, 1], in batches of ``batch_size``."""
    images = np.asarray(images)
    x = images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)
    fn = _apply_fn(config)
    out = [
        np.asarray(fn(variables, x[lo : lo + batch_size])) for lo in range(0, len(x), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, config.num_classes), np.float32)


__all__ = ["PositionWisePatchEmbed", "PositionWiseConvMixer", "position_wise_logits"]
