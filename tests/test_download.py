"""The CIFAR binary releases arrive by themselves: download from a real local HTTP server,
hash, extract, read.

A ThreadingHTTPServer on 127.0.0.1 (``http_server``, conftest.py) serves small archives in
the official format built here with tarfile (a few records per batch file). Checked: the
records read back exactly (CHW -> HWC), the second load makes no request, a
wrong hash / truncated / unreadable / unsafe archive is refused with one
DataError and leaves nothing in the cache (nor outside it), an unreachable
server names --data-dir, the environment overrides, CIFAR-100 fine labels and
names, and the CLI end to end.
"""

from __future__ import annotations

import hashlib
import io
import json
import socket
import tarfile
from pathlib import Path

import numpy as np
import pytest

from convmixer_jax import cli
from convmixer_jax.data import DataError, fetch_release, load_local, load_split
from convmixer_jax.data.download import MARKER, RELEASES, releases_dir, resolve_source

CIFAR10_NAMES = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
C10 = "cifar-10-batches-bin"
C100 = "cifar-100-binary"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("CONVMIXER_JAX_CACHE", str(d))
    for var in (
        "CONVMIXER_JAX_CIFAR10_URL",
        "CONVMIXER_JAX_CIFAR10_SHA256",
        "CONVMIXER_JAX_CIFAR100_URL",
        "CONVMIXER_JAX_CIFAR100_SHA256",
    ):
        monkeypatch.delenv(var, raising=False)
    return d


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_archive(path: Path, members: dict[str, bytes], extra=()) -> str:
    """A tar.gz of ``members`` (with its folder entry first) plus the TarInfos ``extra``;
    returns its SHA-256."""
    with tarfile.open(path, "w:gz") as tar:
        folder = tarfile.TarInfo(next(iter(members)).split("/")[0])
        folder.type, folder.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(folder)
        for name, data in members.items():
            add_file(tar, name, data)
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return sha256(path)


@pytest.fixture
def cifar10_members(cifar10_batches):
    """``cifar10_members(rng, counts=(2, 1, 3, 1, 2), n_test=4)``: the official members, tiny;
    returns (members, {split: (images HWC, labels)})."""

    def make(rng, counts=(2, 1, 3, 1, 2), n_test=4):
        batches, expected = cifar10_batches(rng, counts, n_test)
        members = {f"{C10}/{name}": data for name, data in batches.items()}
        members[f"{C10}/batches.meta.txt"] = ("\n".join(CIFAR10_NAMES) + "\n\n").encode()
        members[f"{C10}/readme.html"] = b"<html></html>"
        return members, expected

    return make


@pytest.fixture
def good(http_server, cifar10_members):
    """The good CIFAR-10 archive on the server: (url, sha256, expected)."""
    members, expected = cifar10_members(np.random.default_rng(0), n_test=12)
    sha = write_archive(http_server.root / "cifar-10-binary.tar.gz", members)
    return http_server.url("cifar-10-binary.tar.gz"), sha, expected


def cache_files(cache: Path) -> list[str]:
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*")) if cache.exists() else []


def test_download_reads_the_records_and_the_second_load_makes_no_request(http_server, good, cache):
    url, sha, expected = good
    for split in ("test", "train"):
        images, labels, classes = load_split(
            split, download_url=url, download_sha256=sha, progress=False
        )
        assert images.dtype == np.uint8 and images.shape == expected[split][0].shape
        np.testing.assert_array_equal(images, expected[split][0])
        np.testing.assert_array_equal(labels, expected[split][1])
        assert labels.dtype == np.int32 and classes == CIFAR10_NAMES
    assert http_server.requests == ["/cifar-10-binary.tar.gz"]
    folder = releases_dir() / C10
    assert (folder / MARKER).read_text().strip() == sha
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [MARKER, "batches.meta.txt", "readme.html", "test_batch.bin"]
        + [f"data_batch_{i}.bin" for i in range(1, 6)]
    )
    assert (releases_dir() / "cifar-10-binary.tar.gz").is_file()
    assert not [
        p for p in releases_dir().iterdir() if p.name.startswith(".")
    ]  # no temporaries left
    # again, in the same and in a fresh call: no request
    assert fetch_release("cifar10", url=url, sha256=sha, progress=False) == folder
    images, _, _ = load_split("test", download_url=url, download_sha256=sha.upper())
    np.testing.assert_array_equal(images, expected["test"][0])
    assert len(http_server.requests) == 1
    # the extracted folder is also a local copy
    np.testing.assert_array_equal(load_local(releases_dir(), "train")[0], expected["train"][0])


