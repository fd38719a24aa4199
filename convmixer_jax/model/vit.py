"""A Vision Transformer in Flax Linen, in timm's ``VisionTransformer`` layout.

::

    patch_embed: Conv(C -> dim, kernel P, stride P), one token per P x P block
    tokens:      [class token] + patch tokens, + learned position embedding
    depth x:     x + Attention(LayerNorm(x));  x + MLP(LayerNorm(x))      (pre-norm)
    head:        LayerNorm -> class token (global_pool 'token'), or
                 mean of the patch tokens -> LayerNorm ('avg', timm's fc_norm) -> Dense

Inputs are NHWC images in [0, 1]; the per-channel normalization ``(x - mean) / std``
happens inside the model, as in the ConvMixer, so that bit flipping is a sign flip of the
normalized value and the patch embedding is encrypted the same way.

Parameters (``variables['params']``), named after timm's state dict:

- ``patch_embed``: ``kernel`` (P, P, C, dim) HWIO, ``bias`` (dim,). Viewed as a matrix
  (P*P*C, dim) its rows are in the block-flattening order of ``docs/method.md``, as the
  ConvMixer's ``stem``.
- ``cls_token`` (1, 1, dim) when ``class_token``; ``pos_embed`` (1, T, dim) with
  T = ``config.pos_rows`` (the class token's row first, unless ``no_embed_class``); patch
  rows in raster order of the grid, ``b = r * gw + s``.
- ``blocks_i``: ``norm1``, ``attn`` {``qkv``, ``proj``}, ``norm2``, ``mlp`` {``fc1``, ``fc2``}
  (Dense kernels (in, out)).
- ``norm`` (global_pool 'token') or ``fc_norm`` ('avg'); ``head``.

The model has no BatchNorm and no dropout: its variables are ``{'params': ...}`` only, and
``train`` changes nothing (it is accepted so that every model family is called alike).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from convmixer_jax.model.config import ViTConfig
from convmixer_jax.scheme.blocks import to_blocks

_trunc02 = nn.initializers.truncated_normal(0.02)


def _dense(features: int, name: str, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, kernel_init=_trunc02, name=name)


def _layer_norm(cfg: ViTConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=cfg.norm_eps, name=name)


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, as ``torch.nn.GELU()``."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * np.float32(1.0 / np.sqrt(2.0))))


class Attention(nn.Module):
    """Multi-head self-attention: (N, T, d) -> (N, T, d), timm's fused ``qkv`` layout
    (output features ordered (3, heads, head_dim))."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        n, t, d = x.shape
        h = cfg.num_heads
        qkv = _dense(3 * d, "qkv", cfg.qkv_bias)(x).reshape(n, t, 3, h, d // h)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (N, T, h, hd)
        q = q * np.float32((d // h) ** -0.5)
        logits = jnp.einsum("nqhc,nkhc->nhqk", q, k)
        weights = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("nhqk,nkhc->nqhc", weights, v).reshape(n, t, d)
        return _dense(d, "proj")(out)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2: (N, T, d) -> (N, T, d)."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        return _dense(cfg.dim, "fc2")(gelu(_dense(cfg.mlp_dim, "fc1")(x)))


class Block(nn.Module):
    """Pre-norm transformer block: (N, T, d) -> (N, T, d)."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        x = x + Attention(cfg, name="attn")(_layer_norm(cfg, "norm1")(x))
        return x + Mlp(cfg, name="mlp")(_layer_norm(cfg, "norm2")(x))


class PatchTokens(nn.Module):
    """Conv(C -> dim, kernel P, stride P) as one matrix product over blocks:
    (N, H, W, C) normalized images -> (N, gh*gw, dim) tokens in raster order."""

    patch_size: int
    dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, _, _, c = x.shape
        p = self.patch_size
        pb = p * p * c
        bound = 1.0 / np.sqrt(pb)

        def uniform(key, shape, dtype=jnp.float32):  # torch's Conv2d default
            return jax.random.uniform(key, shape, dtype, -bound, bound)

        kernel = self.param("kernel", uniform, (p, p, c, self.dim), jnp.float32)
        bias = self.param("bias", uniform, (self.dim,), jnp.float32)
        rows = to_blocks(x, p).reshape(n, -1, pb)  # (N, gh*gw, pb)
        return rows @ kernel.reshape(pb, self.dim) + bias


def normalize_input(cfg: ViTConfig, images: jax.Array) -> jax.Array:
    """(N, H, W, C) in [0, 1] -> ``(x - mean) / std`` in float32; refuses images that do not
    fit the model (channels, or a size other than the position embedding's grid)."""
    _, h, w, c = images.shape
    if c != cfg.channels or h != cfg.image_size or w != cfg.image_size:
        raise ValueError(
            f"images of shape {images.shape} do not fit this ViT (channels {cfg.channels}, "
            f"{cfg.image_size} x {cfg.image_size}: its position embedding has one row per "
            f"{cfg.patch_size} x {cfg.patch_size} block); resize the images"
        )
    mean = jnp.asarray(cfg.norm_mean, jnp.float32)
    std = jnp.asarray(cfg.norm_std, jnp.float32)
    return (images.astype(jnp.float32) - mean) / std


class ViT(nn.Module):
    """ViT as a Flax Linen module: ``apply({'params': ...}, images)``.

    ``images``: (N, H, W, C) float in [0, 1] with H = W = config.image_size.
    Returns logits (N, num_classes) float32. ``train`` is accepted and ignored (no dropout,
    no BatchNorm).
    """

    config: ViTConfig

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
        del train
        cfg = self.config
        x = PatchTokens(cfg.patch_size, cfg.dim, name="patch_embed")(normalize_input(cfg, images))
        n = x.shape[0]
        pos = self.param("pos_embed", _trunc02, (1, cfg.pos_rows, cfg.dim), jnp.float32)
        if cfg.class_token:
            cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, cfg.dim))
            cls = jnp.broadcast_to(cls, (n, 1, cfg.dim))
            if cfg.no_embed_class:
                x = jnp.concatenate([cls, x + pos], axis=1)
            else:
                x = jnp.concatenate([cls, x], axis=1) + pos
        else:
            x = x + pos
        for i in range(cfg.depth):
            x = Block(cfg, name=f"blocks_{i}")(x)
        if cfg.global_pool == "token":
            pooled = _layer_norm(cfg, "norm")(x)[:, 0]
        else:
            start = 1 if cfg.class_token else 0
            pooled = _layer_norm(cfg, "fc_norm")(jnp.mean(x[:, start:], axis=1))
        return _dense(cfg.num_classes, "head")(pooled)


__all__ = ["Attention", "Block", "Mlp", "PatchTokens", "ViT", "ViTConfig", "gelu",
           "normalize_input"]
