"""Image arrays from files: ``.npy`` read without ever unpickling."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from convmixer_jax.scheme.images import ImageError


def load_images(path: str | os.PathLike) -> np.ndarray:
    """Read an image array from a ``.npy`` file (never unpickling anything).

    Raises :class:`~convmixer_jax.scheme.images.ImageError` for a missing,
    unreadable, pickled or non-``.npy`` file. Shape and values are checked by
    the caller (``blockwise.check_images``, ``evaluate.check_model_images``).
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"image file {path} does not exist")
    if path.is_dir():
        raise ImageError(f"{path} is a directory; pass a .npy file")
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise ImageError(f"cannot read {path}: {e.strerror or e}") from None
    if magic[:4] == b"PK\x03\x04":
        raise ImageError(f"{path} is an .npz archive; pass a single array saved with numpy.save (.npy)")
    if magic != b"\x93NUMPY":
        raise ImageError(f"{path} is not a .npy file; save the images with numpy.save")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        raise ImageError(f"cannot read {path} as a .npy array ({e}); "
                         "save the images with numpy.save (object arrays are not accepted)") from None
    return array


__all__ = ["load_images"]
