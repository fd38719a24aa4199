"""Atomic writes: every output appears complete under its name, or not at all.

Files are written to a temporary sibling (``.NAME.*.tmp``) and renamed into
place; directories are built beside their destination and swapped in. An
existing output is refused unless the caller passes ``force``.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np


def check_output_path(path: str | os.PathLike, force: bool = False) -> Path:
    """Refuse an existing ``path`` unless ``force``; return it as a Path.

    Raises FileExistsError naming the fix (``--force``).
    """
    path = Path(path)
    if not force and (path.exists() or path.is_symlink()):
        raise FileExistsError(f"{path} already exists; pass --force to replace it")
    return path


def check_replaceable_dir(out: str | os.PathLike, force: bool, inputs: dict) -> Path:
    """Like :func:`check_output_path` for an output directory that is replaced
    as a whole, and also refuse an ``out`` that holds one of the command's
    ``inputs`` ({option: path or None}): replacing it would delete that input.

    Raises FileExistsError naming the input and the fix.
    """
    out = check_output_path(out, force)
    root = out.resolve()
    for option, path in inputs.items():
        if path is None:
            continue
        p = Path(path).resolve()
        if p == root or root in p.parents:
            raise FileExistsError(
                f"--out {out} contains {option} {path}; writing the results replaces {out} as a whole "
                f"and would delete it: choose an --out directory outside {path}")
    return out


def _mkstemp_beside(path: Path) -> tuple[int, Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    return fd, Path(tmp)


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, force: bool = False,
                       private: bool = False) -> Path:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place.

    An existing ``path`` is refused unless ``force``. ``private`` keeps the file
    readable by its owner only (for keys); otherwise the usual umask applies.
    """
    path = check_output_path(path, force)
    fd, tmp = _mkstemp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if not private:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        check_output_path(path, force)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str, *, force: bool = False,
                      private: bool = False) -> Path:
    """:func:`write_bytes_atomic` for UTF-8 text."""
    return write_bytes_atomic(path, text.encode(), force=force, private=private)


def save_array(path: str | os.PathLike, array, *, force: bool = False) -> Path:
    """Save one array as ``.npy`` (no pickle), atomically."""
    import io

    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    return write_bytes_atomic(path, buf.getvalue(), force=force)


@contextlib.contextmanager
def staged_output_dir(out: str | os.PathLike):
    """Write a multi-file output directory all at once.

    Yields a new temporary directory beside ``out``; when the block ends
    normally it takes the place of ``out`` (an old ``out`` is removed only after
    the rename), and when the block raises it is deleted and ``out`` is left as
    it was. Whether ``out`` may be replaced is the caller's check, made before
    the work (:func:`check_replaceable_dir`).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        swap_into_place(tmp, out, force=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_into_place(tmp: Path, path: Path, force: bool) -> None:
    """Rename the finished ``tmp`` to ``path``, replacing an old ``path`` if ``force``."""
    if not (path.exists() or path.is_symlink()):
        os.rename(tmp, path)
        return
    check_output_path(path, force)
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:12]}"
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)




def write_json_atomic(path: str | os.PathLike, obj, *, force: bool = True, indent: int | None = 1) -> Path:
    """Write ``obj`` as JSON atomically (replacing ``path`` by default: for logs that grow)."""
    import json

    return write_text_atomic(path, json.dumps(obj, indent=indent), force=force)


def save_npz_atomic(path: str | os.PathLike, *, force: bool = True, **arrays) -> Path:
    """Save arrays as an uncompressed ``.npz`` (no pickle), atomically."""
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return write_bytes_atomic(path, buf.getvalue(), force=force)


def save_figure_atomic(fig, path: str | os.PathLike, dpi: int = 130) -> Path:
    """Save a matplotlib figure as PNG atomically (``path`` is the old file or the complete new one)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png")
    return write_bytes_atomic(path, buf.getvalue(), force=True)


__all__ = ["check_output_path", "check_replaceable_dir", "write_bytes_atomic", "write_text_atomic",
           "write_json_atomic", "save_array", "save_npz_atomic", "save_figure_atomic", "staged_output_dir",
           "swap_into_place"]