def test_environment_is_honoured_and_arguments_come_first(http_server, good, monkeypatch):
    url, sha, expected = good
    monkeypatch.setenv("CONVMIXER_JAX_CIFAR10_URL", url)
    monkeypatch.setenv("CONVMIXER_JAX_CIFAR10_SHA256", sha)
    assert resolve_source("cifar10") == (url, sha)
    images, labels, _ = load_split("test", progress=False)
    np.testing.assert_array_equal(labels, expected["test"][1])
    assert http_server.requests == ["/cifar-10-binary.tar.gz"]
    # arguments override the environment (a wrong env URL is never asked)
    monkeypatch.setenv("CONVMIXER_JAX_CIFAR10_URL", http_server.url("nothing-here.tar.gz"))
    assert resolve_source("cifar10", url=url)[0] == url
    load_split("test", download_url=url)
    assert len(http_server.requests) == 1
    # the official URL needs no SHA-256; a mirror does, and a malformed one is refused
    monkeypatch.delenv("CONVMIXER_JAX_CIFAR10_URL")
    monkeypatch.delenv("CONVMIXER_JAX_CIFAR10_SHA256")
    assert resolve_source("cifar10") == (RELEASES["cifar10"].url, RELEASES["cifar10"].sha256)
    assert (
        resolve_source("cifar100", url=RELEASES["cifar100"].url)[1] == RELEASES["cifar100"].sha256
    )
    with pytest.raises(DataError, match="--download-sha256"):
        load_split("test", download_url=url)
    monkeypatch.setenv("CONVMIXER_JAX_CIFAR10_URL", url)
    with pytest.raises(DataError, match="CONVMIXER_JAX_CIFAR10_SHA256"):
        resolve_source("cifar10")
    with pytest.raises(DataError, match="64 hexadecimal"):
        resolve_source("cifar10", sha256="abc")
    with pytest.raises(DataError, match="unknown dataset"):
        load_split("test", dataset="mnist")
    with pytest.raises(DataError, match="unknown split"):
        load_split("validation", download_url=url, download_sha256=sha)
    assert len(http_server.requests) == 1


