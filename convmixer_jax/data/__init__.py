"""Image classification data as uint8 NHWC arrays: local copies, the downloaded CIFAR releases,
tfds.

``load_split(split, ...)`` returns ``(images, labels, class names)``:
images (N, H, W, C) uint8, labels (N,) int32. Its sources:

- :mod:`.local`: a local copy (``data_dir``): class-subfolder images, or the
  CIFAR-10 / CIFAR-100 binary batches; needs nothing else;
- :mod:`.download`: the official CIFAR-10 / CIFAR-100 binary release, downloaded
  once into ``cache_dir()/releases`` and checked against its SHA-256 (the
  default; needs internet the first time, or a mirror with its SHA-256);
- :mod:`.tfds_source`: a data set already prepared by tensorflow-datasets
  (``tfds_data_dir``; needs the ``tfds`` extra, downloads nothing).
"""

from convmixer_jax.data.download import fetch_release
from convmixer_jax.data.loader import load_split, stratified_holdout, subset
from convmixer_jax.data.local import (
    BINARY_LAYOUTS,
    CIFAR10_CLASSES,
    DataError,
    cache_dir,
    load_cifar10_binary,
    load_cifar100_binary,
    load_image_folder,
    load_local,
)

__all__ = [
    "BINARY_LAYOUTS",
    "CIFAR10_CLASSES",
    "DataError",
    "cache_dir",
    "fetch_release",
    "load_cifar10_binary",
    "load_cifar100_binary",
    "load_image_folder",
    "load_local",
    "load_split",
    "stratified_holdout",
    "subset",
]
