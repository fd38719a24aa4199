"""Local data sources, decoded once and cached by content.

Two layouts are read:

- a class-subfolder image tree ``ROOT/{train,test}/<class>/*.{jpg,jpeg,png}``
  (like ``shared/data/cifar10-jpeg``); classes are the sorted folder names,
  which for CIFAR-10 is its label order airplane..truck;
- the official CIFAR-10 binary release: ``data_batch_1..5.bin`` and
  ``test_batch.bin`` (records of 1 label byte + 3072 pixel bytes, CHW).

No pickle is ever read. Decoded arrays are cached as ``.npz`` under
``$CONVMIXER_JAX_CACHE`` (default ``~/.cache/convmixer-jax``), named by a
SHA-256 of the source files' names and bytes, so a changed file gives a new
cache entry and the second load of the same data takes well under a second.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from convmixer_jax.files.atomic import save_npz_atomic

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_SPLITS = ("train", "test")


class DataError(ValueError):
    """A data source is missing, malformed or inconsistent."""


def cache_dir() -> Path:
    return Path(os.environ.get("CONVMIXER_JAX_CACHE", Path.home() / ".cache" / "convmixer-jax"))


def _cached(digest: str, build):
    """Return arrays from the cache entry ``digest`` or build and store them."""
    path = cache_dir() / f"{digest}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                return z["images"], z["labels"]
        except Exception:  # a corrupt entry is rebuilt, never trusted
            path.unlink(missing_ok=True)
    images, labels = build()
    try:
        save_npz_atomic(path, images=images, labels=labels)
    except OSError:
        pass  # an unwritable cache only costs speed
    return images, labels


def _split_dir(root: Path, split: str) -> Path:
    if split not in _SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {_SPLITS}")
    d = root / split
    if not d.is_dir():
        raise DataError(f"{root} has no '{split}' folder; expected {root}/{split}/<class>/*.jpg "
                        "or CIFAR-10 binary batches")
    return d


def _list_image_folder(root: Path, split: str) -> tuple[list[str], list[tuple[Path, int]]]:
    d = _split_dir(root, split)
    classes = sorted(p.name for p in d.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{d} has no class subfolders")
    files = []
    for label, name in enumerate(classes):
        for f in sorted((d / name).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files.append((f, label))
    if not files:
        raise DataError(f"{d} holds no .jpg/.jpeg/.png images")
    return classes, files


def load_image_folder(root: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read ``root/split/<class>/*`` images.

    Returns images (N, H, W, 3) uint8 (RGB), labels (N,) int32 in file order
    (class by class; shuffle before training), and the class names.
    All images must have the same size.
    """
    root = Path(root)
    classes, files = _list_image_folder(root, split)
    h = hashlib.sha256(b"image-folder-v1\0")
    blobs = []
    for f, label in files:
        data = f.read_bytes()
        blobs.append(data)
        h.update(f"{f.parent.name}/{f.name}\0{len(data)}\0".encode())
        h.update(data)

    def build():
        from io import BytesIO

        from PIL import Image

        arrays = []
        for (f, _), data in zip(files, blobs):
            try:
                with Image.open(BytesIO(data)) as im:
                    arrays.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
            except Exception as e:
                raise DataError(f"cannot decode image {f}: {e}") from e
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise DataError(f"images under {root / split} differ in size: {sorted(shapes)[:3]}")
        return np.stack(arrays), np.asarray([lab for _, lab in files], np.int32)

    images, labels = _cached(h.hexdigest(), build)
    return images, labels, classes


_CIFAR_BIN = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}
_RECORD = 1 + 32 * 32 * 3


def _find_cifar_binaries(root: Path) -> Path | None:
    for d in (root, root / "cifar-10-batches-bin"):
        if (d / "test_batch.bin").exists() or (d / "data_batch_1.bin").exists():
            return d
    return None


def load_cifar10_binary(root: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read the official CIFAR-10 binary batches (no pickle).

    Returns images (N, 32, 32, 3) uint8, labels (N,) int32, class names.
    """
    root = Path(root)
    if split not in _SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {_SPLITS}")
    d = _find_cifar_binaries(root)
    if d is None:
        raise DataError(f"no CIFAR-10 binary batches (data_batch_*.bin, test_batch.bin) under {root}")
    raw = []
    for name in _CIFAR_BIN[split]:
        p = d / name
        if not p.exists():
            raise DataError(f"missing {p}; the CIFAR-10 binary release has {', '.join(_CIFAR_BIN[split])}")
        data = p.read_bytes()
        if len(data) % _RECORD:
            raise DataError(f"{p} is not a CIFAR-10 binary batch: size {len(data)} is not a multiple of {_RECORD}")
        raw.append(np.frombuffer(data, np.uint8).reshape(-1, _RECORD))
    records = np.concatenate(raw)
    labels = records[:, 0].astype(np.int32)
    if labels.max(initial=0) > 9:
        raise DataError(f"labels above 9 in {d}: not CIFAR-10 binary batches")
    images = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
    return images, labels, list(CIFAR10_CLASSES)


def load_local(root: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Load ``split`` from a local directory in either supported layout."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist")
    if _find_cifar_binaries(root) is not None:
        return load_cifar10_binary(root, split)
    return load_image_folder(root, split)
