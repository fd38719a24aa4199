"""Data splits as row readers: arrays whose rows are read, and decoded, only when asked for.

A row reader (:class:`Rows`) looks like a uint8 array of shape (N, H, W, C): ``len(r)``,
``r.shape``, ``r.dtype``, ``r[i]`` -> (H, W, C), ``r[a:b]`` and ``r[int_array]`` -> (n, H,
W, C), and ``numpy.asarray(r)`` (which reads every row). Indexing reads only the rows
asked for; ``r.take(indices)`` is a view of some rows that reads nothing until indexed. So
a split of any size is opened at once and held in little memory, and
:func:`~convmixer_jax.parallel.global_arrays.shard_rows` reads only a process's own rows
of a batch. The kinds:

- :class:`ArrayRows`: an array in memory, or a ``.npy`` file mapped into memory;
- :class:`CifarBinaryRows`: the CIFAR-10 / CIFAR-100 binary batch files, mapped into
  memory (``numpy.memmap``; nothing copied into RAM), each record turned HWC when read;
- :class:`ImageFolderRows`: a class-folder tree of PNG/JPEG files, each decoded when read
  (:func:`~convmixer_jax.data.local.decode_folder_image`: RGB, the rules of the image
  commands), optionally through timm's evaluation resize;
- :class:`TfdsRows`: the examples of a tensorflow-datasets ``data_source``;
- :class:`ResizedRows`: timm's evaluation resize of another reader's rows, one by one;
- :class:`TakenRows`: some rows of another reader (what ``take`` returns).

:func:`open_split` opens a split from the same sources, with the same errors, as
:func:`~convmixer_jax.data.loader.load_split`, which is :func:`open_split` followed by
reading every row. Row ``i`` is the same image for both: an image tree's files class by
class, sorted by name within a class; the binary batches in file order.

A decoded image tree of at most :data:`CACHE_MAX_BYTES` may be cached (``cache=True``) as
one ``.npy`` file under :func:`~convmixer_jax.data.local.cache_dir`, named by a SHA-256
of the files' names and bytes (and of the resize), written to a temporary file and renamed
into place, and mapped into memory when read: decoding the tree costs one pass, every
later epoch reads the mapped array (``docs/design.md`` has the measurement). A cache
entry whose header or size is wrong is rebuilt.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convmixer_jax.data.local import (
    BINARY_LAYOUTS,
    BinaryLayout,
    DataError,
    cache_dir,
    check_data_resize,
    cifar_batch_files,
    cifar_class_names,
    cifar_labels,
    cifar_records_to_images,
    decode_folder_image,
    find_cifar_binaries,
    list_image_folder,
    read_image_file,
)
from convmixer_jax.files.atomic import release_temporary, remove_stale_temporaries, temporary_name
from convmixer_jax.files.resize import DEFAULT_CROP_PCT, check_resize, eval_resize

#: The largest decoded image tree (N * H * W * C bytes) that ``cache=True`` writes to the
#: cache: CIFAR-size sets (CIFAR-10's 60,000 images are 184 MB). Larger trees are decoded
#: on every read.
CACHE_MAX_BYTES = 2 * 2**30


def _row_indices(key, n: int) -> np.ndarray:
    """``key`` (a slice, or a 1-D sequence of ints, negative from the end) as (k,) intp
    indices into 0..n-1; IndexError outside."""
    if isinstance(key, slice):
        return np.arange(n)[key]
    rows = np.asarray(key)
    if rows.size == 0:
        return np.zeros(0, np.intp)
    if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
        raise IndexError(
            f"rows are picked by an int, a slice or a 1-D integer array; got {rows.dtype} "
            f"of shape {rows.shape}"
        )
    if rows.min() < -n or rows.max() >= n:
        raise IndexError(f"row indices outside 0..{n - 1}: {rows.min()}..{rows.max()}")
    return np.where(rows < 0, rows + n, rows).astype(np.intp)


class Rows:
    """An array-like of N images, (N, H, W, C) uint8, whose rows are read when indexed.

    Subclasses set ``shape`` and implement :meth:`read`.
    """

    shape: tuple[int, int, int, int]
    dtype = np.dtype(np.uint8)
    ndim = 4

    def read(self, rows: np.ndarray) -> np.ndarray:
        """rows: (k,) int indices in 0..N-1 -> those images, (k, H, W, C), in that order."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __getitem__(self, key) -> np.ndarray:
        """``r[i]`` -> (H, W, C); ``r[a:b]``, ``r[int_array]`` -> (k, H, W, C)."""
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            n, i = len(self), int(key)
            if not -n <= i < n:
                raise IndexError(f"row {i} is outside 0..{n - 1}")
            return self.read(np.asarray([i % n], np.intp))[0]
        if isinstance(key, tuple):
            raise IndexError("a row reader is indexed by rows only; index the array it returns")
        return self.read(_row_indices(key, len(self)))

    def take(self, indices) -> Rows:
        """The rows ``indices`` (a 1-D int sequence, or a slice) as a reader of their own:
        (k, H, W, C), row j being row ``indices[j]`` of this one. Nothing is read."""
        return TakenRows(self, _row_indices(indices, len(self)))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        images = self.read(np.arange(len(self)))
        return images if dtype is None else images.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape})"


