"""Atomic writes: every output appears complete under its name, or not at all.

Files are written to a temporary sibling (``.NAME.cmj-PID-RANDOM.tmp``) and renamed
into place; folders are built beside their destination, given their manifest
(:func:`~convmixer_jax.files.output_paths.write_manifest`) and swapped in. An
existing output is refused unless the caller passes ``force``: the rules of what may
be replaced are in :mod:`convmixer_jax.files.output_paths`, whose checks are
importable from here too.

A temporary is held by its writer through a lock, not a process id: beside every
temporary lies ``.NAME.cmj-PID-RANDOM.lock``, locked (``fcntl.flock``) by the
process writing it from before the temporary exists until after it is gone, and
released by the operating system when that process dies. A process id says nothing
about a writer in another PID namespace (a container) or on another host sharing the
folder; a lock does. :func:`remove_stale_temporaries` removes only temporaries whose
lock is free, or that have no lock file at all.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import re
import shutil
import signal
import threading
import uuid
import weakref
from pathlib import Path

import numpy as np

# check_output is re-exported: commands check and write through this module
from convmixer_jax.files.output_paths import (  # noqa: F401
    RESULTS_MARKER,
    check_output,
    check_output_path,
    write_manifest,
)

# Temporary, about-to-be-deleted and lock names: ".<name>.cmj-<pid>-<random>.tmp|.old|.lock".
_TEMP = re.compile(r"^(\..+\.cmj-\d+-[A-Za-z0-9_]+)\.(tmp|old|lock)$")

# The temporaries this process holds: {temporary path: (lock fd, lock path)}.
_held: dict[str, tuple[int, Path]] = {}
_held_guard = threading.Lock()


class _HeldName(type(Path())):
    """A temporary's name while its writer holds it (a Path that can carry a finalizer)."""


def _lock_path(tmp: Path) -> Path:
    return tmp.with_name(tmp.name.rsplit(".", 1)[0] + ".lock")


def release_temporary(tmp: str | os.PathLike) -> None:
    """Give up this process's hold on the temporary ``tmp`` (from :func:`temporary_name`),
    once it is gone (renamed into place or removed): its lock file is removed. Releasing a
    temporary that still exists leaves it to the next sweep; releasing one not held does
    nothing. The writers of this module release their own; a name that is dropped is
    released when its Path object is collected, and every finished one at exit."""
    with _held_guard:
        entry = _held.pop(os.fspath(tmp), None)
    if entry is None:
        return
    fd, lock = entry
    try:
        if not os.path.lexists(tmp):
            lock.unlink(missing_ok=True)  # unlinked while locked: no sweep can take it meanwhile
    finally:
        os.close(fd)


def _release_if_gone(key: str) -> None:
    if not os.path.lexists(key):
        release_temporary(key)


def _release_finished() -> None:
    with _held_guard:
        keys = list(_held)
    for key in keys:
        _release_if_gone(key)


atexit.register(_release_finished)


def _take_lock(lock: Path) -> int | None:
    """Create and lock ``lock``; None when a sweep removed it before the lock was taken."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits out a sweep probing it
        if os.fstat(fd).st_nlink == 0:
            os.close(fd)
            return None
    except BaseException:
        os.close(fd)
        lock.unlink(missing_ok=True)
        raise
    return fd


def temporary_name(path: Path, suffix: str = "tmp") -> Path:
    """A fresh name beside ``path`` of the recognizable pattern that
    :func:`remove_stale_temporaries` knows, held by this process: its lock file is created
    and locked before the name is returned, so the caller may create the temporary at once.
    The hold ends with :func:`release_temporary`, when the returned object is collected
    after the temporary is gone, or when the process ends."""
    path = Path(path)
    _release_finished()
    while True:
        stem = f".{path.name}.cmj-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        fd = _take_lock(path.parent / f"{stem}.lock")
        if fd is not None:
            break
    tmp = _HeldName(path.parent / f"{stem}.{suffix}")
    with _held_guard:
        _held[os.fspath(tmp)] = (fd, path.parent / f"{stem}.lock")
    weakref.finalize(tmp, _release_if_gone, os.fspath(tmp))
    return tmp


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporaries this package left in ``folder`` when a writer was killed.

    Only names of this package's pattern (``.NAME.cmj-PID-RANDOM.tmp`` / ``.old``) are
    considered, and of those only the ones whose lock file (``.lock``) is free or missing:
    a temporary whose lock is held, by any process on any host, is left alone. Returns the
    temporaries removed (lock files are removed with them, and alone when free).
    """
    _release_finished()
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    folder = Path(folder)
    stems = {}
    for name in names:
        m = _TEMP.match(name)
        if m:
            stems.setdefault(m.group(1), []).append(folder / name)
    with _held_guard:
        mine = {os.fspath(lock) for _, lock in _held.values()}
    for stem, entries in stems.items():
        lock = folder / f"{stem}.lock"
        if os.fspath(lock) in mine:
            continue
        temps = [e for e in entries if e != lock]
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:  # no writer holds these: its lock would exist first
            for e in temps:
                _remove(e)
            removed += temps
            continue
        except OSError:
            continue  # cannot tell: keep
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # held (or locks unsupported here): keep
            if os.fstat(fd).st_nlink == 0:
                continue  # another sweep took it first
            for e in temps:
                _remove(e)
            removed += temps
            lock.unlink(missing_ok=True)
        finally:
            os.close(fd)
    return removed


