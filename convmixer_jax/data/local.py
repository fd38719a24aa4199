"""Local data sources, decoded once and cached by content.

Three layouts are read:

- a class-subfolder image tree ``ROOT/{train,test}/<class>/*.{jpg,jpeg,png}``
  (like ``shared/data/cifar10-jpeg``); classes are the sorted folder names,
  which for CIFAR-10 is its label order airplane..truck;
- the official CIFAR-10 binary release: ``data_batch_1..5.bin`` and
  ``test_batch.bin`` (records of 1 label byte + 3072 pixel bytes, CHW), class
  names from ``batches.meta.txt``;
- the official CIFAR-100 binary release: ``train.bin`` and ``test.bin``
  (records of 1 coarse + 1 fine label byte + 3072 pixel bytes; the fine labels
  are used), class names from ``fine_label_names.txt``.

The binaries may sit in ``ROOT`` or in the release's own subfolder
(``cifar-10-batches-bin``, ``cifar-100-binary``). No pickle is ever read.
Decoded images are cached as ``.npz`` under ``cache_dir()``
(``$CONVMIXER_JAX_CACHE``, default ``~/.cache/convmixer-jax``), named by a
SHA-256 of the source files' names and bytes, so a changed file gives a new
cache entry and a second load of the same data reads one array file instead of
decoding every image again; the binaries are read directly (they need no decoding).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convmixer_jax.files.atomic import save_npz_atomic
from convmixer_jax.files.resize import DEFAULT_CROP_PCT, eval_resize, eval_resize_batch

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_SPLITS = ("train", "test")


class DataError(ValueError):
    """A data source is missing, malformed or inconsistent."""


def cache_dir() -> Path:
    """The cache folder: ``$CONVMIXER_JAX_CACHE``, default ``~/.cache/convmixer-jax``."""
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
        raise DataError(
            f"{root} has no '{split}' folder; expected {root}/{split}/<class>/*.jpg "
            "or CIFAR-10/CIFAR-100 binary batches"
        )
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


def load_image_folder(
    root: str | os.PathLike,
    split: str,
    *,
    progress: bool = False,
    resize: int | None = None,
    crop_pct: float = DEFAULT_CROP_PCT,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read ``root/split/<class>/*`` images.

    Returns images (N, H, W, 3) uint8 (RGB), labels (N,) int32 in file order
    (class by class; shuffle before training), and the class names.
    All images must have the same size, unless ``resize`` is given: then every
    image goes through timm's evaluation transform to ``resize x resize``
    (:func:`~convmixer_jax.files.resize.eval_resize`).
    """
    root = Path(root)
    classes, files = _list_image_folder(root, split)
    h = hashlib.sha256(b"image-folder-v1\0")
    if resize is not None:  # another cache entry for every transform
        h.update(f"eval-resize {resize} {crop_pct!r}\0".encode())
    blobs = []
    for f, _label in files:
        data = f.read_bytes()
        blobs.append(data)
        h.update(f"{f.parent.name}/{f.name}\0{len(data)}\0".encode())
        h.update(data)

    def build():
        from io import BytesIO

        from PIL import Image

        arrays = []
        pairs = zip(files, blobs, strict=True)
        if progress:  # the first decode of 60,000 JPEGs takes a while; later loads hit the cache
            from tqdm.auto import tqdm

            pairs = tqdm(
                pairs,
                total=len(files),
                desc=f"decode {split} images",
                unit="img",
                leave=False,
                disable=None,
            )  # on a terminal only: logs and error output stay clean
        for (f, _), data in pairs:
            try:
                with Image.open(BytesIO(data)) as im:
                    a = np.asarray(im.convert("RGB"), dtype=np.uint8)
                arrays.append(a if resize is None else eval_resize(a, resize, crop_pct))
            except Exception as e:
                raise DataError(f"cannot decode image {f}: {e}") from e
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise DataError(
                f"images under {root / split} differ in size: {sorted(shapes)[:3]}; "
                "evaluate --resize maps them onto the model's input size"
            )
        return np.stack(arrays), np.asarray([lab for _, lab in files], np.int32)

    images, labels = _cached(h.hexdigest(), build)
    return images, labels, classes


@dataclass(frozen=True)
class BinaryLayout:
    """One CIFAR binary release: its folder, batch files and record layout.

    A record is ``label_bytes`` label bytes, then 3072 pixel bytes (3 planes of
    32x32, CHW); ``label_index`` picks the label that is used.
    """

    name: str  # "CIFAR-10"
    folder: str  # the release's top folder in its archive
    batches: dict  # split -> batch file names, read in this order
    label_bytes: int
    label_index: int
    num_classes: int
    names_file: str  # class names, one per line
    other_files: tuple = ()  # further members of the release (not read)
    default_names: tuple | None = None  # when names_file is absent (None: "0", "1", ...)

    @property
    def record(self) -> int:
        return self.label_bytes + _PIXELS

    @property
    def batch_files(self) -> tuple:
        return tuple(n for names in self.batches.values() for n in names)

    @property
    def files(self) -> tuple:
        """Every file name of the release folder."""
        return (*self.batch_files, self.names_file, *self.other_files)