class ArrayRows(Rows):
    """The rows of an array (N, H, W, C): in memory, or a ``.npy`` mapped from disk
    (:meth:`from_npy`; it is pickled by its path, so worker processes map it too)."""

    def __init__(self, array: np.ndarray, *, path: str | None = None):
        array = array if isinstance(array, np.ndarray) else np.asarray(array)
        if array.ndim != 4:
            raise ValueError(f"images must be (N, H, W, C); got shape {array.shape}")
        self.array, self.path = array, path
        self.shape, self.dtype = tuple(array.shape), array.dtype

    @classmethod
    def from_npy(cls, path: str | os.PathLike) -> ArrayRows:
        """A ``.npy`` file of (N, H, W, C), mapped read-only (``mmap_mode="r"``)."""
        return cls(np.load(path, mmap_mode="r", allow_pickle=False), path=os.fspath(path))

    def read(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.array[rows])

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, tuple):
            raise IndexError("a row reader is indexed by rows only; index the array it returns")
        return self.array[key]  # a view for an int or a slice

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.array(self.array, dtype=dtype)  # a copy in memory, also of a mapped file

    def __reduce__(self):
        if self.path is not None:
            return (ArrayRows.from_npy, (self.path,))
        return (ArrayRows, (self.array,))


class TakenRows(Rows):
    """Rows ``rows`` of ``source``: (len(rows), H, W, C); reads through ``source``."""

    def __init__(self, source: Rows, rows: np.ndarray):
        self.source, self.rows = source, np.asarray(rows, np.intp)
        self.shape = (len(self.rows), *source.shape[1:])
        self.dtype = source.dtype

    def read(self, rows: np.ndarray) -> np.ndarray:
        return self.source.read(self.rows[rows])

    def take(self, indices) -> Rows:
        return TakenRows(self.source, self.rows[_row_indices(indices, len(self))])


class CifarBinaryRows(Rows):
    """The images of CIFAR binary batch files, (N, 32, 32, 3) uint8, mapped from disk.

    files: (path, records) per batch file, in row order. Each file is mapped read-only when
    first read (and again in each worker process: the reader is pickled by its paths).
    """

    def __init__(self, files: list[tuple[str, int]], layout: BinaryLayout):
        self.files = [(os.fspath(p), int(k)) for p, k in files]
        self.layout = layout
        counts = np.asarray([k for _, k in self.files])
        self._ends = np.cumsum(counts)
        self._starts = self._ends - counts
        self.shape = (int(self._ends[-1]) if len(counts) else 0, 32, 32, 3)
        self._maps: list[np.memmap] | None = None

    def _mapped(self) -> list[np.memmap]:
        if self._maps is None:
            self._maps = [
                np.memmap(p, np.uint8, "r", shape=(k, self.layout.record)) for p, k in self.files
            ]
        return self._maps

    def read(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.intp)
        out = np.empty((len(rows), 32, 32, 3), np.uint8)
        which = np.searchsorted(self._ends, rows, side="right")
        maps = self._mapped()
        for f in np.unique(which):
            picked = which == f
            local = rows[picked] - self._starts[f]
            out[picked] = cifar_records_to_images(maps[f][local, self.layout.label_bytes :])
        return out

    def __getstate__(self):
        return {**self.__dict__, "_maps": None}


def _read_cifar_label_bytes(path: str, records: int, layout: BinaryLayout) -> np.ndarray:
    """(records, label_bytes) uint8: the label bytes of each record, read in chunks (the
    pixels pass through a small buffer only)."""
    out = np.empty((records, layout.label_bytes), np.uint8)
    chunk = 4096  # records per read, 12 MB
    try:
        with open(path, "rb") as f:
            for start in range(0, records, chunk):
                k = min(chunk, records - start)
                data = f.read(k * layout.record)
                if len(data) != k * layout.record:
                    raise DataError(f"{path} became shorter while it was read; read it again")
                recs = np.frombuffer(data, np.uint8).reshape(k, layout.record)
                out[start : start + k] = recs[:, : layout.label_bytes]
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    return out


