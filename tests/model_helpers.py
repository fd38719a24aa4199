"""Helpers shared by the model tests (a plain module, not a test module)."""

from __future__ import annotations

import jax
import numpy as np

from convmixer_jax.model.convmixer import ConvMixer, ConvMixerConfig


def random_variables(cfg: ConvMixerConfig, seed: int, dtype=np.float32):
    """Random variables of the right shapes (eval_shape only; BN statistics random too)."""
    x = np.zeros((1, cfg.image_size, cfg.image_size, cfg.channels), np.float32)
    shapes = jax.eval_shape(ConvMixer(cfg).init, jax.random.key(0), x)
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = path[-1].key
        if name == "var":
            v = rng.uniform(0.5, 2.0, s.shape)
        elif name == "scale":
            v = rng.uniform(0.5, 1.5, s.shape)
        elif name == "kernel":
            v = rng.normal(0, 1, s.shape) / np.sqrt(np.prod(s.shape[:-1]))
        else:
            v = rng.normal(0, 0.3, s.shape)
        return v.astype(dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)
