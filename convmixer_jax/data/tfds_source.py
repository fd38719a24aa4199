"""CIFAR-10, CIFAR-100 (or another image classification set) from tensorflow-datasets.

Used only when a ``tfds_data_dir`` is given (``--tfds-data-dir``). Uses
``tfds.data_source`` over the prepared array_record files, which reads without
TensorFlow (``tfds.load`` needs TensorFlow). Needs the ``tfds`` extra
(``pip install 'convmixer-jax[tfds]'``) and a data set already prepared in that
folder: nothing is downloaded here (``download=False``; preparing needs
TensorFlow and internet). Without a tfds folder the CIFAR binary release is
downloaded instead (:mod:`.download`), or ``--data-dir`` reads a local copy.
The label is the data set's ``label`` feature (CIFAR-100: the fine label).
"""

from __future__ import annotations

import numpy as np

from convmixer_jax.data.local import DataError


def open_tfds(name: str, split: str, *, data_dir: str | None = None):
    """(source, labels (N,) int32, class names): ``source[i]["image"]`` is image ``i``
    (H, W, C) uint8, read when asked (the random-access ``tfds.data_source``).

    The labels are read once here, one example at a time (no image is kept)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(
            "tensorflow-datasets is not installed: `pip install 'convmixer-jax[tfds]'`, "
            "or pass --data-dir with a local copy of the data"
        ) from e
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises several types for a missing data set
        raise DataError(
            f"tensorflow-datasets could not open {name}/{split} ({type(e).__name__}: {e}); "
            "prepare it first or pass --data-dir with a local copy"
        ) from e
    n = len(source)
    if n == 0:
        raise DataError(f"tfds {name}/{split} is empty")
    labels = np.asarray([int(source[i]["label"]) for i in range(n)], np.int32)
    try:
        classes = list(tfds.builder(name, data_dir=data_dir).info.features["label"].names)
    except Exception:
        classes = [str(i) for i in range(int(labels.max()) + 1)]
    return source, labels, classes


def load_tfds(
    name: str, split: str, *, data_dir: str | None = None
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Returns images (N, H, W, C) uint8, labels (N,) int32, class names."""
    source, labels, classes = open_tfds(name, split, data_dir=data_dir)
    images = np.stack([np.asarray(source[i]["image"], np.uint8) for i in range(len(source))])
    return images, labels, classes
