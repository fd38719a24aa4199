"""One entry point over every data source (a local copy, tensorflow-datasets, or the downloaded
release) read whole into memory, subsets, and the stratified validation hold-out."""

from __future__ import annotations

import numpy as np

from convmixer_jax.data.sources import open_split
from convmixer_jax.files.resize import DEFAULT_CROP_PCT


def load_split(
    split: str,
    *,
    data_dir: str | None = None,
    dataset: str = "cifar10",
    download_url: str | None = None,
    download_sha256: str | None = None,
    tfds_data_dir: str | None = None,
    progress: bool = True,
    resize: int | None = None,
    crop_pct: float = DEFAULT_CROP_PCT,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Load a split ("train" or "test") as (images (N,H,W,C) uint8, labels (N,) int32, class names).

    The source, first match wins:

    - ``data_dir``: a local copy (image folders, or CIFAR-10 / CIFAR-100 binaries,
      detected from the files; ``dataset`` is not consulted);
    - ``tfds_data_dir``: ``dataset`` as prepared by tensorflow-datasets in that
      folder (needs the ``tfds`` extra; nothing is downloaded);
    - otherwise the official binary release of ``dataset`` ("cifar10", or
      "cifar100" with its 100 fine labels), downloaded once into the cache and
      checked against its SHA-256 (:func:`convmixer_jax.data.download.fetch_release`;
      ``download_url`` / ``download_sha256`` name a mirror). ``progress`` shows
      the download's (and an image folder's decoding) progress bar.

    Images of the CIFAR sets are (N, 32, 32, 3). With ``resize`` every image of
    any source goes through timm's evaluation transform to ``resize x resize``
    (:func:`~convmixer_jax.files.resize.eval_resize`); ``resize`` and ``crop_pct`` are
    checked (:func:`~convmixer_jax.files.resize.check_resize`) before any data is read.
    """
    opened = open_split(
        split,
        data_dir=data_dir,
        dataset=dataset,
        download_url=download_url,
        download_sha256=download_sha256,
        tfds_data_dir=tfds_data_dir,
        progress=progress,
        resize=resize,
        crop_pct=crop_pct,
        cache=True,
    )
    return np.array(opened.images), opened.labels, list(opened.classes)


def subset_indices(total: int, n: int | None, seed: int) -> np.ndarray | None:
    """The rows of a seeded random subset of ``n`` of ``total`` examples, sorted: (n,) int;
    None (all rows) if n is None or n >= total. :func:`subset` picks these rows."""
    if n is None or n >= total:
        return None
    return np.sort(np.random.default_rng(seed).choice(total, n, replace=False))


def subset(images: np.ndarray, labels: np.ndarray, n: int | None, seed: int):
    """A seeded random subset of ``n`` examples, kept in their original order; all if n is None."""
    idx = subset_indices(len(images), n, seed)
    return (images, labels) if idx is None else (images[idx], labels[idx])


def stratified_holdout(labels: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices 0..N-1 into (kept, held_out), held_out of size ``n`` stratified by class.

    labels: (N,) int. Each class gives its share of ``n`` (largest remainders
    decide the rounding, ties to the lower class), drawn with
    ``numpy.random.default_rng(seed)``. Both index arrays are sorted.
    """
    labels = np.asarray(labels)
    if not 0 < n < len(labels):
        raise ValueError(
            f"a hold-out of {n} needs more than {n} training images, got {len(labels)}"
        )
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n / len(labels)
    take = np.floor(exact).astype(int)
    order = np.lexsort((classes, -(exact - take)))
    take[order[: n - take.sum()]] += 1
    rng = np.random.default_rng(seed)
    held = np.concatenate(
        [
            rng.choice(np.flatnonzero(labels == c), k, replace=False)
            for c, k in zip(classes, take, strict=True)
        ]
    )
    mask = np.zeros(len(labels), bool)
    mask[held] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)
