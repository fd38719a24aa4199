"""Atomic writes: every output appears complete under its name, or not at all.

Files are written to a temporary sibling (``.NAME.*.tmp``) and renamed into
place; directories are built beside their destination and swapped in. An
existing output is refused unless the caller passes ``force``: the rules of what
may be replaced are in :mod:`convmixer_jax.files.output_paths`, whose checks are
importable from here too.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import tempfile
import threading
import uuid
from pathlib import Path

import numpy as np

# check_output is re-exported: commands check and write through this module
from convmixer_jax.files.output_paths import (  # noqa: F401
    RESULTS_MARKER,
    check_output,
    check_output_path,
)

# Temporary and about-to-be-deleted names: ".<name>.cmj-<pid>-<random>.tmp" / ".old".
_TEMP = re.compile(r"^\..+\.cmj-(\d+)-[A-Za-z0-9_]+\.(tmp|old)$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries this package left in ``folder`` when a process was killed.

    Only names of this package's pattern (``.NAME.cmj-PID-RANDOM.tmp`` / ``.old``)
    whose process no longer runs are removed; returns them.
    """
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.match(entry.name)
        if not m or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def temporary_name(path: Path, suffix: str = "tmp") -> Path:
    """A fresh name beside ``path`` of the recognizable pattern that
    :func:`remove_stale_temporaries` knows."""
    return path.parent / f".{path.name}.cmj-{os.getpid()}-{uuid.uuid4().hex[:12]}.{suffix}"


def _mkstemp_beside(path: Path) -> tuple[int, Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.cmj-{os.getpid()}-", suffix=".tmp"
    )
    return fd, Path(tmp)


def write_bytes_atomic(
    path: str | os.PathLike, data: bytes, *, force: bool = False, private: bool = False
) -> Path:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place.

    An existing ``path`` is refused unless ``force``. ``private`` keeps the file
    readable by its owner only (for keys); otherwise the usual umask applies.
    """
    path = check_output_path(path, force)
    tmp = None
    try:
        # a signal between creating the temporary and holding its name would leave it behind:
        # it is delivered at the end of this block, inside the clean-up below
        with deferred_interrupts():
            fd, tmp = _mkstemp_beside(path)
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
    except OSError as e:
        if tmp is None:
            raise OSError(
                f"cannot write {path}: {e.strerror or e} (check the folder's permissions)"
            ) from None
        tmp.unlink(missing_ok=True)
        raise OSError(f"cannot write {path}: {e.strerror or e}") from None
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(
    path: str | os.PathLike, text: str, *, force: bool = False, private: bool = False
) -> Path:
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
    the work (:func:`~convmixer_jax.files.output_paths.check_output` with
    ``kind='results_dir'``). The folder holds
    :data:`~convmixer_jax.files.output_paths.RESULTS_MARKER`, so that a later
    ``--force`` may replace it.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out.parent)
    tmp = temporary_name(out)
    tmp.mkdir()
    try:
        (tmp / RESULTS_MARKER).write_text(
            "written by convmixer-jax; --force may replace this folder\n"
        )
        yield tmp
        swap_into_place(tmp, out, force=True, kind="results_dir")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def deferred_interrupts():
    """Hold SIGINT and SIGTERM until the block ends, then deliver the first one that came.

    For writes that a library makes in several threads (an Orbax checkpoint save): an
    exception raised in the main thread halfway through leaves those threads writing into
    a folder that the cleanup is removing. Outside the main thread this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    sigs = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in sigs}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if caught:
            signal.raise_signal(caught[0])  # the restored handler raises, as it would have


def swap_into_place(tmp: Path, path: Path, force: bool, *, kind: str = "model_dir") -> None:
    """Rename the finished ``tmp`` to ``path``, replacing an old ``path`` (of ``kind``) if
    ``force``."""
    if not (path.exists() or path.is_symlink()):
        os.rename(tmp, path)
        return
    check_output_path(path, force, kind=kind)
    old = temporary_name(path, "old")
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


def write_json_atomic(
    path: str | os.PathLike, obj, *, force: bool = True, indent: int | None = 1
) -> Path:
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
    """Save a matplotlib figure as PNG atomically (``path`` is the old file or the complete new
    one)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png")
    return write_bytes_atomic(path, buf.getvalue(), force=True)


__all__ = [
    "remove_stale_temporaries",
    "temporary_name",
    "write_bytes_atomic",
    "write_text_atomic",
    "write_json_atomic",
    "save_array",
    "save_npz_atomic",
    "save_figure_atomic",
    "staged_output_dir",
    "swap_into_place",
]