class ImageFolderRows(Rows):
    """The images of PNG/JPEG files, each decoded when read: (N, H, W, 3) uint8 RGB, or (N,
    resize, resize, 3) through timm's evaluation resize.

    paths: the N files in row order. Without ``resize`` every image must have the size of
    the first (decoded here to learn it): :meth:`check_sizes` checks all at once, and a row
    of another size is refused when it is read. ``folder`` names the tree in errors.
    """

    def __init__(
        self,
        paths: list[str],
        *,
        resize: int | None = None,
        crop_pct: float = DEFAULT_CROP_PCT,
        folder: str | os.PathLike | None = None,
    ):
        if not paths:
            raise DataError(f"{folder or 'the image folder'} holds no .jpg/.jpeg/.png images")
        check_data_resize(resize, crop_pct)
        self.paths = [os.fspath(p) for p in paths]
        self.resize, self.crop_pct = resize, crop_pct
        self.folder = os.fspath(folder) if folder is not None else os.path.dirname(self.paths[0])
        if resize is None:
            first = decode_folder_image(read_image_file(Path(self.paths[0])), Path(self.paths[0]))
            self.shape = (len(self.paths), *first.shape)
        else:
            self.shape = (len(self.paths), resize, resize, 3)

    def check_sizes(self) -> ImageFolderRows:
        """Refuse (a :class:`DataError`) a tree without ``resize`` whose images differ in size,
        from the files' headers (nothing is decoded); returns the reader."""
        if self.resize is not None:
            return self
        from PIL import Image

        shapes = {self.shape[1:]}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for p in self.paths:
                try:
                    with Image.open(p, formats=["PNG", "JPEG"]) as im:
                        shapes.add((im.size[1], im.size[0], 3))
                except Exception:  # decoding it will raise the error that names the problem
                    continue
        if len(shapes) != 1:
            raise DataError(
                f"images under {self.folder} differ in size: {sorted(shapes)[:3]}; "
                "evaluate --resize maps them onto the model's input size"
            )
        return self

    def decode(self, i: int, data: bytes) -> np.ndarray:
        """Row ``i`` from its file's bytes ``data``: (H, W, 3) uint8."""
        path = Path(self.paths[i])
        image = decode_folder_image(data, path, self.resize, self.crop_pct)
        if image.shape != self.shape[1:]:
            h, w = self.shape[1:3]
            raise DataError(
                f"images under {self.folder} differ in size: {self.paths[0]} is {h} x {w}, "
                f"{path} is {image.shape[0]} x {image.shape[1]}; "
                "evaluate --resize maps them onto the model's input size"
            )
        return image

    def read(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), *self.shape[1:]), np.uint8)
        for j, i in enumerate(np.asarray(rows, np.intp)):
            out[j] = self.decode(int(i), read_image_file(Path(self.paths[i])))
        return out

    def __repr__(self) -> str:
        return f"ImageFolderRows(shape={self.shape}, folder={self.folder!r})"


class ResizedRows(Rows):
    """timm's evaluation resize of each row of ``source`` (any H, W) -> (N, size, size, C)."""

    def __init__(self, source: Rows, size: int, crop_pct: float = DEFAULT_CROP_PCT):
        check_resize(size, crop_pct)
        self.source, self.size_to, self.crop_pct = source, size, crop_pct
        self.shape = (len(source), size, size, source.shape[3])

    def read(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), *self.shape[1:]), np.uint8)
        for j, image in enumerate(self.source.read(rows)):
            out[j] = eval_resize(image, self.size_to, self.crop_pct)
        return out


class TfdsRows(Rows):
    """The ``"image"`` of each example of a tensorflow-datasets ``data_source`` (any object
    with ``len`` and ``source[i] -> {"image": (H, W, C) uint8, ...}``), read when indexed.
    Every image must have the size of the first."""

    def __init__(self, source, name: str = "tfds"):
        self.source, self.name = source, name
        first = np.asarray(source[0]["image"], np.uint8)
        self.shape = (len(source), *first.shape)

    def read(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), *self.shape[1:]), np.uint8)
        for j, i in enumerate(np.asarray(rows, np.intp)):
            image = np.asarray(self.source[int(i)]["image"], np.uint8)
            if image.shape != self.shape[1:]:
                raise DataError(
                    f"the images of {self.name} differ in size: {self.shape[1:]} and "
                    f"{image.shape} (example {int(i)}); pass --resize"
                )
            out[j] = image
        return out


