"""Weight averaging of plain models (a uniform "model soup", the last step of
stochastic weight averaging) and BatchNorm statistics re-estimated for the result.

Averaging the weights of models that share a training lineage (a model and its
warm-started continuation, or checkpoints of one run) often generalizes better
than either; the running BatchNorm statistics of the inputs do not belong to the
averaged weights, so :func:`recalibrate_batch_stats` measures them again on
training images. The result is one ordinary ConvMixer: it is encrypted, saved and
evaluated like any other plain model. How the statistics are measured matters
(results/cifar10/README.md): the images must be shuffled (a data set stored class
by class gives one-class batches), and statistics measured under the training
augmentation are closer to the ones the weights were trained with.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from convmixer_jax.model.convmixer import ChannelBatchNorm, ConvMixer, ConvMixerConfig
from convmixer_jax.model.inference import iterate_batches


def average_variables(variables: Sequence[dict], weights: Sequence[float] | None = None) -> dict:
    """Weighted mean of models' ``{'params', 'batch_stats'}``, leaf by leaf.

    variables: two or more trees of one structure and shapes; weights: one
    positive number per model (default equal), normalized to sum to 1.
    Returns a new tree of float32 NumPy arrays (``batch_stats`` averaged too, as
    a starting point only: re-estimate them with :func:`recalibrate_batch_stats`).
    """
    variables = list(variables)
    if len(variables) < 2:
        raise ValueError(f"averaging needs at least two models, got {len(variables)}")
    w = np.ones(len(variables)) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (len(variables),):
        raise ValueError(f"give one weight per model: {len(variables)} models, {w.size} weights")
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"weights must be positive finite numbers, got {list(w)}")
    w = w / w.sum()
    trees = [{"params": v["params"], "batch_stats": v["batch_stats"]} for v in variables]
    structure = jax.tree.structure(trees[0])
    for i, t in enumerate(trees[1:], start=2):
        if jax.tree.structure(t) != structure:
            raise ValueError(
                f"model {i} has another parameter tree than model 1 (another architecture?)"
            )
        for a, b in zip(jax.tree.leaves(trees[0]), jax.tree.leaves(t), strict=True):
            if np.shape(a) != np.shape(b):
                raise ValueError(
                    f"model {i} has a leaf of shape {np.shape(b)} where model 1 has "
                    f"{np.shape(a)} (another architecture?)"
                )

    def mean(*leaves):
        acc = sum(wi * np.asarray(leaf, np.float64) for wi, leaf in zip(w, leaves, strict=True))
        return acc.astype(np.float32)

    return jax.tree.map(mean, *trees)


@functools.lru_cache(maxsize=None)
def _batch_moments_fn(config: ConvMixerConfig) -> Callable:
    """jit: (variables, uint8 or float images) -> per-BatchNorm (mean, E[x^2]) of the batch.

    A train-mode forward from zeroed running statistics leaves
    ``(1 - momentum) * batch statistic`` in them; dividing gives the batch's mean
    and (biased) variance of every BatchNorm input exactly.
    """
    model = ConvMixer(config)
    keep = 1.0 - ChannelBatchNorm.momentum

    @jax.jit
    def moments(variables, images):
        x = images.astype(jnp.float32)
        if images.dtype == jnp.uint8:
            x = x / 255.0
        zeros = jax.tree.map(jnp.zeros_like, variables["batch_stats"])
        _, upd = model.apply(
            {"params": variables["params"], "batch_stats": zeros},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        stats = upd["batch_stats"]
        is_bn = lambda t: isinstance(t, dict) and set(t) == {"mean", "var"}  # noqa: E731
        return jax.tree.map(
            lambda s: {
                "mean": s["mean"] / keep,
                "sq": s["var"] / keep + jnp.square(s["mean"] / keep),
            },
            stats,
            is_leaf=is_bn,
        )

    return moments


def recalibrate_batch_stats(
    config: ConvMixerConfig,
    variables: dict,
    images,
    *,
    batch_size: int = 500,
    augment: Callable | None = None,
    passes: int = 1,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """``variables`` with every BatchNorm's running mean and variance measured on ``images``.

    images: (N, H, W, C) uint8 or float in [0, 1], typically the training images.
    Each pass goes over all N images in a fresh random order
    (``np.random.default_rng([seed, pass]).permutation(N)``): datasets stored class
    by class would otherwise give one-class batches, and every BatchNorm after the
    first sees features normalized by such a batch's own statistics. augment: None
    (the images as they are) or ``f(rng, batch) -> (B, H, W, C) float in [0, 1]``,
    e.g. the training augmentation ``functools.partial(train.augment_batch,
    cfg=...)``; batch i of pass p gets ``fold_in(fold_in(PRNGKey(seed), p), i)``.
    passes: how many times to go over the images (more than one is only useful
    with ``augment``).

    Each layer's statistics are pooled over the batches of a train-mode forward
    (each batch normalized by its own statistics, as in training): mean =
    size-weighted mean of batch means, var = pooled E[x^2] - mean^2. With one batch
    holding all N images the model in eval mode then computes exactly what the
    train-mode forward of those N images does. Returns a new tree; the params are
    unchanged.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    if seed < 0:
        raise ValueError(f"the recalibration seed must be >= 0, got {seed}")
    n = len(images)
    if n == 0:
        raise ValueError("recalibration needs at least one image")
    fn = _batch_moments_fn(config)
    it = [
        (p, i, start, stop)
        for p in range(passes)
        for i, (start, stop) in enumerate(iterate_batches(n, batch_size))
    ]
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="batch statistics", unit="batch", leave=False)
    base = jax.random.PRNGKey(seed)
    order = None
    total = None
    for p, i, start, stop in it:
        if i == 0:
            order = np.random.default_rng([seed, p]).permutation(n)
        batch = np.asarray(images[order[start:stop]])
        if augment is not None:
            batch = augment(jax.random.fold_in(jax.random.fold_in(base, p), i), batch)
        m = jax.tree.map(
            lambda a, rows=stop - start: np.asarray(a, np.float64) * rows, fn(variables, batch)
        )
        total = m if total is None else jax.tree.map(np.add, total, m)
    count = n * passes
    is_m = lambda t: isinstance(t, dict) and set(t) == {"mean", "sq"}  # noqa: E731
    stats = jax.tree.map(
        lambda t: {
            "mean": (t["mean"] / count).astype(np.float32),
            "var": np.maximum(t["sq"] / count - np.square(t["mean"] / count), 0.0).astype(
                np.float32
            ),
        },
        total,
        is_leaf=is_m,
    )
    return {"params": variables["params"], "batch_stats": stats}


__all__ = ["average_variables", "recalibrate_batch_stats"]
