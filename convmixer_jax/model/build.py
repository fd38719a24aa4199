"""One place that turns an architecture (either family's config) into its Flax module.

A new model family is its config class in :mod:`convmixer_jax.model.config` (one entry in
``FAMILIES``) plus its module here (one entry in :data:`MODULES`).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from convmixer_jax.model.config import ConvMixerConfig, ViTConfig


def _convmixer(config):
    from convmixer_jax.model.convmixer import ConvMixer

    return ConvMixer(config)


def _vit(config):
    from convmixer_jax.model.vit import ViT

    return ViT(config)


#: family -> (config class, module builder, whether the model carries BatchNorm statistics).
MODULES: dict[str, tuple[type, Any, bool]] = {
    "convmixer": (ConvMixerConfig, _convmixer, True),
    "vit": (ViTConfig, _vit, False),
}


def _entry(config):
    family = getattr(config, "family", None)
    if family not in MODULES or not isinstance(config, MODULES[family][0]):
        raise TypeError(
            f"config must be a ConvMixerConfig or a ViTConfig, got {type(config).__name__}"
        )
    return MODULES[family]


def build_model(config) -> nn.Module:
    """The Flax module of ``config``: ``apply(variables, images (N, H, W, C) in [0, 1],
    train=...) -> logits (N, num_classes)``."""
    return _entry(config)[1](config)


def has_batch_norm(config) -> bool:
    """Whether the model's variables hold a ``'batch_stats'`` collection (the ConvMixer's
    BatchNorms); a ViT's variables are ``{'params'}`` only."""
    return _entry(config)[2]


def collections(config) -> tuple[str, ...]:
    """The variable collections a trained model of ``config`` has, in order."""
    return ("params", "batch_stats") if has_batch_norm(config) else ("params",)


def model_variables(config, tree: dict) -> dict:
    """``{collection: tree[collection]}`` for the model's collections (a training state, or
    variables with extra collections, cut down to what is saved)."""
    return {name: tree[name] for name in collections(config)}


def init_variables(config, seed: int) -> dict:
    """Freshly initialized variables of ``config`` (NumPy leaves) from ``PRNGKey(seed)``.

    A ViT is initialized by one compiled call (op by op, each of its many small
    initializers would be compiled on its own, which takes longer); a ConvMixer op by op, as
    its committed models were.
    """
    dummy = jnp.zeros((1, config.image_size, config.image_size, config.channels), jnp.float32)
    init = functools.partial(build_model(config).init, train=False)
    if not has_batch_norm(config):
        init = jax.jit(init)
    variables = init(jax.random.PRNGKey(seed), dummy)
    return jax.tree.map(np.asarray, dict(variables))


def init_variables_abstract(config):
    """``model.init`` for use under ``jax.eval_shape`` (shapes only, no compute)."""
    dummy = jnp.zeros((1, config.image_size, config.image_size, config.channels), jnp.float32)
    return build_model(config).init(jax.random.PRNGKey(0), dummy, train=False)


__all__ = [
    "MODULES",
    "build_model",
    "collections",
    "has_batch_norm",
    "init_variables",
    "init_variables_abstract",
    "model_variables",
]