def take_rows(images, rows):
    """The rows ``rows`` (1-D ints) of ``images`` (N, H, W, C): a row reader's
    :meth:`Rows.take` (a view, nothing read), an array's ``images[rows]`` (a copy)."""
    if isinstance(images, Rows):
        return images.take(rows)
    return np.asarray(images)[np.asarray(rows, np.intp)]


@dataclass(frozen=True)
class Split:
    """One split of a data set: ``images`` a row reader (N, H, W, C) uint8, ``labels`` (N,)
    int32 in memory, ``classes`` the class names (``classes[label]``)."""

    images: Rows
    labels: np.ndarray
    classes: list[str]

    def take(self, indices) -> Split:
        """The examples ``indices`` (1-D ints) as a split: a view, nothing is read."""
        rows = _row_indices(indices, len(self.labels))
        return Split(self.images.take(rows), self.labels[rows], self.classes)

    def __len__(self) -> int:
        return len(self.labels)


def open_cifar_binary(root: str | os.PathLike, split: str, layout: BinaryLayout) -> Split:
    """A split of a CIFAR binary release in ``root`` (or ``root/<release folder>``): images
    (N, 32, 32, 3) mapped from the batch files, the labels (N,) int32 read and checked here,
    the class names; the checks and errors of
    :func:`~convmixer_jax.data.local.load_cifar_binary`."""
    d, files = cifar_batch_files(root, split, layout)
    label_bytes = np.concatenate([_read_cifar_label_bytes(str(p), k, layout) for p, k in files])
    labels = cifar_labels(label_bytes, layout, d)
    return Split(CifarBinaryRows(files, layout), labels, cifar_class_names(d, layout))


def open_image_folder(
    root: str | os.PathLike,
    split: str,
    *,
    resize: int | None = None,
    crop_pct: float = DEFAULT_CROP_PCT,
    cache: bool = False,
    progress: bool = False,
) -> Split:
    """``root/split/<class>/*`` images: (N, H, W, 3) uint8 RGB rows decoded when read (all of
    one size unless ``resize``: timm's evaluation transform to ``resize x resize``), labels
    (N,) int32 class by class, the sorted class names.

    ``cache``: a tree of at most :data:`CACHE_MAX_BYTES` decoded is decoded once into a
    ``.npy`` in the cache and read from there, mapped (``progress``: a bar while decoding).
    """
    root = Path(root)
    check_data_resize(resize, crop_pct)
    classes, files = list_image_folder(root, split)
    labels = np.asarray([label for _, label in files], np.int32)
    rows = ImageFolderRows(
        [str(f) for f, _ in files], resize=resize, crop_pct=crop_pct, folder=root / split
    )
    if cache and rows.nbytes <= CACHE_MAX_BYTES:
        cached = _cached_rows(rows, split, progress)  # decoding it checks every size
        if cached is not None:
            return Split(cached, labels, classes)
    return Split(rows.check_sizes(), labels, classes)


def _digest_start(rows: ImageFolderRows):
    """The cache key of a tree, begun: SHA-256 over the transform, then (:func:`_digest_file`)
    each file's class folder, name and bytes in row order."""
    h = hashlib.sha256(b"image-folder-rows-v1\0")
    if rows.resize is not None:
        h.update(f"eval-resize {rows.resize} {rows.crop_pct!r}\0".encode())
    return h


def _digest_file(h, path: Path, data: bytes) -> None:
    h.update(f"{path.parent.name}/{path.name}\0{len(data)}\0".encode())
    h.update(data)


def _usable_entry(path: Path, shape: tuple) -> bool:
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception:  # a damaged header, a short file: rebuilt, never trusted
        return False
    return isinstance(a, np.ndarray) and a.dtype == np.uint8 and a.shape == shape


