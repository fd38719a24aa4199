"""Image arrays from files: ``.npy`` read without ever unpickling."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from convmixer_jax.scheme.images import ImageError


def load_images(path: str | os.PathLike, *, data: bytes | None = None) -> np.ndarray:
    """Read an image array from a ``.npy`` file (never unpickling anything).

    ``data``, when given, is the file's content already read (a pipe can be read only
    once); ``path`` then only names it. The file is opened once.

    Raises :class:`~convmixer_jax.scheme.images.ImageError` for a missing,
    unreadable, pickled or non-``.npy`` file. Shape and values are checked by
    the caller (``blockwise.check_images``, ``evaluate.check_model_images``).
    """
    path = Path(path)
    if data is None:
        if not path.exists():
            raise ImageError(f"image file {path} does not exist")
        if path.is_dir():
            raise ImageError(f"{path} is a directory; pass a .npy file")
        try:
            f = open(path, "rb")
        except OSError as e:
            raise ImageError(f"cannot read {path}: {e.strerror or e}") from None
    else:
        f = io.BytesIO(data)
    with f:
        try:
            magic = f.read(6)
            size = len(data) if data is not None else os.fstat(f.fileno()).st_size
        except OSError as e:
            raise ImageError(f"cannot read {path}: {e.strerror or e}") from None
        if magic[:4] == b"PK\x03\x04":
            raise ImageError(
                f"{path} is an .npz archive; pass a single array saved with numpy.save (.npy)"
            )
        if magic != b"\x93NUMPY":
            raise ImageError(f"{path} is not a .npy file; save the images with numpy.save")
        f.seek(0)
        shape, dtype, offset = _read_header(f, path)
        need = int(np.prod(shape, dtype=object)) * dtype.itemsize
        have = size - offset
        if have < need:
            raise ImageError(
                f"cannot read {path}: it is truncated or damaged; its header "
                f"promises {need:,} bytes of data (shape {shape}, {dtype}) but "
                f"the file holds {max(have, 0):,}; write it again with numpy.save"
            )
        try:
            f.seek(0)
            array = np.load(f, allow_pickle=False, mmap_mode=None)
        except (ValueError, EOFError, OSError, MemoryError) as e:
            raise ImageError(
                f"cannot read {path} as a .npy array ({e}); "
                "save the images with numpy.save (object arrays are not accepted)"
            ) from None
    if not array.dtype.isnative:  # big-endian (or other) byte order: the same values, native order
        array = array.astype(array.dtype.newbyteorder("="))
    return array


def _read_header(f, path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) of the ``.npy`` file open as ``f`` (at its start), from its
    header alone (nothing allocated); ``path`` names it in errors."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy version {version}")
        offset = f.tell()
    except Exception as e:  # numpy parses the header with ast/tokenize: any error means damaged
        raise ImageError(
            f"{path} has a damaged .npy header ({' '.join(str(e).split())[:200]}); "
            "write it again with numpy.save"
        ) from None
    if dtype.hasobject:
        raise ImageError(
            f"{path} holds Python objects (dtype {dtype}; object arrays are not "
            "accepted); images must be uint8 or float arrays saved with numpy.save"
        )
    return tuple(int(n) for n in shape), dtype, offset


__all__ = ["load_images"]
