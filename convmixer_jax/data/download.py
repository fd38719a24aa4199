"""The official CIFAR binary releases, downloaded once into the cache, hash-checked and safely
extracted.

``fetch_release("cifar10")`` returns ``cache_dir()/releases/cifar-10-batches-bin``
(``cifar-100-binary`` for ``"cifar100"``), read by
:func:`convmixer_jax.data.local.load_cifar_binary`. Cache layout::

    cache_dir()/releases/cifar-10-binary.tar.gz     the archive (kept; SHA-256 checked on use)
    cache_dir()/releases/cifar-10-batches-bin/      the extracted release folder
    cache_dir()/releases/cifar-10-batches-bin/.convmixer-jax-extracted   the archive's SHA-256

The download and the hash check are pooch's (it writes to a temporary file and
keeps it only if the SHA-256 matches; an archive in the cache that does not
match is downloaded again). Only the release's own file names are extracted
(regular files: no links, devices, absolute paths or ``..``), into a temporary
folder beside the release folder that is renamed into place once complete; the
marker file, written last, names the archive it came from, so a half-extracted
or other archive's folder is never used. An archive that fails the hash or
cannot be extracted is removed from the cache.

The source is, in this order: the ``url`` / ``sha256`` arguments, the
environment (``CONVMIXER_JAX_CIFAR10_URL`` / ``CONVMIXER_JAX_CIFAR10_SHA256``;
``..._CIFAR100_...``), the official release. A mirror needs its SHA-256.
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import shutil
import sys
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from convmixer_jax.data.local import BINARY_LAYOUTS, BinaryLayout, DataError, cache_dir
from convmixer_jax.files.atomic import (
    release_temporary,
    remove_stale_temporaries,
    temporary_name,
    write_bytes_atomic,
    write_text_atomic,
)

MARKER = ".convmixer-jax-extracted"
_TIMEOUT_S = 60  # per connection attempt and between received chunks


@dataclass(frozen=True)
class Release:
    """An official binary release: where it is, what it must hash to, what it holds."""

    layout: BinaryLayout
    url: str
    sha256: str
    size: int  # bytes of the archive
    env: str  # the environment prefix, e.g. CONVMIXER_JAX_CIFAR10

    @property
    def archive(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def members(self) -> frozenset[str]:
        """The archive member names that may be extracted (the release's own files)."""
        return frozenset(f"{self.layout.folder}/{f}" for f in self.layout.files)

    @property
    def required(self) -> frozenset[str]:
        return frozenset(f"{self.layout.folder}/{f}" for f in self.layout.batch_files)


RELEASES = {
    "cifar10": Release(
        BINARY_LAYOUTS["cifar10"],
        "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
        "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
        170052171,
        "CONVMIXER_JAX_CIFAR10",
    ),
    "cifar100": Release(
        BINARY_LAYOUTS["cifar100"],
        "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
        "58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec",
        168513733,
        "CONVMIXER_JAX_CIFAR100",
    ),
}


def releases_dir() -> Path:
    """Where archives and extracted releases live: ``cache_dir()/releases``."""
    return cache_dir() / "releases"


def _release(dataset: str) -> Release:
    try:
        return RELEASES[dataset]
    except KeyError:
        raise DataError(f"unknown dataset {dataset!r}; use one of {', '.join(RELEASES)}") from None


def resolve_source(
    dataset: str, url: str | None = None, sha256: str | None = None
) -> tuple[str, str]:
    """(url, lowercase hex SHA-256) to download ``dataset`` from: arguments, then environment,
    then the official release.

    A URL other than the official one needs a SHA-256 (argument or environment).
    """
    release = _release(dataset)
    url = url or os.environ.get(f"{release.env}_URL") or release.url
    sha256 = sha256 or os.environ.get(f"{release.env}_SHA256")
    if sha256 is None:
        if url != release.url:
            raise DataError(
                f"the {release.layout.name} mirror {url} needs the SHA-256 of its archive: pass "
                f"--download-sha256 (or set {release.env}_SHA256)"
            )
        sha256 = release.sha256
    digest = sha256.strip().lower().removeprefix("sha256:")
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise DataError(
            f"the SHA-256 {sha256!r} for {release.layout.name} is not 64 hexadecimal digits "
            "(--download-sha256)"
        )
    return url, digest


def _is_complete(folder: Path, release: Release, sha256: str) -> bool:
    try:
        if (folder / MARKER).read_text().strip() != sha256:
            return False
    except OSError:
        return False
    return all((folder.parent / m).is_file() for m in release.required)


def fetch_release(
    dataset: str, *, url: str | None = None, sha256: str | None = None, progress: bool = True
) -> Path:
    """Download (once), verify and extract the binary release of ``dataset`` ("cifar10",
    "cifar100").

    Returns the folder holding its batch files, ``cache_dir()/releases/<release folder>``.
    A folder already extracted from an archive of this SHA-256 is returned without
    any network access. ``progress`` shows pooch's progress bar (on a terminal only).
    Raises DataError (one line) when the download fails, the hash does not match
    or the archive is unsafe or unreadable; no such archive is left in the cache.
    """
    release = _release(dataset)
    url, sha256 = resolve_source(dataset, url, sha256)
    root = releases_dir()
    folder = root / release.layout.folder
    if _is_complete(folder, release, sha256):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(root)
    archive = _download(release, url, sha256, root, progress)
    try:
        _extract(archive, release, url, sha256, folder)
    except DataError:
        archive.unlink(missing_ok=True)
        raise
    return folder


def _reason(e: Exception) -> str:
    """A short reason for a failed request: 'HTTP 404 Not Found', '[Errno 111] Connection
    refused', ..."""
    import requests

    if isinstance(e, requests.HTTPError) and e.response is not None:
        return f"HTTP {e.response.status_code} {e.response.reason}".strip()
    if isinstance(e, requests.Timeout):
        return f"no answer within {_TIMEOUT_S} s"
    m = re.search(r"IncompleteRead\((\d+) bytes read, (\d+) more expected\)", str(e))
    if m:
        return f"the connection broke off after {m.group(1)} bytes, {m.group(2)} short of the end"
    m = re.search(r"\[Errno -?\d+\] [^'\")\]]+", str(e))
    if m:
        return m.group(0).strip()
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def _download(release: Release, url: str, sha256: str, root: Path, progress: bool) -> Path:
    """The verified archive in ``root`` (downloaded unless a matching one is there)."""
    import pooch
    import requests

    pooch.get_logger().setLevel(logging.WARNING)  # no "Downloading data from ..." lines
    archive = root / release.archive
    bar = bool(progress) and bool(getattr(sys.stderr, "isatty", lambda: False)())
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("http", "https"):
        downloader = pooch.HTTPDownloader(progressbar=bar, timeout=_TIMEOUT_S)
    else:
        try:
            downloader = pooch.downloaders.choose_downloader(url, progressbar=bar)
        except ValueError:
            raise DataError(
                f"cannot download {release.layout.name} from {url!r}: not an http(s) or ftp URL"
            ) from None
    name = release.layout.name
    try:
        path = pooch.retrieve(
            url,
            known_hash=f"sha256:{sha256}",
            fname=release.archive,
            path=root,
            downloader=downloader,
        )
    except ValueError as e:  # pooch: hash mismatch (it deleted the download)
        archive.unlink(missing_ok=True)  # an older archive pooch could not replace
        got = re.search(r"but got ([0-9a-fA-F]+)", str(e))
        raise DataError(
            f"the {name} archive downloaded from {url} has SHA-256 "
            f"{got.group(1) if got else 'of other bytes'}, expected {sha256}: a corrupt or "
            "truncated download or a mirror of other bytes; it was deleted (try again, or pass the "
            "mirror's --download-sha256)"
        ) from None
    # requests' errors are OSErrors too; a local file error is not caught here
    except requests.RequestException as e:
        archive.unlink(missing_ok=True)  # anything there failed the hash; pooch tried to replace it
        raise DataError(
            f"cannot download {name} from {url} ({_reason(e)}); on an offline machine pass "
            "--data-dir with a local copy"
        ) from None
    return Path(path)


def _member_problem(m: tarfile.TarInfo, release: Release) -> str | None:
    """Why ``m`` must not be extracted (None: a regular file of the release, or its folder)."""
    name = m.name.removeprefix("./")
    parts = PurePosixPath(name).parts
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "an absolute path"
    if ".." in parts:
        return "a path leaving the folder ('..')"
    if m.issym() or m.islnk():
        return f"a link (to {m.linkname!r})"
    if m.isdir():
        return None if name.rstrip("/") in (release.layout.folder, "") else "an unexpected folder"
    if not m.isfile():
        return "a device or special file"
    if name not in release.members:
        return "an unexpected name"
    return None


def _extract(archive: Path, release: Release, url: str, sha256: str, folder: Path) -> None:
    """Extract the release's files from ``archive`` so that ``folder`` appears complete or not at
    all."""
    name = release.layout.name
    tmp = temporary_name(folder)
    tmp.mkdir()
    try:
        seen = set()
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for m in tar:
                    problem = _member_problem(m, release)
                    if problem:
                        raise DataError(
                            f"the {name} archive from {url} holds {m.name!r}, {problem}; "
                            "nothing was extracted and the archive was deleted (expected only "
                            f"{release.layout.folder}/{{{','.join(release.layout.files)}}})"
                        )
                    if m.isdir():
                        continue
                    member = m.name.removeprefix("./")
                    if member in seen:
                        raise DataError(
                            f"the {name} archive from {url} holds {m.name!r} twice; nothing was "
                            "extracted and the archive was deleted"
                        )
                    seen.add(member)
                    data = tar.extractfile(m).read()
                    write_bytes_atomic(tmp / PurePosixPath(member).name, data)
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise DataError(
                f"the {name} archive from {url} cannot be read as a tar.gz "
                f"({type(e).__name__}: {' '.join(str(e).split())[:200]}); it was deleted: "
                "download again or check the mirror"
            ) from None
        missing = sorted(release.required - seen)
        if missing:
            raise DataError(
                f"the {name} archive from {url} lacks {', '.join(missing)}; it was deleted: "
                "check the mirror"
            )
        write_text_atomic(tmp / MARKER, sha256 + "\n")
        _swap_in(tmp, folder, release, sha256)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        release_temporary(tmp)


def _swap_in(tmp: Path, folder: Path, release: Release, sha256: str) -> None:
    """Rename the complete ``tmp`` to ``folder``, replacing an incomplete or outdated one."""
    old = None
    try:
        if folder.exists() or folder.is_symlink():
            old = temporary_name(folder, "old")
            os.rename(folder, old)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not _is_complete(folder, release, sha256):  # not another process finishing first
                raise
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
    finally:
        if old is not None:
            release_temporary(old)  # its lock goes once the old folder is gone


__all__ = ["RELEASES", "Release", "fetch_release", "releases_dir", "resolve_source", "MARKER"]
