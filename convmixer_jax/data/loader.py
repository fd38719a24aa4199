"""One entry point over every data source: a local copy, tensorflow-datasets, or the downloaded
release."""

from __future__ import annotations

import numpy as np

from convmixer_jax.data.local import BINARY_LAYOUTS, DataError, load_cifar_binary, load_local
from convmixer_jax.files.resize import DEFAULT_CROP_PCT, check_resize, eval_resize_batch


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
    if resize is not None:
        check_resize(resize, crop_pct)
    if data_dir is not None:
        return load_local(data_dir, split, progress=progress, resize=resize, crop_pct=crop_pct)
    images, labels, classes = _load_source(
        split, dataset, download_url, download_sha256, tfds_data_dir, progress
    )
    if resize is not None:
        images = eval_resize_batch(images, resize, crop_pct)
    return images, labels, classes


def _load_source(split, dataset, download_url, download_sha256, tfds_data_dir, progress):
    """A split of ``dataset`` from tfds or the downloaded release, as :func:`load_split` returns
    it."""
    if dataset not in BINARY_LAYOUTS:
        raise DataError(f"unknown dataset {dataset!r}; use one of {', '.join(BINARY_LAYOUTS)}")
    if tfds_data_dir is not None:
        from convmixer_jax.data.tfds_source import load_tfds

        return load_tfds(dataset, split, data_dir=tfds_data_dir)
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r}; use one of ('train', 'test')")
    from convmixer_jax.data.download import fetch_release

    folder = fetch_release(dataset, url=download_url, sha256=download_sha256, progress=progress)
    return load_cifar_binary(folder, split, BINARY_LAYOUTS[dataset])


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
