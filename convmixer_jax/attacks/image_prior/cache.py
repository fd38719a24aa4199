"""Train an image prior once per set of public images and training settings.

The trained prior is kept under ``cache_dir()/image-prior/<SHA-256>``
(:func:`convmixer_jax.data.local.cache_dir`), keyed by the images' shape, dtype and bytes
and the training settings, and loaded from there on later calls.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from convmixer_jax.attacks.image_prior.network import ImagePrior, PriorConfig
from convmixer_jax.attacks.image_prior.storage import (
    PRIOR_FORMAT,
    PRIOR_VERSION,
    ImagePriorError,
    load_image_prior,
    save_image_prior,
)
from convmixer_jax.attacks.image_prior.training import train_image_prior
from convmixer_jax.data.local import cache_dir


def prior_cache_key(public_images, settings: dict) -> str:
    """SHA-256 hex of the images' shape, dtype and bytes and of the training ``settings``."""
    images = np.ascontiguousarray(public_images)
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {
                "format": PRIOR_FORMAT,
                "version": PRIOR_VERSION,
                "shape": list(images.shape),
                "dtype": images.dtype.str,
                "settings": settings,
            },
            sort_keys=True,
            default=str,
        ).encode()
    )
    h.update(memoryview(images).cast("B"))
    return h.hexdigest()


def cached_image_prior(
    public_images, *, seed: int = 0, progress: bool = True, **train_kwargs
) -> ImagePrior:
    """:func:`~convmixer_jax.attacks.image_prior.training.train_image_prior` once per
    (images, settings): the result is kept in the cache (module docstring) and loaded from
    there on later calls. A damaged cache entry is retrained and replaced; an unwritable
    cache only costs the training."""
    settings = {
        "seed": seed,
        **{
            k: (v.to_dict() if isinstance(v, PriorConfig) else v)
            for k, v in sorted(train_kwargs.items())
        },
    }
    entry = cache_dir() / "image-prior" / prior_cache_key(public_images, settings)
    if entry.is_dir():
        try:
            return load_image_prior(entry)
        except ImagePriorError:
            pass  # rebuilt below, never trusted
    prior = train_image_prior(public_images, seed=seed, progress=progress, **train_kwargs)
    try:
        save_image_prior(prior, entry, force=True, extra={"settings": settings})
    except OSError:
        pass
    return prior


__all__ = ["prior_cache_key", "cached_image_prior"]
