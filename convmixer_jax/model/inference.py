"""Accuracy and logits of a model over arrays of images, or over a stream of batches, in
fixed-size batches.

Each batch is split over every device of every process (the global mesh of
:mod:`convmixer_jax.parallel`); in a multi-process run each process feeds only its
own images of the batch and every process receives all the logits.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable

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


def top_k_hits(logits: np.ndarray, labels, k: int) -> np.ndarray:
    """(N,) bool: whether each label is among the ``k`` largest of its row of ``logits`` (N,
    classes); among equal logits the lower class comes first (as ``argmax``)."""
    order = np.argsort(-np.asarray(logits), axis=1, kind="stable")[:, :k]
    return (order == np.asarray(labels)[:, None]).any(axis=1)


def evaluate_batches(
    config: ConvMixerConfig,
    variables,
    batches: Iterable,
    *,
    transform: Callable | None = None,
    progress: bool = False,
    total: int | None = None,
    desc: str = "evaluate",
) -> dict:
    """Top-1 and top-5 accuracy over a stream of batches, holding one batch at a time.

    batches: an iterable of (images (B, H, W, C) uint8 or float in [0, 1], labels (B,) int),
    e.g. :func:`convmixer_jax.data.pipeline.batches`; ``transform`` maps each batch of
    images before the model (e.g. encrypting it with a key). Every batch is run at the size
    of the first (rounded up to a multiple of the device count; a shorter one is padded with
    repeats of its last image, a longer one cut), so one shape is compiled and the result
    equals :func:`accuracy` over the same images with ``batch_size`` the first batch's size.
    Top-5 counts a label among the min(5, classes) largest logits. ``progress`` shows a bar
    in images per second (``total``: the image count, when known).

    Returns {"top1": float, "top5": float, "images": int, "seconds": float}: the accuracies
    in [0, 1], the number of images and the seconds the loop took (reading included).
    """
    mesh = global_mesh("data")
    fn = _logits_fn(config, mesh)
    variables = replicate(prepare_inference(config, to_host(variables)), mesh)
    k = min(5, config.num_classes)
    size, count, top1, top5 = None, 0, 0, 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=desc, unit="img", leave=False)
    start = time.perf_counter()
    try:
        for images, labels in batches:
            labels = np.asarray(labels)
            if size is None:
                size = pad_to_multiple(len(images), mesh.devices.size)
            for lo in range(0, len(images), size):
                part, hi = images[lo : lo + size], min(lo + size, len(images))
                if len(part) < size:  # one compiled shape: pad with the last image
                    part = np.asarray(part)[np.minimum(np.arange(size), len(part) - 1)]
                if transform is not None:
                    part = transform(part)
                logits = to_host(fn(variables, shard_rows(np.asarray(part), mesh)))[: hi - lo]
                top1 += int(np.sum(np.argmax(logits, axis=1) == labels[lo:hi]))
                top5 += int(np.sum(top_k_hits(logits, labels[lo:hi], k)))
                count += hi - lo
                if bar is not None:
                    bar.update(hi - lo)
    finally:
        if bar is not None:
            bar.close()
    if count == 0:
        raise ValueError("no images to evaluate: the batches were empty")
    seconds = time.perf_counter() - start
    return {"top1": top1 / count, "top5": top5 / count, "images": count, "seconds": seconds}
