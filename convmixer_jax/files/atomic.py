"""Atomic writes: every output appears complete under its name, or not at all.

Files are written to a temporary sibling (``.NAME.*.tmp``) and renamed into
place; directories are built beside their destination and swapped in. An
existing output is refused unless the caller passes ``force``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
import uuid
from pathlib import Path

import numpy as np

OUTPUT_KINDS = ("file", "model_dir", "results_dir")
#: The file every results directory (reproduce, security-report) holds, naming the command that wrote it.
RESULTS_MARKER = ".convmixer-jax-output"
# Temporary and about-to-be-deleted names: ".<name>.cmj-<pid>-<random>.tmp" / ".old".
_TEMP = re.compile(r"^\..+\.cmj-(\d+)-[A-Za-z0-9_]+\.(tmp|old)$")


def _what_is(path: Path) -> str:
    st = os.lstat(path)
    for test, name in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISREG, "a file"),
    ):
        if test(st.st_mode):
            return name
    return "a special file"


def _is_model_dir(path: Path) -> bool:
    import json

    try:
        meta = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == "convmixer-jax-model"


def check_output_path(
    path: str | os.PathLike, force: bool = False, *, kind: str = "file", inputs=()
) -> Path:
    """Refuse an output ``path`` that must not be written; return it as a Path.

    An existing ``path`` is refused unless ``force``, and even then replaced only if it
    is the kind of thing the command writes: ``kind='file'`` a regular file,
    ``'model_dir'`` a model directory (``config.json`` of this format, nothing but
    ``config.json`` and ``variables/`` in it), ``'results_dir'`` an empty directory
    or one a command of this package wrote (it holds :data:`RESULTS_MARKER`). Never a
    symbolic link, device, socket or other special file, and never one of the command's
    ``inputs`` (paths, or {label: path or paths}; None skipped) or a folder holding one. Raises FileExistsError
    naming the problem and the fix.
    """
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"kind must be one of {OUTPUT_KINDS}, got {kind!r}")
    if str(path) in ("", "."):
        raise FileExistsError(
            f"the output path {str(path)!r} names no file; give the name of the output to write"
        )
    path = Path(path)
    root = path.resolve()
    named = inputs.items() if isinstance(inputs, dict) else (("the input", i) for i in inputs)
    for label, inp in named:
        if inp is None:
            continue
        for one in [inp] if isinstance(inp, (str, os.PathLike)) else inp:
            p = Path(one).resolve()
            if p == root or root in p.parents:
                what = "is" if p == root else "contains"
                raise FileExistsError(
                    f"the output {path} {what} {label} {one}; writing it would destroy that "
                    "input: choose another output name"
                )
    if not (path.exists() or path.is_symlink()):
        return path
    if not force:
        raise FileExistsError(f"{path} already exists; pass --force to replace it")
    what = _what_is(path)
    if kind == "file" and what != "a file":
        raise FileExistsError(
            f"{path} is {what}, not a file this command writes; --force replaces only "
            "regular files: choose another output name"
        )
    if kind in ("model_dir", "results_dir") and what != "a directory":
        raise FileExistsError(
            f"{path} is {what}, not a directory this command writes; --force replaces only "
            f"{'a model directory' if kind == 'model_dir' else 'a results directory'}: "
            "choose another output name"
        )
    if kind == "model_dir":
        others = sorted(
            e.name for e in path.iterdir() if e.name not in ("config.json", "variables")
        )
        if not _is_model_dir(path) or others:
            detail = (
                f"it holds {', '.join(others[:3])}" if others else "it has no model config.json"
            )
            raise FileExistsError(
                f"{path} is not a model directory ({detail}); --force replaces only a model "
                "directory, so nothing else is lost: choose another output name"
            )
    if kind == "results_dir" and any(path.iterdir()) and not (path / RESULTS_MARKER).is_file():
        raise FileExistsError(
            f"{path} is a folder this package did not write (no {RESULTS_MARKER}); --force "
            "replaces only an earlier output of the command: choose another output name"
        )
    return path


def check_output(
    path: str | os.PathLike, force: bool = False, *, kind: str = "file", inputs=()
) -> Path:
    """:func:`check_output_path` for a command's output, which must also have an existing folder
    (a missing folder is refused, not created: a typo would otherwise scatter outputs)."""
    path = check_output_path(path, force, kind=kind, inputs=inputs)
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(
            f"the folder {parent} of the output {path} does not exist; create it first "
            f"(mkdir -p {parent})"
        )
    return path


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
    """A fresh name beside ``path`` of the recognizable pattern :func:`remove_stale_temporaries` knows."""
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
    the work (:func:`check_output` with ``kind='results_dir'``). The folder holds
    :data:`RESULTS_MARKER`, so that a later ``--force`` may replace it.
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
    """Rename the finished ``tmp`` to ``path``, replacing an old ``path`` (of ``kind``) if ``force``."""
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
    """Save a matplotlib figure as PNG atomically (``path`` is the old file or the complete new one)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, dpi=dpi, format="png")
    return write_bytes_atomic(path, buf.getvalue(), force=True)


__all__ = [
    "check_output_path",
    "check_output",
    "remove_stale_temporaries",
    "temporary_name",
    "RESULTS_MARKER",
    "write_bytes_atomic",
    "write_text_atomic",
    "write_json_atomic",
    "save_array",
    "save_npz_atomic",
    "save_figure_atomic",
    "staged_output_dir",
    "swap_into_place",
]
