"""Ordinary image files: PNG and JPEG in, lossless PNG (or ``.npy``) out.

Inputs are one ``.npy`` array, or any mix of PNG/JPEG files and folders of them
(:func:`~convmixer_jax.files.image_files.load_image_inputs`). The output format
follows the output name (:func:`~convmixer_jax.files.image_files.output_format`):
``OUT.npy`` one array, ``OUT.png`` one image, a folder (an existing one, or a
name without a suffix) one PNG per input file with its name kept. Lossy formats
(JPEG, WebP, GIF, ...) are refused: a lossy encoder
changes the encrypted pixels, and the encrypted model would then no longer
compute the plain model's function on them. PNGs are written by Pillow with no
metadata, so they hold exactly the array's values.

Check the output first (:func:`~convmixer_jax.files.image_files.check_image_output`),
then write it (:func:`~convmixer_jax.files.image_files.write_image_outputs`): every
file appears complete under its name, or nothing at all
(:mod:`convmixer_jax.files.atomic`).
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from convmixer_jax.files.arrays import load_images
from convmixer_jax.files.atomic import save_array, staged_output_dir, write_bytes_atomic
from convmixer_jax.files.output_paths import (
    RESULTS_MARKER,
    check_output,
    check_output_path,
    describe_file_type,
)
from convmixer_jax.files.resize import (
    DEFAULT_CROP_PCT,
    check_resize,
    eval_resize,
    eval_resize_batch,
)
from convmixer_jax.scheme.images import ImageError

#: Suffixes of the image files read from folders and named as inputs (any case).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_LOSSY = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".jpe": "JPEG",
    ".jfif": "JPEG",
    ".webp": "WebP",
    ".gif": "GIF (at most 256 colours)",
    ".avif": "AVIF",
    ".heic": "HEIC",
    ".heif": "HEIF",
    ".jp2": "JPEG 2000",
    ".j2k": "JPEG 2000",
    ".jpx": "JPEG 2000",
    ".jxl": "JPEG XL",
}
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {1: "grayscale", 3: "RGB", 4: "RGBA"}


# --------------------------------------------------------------------------- inputs


def image_input_kind(path: str | os.PathLike, data: bytes | None = None) -> str:
    """How :func:`~convmixer_jax.files.image_files.load_image_inputs` reads ``path``:
    ``'folder'`` (a directory), ``'image'`` (a ``.png``/``.jpg``/``.jpeg`` name, or PNG/JPEG
    content under another name), ``'npy'`` (a ``.npy`` name, or any other file or missing
    path, which the ``.npy`` reader judges).

    ``data``, when given, is the content already read and is sniffed instead of the file.
    A pipe, socket or device (``<(cat im.png)``, ``/dev/stdin``) can be read only once, so
    without ``data`` it is never read here: under another name than ``.npy`` it counts as
    ``'image'``."""
    p = Path(path)
    if data is None and p.is_dir():
        return "folder"
    suffix = p.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix != ".npy":
        if data is not None:
            head = data[:8]
        elif is_stream(p):
            return "image"
        else:
            try:
                with open(p, "rb") as f:
                    head = f.read(8)
            except OSError:
                return "npy"
        if head.startswith(_PNG_MAGIC) or head.startswith(b"\xff\xd8\xff"):
            return "image"
    return "npy"


def is_stream(path: str | os.PathLike) -> bool:
    """Whether ``path`` exists and is neither a regular file nor a folder (a pipe, a socket,
    a device): its bytes can be read only once."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _read_stream(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ImageError(f"cannot read {path}: {e.strerror or e}") from None


def _folder_images(folder: Path) -> list[Path]:
    """The image files a folder contributes: ``*.png|*.jpg|*.jpeg`` (any case), not hidden,
    sorted by name."""
    try:
        entries = list(folder.iterdir())
    except OSError as e:
        raise ImageError(f"cannot read the folder {folder}: {e.strerror or e}") from None
    return sorted(
        (
            e
            for e in entries
            if e.suffix.lower() in IMAGE_SUFFIXES and not e.name.startswith(".") and e.is_file()
        ),
        key=lambda e: e.name,
    )


