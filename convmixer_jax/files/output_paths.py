"""Which output paths a command may write, checked before any work.

A command never overwrites what it did not write. Every path is compared after
resolving links and ``..`` (:func:`os.path.realpath`). The rules, for every kind of
output:

- An output that is one of the command's inputs, holds one, or lies inside one is
  refused, with or without ``--force``.
- An output inside a folder that belongs to something else is refused too, even when
  that folder is no input of the command: inside a model directory (a folder whose
  ``config.json`` is a model of this package: a model is replaced only whole), inside
  a folder a command of this package wrote (it holds
  :data:`~convmixer_jax.files.output_paths.RESULTS_MARKER`: writing into it would add
  a file its manifest does not list) and inside a downloaded data set (it holds
  :data:`~convmixer_jax.files.output_paths.DATA_MARKER`).
- An output whose folder does not exist is refused (:func:`check_output`).
- An existing output is refused unless the caller passes ``force``; symbolic links,
  devices, pipes and sockets are never replaced.

With ``force``, ownership decides what may be replaced:

- **Folders** (``kind='results_dir'``: results, security reports, folders of images)
  carry a manifest, :data:`~convmixer_jax.files.output_paths.RESULTS_MARKER`, written
  as the last step of the staged write (:func:`write_manifest`): JSON naming the
  command that wrote the folder and every file in it with its SHA-256. ``--force``
  replaces the folder only if the manifest is there, names the same kind of command
  (:func:`output_family`: ``encrypt-images`` and ``decrypt-images`` write the same kind
  of folder), and the folder holds exactly the listed files with those digests. An
  empty folder holds nothing to lose and may be taken.
- **Model directories** (``kind='model_dir'``) are their own manifest: ``config.json``
  of the model format lists every file under ``variables/`` with its SHA-256
  (``variables_sha256``). ``--force`` replaces the directory, whole, only if it holds
  ``config.json`` and ``variables/`` and nothing else, and ``variables/`` holds exactly
  the listed files with those digests. Any command that writes models may replace one.
- **Single files** (``kind='file'``) cannot hold a manifest of their own, and a
  sidecar file beside every output would be clutter, so a file is owned by where it
  lies: ``--force`` replaces a regular file that is not an input, not inside an input
  and not inside a model directory, results folder or data set (the rules above), and
  never a key file (JSON of the key format) unless the command writes keys
  (:data:`~convmixer_jax.files.output_paths.KEY_WRITERS`).

The command that is writing is set once by the command line
(:func:`set_writing_command`); library calls write as ``convmixer-jax``. The writes
themselves are in :mod:`convmixer_jax.files.atomic`.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

OUTPUT_KINDS = ("file", "model_dir", "results_dir")
#: The manifest every folder output holds (results, reports, image folders): JSON with
#: ``format``, ``version``, ``command`` and ``files`` ({path inside the folder: SHA-256}).
RESULTS_MARKER = ".convmixer-jax-output"
MANIFEST_FORMAT = "convmixer-jax-output"
MANIFEST_VERSION = 1
#: The file a data set extracted by :mod:`convmixer_jax.data.download` holds (the data
#: layer lies below this one, so the name is repeated here; a test keeps the two equal).
DATA_MARKER = ".convmixer-jax-extracted"
#: config.json's format in a model directory (repeated from
#: :mod:`convmixer_jax.files.model_dir`, which imports this module).
MODEL_FORMAT = "convmixer-jax-model"
KEY_FORMAT = "convmixer-jax-key"
#: The commands that write key files: only they may replace one with ``--force``.
KEY_WRITERS = ("keygen", "recover-key")
#: The command recorded when the library writes outside the command line.
LIBRARY_COMMAND = "convmixer-jax"
#: Commands whose outputs are the same kind of thing, so that one may replace the other's.
OUTPUT_FAMILIES = {"encrypt-images": "image folder", "decrypt-images": "image folder"}
_SMALL_JSON = 1 << 20  # a config.json or key file larger than this is not one of ours

_writing = LIBRARY_COMMAND


def set_writing_command(name: str) -> None:
    """Name the command that is writing (the command line calls this once, after parsing);
    manifests record it and ``--force`` compares it with theirs."""
    global _writing
    _writing = str(name) if name else LIBRARY_COMMAND


def writing_command() -> str:
    """The command set by :func:`set_writing_command` (``convmixer-jax`` until then)."""
    return _writing


def output_family(command: str) -> str:
    """The kind of output ``command`` writes: commands of one family may replace each other's
    folders (:data:`~convmixer_jax.files.output_paths.OUTPUT_FAMILIES`; otherwise the
    command itself)."""
    return OUTPUT_FAMILIES.get(command, command)


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


# --------------------------------------------------------------------------- manifests


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 (hex) of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def folder_files(folder: str | os.PathLike) -> tuple[dict[str, Path], list[str]]:
    """The regular files under ``folder`` by their path inside it (POSIX form, links not
    followed, the manifest left out), and the paths of everything else found (links,
    pipes, ...), which no command of this package writes into a folder."""
    folder = Path(folder)
    files, others = {}, []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        for name in list(dirnames):
            if (here / name).is_symlink():
                others.append((here / name).relative_to(folder).as_posix())
                dirnames.remove(name)
        for name in filenames:
            p = here / name
            rel = p.relative_to(folder).as_posix()
            if rel == RESULTS_MARKER:
                continue
            if p.is_symlink() or not p.is_file():
                others.append(rel)
            else:
                files[rel] = p
    return files, sorted(others)


def write_manifest(folder: str | os.PathLike, command: str | None = None) -> Path:
    """Write ``folder``'s manifest (:data:`~convmixer_jax.files.output_paths.RESULTS_MARKER`):
    the writing command and every file under it with its SHA-256. The last step of a staged
    folder write, made before the folder takes its name."""
    folder = Path(folder)
    files, others = folder_files(folder)
    if others:
        raise OSError(f"cannot finish {folder}: it holds {others[0]}, which is not a regular file")
    doc = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "command": command or writing_command(),
        "files": {rel: file_sha256(p) for rel, p in sorted(files.items())},
    }
    marker = folder / RESULTS_MARKER
    marker.write_text(json.dumps(doc, indent=1) + "\n")
    return marker


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """``folder``'s manifest as written by :func:`write_manifest`, or None when there is none
    or it is not one (unreadable, another format, malformed)."""
    marker = Path(folder) / RESULTS_MARKER
    try:
        if marker.is_symlink() or not marker.is_file() or marker.stat().st_size > 64 * _SMALL_JSON:
            return None
        doc = json.loads(marker.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not (
        isinstance(doc, dict)
        and doc.get("format") == MANIFEST_FORMAT
        and isinstance(doc.get("command"), str)
        and isinstance(doc.get("files"), dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in doc["files"].items())
    ):
        return None
    return doc


def _unlisted(folder: Path, listed: dict) -> str | None:
    """The first file that makes ``folder`` differ from ``listed`` ({path: SHA-256}), as a
    phrase, or None when it holds exactly those files with those digests."""
    files, others = folder_files(folder)
    if others:
        return f"{others[0]} (not a regular file)"
    extra = sorted(set(files) - set(listed))
    if extra:
        return f"{extra[0]} (not listed)"
    missing = sorted(set(listed) - set(files))
    if missing:
        return f"{missing[0]} (missing)"
    for rel in sorted(files):
        if file_sha256(files[rel]) != listed[rel]:
            return f"{rel} (changed since it was written)"
    return None


def _read_small_json(path: Path):
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > _SMALL_JSON:
            return None
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def _is_model_dir(path: Path) -> bool:
    meta = _read_small_json(path / "config.json")
    return isinstance(meta, dict) and meta.get("format") == MODEL_FORMAT


def _is_key_file(path: Path) -> bool:
    doc = _read_small_json(path)
    return isinstance(doc, dict) and doc.get("format") == KEY_FORMAT


def _owner_of(folder: Path) -> str | None:
    """What ``folder`` is, if something owns its contents: a phrase, else None."""
    if (folder / RESULTS_MARKER).is_file():
        doc = read_manifest(folder)
        return f"{folder}, an output of {doc['command'] if doc else 'convmixer-jax'}"
    if (folder / DATA_MARKER).is_file():
        return f"the data set {folder}"
    if (folder / "config.json").is_file() and _is_model_dir(folder):
        return f"the model directory {folder}"
    return None


# --------------------------------------------------------------------------- the checks


def _named_inputs(inputs):
    named = inputs.items() if isinstance(inputs, dict) else (("the input", i) for i in inputs)
    for label, inp in named:
        if inp is None:
            continue
        for one in [inp] if isinstance(inp, (str, os.PathLike)) else inp:
            if one is not None:
                yield label, one


def _inside(inner: str, outer: str) -> bool:
    return inner != outer and inner.startswith(outer.rstrip(os.sep) + os.sep)


def _check_not_an_input(path: Path, real: str, inputs) -> None:
    named = [(label, one, os.path.realpath(one)) for label, one in _named_inputs(inputs)]
    for label, one, p in named:  # the input itself first, then a folder around the output
        if p == real or _inside(p, real):
            raise FileExistsError(
                f"the output {path} {'is' if p == real else 'contains'} {label} {one}; writing "
                "it would destroy that input: choose another output name"
            )
    for label, one, p in named:
        if _inside(real, p):
            raise FileExistsError(
                f"the output {path} lies inside {label} {one}; writing there would change "
                "that input: choose an output outside it"
            )


def _check_not_inside_owned(path: Path, real: str) -> None:
    for folder in Path(real).parents:
        owner = _owner_of(folder)
        if owner is not None:
            raise FileExistsError(
                f"the output {path} lies inside {owner}, which holds only what its writer "
                "put there: choose an output outside it"
            )


def _refuse_unowned(path: Path, why: str) -> None:
    raise FileExistsError(
        f"{path} holds files this command did not write ({why}); remove it yourself or "
        "choose another output name"
    )


def _check_replaceable(path: Path, kind: str, private: bool) -> None:
    what = describe_file_type(path)
    if kind == "file":
        if what != "a file":
            raise FileExistsError(
                f"{path} is {what}, not a file this command writes; --force replaces only "
                "regular files: choose another output name"
            )
        if not private and writing_command() not in KEY_WRITERS and _is_key_file(path):
            raise FileExistsError(
                f"{path} is a key file; --force replaces a key only with a command that makes "
                "keys (keygen, recover-key): choose another output name"
            )
        return
    if what != "a directory":
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
        recorded = _read_small_json(path / "config.json").get("variables_sha256")
        if not isinstance(recorded, dict) or not recorded:
            _refuse_unowned(path, "its config.json lists no files under variables/")
        var_dir = path / "variables"
        if var_dir.is_symlink() or not var_dir.is_dir():
            _refuse_unowned(path, "variables is not a folder")
        why = _unlisted(var_dir, recorded)
        if why is not None:
            _refuse_unowned(path, "variables/" + why)
        return
    if not any(path.iterdir()):
        return  # an empty folder: nothing to lose
    doc = read_manifest(path)
    if doc is None:
        _refuse_unowned(path, f"it has no manifest {RESULTS_MARKER}")
    if output_family(doc["command"]) != output_family(writing_command()):
        raise FileExistsError(
            f"{path} was written by {doc['command']}, not by {writing_command()}; --force "
            "replaces only this command's own output: remove it yourself or choose another "
            "output name"
        )
    why = _unlisted(path, doc["files"])
    if why is not None:
        _refuse_unowned(path, why)


def check_output_path(
    path: str | os.PathLike,
    force: bool = False,
    *,
    kind: str = "file",
    inputs=(),
    private: bool = False,
) -> Path:
    """Refuse an output ``path`` that must not be written; return it as a Path.

    The rules are the module's: never an input (``inputs``: paths, or {label: path or
    paths}; None skipped), a folder holding one or a path inside one; never a path inside
    a model directory, an output folder or a data set; an existing ``path`` only with
    ``force`` and only if this command owns it: ``kind='file'`` a regular file (not a key
    file, unless the command writes keys or ``private``, the key writer's own write),
    ``'model_dir'`` a whole model directory holding exactly its listed files,
    ``'results_dir'`` an empty folder or one whose manifest names the same kind of command
    and lists exactly its files. Raises FileExistsError naming the problem and the fix.
    """
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"kind must be one of {OUTPUT_KINDS}, got {kind!r}")
    if str(path) in ("", "."):
        raise FileExistsError(
            f"the output path {str(path)!r} names no file; give the name of the output to write"
        )
    path = Path(path)
    real = os.path.realpath(path)
    _check_not_an_input(path, real, inputs)
    _check_not_inside_owned(path, real)
    if not (path.exists() or path.is_symlink()):
        return path
    if not force:
        raise FileExistsError(f"{path} already exists; pass --force to replace it")
    _check_replaceable(path, kind, private)
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
    "MANIFEST_FORMAT",
    "DATA_MARKER",
    "KEY_WRITERS",
    "LIBRARY_COMMAND",
    "OUTPUT_FAMILIES",
    "set_writing_command",
    "writing_command",
    "output_family",
    "describe_file_type",
    "file_sha256",
    "folder_files",
    "write_manifest",
    "read_manifest",
    "check_output_path",
    "check_output",
]