_PIXELS = 32 * 32 * 3
CIFAR10_BINARY = BinaryLayout(
    "CIFAR-10",
    "cifar-10-batches-bin",
    {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test": ("test_batch.bin",)},
    label_bytes=1,
    label_index=0,
    num_classes=10,
    names_file="batches.meta.txt",
    other_files=("readme.html",),
    default_names=CIFAR10_CLASSES,
)
CIFAR100_BINARY = BinaryLayout(
    "CIFAR-100",
    "cifar-100-binary",
    {"train": ("train.bin",), "test": ("test.bin",)},
    label_bytes=2,
    label_index=1,
    num_classes=100,
    names_file="fine_label_names.txt",
    other_files=("coarse_label_names.txt",),
)
#: The binary releases by data set name (cifar100: the fine labels; the coarse byte is
#: checked, not used).
BINARY_LAYOUTS = {"cifar10": CIFAR10_BINARY, "cifar100": CIFAR100_BINARY}
_ALL_BINARY_LAYOUTS = tuple(BINARY_LAYOUTS.values())
_COARSE_CLASSES = 20


def _find_cifar_binaries(
    root: Path, layouts: tuple[BinaryLayout, ...] = _ALL_BINARY_LAYOUTS
) -> tuple[BinaryLayout, Path] | None:
    """The first layout with a batch file in ``root`` or ``root/<release folder>``."""
    for layout in layouts:
        for d in (root, root / layout.folder):
            if any((d / n).exists() for n in layout.batch_files):
                return layout, d
    return None


def _class_names(d: Path, layout: BinaryLayout) -> list[str]:
    p = d / layout.names_file
    if not p.is_file():
        return list(layout.default_names or (str(i) for i in range(layout.num_classes)))
    names = [line.strip() for line in p.read_text(errors="replace").splitlines() if line.strip()]
    if len(names) != layout.num_classes:
        raise DataError(f"{p} names {len(names)} classes; {layout.name} has {layout.num_classes}")
    return names


def load_cifar_binary(
    root: str | os.PathLike, split: str, layout: BinaryLayout
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read the batches of a CIFAR binary release (no pickle) in ``root`` or
    ``root/<release folder>``.

    Returns images (N, 32, 32, 3) uint8 (CHW records turned HWC), labels (N,)
    int32 in [0, num_classes), and the class names (from the release's names
    file when present).
    """
    root = Path(root)
    if split not in _SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {_SPLITS}")
    found = _find_cifar_binaries(root, (layout,))
    if found is None:
        raise DataError(
            f"no {layout.name} binary batches ({', '.join(layout.batch_files)}) under {root}"
        )
    d = found[1]
    raw = []
    for name in layout.batches[split]:
        p = d / name
        if not p.exists():
            raise DataError(
                f"missing {p}; the {layout.name} binary release "
                f"has {', '.join(layout.batches[split])}"
            )
        data = p.read_bytes()
        if len(data) % layout.record:
            raise DataError(
                f"{p} is not a {layout.name} binary batch: size {len(data)} is not a multiple "
                f"of {layout.record}"
            )
        raw.append(np.frombuffer(data, np.uint8).reshape(-1, layout.record))
    records = np.concatenate(raw)
    labels = records[:, layout.label_index].astype(np.int32)
    if labels.max(initial=0) >= layout.num_classes:
        raise DataError(
            f"labels above {layout.num_classes - 1} in {d}: not {layout.name} binary batches"
        )
    if layout.label_bytes == 2 and records[:, 0].max(initial=0) >= _COARSE_CLASSES:
        raise DataError(
            f"coarse labels above {_COARSE_CLASSES - 1} in {d}: not {layout.name} binary batches"
        )
    images = records[:, layout.label_bytes :].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
    return images, labels, _class_names(d, layout)


def load_cifar10_binary(
    root: str | os.PathLike, split: str
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read the official CIFAR-10 binary batches (records: 1 label byte + 3072 pixel bytes).

    Returns images (N, 32, 32, 3) uint8, labels (N,) int32 in [0, 10), class names.
    """
    return load_cifar_binary(root, split, CIFAR10_BINARY)


def load_cifar100_binary(
    root: str | os.PathLike, split: str
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read the official CIFAR-100 binary batches ``train.bin`` / ``test.bin``
    (records: 1 coarse + 1 fine label byte + 3072 pixel bytes).

    Returns images (N, 32, 32, 3) uint8, the FINE labels (N,) int32 in [0, 100),
    and the fine class names (``fine_label_names.txt``; "0".."99" without it).
    """
    return load_cifar_binary(root, split, CIFAR100_BINARY)


def load_local(
    root: str | os.PathLike,
    split: str,
    *,
    progress: bool = False,
    resize: int | None = None,
    crop_pct: float = DEFAULT_CROP_PCT,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Load ``split`` from a local directory in any supported layout (CIFAR-10 / CIFAR-100
    binaries in ``root`` or its release subfolder, else a class-subfolder image tree);
    ``progress`` shows a bar while images are decoded; ``resize`` maps every image
    to ``resize x resize`` by timm's evaluation transform."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist")
    found = _find_cifar_binaries(root)
    if found is not None:
        images, labels, classes = load_cifar_binary(root, split, found[0])
        if resize is not None:
            images = eval_resize_batch(images, resize, crop_pct)
        return images, labels, classes
    return load_image_folder(root, split, progress=progress, resize=resize, crop_pct=crop_pct)
