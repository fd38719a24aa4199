"""Image classification data: splits as row readers that decode on demand, or whole uint8
NHWC arrays; local copies, the downloaded CIFAR releases, tfds; Grain input pipelines.

``open_split(split, ...)`` returns a :class:`~convmixer_jax.data.sources.Split`: images a
row reader (N, H, W, C) uint8 that reads only the rows asked for, labels (N,) int32, class
names. ``load_split(split, ...)`` returns ``(images, labels, class names)`` with every row
read into memory. :mod:`.pipeline` turns a reader into batches with Grain (decoding in
threads or worker processes, a bounded buffer). Their sources:

- :mod:`.local`: a local copy (``data_dir``): class-subfolder images, or the
  CIFAR-10 / CIFAR-100 binary batches; needs nothing else;
- :mod:`.download`: the official CIFAR-10 / CIFAR-100 binary release, downloaded
  once into ``cache_dir()/releases`` and checked against its SHA-256 (the
  default; needs internet the first time, or a mirror with its SHA-256);
- :mod:`.tfds_source`: a data set already prepared by tensorflow-datasets
  (``tfds_data_dir``; needs the ``tfds`` extra, downloads nothing).
"""

from convmixer_jax.data.download import fetch_release
from convmixer_jax.data.loader import load_split, stratified_holdout, subset, subset_indices
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
from convmixer_jax.data.sources import Rows, Split, open_split

__all__ = [
    "BINARY_LAYOUTS",
    "CIFAR10_CLASSES",
    "DataError",
    "Rows",
    "Split",
    "cache_dir",
    "fetch_release",
    "load_cifar10_binary",
    "load_cifar100_binary",
    "load_image_folder",
    "load_local",
    "load_split",
    "open_split",
    "stratified_holdout",
    "subset",
    "subset_indices",
]
