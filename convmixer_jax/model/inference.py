"""Accuracy and logits of a ConvMixer over arrays of images, in fixed-size batches.

Each batch is split over every device of every process (the global mesh of
:mod:`convmixer_jax.parallel`); in a multi-process run each process feeds only its
own images of the batch and every process receives all the logits.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from convmixer_jax.model.build import build_model
from convmixer_jax.model.config import ConvMixerConfig
from convmixer_jax.model.convmixer import prepare_inference
from convmixer_jax.parallel.global_arrays import (
    by_rows,
    global_mesh,
    pad_to_multiple,
    replicate,
    replicated,
    shard_rows,
    to_host,
)
from convmixer_jax.scheme.images import ImageError, check_not_empty, check_pixel_values


@functools.lru_cache(maxsize=None)
def _logits_fn(config: ConvMixerConfig, mesh) -> Callable:
    model = build_model(config)

    def logits(variables, images):
        x = images.astype(jnp.float32)
        if images.dtype == jnp.uint8:
            x = x / 255.0
        return model.apply(variables, x, train=False)

    return jax.jit(
        logits, in_shardings=(replicated(mesh), by_rows(mesh)), out_shardings=replicated(mesh)
    )


def check_model_images(config: ConvMixerConfig, images) -> None:
    """Raise :class:`~convmixer_jax.scheme.images.ImageError` unless ``images`` can be
    fed to a model of ``config``: shape (N, image_size, image_size, channels),
    uint8 or float with finite values in [0, 1]."""
    shape = tuple(np.shape(images))
    s, c = config.image_size, config.channels
    check_not_empty(shape)
    if len(shape) != 4:
        raise ImageError(
            f"images must be a batch of shape (N, H, W, C); got shape {shape} "
            "(for a single image add a leading axis: image[None])"
        )
    if shape[1:3] != (s, s):
        raise ImageError(
            f"images are {shape[1]}x{shape[2]} but the model takes {s}x{s} images; "
            f"resize or crop them to {s}x{s}"
        )
    if shape[3] != c:
        raise ImageError(f"images have {shape[3]} channels but the model takes {c}")
    check_pixel_values(images)


def iterate_batches(n: int, batch_size: int):
    """Yield (start, stop) covering 0..n in batches of ``batch_size``."""
    for start in range(0, n, batch_size):
        yield start, min(start + batch_size, n)


def predict_logits(
    config: ConvMixerConfig,
    variables,
    images,
    *,
    batch_size: int = 500,
    progress: bool = False,
    desc: str = "predict",
) -> np.ndarray:
    """Logits of ``images`` (N, H, W, C) uint8 or float in [0, 1] -> (N, classes) float32.

    Every batch has one size, ``batch_size`` (or N if smaller) rounded up to a
    multiple of the device count: the last one is padded (with repeats of the last
    image), so that one shape is compiled; padding rows are dropped from the result.
    ``progress`` shows a bar labelled ``desc`` (say what the model runs on).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    mesh = global_mesh("data")
    fn = _logits_fn(config, mesh)
    # depthwise matrices once, not per batch
    variables = replicate(prepare_inference(config, to_host(variables)), mesh)
    n = len(images)
    size = pad_to_multiple(min(batch_size, n), mesh.devices.size)
    out = np.empty((n, config.num_classes), np.float32)
    it = iterate_batches(n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(list(it), desc=desc, unit="batch", leave=False)
    for start, stop in it:
        rows = np.minimum(np.arange(start, start + size), stop - 1)
        out[start:stop] = to_host(fn(variables, shard_rows(images, mesh, rows)))[: stop - start]
    return out


def accuracy(
    config: ConvMixerConfig,
    variables,
    images,
    labels,
    *,
    batch_size: int = 500,
    progress: bool = False,
    desc: str = "accuracy",
) -> float:
    """Top-1 accuracy in [0, 1] of the model on ``images`` with integer ``labels`` (N,);
    ``progress`` shows a bar labelled ``desc``."""
    logits = predict_logits(
        config, variables, images, batch_size=batch_size, progress=progress, desc=desc
    )
    return float(np.mean(np.argmax(logits, axis=1) == np.asarray(labels)))
