"""A training ``workdir``: one writer at a time, its checkpoint folders, and what is in them.

A run holds an exclusive OS lock (``fcntl.flock``) on ``workdir/train.lock`` from before
it touches anything in the folder until it ends; the kernel releases it when the process
dies, however it dies, so a lock is never stale (the file a killed run leaves is taken
over by the next). A second run on the same folder is refused
before it changes anything: in particular before Orbax's start-up sweep of temporary
folders, which would delete the first run's save in progress.

The folder holds ``checkpoints/<epoch>`` (the state at the end of each epoch, the newest
two kept) and ``checkpoints-mid-epoch/<step>`` (the newest state saved inside an epoch,
named by the optimizer step; dropped once its epoch ends), beside ``train_log.json``.
In a multi-process run process 0 holds the lock (the folder is shared) and every process
learns whether it got it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from convmixer_jax.parallel.runtime import from_process_zero, is_writer, process_count

LOCK_NAME = "train.lock"
EPOCH_CHECKPOINTS = "checkpoints"
MID_EPOCH_CHECKPOINTS = "checkpoints-mid-epoch"


class WorkdirError(ValueError):
    """A training folder that cannot be used as asked: another run holds it, it holds
    checkpoints without ``--resume``, or it has none to resume from."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read back (damaged, or of another model)."""


def saved_steps(folder: str | os.PathLike) -> list[int]:
    """The finished checkpoints in an Orbax checkpoint ``folder``, oldest first (read only:
    a save in progress sits in a temporary folder whose name is not a number)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir())


def checkpoint_digest(folder: str | os.PathLike) -> str:
    """SHA-256 of a checkpoint folder: every file's path (relative to ``folder``) and bytes,
    in path order. Recorded when a checkpoint is saved and checked before it is read, so a
    damaged checkpoint is named before Orbax reads it (and never loads silently)."""
    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        name = p.relative_to(folder).as_posix().encode()
        h.update(len(name).to_bytes(8, "little") + name + p.stat().st_size.to_bytes(8, "little"))
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def record_digest(digests: dict, workdir: str | os.PathLike, folder: Path) -> None:
    """Put ``folder``'s :func:`checkpoint_digest` into ``digests`` (keyed by its path in
    ``workdir``) and drop the entries of checkpoints that are gone."""
    workdir = Path(workdir)
    digests[folder.relative_to(workdir).as_posix()] = checkpoint_digest(folder)
    for key in [k for k in digests if not (workdir / k).is_dir()]:
        del digests[key]


def check_digest(digests: dict, workdir: str | os.PathLike, folder: Path, advice: str) -> None:
    """Raise :class:`CheckpointError` if ``folder`` differs from the digest recorded for it
    (checkpoints saved before digests were recorded are not checked)."""
    expected = digests.get(folder.relative_to(Path(workdir)).as_posix())
    if expected is not None and checkpoint_digest(folder) != expected:
        raise CheckpointError(
            f"the checkpoint {folder} is damaged (its files differ from those saved); {advice}"
        )


def has_checkpoint(workdir: str | os.PathLike) -> bool:
    workdir = Path(workdir)
    return bool(
        saved_steps(workdir / EPOCH_CHECKPOINTS) or saved_steps(workdir / MID_EPOCH_CHECKPOINTS)
    )


def check_workdir(workdir: str | os.PathLike, resume: bool) -> None:
    """Raise :class:`WorkdirError` unless ``workdir`` suits a run with (or without) ``resume``:
    ``resume`` needs a checkpoint there, a fresh run needs none. Reads only."""
    workdir = Path(workdir)
    found = has_checkpoint(workdir)
    if resume and not found:
        raise WorkdirError(
            f"--resume: {workdir} holds no checkpoint to resume from; drop --resume to "
            "start a fresh run there"
        )
    if found and not resume:
        raise WorkdirError(
            f"{workdir} already holds checkpoints; pass --resume to continue "
            "or choose another directory"
        )


_held: dict[str, list] = {}  # resolved lock path -> [file descriptor, depth]


def _acquire(path: Path) -> int:
    """An exclusive flock on ``path`` (created if missing), or :class:`WorkdirError`."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            with contextlib.suppress(OSError):
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            who = f" ({holder})" if holder else ""
            raise WorkdirError(
                f"{path.parent} is in use by another training run{who}; wait for it to "
                "finish or choose another --workdir"
            ) from None
        except OSError as e:
            os.close(fd)
            raise WorkdirError(
                f"cannot lock {path} ({e.strerror or e}); use a --workdir on a file system "
                "that supports file locks"
            ) from None
        # a holder that gave up the folder may have removed the file meanwhile: lock the live one
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
            return fd
        os.close(fd)


def _missing_folders(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, outermost first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing[::-1]


@contextlib.contextmanager
def locked_workdir(workdir: str | os.PathLike) -> Iterator[Path]:
    """Hold ``workdir`` (created if missing) for one run; yields it as a :class:`Path`.

    Raises :class:`WorkdirError` if another process holds it, having changed nothing.
    Re-entrant within a process (the command line takes it early, the training loop again).
    On leaving, the lock file is removed (it exists only while a run holds the folder, or
    after a run was killed, when the next run takes it over), and so is what this block
    created and left empty (the folder, its checkpoint folders): a run stopped before its
    first checkpoint, or refused, leaves nothing behind.
    """
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"--workdir {workdir} is a file, not a folder; choose a folder")
    lock_path = workdir / LOCK_NAME
    key = os.path.realpath(lock_path)
    if key in _held:
        _held[key][1] += 1
        try:
            yield workdir
        finally:
            _held[key][1] -= 1
        return
    writer = is_writer()
    created, fd, failure = [], None, None
    if writer:
        root = workdir.absolute()
        created = _missing_folders(root) + [
            p for p in (root / EPOCH_CHECKPOINTS, root / MID_EPOCH_CHECKPOINTS) if not p.exists()
        ]
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            fd = _acquire(lock_path)
        except WorkdirError as e:
            failure = e
            _remove_empty(created, None)
    if process_count() > 1 and not bool(from_process_zero(np.asarray(failure is None))):
        raise failure or WorkdirError(
            f"process 0 could not lock {workdir}: another training run uses it; wait for it "
            "to finish or choose another --workdir"
        )
    if failure is not None:
        raise failure
    _held[key] = [fd, 1]
    try:
        yield workdir
    finally:
        del _held[key]
        if fd is not None:
            try:
                # removed while still held; the mid-epoch folder goes whenever it is empty
                _remove_empty([*created, workdir.absolute() / MID_EPOCH_CHECKPOINTS], lock_path)
            finally:
                os.close(fd)  # releases the lock


def _remove_empty(created: list[Path], lock_path: Path | None) -> None:
    """Remove ``lock_path`` (if given) and then every folder of ``created`` that is empty,
    innermost first."""
    if lock_path is not None:
        with contextlib.suppress(OSError):
            lock_path.unlink()
    for folder in sorted(created, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if empty


__all__ = [
    "LOCK_NAME",
    "EPOCH_CHECKPOINTS",
    "MID_EPOCH_CHECKPOINTS",
    "WorkdirError",
    "CheckpointError",
    "saved_steps",
    "checkpoint_digest",
    "record_digest",
    "check_digest",
    "has_checkpoint",
    "check_workdir",
    "locked_workdir",
]