def _with_path(e: OSError, path: Path) -> OSError:
    """``e`` as one line naming ``path`` (the errno kept)."""
    err = OSError(f"cannot write {path}: {e.strerror or e}")
    err.errno = e.errno
    return err


def _create_beside(path: Path) -> tuple[int, Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    tmp = temporary_name(path)
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except BaseException:
        release_temporary(tmp)
        raise
    return fd, tmp


def write_bytes_atomic(
    path: str | os.PathLike, data: bytes, *, force: bool = False, private: bool = False
) -> Path:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place.

    An existing ``path`` is refused unless ``force``. ``private`` keeps the file
    readable by its owner only (for keys); otherwise the usual umask applies.
    """
    path = check_output_path(path, force, private=private)
    tmp = None
    try:
        # a signal between creating the temporary and holding its name would leave it behind:
        # it is delivered at the end of this block, inside the clean-up below
        with deferred_interrupts():
            fd, tmp = _create_beside(path)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if not private:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        check_output_path(path, force, private=private)
        os.replace(tmp, path)
    except OSError as e:
        if tmp is None:
            raise OSError(
                f"cannot write {path}: {e.strerror or e} (check the folder's permissions)"
            ) from None
        tmp.unlink(missing_ok=True)
        if e.errno is None:  # a refusal of this package's, already one line
            raise
        raise _with_path(e, path) from None
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    finally:
        if tmp is not None:
            release_temporary(tmp)
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
def staged_output_dir(out: str | os.PathLike, *, command: str | None = None):
    """Write a multi-file output directory all at once.

    Yields a new temporary directory beside ``out``; when the block ends normally its
    manifest is written (:func:`~convmixer_jax.files.output_paths.write_manifest`:
    ``command``, by default the command that is writing, and every file with its
    SHA-256) and it takes the place of ``out`` (an old ``out`` is removed only after the
    rename); when the block raises it is deleted and ``out`` is left as it was. Whether
    ``out`` may be replaced is the caller's check, made before the work
    (:func:`~convmixer_jax.files.output_paths.check_output` with ``kind='results_dir'``),
    and made again before the swap. An error of the file system names ``out``.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out.parent)
    tmp = None
    try:
        # a signal held here is delivered when the block ends: inside this try, so the
        # temporary it leaves is removed
        with deferred_interrupts():
            tmp = temporary_name(out)
            tmp.mkdir()
        try:
            yield tmp
            write_manifest(tmp, command)
            swap_into_place(tmp, out, force=True, kind="results_dir")
        except OSError as e:
            if e.errno is None:  # a refusal of this package's, already one line
                raise
            raise _with_path(e, out) from None
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if tmp is not None:
            release_temporary(tmp)


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
    ``force`` and this command owns it
    (:func:`~convmixer_jax.files.output_paths.check_output_path`); ``tmp``'s hold
    (:func:`release_temporary`) ends once it has its name."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        check_output_path(path, force, kind=kind)
        os.rename(tmp, path)
        release_temporary(tmp)
        return
    check_output_path(path, force, kind=kind)
    old = temporary_name(path, "old")
    try:
        os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            os.rename(old, path)
            raise
        release_temporary(tmp)
        _remove(old)
    finally:
        release_temporary(old)


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
    "release_temporary",
    "write_bytes_atomic",
    "write_text_atomic",
    "write_json_atomic",
    "save_array",
    "save_npz_atomic",
    "save_figure_atomic",
    "staged_output_dir",
    "swap_into_place",
]
