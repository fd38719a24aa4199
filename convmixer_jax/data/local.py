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
Images of a tree are decoded by the rules of the image commands
(:func:`~convmixer_jax.files.image_files.decode_image`: 16-bit and float images are
refused, never clipped), then made RGB (gray replicated, alpha dropped).
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
from convmixer_jax.files.image_files import decode_image
from convmixer_jax.files.resize import (
    DEFAULT_CROP_PCT,
    check_resize,
    eval_resize,
    eval_resize_batch,
)
from convmixer_jax.scheme.images import ImageError

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
    """The cache folder: ``$CONVMIXER_JAX_CACHE``, default ``~/.cache/convmixer-jax``.

    An empty ``CONVMIXER_JAX_CACHE`` counts as unset (as the XDG base directory
    specification treats an empty ``XDG_CACHE_HOME``), so that ``CONVMIXER_JAX_CACHE=""``
    gives the default rather than the current directory."""
    value = os.environ.get("CONVMIXER_JAX_CACHE", "")
    return Path(value) if value else Path.home() / ".cache" / "convmixer-jax"


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


def list_image_folder(root: Path, split: str) -> tuple[list[str], list[tuple[Path, int]]]:
    """The class names (sorted folder names) and the images of ``root/split/<class>/`` as
    (path, label) pairs, in the row order of every reader of the tree: class by class, files
    sorted by name within a class."""
    root = Path(root)
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
    check_data_resize(resize, crop_pct)
    classes, files = list_image_folder(root, split)
    # v2: 16-bit and float images are refused (v1 entries hold them clipped to 255)
    h = hashlib.sha256(b"image-folder-v2\0")
    if resize is not None:  # another cache entry for every transform
        h.update(f"eval-resize {resize} {crop_pct!r}\0".encode())
    blobs = []
    for f, _label in files:
        data = read_image_file(f)
        blobs.append(data)
        h.update(f"{f.parent.name}/{f.name}\0{len(data)}\0".encode())
        h.update(data)

    def build():
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
            arrays.append(decode_folder_image(data, f, resize, crop_pct))
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise DataError(
                f"images under {root / split} differ in size: {sorted(shapes)[:3]}; "
                "evaluate --resize maps them onto the model's input size"
            )
        return np.stack(arrays), np.asarray([lab for _, lab in files], np.int32)

    images, labels = _cached(h.hexdigest(), build)
    return images, labels, classes


def read_image_file(path: Path) -> bytes:
    """The bytes of one image of a data tree; a :class:`DataError` naming it if it cannot be
    read."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"cannot read the image {path}: {e.strerror or e}") from None


def decode_folder_image(
    data: bytes, path, resize: int | None = None, crop_pct: float = DEFAULT_CROP_PCT
) -> np.ndarray:
    """One image of a data tree from its file's bytes: (H, W, 3) uint8 RGB, or (resize, resize,
    3) by timm's evaluation transform; a :class:`DataError` naming ``path`` if it is refused
    (:func:`~convmixer_jax.files.image_files.decode_image`'s rules)."""
    try:
        a = rgb(decode_image(data, path, npy_alternative=False))
        return a if resize is None else eval_resize(a, resize, crop_pct)
    except ImageError as e:
        raise DataError(str(e) if str(path) in str(e) else f"{path}: {e}") from None


def rgb(image: np.ndarray) -> np.ndarray:
    """(H, W, C) uint8 with C in 1, 3, 4 -> (H, W, 3): gray replicated, alpha dropped (what
    Pillow's ``convert("RGB")`` gives for ``L`` and ``RGBA``)."""
    c = image.shape[-1]
    if c == 1:
        return np.ascontiguousarray(np.repeat(image, 3, axis=-1))
    return np.ascontiguousarray(image[..., :3]) if c == 4 else image


def check_data_resize(resize: int | None, crop_pct: float) -> None:
    """:func:`~convmixer_jax.files.resize.check_resize` (when ``resize`` is given) raising a
    :class:`DataError`."""
    if resize is not None:
        try:
            check_resize(resize, crop_pct)
        except ImageError as e:
            raise DataError(str(e)) from None


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
    records: dict | None = None  # split -> records per batch file in the official release

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
    records={"train": 10_000, "test": 10_000},
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
    records={"train": 50_000, "test": 10_000},
)
#: The binary releases by data set name (cifar100: the fine labels; the coarse byte is
#: checked, not used).
BINARY_LAYOUTS = {"cifar10": CIFAR10_BINARY, "cifar100": CIFAR100_BINARY}
_ALL_BINARY_LAYOUTS = tuple(BINARY_LAYOUTS.values())
_COARSE_CLASSES = 20