def _cached_rows(rows: ImageFolderRows, split: str, progress: bool) -> Rows | None:
    """``rows`` from their cache entry (built first if missing); None when the cache cannot be
    written."""
    h = _digest_start(rows)
    for p in rows.paths:
        _digest_file(h, Path(p), read_image_file(Path(p)))
    digest = h.hexdigest()
    path = cache_dir() / f"{digest}.npy"
    if path.exists():
        if _usable_entry(path, rows.shape):
            return ArrayRows.from_npy(path)
        path.unlink(missing_ok=True)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path.parent)
        tmp = temporary_name(path)
    except OSError:
        return None  # an unwritable cache only costs speed
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=rows.shape)
        order = range(len(rows))
        if progress:  # the first decode of 60,000 JPEGs takes a while; later opens map the file
            from tqdm.auto import tqdm

            desc = f"decode {split} images"
            order = tqdm(order, desc=desc, unit="img", leave=False, disable=None)
        h = _digest_start(rows)
        for i in order:  # each image decoded from the very bytes that are hashed
            p = Path(rows.paths[i])
            data = read_image_file(p)
            _digest_file(h, p, data)
            out[i] = rows.decode(i, data)
        out.flush()
        del out
        if h.hexdigest() != digest:
            raise DataError(
                f"files under {rows.folder} changed while they were read; run the command again"
            )
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        return None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        release_temporary(tmp)
    return ArrayRows.from_npy(path)


def open_local(
    root: str | os.PathLike,
    split: str,
    *,
    resize: int | None = None,
    crop_pct: float = DEFAULT_CROP_PCT,
    cache: bool = False,
    progress: bool = False,
) -> Split:
    """``split`` of a local directory in any supported layout (CIFAR-10 / CIFAR-100 binaries in
    ``root`` or its release subfolder, else a class-subfolder image tree), as
    :func:`~convmixer_jax.data.local.load_local` reads it; ``cache`` and ``progress`` as in
    :func:`open_image_folder`."""
    root = Path(root)
    check_data_resize(resize, crop_pct)
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist")
    found = find_cifar_binaries(root)
    if found is not None:
        return _resized(open_cifar_binary(root, split, found[0]), resize, crop_pct)
    return open_image_folder(
        root, split, resize=resize, crop_pct=crop_pct, cache=cache, progress=progress
    )


def _resized(split: Split, resize: int | None, crop_pct: float) -> Split:
    if resize is None:
        return split
    return Split(ResizedRows(split.images, resize, crop_pct), split.labels, split.classes)


def open_split(
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
    cache: bool = False,
) -> Split:
    """Open a split ("train" or "test") as a :class:`Split`: images a row reader (N, H, W, C)
    uint8, labels (N,) int32, class names.

    The source, first match wins (as :func:`~convmixer_jax.data.loader.load_split`):
    ``data_dir`` (a local copy: image folders, or CIFAR-10 / CIFAR-100 binaries, detected
    from the files; ``dataset`` is not consulted); ``tfds_data_dir`` (``dataset`` as prepared
    by tensorflow-datasets there); otherwise the official binary release of ``dataset``
    ("cifar10", "cifar100"), downloaded once into the cache and checked against its SHA-256
    (``download_url`` / ``download_sha256`` name a mirror; ``progress`` shows the download's
    bar). ``resize``: every image through timm's evaluation transform to ``resize x resize``,
    when it is read (``resize`` and ``crop_pct`` are checked before anything is read).
    ``cache``: an image tree of CIFAR size is decoded once into the cache
    (:func:`open_image_folder`); the other sources need no cache.
    """
    if resize is not None:
        check_resize(resize, crop_pct)
    if data_dir is not None:
        return open_local(
            data_dir, split, resize=resize, crop_pct=crop_pct, cache=cache, progress=progress
        )
    if dataset not in BINARY_LAYOUTS:
        raise DataError(f"unknown dataset {dataset!r}; use one of {', '.join(BINARY_LAYOUTS)}")
    if tfds_data_dir is not None:
        from convmixer_jax.data.tfds_source import open_tfds

        source, labels, classes = open_tfds(dataset, split, data_dir=tfds_data_dir)
        opened = Split(TfdsRows(source, f"tfds {dataset}/{split}"), labels, classes)
    else:
        if split not in ("train", "test"):
            raise DataError(f"unknown split {split!r}; use one of ('train', 'test')")
        from convmixer_jax.data.download import fetch_release

        folder = fetch_release(dataset, url=download_url, sha256=download_sha256, progress=progress)
        opened = open_cifar_binary(folder, split, BINARY_LAYOUTS[dataset])
    return _resized(opened, resize, crop_pct)


__all__ = [
    "CACHE_MAX_BYTES",
    "ArrayRows",
    "CifarBinaryRows",
    "ImageFolderRows",
    "ResizedRows",
    "Rows",
    "Split",
    "TakenRows",
    "TfdsRows",
    "open_cifar_binary",
    "open_image_folder",
    "open_local",
    "open_split",
    "take_rows",
]
