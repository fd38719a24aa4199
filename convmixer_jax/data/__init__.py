"""Image classification data as uint8 NHWC arrays: local folders, CIFAR-10 binaries, tfds.

``load_split(source, split)`` returns ``(images, labels)``:
images (N, H, W, C) uint8, labels (N,) int32. See :mod:`.local` and :mod:`.tfds_source`.
"""
from convmixer_jax.data.local import (  # noqa: F401
    CIFAR10_CLASSES,
    DataError,
    load_cifar10_binary,
    load_image_folder,
    load_local,
)
from convmixer_jax.data.loader import load_split, stratified_holdout, subset  # noqa: F401