def find_cifar_binaries(
    root: Path, layouts: tuple[BinaryLayout, ...] = _ALL_BINARY_LAYOUTS
) -> tuple[BinaryLayout, Path] | None:
    """The first layout with a batch file in ``root`` or ``root/<release folder>``, and that
    folder; None if there is none."""
    root = Path(root)
    for layout in layouts:
        for d in (root, root / layout.folder):
            if any((d / n).exists() for n in layout.batch_files):
                return layout, d
    return None


def cifar_class_names(d: Path, layout: BinaryLayout) -> list[str]:
    """The class names of the release in folder ``d`` (its names file; the layout's defaults
    without one)."""
    p = Path(d) / layout.names_file
    if not p.is_file():
        return list(layout.default_names or (str(i) for i in range(layout.num_classes)))
    names = [line.strip() for line in p.read_text(errors="replace").splitlines() if line.strip()]
    if len(names) != layout.num_classes:
        raise DataError(f"{p} names {len(names)} classes; {layout.name} has {layout.num_classes}")
    return names


def cifar_batch_files(
    root: str | os.PathLike, split: str, layout: BinaryLayout
) -> tuple[Path, list[tuple[Path, int]]]:
    """The folder of the release in ``root`` (or ``root/<release folder>``) and the batch files
    of ``split`` with their record counts, read in this order. Refuses a missing, empty or
    truncated file (its size is not a whole number of records) with a :class:`DataError`."""
    root = Path(root)
    if split not in _SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {_SPLITS}")
    found = find_cifar_binaries(root, (layout,))
    if found is None:
        raise DataError(
            f"no {layout.name} binary batches ({', '.join(layout.batch_files)}) under {root}"
        )
    d = found[1]
    out = []
    for name in layout.batches[split]:
        p = d / name
        if not p.exists():
            raise DataError(
                f"missing {p}; the {layout.name} binary release "
                f"has {', '.join(layout.batches[split])}"
            )
        try:
            size = p.stat().st_size
        except OSError as e:
            raise DataError(f"cannot read {p}: {e.strerror or e}") from None
        if not size or size % layout.record:
            official = (layout.records or {}).get(split)
            should = (
                f" (the official file holds {official:,} records: {official * layout.record:,} "
                "bytes)"
                if official
                else ""
            )
            problem = (
                "is empty (0 bytes)"
                if not size
                else f"is truncated or damaged: its size {size:,} bytes is not a multiple of"
                " the record size"
            )
            raise DataError(
                f"{p} {problem}: a {layout.name} binary batch holds whole "
                f"{layout.record:,}-byte records{should}; download the release again"
            )
        out.append((p, size // layout.record))
    return d, out


def cifar_labels(label_bytes: np.ndarray, layout: BinaryLayout, d: Path) -> np.ndarray:
    """label_bytes: (N, layout.label_bytes) uint8, the label bytes of each record ->
    the used labels (N,) int32, after checking every label byte lies in its range."""
    labels = label_bytes[:, layout.label_index].astype(np.int32)
    if labels.max(initial=0) >= layout.num_classes:
        raise DataError(
            f"labels above {layout.num_classes - 1} in {d}: not {layout.name} binary batches"
        )
    if layout.label_bytes == 2 and label_bytes[:, 0].max(initial=0) >= _COARSE_CLASSES:
        raise DataError(
            f"coarse labels above {_COARSE_CLASSES - 1} in {d}: not {layout.name} binary batches"
        )
    return labels


def cifar_records_to_images(pixels: np.ndarray) -> np.ndarray:
    """pixels: (N, 3072) uint8 records' pixel bytes (3 planes of 32 x 32, CHW) -> (N, 32, 32,
    3) uint8 HWC, a new contiguous array."""
    return np.ascontiguousarray(pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def load_cifar_binary(
    root: str | os.PathLike, split: str, layout: BinaryLayout
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read the batches of a CIFAR binary release (no pickle) in ``root`` or
    ``root/<release folder>``.

    Returns images (N, 32, 32, 3) uint8 (CHW records turned HWC), labels (N,)
    int32 in [0, num_classes), and the class names (from the release's names
    file when present).
    """
    d, files = cifar_batch_files(root, split, layout)
    raw = []
    for p, _ in files:
        try:
            data = p.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read {p}: {e.strerror or e}") from None
        raw.append(np.frombuffer(data, np.uint8).reshape(-1, layout.record))
    records = np.concatenate(raw)
    labels = cifar_labels(records[:, : layout.label_bytes], layout, d)
    images = cifar_records_to_images(records[:, layout.label_bytes :])
    return images, labels, cifar_class_names(d, layout)


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
    check_data_resize(resize, crop_pct)
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist")
    found = find_cifar_binaries(root)
    if found is not None:
        images, labels, classes = load_cifar_binary(root, split, found[0])
        if resize is not None:
            images = eval_resize_batch(images, resize, crop_pct)
        return images, labels, classes
    return load_image_folder(root, split, progress=progress, resize=resize, crop_pct=crop_pct)