def test_wrong_hash_is_refused_and_nothing_stays_in_the_cache(http_server, good, cache):
    url, sha, _ = good
    wrong = "0" * 64
    with pytest.raises(DataError, match=f"has SHA-256 {sha}, expected {wrong}") as e:
        fetch_release("cifar10", url=url, sha256=wrong, progress=False)
    assert "\n" not in str(e.value)
    assert cache_files(cache) == ["releases"]
    # a truncated archive, announced with the real hash: the same refusal
    data = (http_server.root / "cifar-10-binary.tar.gz").read_bytes()
    (http_server.root / "half.tar.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="corrupt or truncated"):
        fetch_release("cifar10", url=http_server.url("half.tar.gz"), sha256=sha, progress=False)
    assert cache_files(cache) == ["releases"]
    # a connection that breaks off half way
    with pytest.raises(DataError, match="cannot download CIFAR-10"):
        fetch_release(
            "cifar10",
            url=http_server.url("short/cifar-10-binary.tar.gz"),
            sha256=sha,
            progress=False,
        )
    assert cache_files(cache) == ["releases"]


def test_an_archive_that_passes_the_hash_but_is_not_a_tar_is_refused_and_deleted(
    http_server, good, cache
):
    url, sha, _ = good
    data = (http_server.root / "cifar-10-binary.tar.gz").read_bytes()
    for name, body in (
        ("half.tar.gz", data[: len(data) // 2]),
        ("junk.tar.gz", b"not a tar at all" * 50),
    ):
        (http_server.root / name).write_bytes(body)
        with pytest.raises(DataError, match="cannot be read as a tar.gz") as e:
            fetch_release(
                "cifar10",
                url=http_server.url(name),
                sha256=sha256(http_server.root / name),
                progress=False,
            )
        assert "\n" not in str(e.value)
        assert cache_files(cache) == ["releases"]


def _info(name, kind, **kw):
    info = tarfile.TarInfo(name)
    info.type = kind
    for k, v in kw.items():
        setattr(info, k, v)
    return info


@pytest.mark.parametrize(
    "bad",
    [
        "dotdot",
        "dotdot-inside",
        "absolute",
        "symlink",
        "hardlink",
        "device",
        "fifo",
        "unexpected",
        "unexpected-folder",
    ],
)
def test_unsafe_members_are_refused_and_nothing_is_written(
    http_server, cache, tmp_path, bad, cifar10_members
):
    members, _ = cifar10_members(np.random.default_rng(1))
    outside = tmp_path / "evil"
    payload = b"pwned"
    extra = {
        "dotdot": (f"../../../../../../../..{outside}", tarfile.REGTYPE, {"size": 5}, payload),
        "dotdot-inside": (f"{C10}/../evil", tarfile.REGTYPE, {"size": 5}, payload),
        "absolute": (str(outside), tarfile.REGTYPE, {"size": 5}, payload),
        "symlink": (f"{C10}/test_batch.bin", tarfile.SYMTYPE, {"linkname": str(outside)}, None),
        "hardlink": (f"{C10}/extra.bin", tarfile.LNKTYPE, {"linkname": f"{C10}/readme.html"}, None),
        "device": (f"{C10}/zero", tarfile.CHRTYPE, {"devmajor": 1, "devminor": 5}, None),
        "fifo": (f"{C10}/pipe", tarfile.FIFOTYPE, {}, None),
        "unexpected": (f"{C10}/run_me.py", tarfile.REGTYPE, {"size": 5}, payload),
        "unexpected-folder": (f"{C10}/sub", tarfile.DIRTYPE, {}, None),
    }[bad]
    name, kind, kw, data = extra
    if bad == "symlink":
        del members[f"{C10}/test_batch.bin"]
    path = http_server.root / f"{bad}.tar.gz"
    sha = write_archive(path, members, [(_info(name, kind, **kw), data)])
    with pytest.raises(DataError) as e:
        fetch_release("cifar10", url=http_server.url(path.name), sha256=sha, progress=False)
    msg = str(e.value)
    assert repr(name) in msg and "\n" not in msg and "nothing was extracted" in msg, msg
    assert not outside.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "www"]
    assert cache_files(cache) == ["releases"]


def test_an_archive_without_the_batches_is_refused(http_server, cache, cifar10_members):
    members, _ = cifar10_members(np.random.default_rng(2))
    del members[f"{C10}/data_batch_3.bin"]
    path = http_server.root / "short.tar.gz"
    sha = write_archive(path, members)
    with pytest.raises(DataError, match="lacks cifar-10-batches-bin/data_batch_3.bin"):
        fetch_release("cifar10", url=http_server.url(path.name), sha256=sha, progress=False)
    assert cache_files(cache) == ["releases"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_and_http_errors_name_data_dir(http_server, good, cache):
    url = f"http://127.0.0.1:{_closed_port()}/cifar-10-binary.tar.gz"
    with pytest.raises(DataError) as e:
        load_split("test", download_url=url, download_sha256=good[1], progress=False)
    msg = str(e.value)
    assert (
        msg.startswith(f"cannot download CIFAR-10 from {url} (")
        and "--data-dir" in msg
        and "\n" not in msg
    )
    assert "refused" in msg.lower(), msg
    with pytest.raises(DataError, match=r"\(HTTP 404 .*--data-dir"):
        load_split("test", download_url=http_server.url("missing.tar.gz"), download_sha256=good[1])
    assert not (releases_dir() / C10).exists() and cache_files(cache) == ["releases"]


def test_a_bad_archive_in_the_cache_is_downloaded_again(http_server, good):
    url, sha, expected = good
    releases_dir().mkdir(parents=True)
    (releases_dir() / "cifar-10-binary.tar.gz").write_bytes(
        b"an interrupted download of other bytes"
    )
    images, _, _ = load_split("test", download_url=url, download_sha256=sha)
    np.testing.assert_array_equal(images, expected["test"][0])
    assert (
        len(http_server.requests) == 1 and sha256(releases_dir() / "cifar-10-binary.tar.gz") == sha
    )
    # a good archive in the cache is extracted again without a request when its folder is gone
    import shutil

    shutil.rmtree(releases_dir() / C10)
    load_split("test", download_url=url, download_sha256=sha)
    assert len(http_server.requests) == 1
    # if the server now serves other bytes, the bad cached archive is not kept either
    (releases_dir() / "cifar-10-binary.tar.gz").write_bytes(b"rotten")
    shutil.rmtree(releases_dir() / C10)
    (http_server.root / "cifar-10-binary.tar.gz").write_bytes(b"changed")
    with pytest.raises(DataError, match="SHA-256"):
        fetch_release("cifar10", url=url, sha256=sha)
    assert not (releases_dir() / "cifar-10-binary.tar.gz").exists()


def test_a_half_extracted_or_other_archives_folder_is_never_used(http_server, good):
    url, sha, expected = good
    folder = releases_dir() / C10
    folder.mkdir(parents=True)
    (folder / "test_batch.bin").write_bytes(bytes(3073))  # no marker: an interrupted extraction
    images, labels, _ = load_split("test", download_url=url, download_sha256=sha)
    np.testing.assert_array_equal(images, expected["test"][0])
    # a folder marked with another archive's hash is replaced as well
    (folder / MARKER).write_text("f" * 64 + "\n")
    (folder / "test_batch.bin").write_bytes(bytes(3073))
    images, _, _ = load_split("test", download_url=url, download_sha256=sha)
    np.testing.assert_array_equal(images, expected["test"][0])
    assert (folder / MARKER).read_text().strip() == sha
    assert not [p for p in releases_dir().iterdir() if p.name.startswith(".")]


def test_cifar100_fine_labels_and_names(http_server, monkeypatch, cache):
    rng = np.random.default_rng(3)
    fine_names = [f"fine{i:02d}" for i in range(100)]
    members, expected = {}, {}
    for split, n in (("train", 7), ("test", 5)):
        hwc = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        coarse = rng.integers(0, 20, n, dtype=np.uint8)
        fine = rng.integers(0, 100, n, dtype=np.uint8)
        fine[0] = 99
        members[f"{C100}/{split}.bin"] = b"".join(
            bytes([coarse[i], fine[i]]) + hwc[i].transpose(2, 0, 1).tobytes() for i in range(n)
        )
        expected[split] = (hwc, fine.astype(np.int32))
    members[f"{C100}/fine_label_names.txt"] = "\n".join(fine_names).encode()
    members[f"{C100}/coarse_label_names.txt"] = "\n".join(f"coarse{i}" for i in range(20)).encode()
    sha = write_archive(http_server.root / "cifar-100-binary.tar.gz", members)
    monkeypatch.setenv("CONVMIXER_JAX_CIFAR100_URL", http_server.url("cifar-100-binary.tar.gz"))
    monkeypatch.setenv("CONVMIXER_JAX_CIFAR100_SHA256", sha)
    for split in ("train", "test"):
        images, labels, classes = load_split(split, dataset="cifar100", progress=False)
        np.testing.assert_array_equal(images, expected[split][0])
        np.testing.assert_array_equal(labels, expected[split][1])
        assert classes == fine_names
    assert http_server.requests == ["/cifar-100-binary.tar.gz"]
    assert (releases_dir() / C100 / MARKER).read_text().strip() == sha
    # the extracted folder (or its parent) is detected as CIFAR-100 by load_local
    for root in (releases_dir() / C100, releases_dir()):
        images, labels, classes = load_local(root, "test")
        np.testing.assert_array_equal(labels, expected["test"][1])
        assert classes == fine_names
    # the CIFAR-10 env is another data set's: cifar10 is not fetched from the CIFAR-100 mirror
    with pytest.raises(DataError, match="--download-sha256"):
        load_split("test", download_url=http_server.url("cifar-100-binary.tar.gz"))


def test_cli_evaluate_downloads_once_then_refuses_a_wrong_hash(
    http_server, good, monkeypatch, tmp_path, capsys, make_tiny_config, make_model_dir
):
    url, sha, _ = good
    monkeypatch.setenv("CONVMIXER_JAX_CIFAR10_URL", url)
    monkeypatch.setenv("CONVMIXER_JAX_CIFAR10_SHA256", sha)
    config = make_tiny_config(patch_size=4, num_classes=10, image_size=32)
    model = make_model_dir(tmp_path / "M", config, seed=0)
    capsys.readouterr()
    for _ in range(2):
        rc = cli.main(["evaluate", str(model), "--limit", "10"])
        out, err = capsys.readouterr()
        assert rc == 0, err
        result = json.loads(out.strip().splitlines()[-1])
        assert result["images"] == 10 and 0.0 <= result["accuracy"] <= 1.0
        assert http_server.requests == ["/cifar-10-binary.tar.gz"]
    # a wrong hash (for a fresh cache): exit 1, one line, nothing kept
    monkeypatch.setenv("CONVMIXER_JAX_CACHE", str(tmp_path / "cache2"))
    monkeypatch.setenv("CONVMIXER_JAX_CIFAR10_SHA256", "1" * 64)
    rc = cli.main(["evaluate", str(model), "--limit", "10"])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("convmixer-jax: error: "), err
    assert "SHA-256" in lines[0] and "Traceback" not in err
    assert cache_files(tmp_path / "cache2") == ["releases"]