def load_image_inputs(
    paths: Sequence[str | os.PathLike],
    *,
    resize: int | None = None,
    crop_pct: float = DEFAULT_CROP_PCT,
) -> tuple[np.ndarray, list[str] | None]:
    """Read the images of a command's inputs; return (images, names).

    ``paths`` is either exactly one ``.npy`` file, read by
    :func:`convmixer_jax.files.arrays.load_images` (shape and dtype as stored; names
    None), or any mix of PNG/JPEG files and folders. A folder contributes its
    ``*.png``, ``*.jpg`` and ``*.jpeg`` files (any case; hidden files and subfolders
    skipped), sorted by name; a folder with none is an error. The images come back
    as one (N, H, W, C) uint8 array in that order, with the files' base names, which
    must be unique (outputs keep them).

    Pixels are decoded by Pillow as stored (no EXIF rotation, no colour
    management). Modes: ``L`` gives C = 1, ``RGB`` C = 3, ``RGBA`` C = 4, ``1``
    (bilevel) C = 1 with values 0 and 255; every other 8-bit mode (``P`` palette,
    ``LA``, ``PA``, ``CMYK``, ``YCbCr``, ...) is converted to RGB (C = 3, any alpha
    dropped). 16-bit and float images (``I;16``, ``I``, ``F``, 16-bit PNG) and
    animated files are refused. All images must share (H, W, C), unless ``resize``
    is given: then each image, of any size, goes through timm's evaluation
    transform to ``resize x resize`` (:func:`~convmixer_jax.files.resize.eval_resize`,
    shorter side to floor(resize / crop_pct), bicubic, centre crop); a uint8
    ``.npy`` batch is resized image by image. ``resize`` and ``crop_pct`` are checked
    (:func:`~convmixer_jax.files.resize.check_resize`) before any file is read.

    A pipe or other stream (``<(cat im.png)``, ``/dev/stdin``) is read once, and its
    type (PNG, JPEG or ``.npy``) is told from those bytes.

    Raises :class:`~convmixer_jax.scheme.images.ImageError` naming the problem and the fix.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ImageError(
            "no input images given; pass one .npy file, or PNG/JPEG files or folders of them"
        )
    if resize is not None:  # before any file is read
        check_resize(resize, crop_pct)
    # a pipe (``<(cat im.png)``) is read once, here; its type is sniffed from these bytes
    streams = {p: _read_stream(p) for p in paths if is_stream(p)}
    kinds = [image_input_kind(p, streams.get(p)) for p in paths]
    npys = [p for p, k in zip(paths, kinds, strict=True) if k == "npy"]
    if npys:
        if len(npys) < len(paths):
            other = next(p for p, k in zip(paths, kinds, strict=True) if k != "npy")
            what = "folder" if other.is_dir() else "file"
            raise ImageError(
                f"{npys[0]} is an array file and {other} an image {what}; "
                "they cannot be mixed: pass the .npy alone, or only PNG/JPEG files and folders"
            )
        if len(npys) > 1:
            more = ", ..." if len(npys) > 2 else ""
            raise ImageError(
                f"pass one .npy file, not {len(npys)} ({npys[0]}, {npys[1]}{more}); "
                "stack the images into one array saved with numpy.save"
            )
        images = load_images(npys[0], data=streams.get(npys[0]))
        if resize is not None:
            images = eval_resize_batch(
                images if images.ndim == 4 else images[None], resize, crop_pct
            )
        return images, None
    files: list[Path] = []
    for p, k in zip(paths, kinds, strict=True):
        if k == "folder":
            found = _folder_images(p)
            if not found:
                raise ImageError(
                    f"the folder {p} holds no .png, .jpg or .jpeg files (subfolders are not read); "
                    "put the images in it, or name the image files"
                )
            files.extend(found)
        else:
            files.append(p)
    seen: dict[str, Path] = {}
    for f in files:
        if f.name in seen:
            raise ImageError(
                f"two inputs are named {f.name} ({seen[f.name]} and {f}); the outputs keep the "
                "input names: rename one of them (or pass a file only once)"
            )
        seen[f.name] = f

    def decode(f):
        img = _decode(f, streams.get(f))
        if resize is None:
            return img
        try:
            return eval_resize(img, resize, crop_pct)
        except ImageError as e:
            raise ImageError(f"{f}: {e}") from None

    first = decode(files[0])
    images = np.empty((len(files),) + first.shape, np.uint8)
    images[0] = first
    for i, f in enumerate(files[1:], 1):
        img = decode(f)
        if img.shape != first.shape:
            raise ImageError(
                f"{files[0]} is {_describe(first.shape)} but {f} is "
                f"{_describe(img.shape)}; all images must have the same size and channels: "
                "resize or convert them (--resize does timm's evaluation resize)"
            )
        images[i] = img
    return images, [f.name for f in files]


def _describe(shape) -> str:
    h, w, c = shape
    return f"{h}x{w} {_CHANNELS.get(c, f'{c}-channel')}"


def _decode(path: Path, data: bytes | None = None) -> np.ndarray:
    """One image file (or its bytes, already read) as an (H, W, C) uint8 array (the rules of
    :func:`~convmixer_jax.files.image_files.load_image_inputs`)."""
    if data is None:
        if not path.exists():
            raise ImageError(f"image file {path} does not exist")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ImageError(f"cannot read {path}: {e.strerror or e}") from None
    return decode_image(data, path)


def decode_image(data: bytes, source, *, npy_alternative: bool = True) -> np.ndarray:
    """The bytes of one PNG or JPEG file as an (H, W, C) uint8 array, pixels as stored.

    The rules of :func:`~convmixer_jax.files.image_files.load_image_inputs`: ``L`` gives
    C = 1, ``RGB`` C = 3, ``RGBA`` C = 4, ``1`` C = 1 (0 and 255), any other 8-bit mode
    RGB; 16-bit and float images and animated files are refused, never clipped.
    ``source`` (the file's path) names the image in every error, an
    :class:`~convmixer_jax.scheme.images.ImageError` that says the fix;
    ``npy_alternative`` adds a float ``.npy`` to the fixes offered (where one is read).
    """
    from PIL import Image, UnidentifiedImageError

    or_npy = ", or save it as a float .npy in [0, 1]" if npy_alternative else ""
    or_array = ", or save the images as a .npy array with numpy.save" if npy_alternative else ""
    # Pillow's warnings (large image, palette transparency) would break the one-line rule
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with Image.open(io.BytesIO(data), formats=["PNG", "JPEG"]) as im:
                if getattr(im, "n_frames", 1) > 1:
                    raise ImageError(
                        f"{source} is an animated image of {im.n_frames} "
                        "frames; pass single-frame images"
                    )
                if im.format == "PNG" and len(data) > 24 and data[24] > 8:
                    raise ImageError(
                        f"{source} is a {data[24]}-bit PNG; only 8-bit images are read "
                        f"without changing their values: convert it to 8 bits per channel{or_npy}"
                    )
                mode = im.mode
                if mode in ("I", "F") or mode.startswith(("I;", "F;")):
                    raise ImageError(
                        f"{source} has "
                        f"{'float' if mode.startswith('F') else 'integer (16/32-bit)'} pixels "
                        f"(Pillow mode {mode}); only 8-bit images are read without changing "
                        f"their values: convert it to 8 bits per channel{or_npy}"
                    )
                if mode == "1":
                    im = im.convert("L")
                elif mode not in ("L", "RGB", "RGBA"):
                    im = im.convert("RGB")
                array = np.asarray(im, dtype=np.uint8)
        except ImageError:
            raise
        except UnidentifiedImageError:
            raise ImageError(
                f"cannot decode {source}: it is not a PNG or JPEG image; "
                f"convert it to PNG{or_array}"
            ) from None
        except Image.DecompressionBombError as e:
            raise ImageError(
                f"{source} is too large to decode safely ({e}); split or shrink it"
            ) from None
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            raise ImageError(
                f"cannot decode {source}: {' '.join(str(e).split())[:200] or type(e).__name__}; "
                "the file is damaged or truncated: write it again"
            ) from None
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or 0 in array.shape:
        raise ImageError(
            f"{source} holds no pixels (shape {array.shape}); pass images of at least one pixel"
        )
    return np.ascontiguousarray(array)


# --------------------------------------------------------------------------- outputs


def output_format(out: str | os.PathLike) -> str:
    """The format an output name asks for: ``'npy'``, ``'png'`` or ``'folder'``.

    An existing directory, a name ending in a path separator or a name without a suffix
    is a folder; otherwise the suffix decides (any case). A lossy format (``.jpg``,
    ``.webp``, ``.gif``, ...) or any other suffix raises
    :class:`~convmixer_jax.scheme.images.ImageError` with the reason.
    """
    text = os.fspath(out)
    p = Path(out)
    if (p.is_dir() and not p.is_symlink()) or text.endswith(("/", os.sep)) or text in ("", "."):
        return "folder"
    suffix = p.suffix.lower()
    if suffix in (".npy", ".png"):
        return suffix[1:]
    if suffix == "":
        return "folder"
    if suffix in _LOSSY:
        raise ImageError(
            f"cannot write {out}: {_LOSSY[suffix]} is lossy: it would change the encrypted pixels "
            "and the model would no longer compute the plain model's function; use .png or .npy"
        )
    raise ImageError(
        f"cannot write {out}: {p.suffix} is not a format this command writes; name the output .npy "
        "(one array), .png (one image) or a folder without a suffix (one PNG per input image)"
    )


def png_names(names: Sequence[str]) -> list[str]:
    """The file names of a folder output: each input's name with the suffix ``.png``
    (``cat.jpg`` -> ``cat.png``); raises :class:`~convmixer_jax.scheme.images.ImageError`
    if two inputs would give the same name."""
    out, seen = [], {}
    for name in names:
        png = Path(name).stem + ".png"
        if png in seen:
            raise ImageError(
                f"the inputs {seen[png]} and {name} would both be written as {png}; rename one"
            )
        seen[png] = name
        out.append(png)
    return out


def _check_png_images(out, images, fmt: str) -> None:
    dtype, shape = np.dtype(images.dtype), tuple(np.shape(images))
    if dtype != np.uint8:
        raise ImageError(
            f"cannot write {out}: PNG holds 8-bit pixels but the images are {dtype}, and "
            "converting them would change the values; write a .npy instead, or use uint8 images"
        )
    if len(shape) < 3 or shape[-1] not in _CHANNELS:
        raise ImageError(
            f"cannot write {out}: PNG holds images of 1 (grayscale), 3 (RGB) or 4 (RGBA) channels, "
            f"not arrays of shape {shape}; write a .npy instead"
        )
    if fmt == "png" and int(np.prod(shape[:-3])) != 1:
        raise ImageError(
            f"cannot write {out}: a .png holds one image but there are {int(np.prod(shape[:-3]))}; "
            "name a folder (without a suffix) for one PNG per image, or a .npy for one array"
        )


def _check_folder_contents(out: Path) -> None:
    """--force replaces a folder output only if it holds nothing but this command's PNGs and
    marker."""
    if out.is_dir() and not out.is_symlink():
        others = sorted(
            e.name
            for e in out.iterdir()
            if e.name != RESULTS_MARKER
            and not (e.suffix.lower() == ".png" and e.is_file() and not e.is_symlink())
        )
        if others:
            raise FileExistsError(
                f"{out} holds {', '.join(others[:3])}{', ...' if len(others) > 3 else ''}, which "
                "this command does not write; --force replaces only a folder of PNG images it "
                "wrote, so nothing else is lost: choose another output name"
            )


def check_image_output(
    out: str | os.PathLike,
    *,
    n_inputs: int,
    from_files: bool,
    force: bool,
    inputs: dict,
    names: Sequence[str] | None = None,
    images=None,
) -> Path:
    """Refuse an output that must not be written, before any work; return it as a Path.

    The format follows the name (:func:`~convmixer_jax.files.image_files.output_format`).
    ``.npy``: one array, any count. ``.png``: only for ``n_inputs == 1``. A folder: only
    when the inputs are image files (``from_files``), one PNG per input, its parent must
    exist. Then the rules of :func:`convmixer_jax.files.output_paths.check_output`: an
    existing output is refused unless ``force``, and even then a ``.npy``/``.png`` must be
    a regular file and a folder must hold only PNG files and
    :data:`~convmixer_jax.files.output_paths.RESULTS_MARKER` (or nothing); never one of
    ``inputs`` ({label: path or paths}; the image files of an input folder count as
    inputs too). If given, ``names`` (the input file names) must give distinct PNG names
    (:func:`~convmixer_jax.files.image_files.png_names`), and ``images`` (the array to
    write) must fit the format: PNG holds uint8 with C in 1, 3, 4.
    Raises ImageError or FileExistsError / FileNotFoundError with the fix.
    """
    if os.fspath(out) in ("", "."):
        check_output_path(out, force)  # raises: names no file
    fmt = output_format(out)
    out = Path(out)
    if fmt == "png" and n_inputs != 1:
        raise ImageError(
            f"cannot write {out}: a .png holds one image but there are {n_inputs}; name a folder "
            "(without a suffix) for one PNG per image, or a .npy for one array"
        )
    if fmt == "folder" and not from_files:
        what = (
            f"is {describe_file_type(out)}"
            if (out.exists() or out.is_symlink())
            else "has no suffix, so it names a folder"
        )
        raise ImageError(
            f"the output {out} {what}; a folder output holds one PNG per input image file, but the "
            "input is one .npy array: name the output .npy (or .png for a single image)"
        )
    expanded = {}
    for label, value in (inputs or {}).items():
        many = [value] if value is None or isinstance(value, (str, os.PathLike)) else list(value)
        expanded[label] = [
            q
            for v in many
            if v is not None
            for q in ([v] + (_folder_images(Path(v)) if Path(v).is_dir() else []))
        ]
    path = check_output(
        out, force, kind="results_dir" if fmt == "folder" else "file", inputs=expanded
    )
    if fmt == "folder":
        _check_folder_contents(path)
        if names is not None:
            png_names(names)
    if images is not None and fmt != "npy":
        _check_png_images(out, images, fmt)
    return path


def encode_png(image) -> bytes:
    """One (H, W, C) uint8 image (C in 1, 3, 4) as lossless PNG bytes (no metadata)."""
    from PIL import Image

    image = np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def write_image_outputs(
    out: str | os.PathLike, images, names: Sequence[str] | None, *, force: bool
) -> Path:
    """Write ``images`` to ``out`` in the format its name asks for; return ``out`` as a Path.

    ``.npy``: one array (shape and dtype kept). ``.png``: the single image. A folder:
    one PNG per image, named after ``names``
    (:func:`~convmixer_jax.files.image_files.png_names`), built beside ``out`` and swapped
    in whole. Check the output with
    :func:`~convmixer_jax.files.image_files.check_image_output` first (it also guards the
    inputs); everything this function can refuse is refused before anything is written.
    """
    fmt = output_format(out)
    images = np.asarray(images)
    if fmt == "npy":
        return save_array(out, images, force=force)
    _check_png_images(out, images, fmt)
    if fmt == "png":
        return write_bytes_atomic(out, encode_png(images.reshape(images.shape[-3:])), force=force)
    if names is None or len(names) != len(images) or images.ndim != 4:
        raise ImageError(
            f"cannot write {out}: a folder output needs one file name per image (got "
            f"{None if names is None else len(names)} names for images of shape {images.shape})"
        )
    files = png_names(names)
    out = check_output(out, force, kind="results_dir")
    _check_folder_contents(out)
    with staged_output_dir(out) as tmp:
        for name, image in zip(files, images, strict=True):
            (tmp / name).write_bytes(encode_png(image))
    return out


__all__ = [
    "IMAGE_SUFFIXES",
    "decode_image",
    "image_input_kind",
    "is_stream",
    "load_image_inputs",
    "output_format",
    "png_names",
    "check_image_output",
    "encode_png",
    "write_image_outputs",
]
