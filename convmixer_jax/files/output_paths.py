"""Which output paths a command may write, checked before any work.

A command never overwrites what it did not write: an existing output is refused
unless the caller passes ``force``, and even then only the kind of thing the
command writes is replaced (a regular file, a model directory, or a results
folder holding :data:`~convmixer_jax.files.output_paths.RESULTS_MARKER`). An
output that is, or contains, one of the command's inputs is always refused, and
so is an output whose folder does not exist. The writes themselves are in
:mod:`convmixer_jax.files.atomic`.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

OUTPUT_KINDS = ("file", "model_dir", "results_dir")
#: The file every results directory (reproduce, security-report) holds, naming the command
#: that wrote it.
RESULTS_MARKER = ".convmixer-jax-output"


def describe_file_type(path: str | os.PathLike) -> str:
    """What ``path`` is, as a phrase for a message: ``"a file"``, ``"a directory"``,
    ``"a symbolic link"``, ``"a named pipe"``, ... (the link itself, not its target)."""
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
    or one a command of this package wrote (it holds
    :data:`~convmixer_jax.files.output_paths.RESULTS_MARKER`). Never a symbolic link,
    device, socket or other special file, and never one of the command's ``inputs``
    (paths, or {label: path or paths}; None skipped) or a folder holding one. Raises
    FileExistsError naming the problem and the fix.
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
    what = describe_file_type(path)
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
    """:func:`~convmixer_jax.files.output_paths.check_output_path` for a command's output,
    which must also have an existing folder (a missing folder is refused, not created: a typo
    would otherwise scatter outputs)."""
    path = check_output_path(path, force, kind=kind, inputs=inputs)
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(
            f"the folder {parent} of the output {path} does not exist; create it first "
            f"(mkdir -p {parent})"
        )
    return path


__all__ = [
    "OUTPUT_KINDS",
    "RESULTS_MARKER",
    "describe_file_type",
    "check_output_path",
    "check_output",
]
