"""One entry point over every data source."""
from __future__ import annotations

import numpy as np

from convmixer_jax.data.local import load_local


def load_split(split: str, *, data_dir: str | None = None, tfds_name: str = "cifar10",
               tfds_data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Load a split as (images (N,H,W,C) uint8, labels (N,) int32, class names).

    ``data_dir`` selects a local copy (image folders or CIFAR-10 binaries);
    without it the data come from tensorflow-datasets (``pip install
    convmixer-jax[tfds]``; the data set must already be prepared in
    ``tfds_data_dir``).
    """
    if data_dir is not None:
        return load_local(data_dir, split)
    from convmixer_jax.data.tfds_source import load_tfds

    return load_tfds(tfds_name, split, data_dir=tfds_data_dir)


def subset(images: np.ndarray, labels: np.ndarray, n: int | None, seed: int):
    """A seeded random subset of ``n`` examples, kept in their original order; all if n is None."""
    if n is None or n >= len(images):
        return images, labels
    idx = np.sort(np.random.default_rng(seed).choice(len(images), n, replace=False))
    return images[idx], labels[idx]


def stratified_holdout(labels: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices 0..N-1 into (kept, held_out), held_out of size ``n`` stratified by class.

    labels: (N,) int. Each class gives its share of ``n`` (largest remainders
    decide the rounding, ties to the lower class), drawn with
    ``numpy.random.default_rng(seed)``. Both index arrays are sorted.
    """
    labels = np.asarray(labels)
    if not 0 < n < len(labels):
        raise ValueError(f"a hold-out of {n} needs more than {n} training images, got {len(labels)}")
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n / len(labels)
    take = np.floor(exact).astype(int)
    order = np.lexsort((classes, -(exact - take)))
    take[order[: n - take.sum()]] += 1
    rng = np.random.default_rng(seed)
    held = np.concatenate([rng.choice(np.flatnonzero(labels == c), k, replace=False)
                           for c, k in zip(classes, take)])
    mask = np.zeros(len(labels), bool)
    mask[held] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)
