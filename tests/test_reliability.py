"""Nothing lost, nothing silently wrong: each hostile case (an output that would replace the
input or the key, a special file, a damaged model, a malformed or huge input) gets one line
on stderr and a non-zero exit and leaves every path as it was; model directories verify
themselves; killed or terminated writes leave no debris."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from cli_helpers import run

from convmixer_jax import cli
from convmixer_jax.files import atomic

REPO = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def config(make_tiny_config):
    """ConvMixer-16/1, kernel 3, patch 4 (the key's block size), 10 classes, 8 x 8 RGB."""
    return make_tiny_config(dim=16, patch_size=4, num_classes=10)


@pytest.fixture(scope="module")
def arch(arch_args, config):
    """The options of ``init-model`` and ``train`` that give ``config``."""
    return arch_args(config)


def tree(path: Path) -> dict:
    """Every entry under ``path`` (names, and bytes of files), to compare before/after."""
    out = {}
    for p in sorted(path.rglob("*")):
        out[str(p.relative_to(path))] = (
            p.read_bytes() if p.is_file() and not p.is_symlink() else p.is_dir()
        )
    return out


def refused(capsys, argv, *, where: Path, code: int = 1, words: tuple[str, ...] = ()) -> str:
    """Run the CLI in-process; it must fail with one line naming ``words`` and change nothing
    under ``where``."""
    before = tree(where)
    assert cli.main([str(a) for a in argv]) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("convmixer-jax: error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert tree(where) == before
    return lines[0]


@pytest.fixture()
def work(tmp_path, capsys, make_model_dir, config):
    """A folder with a key (made by the CLI), images and a plain model ``m`` of ``config``."""
    assert (
        cli.main(
            [
                "keygen",
                "--block-size",
                "4",
                "--channels",
                "3",
                "--seed",
                "3",
                "--out",
                str(tmp_path / "k.json"),
            ]
        )
        == 0
    )
    np.save(
        tmp_path / "x.npy", np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    )
    make_model_dir(tmp_path / "m", config, seed=0)
    capsys.readouterr()
    return tmp_path


# --------------------------------------------------------------------------- --force


def test_force_never_replaces_a_folder_holding_the_input_or_the_key(work, capsys, arch):
    p = work / "p"
    p.mkdir()
    os.rename(work / "m", p / "plain-model")
    os.rename(work / "k.json", p / "key.json")
    (p / "notes.txt").write_text("mine")
    refused(
        capsys,
        ["encrypt-model", "--key", p / "key.json", "--force", p / "plain-model", p],
        where=work,
        words=("contains",),
    )
    refused(
        capsys,
        ["encrypt-model", "--key", p / "key.json", "--force", p / "plain-model", p / "plain-model"],
        where=work,
        words=("is IN_MODEL",),
    )
    # a folder that is not a model directory, or that holds more than one
    (work / "other").mkdir()
    (work / "other" / "a.txt").write_text("a")
    refused(
        capsys,
        ["init-model", *arch, "--seed", "1", "--force", "--out", work / "other"],
        where=work,
        words=("not a model directory",),
    )
    assert cli.main(["init-model", *arch, "--seed", "1", "--out", str(work / "m2")]) == 0
    (work / "m2" / "notes.txt").write_text("mine")
    refused(
        capsys,
        ["init-model", *arch, "--seed", "2", "--force", "--out", work / "m2"],
        where=work,
        words=("notes.txt",),
    )
    # a results folder that no command wrote
    refused(
        capsys,
        [
            "reproduce",
            "--checkpoint",
            p / "plain-model",
            "--data-dir",
            work / "nodata",
            "--force",
            "--out",
            work / "other",
        ],
        where=work,
        words=("did not write",),
    )


def test_force_replaces_what_the_command_made(work, capsys, arch):
    key = work / "k.json"
    assert (
        cli.main(["encrypt-images", "--key", str(key), str(work / "x.npy"), str(work / "e.npy")])
        == 0
    )
    assert cli.main(["encrypt-model", "--key", str(key), str(work / "m"), str(work / "em")]) == 0
    first = tree(work / "em")
    assert cli.main(["init-model", *arch, "--seed", "5", "--out", str(work / "m5")]) == 0
    assert (
        cli.main(
            ["encrypt-model", "--key", str(key), "--force", str(work / "m5"), str(work / "em")]
        )
        == 0
    )
    assert tree(work / "em") != first
    assert (
        cli.main(
            [
                "encrypt-images",
                "--key",
                str(key),
                "--force",
                str(work / "x.npy"),
                str(work / "e.npy"),
            ]
        )
        == 0
    )
    capsys.readouterr()


def test_force_never_replaces_special_files_or_directories(work, capsys):
    fifo = work / "fifo"
    os.mkfifo(fifo)
    refused(
        capsys,
        ["encrypt-images", "--key", work / "k.json", "--force", work / "x.npy", fifo],
        where=work,
        words=("named pipe",),
    )
    (work / "adir").mkdir()
    refused(
        capsys,
        ["encrypt-images", "--key", work / "k.json", "--force", work / "x.npy", work / "adir"],
        where=work,
        words=("a directory",),
    )
    (work / "target.npy").write_bytes(b"someone else's file")
    os.symlink(work / "target.npy", work / "link.npy")
    refused(
        capsys,
        ["encrypt-images", "--key", work / "k.json", "--force", work / "x.npy", work / "link.npy"],
        where=work,
        words=("symbolic link",),
    )


def test_output_names_that_name_nothing_or_a_missing_folder(work, capsys):
    refused(
        capsys,
        ["keygen", "--block-size", "4", "--channels", "3", "--out", ""],
        where=work,
        words=("names no file",),
    )
    refused(
        capsys,
        [
            "encrypt-images",
            "--key",
            work / "k.json",
            work / "x.npy",
            work / "no" / "such" / "e.npy",
        ],
        where=work,
        words=("does not exist", "mkdir -p"),
    )
    assert not (work / "no").exists()


# --------------------------------------------------------------------------- model files


def _largest_variables_file(model: Path) -> Path:
    return max(
        (f for f in (model / "variables").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size
    )


def _flip_100_bytes(f: Path) -> None:
    data = bytearray(f.read_bytes())
    mid = max(0, len(data) // 2 - 50)
    for i in range(mid, min(len(data), mid + 100)):
        data[i] ^= 0xFF
    f.write_bytes(bytes(data))


def test_every_damaged_variables_file_is_refused_by_name(work, capsys):
    files = sorted(f for f in (work / "m").joinpath("variables").rglob("*") if f.is_file())
    assert len(files) >= 5
    for f in files:
        copy = work / "copy"
        subprocess.run(["cp", "-r", str(work / "m"), str(copy)], check=True)
        _flip_100_bytes(copy / f.relative_to(work / "m"))
        name = f.relative_to(work / "m" / "variables").as_posix()
        refused(
            capsys,
            ["predict", copy, work / "x.npy", "--out", work / "l.npy"],
            where=work,
            words=(name,),
        )
        refused(
            capsys,
            ["encrypt-model", "--key", work / "k.json", copy, work / "em"],
            where=work,
            words=(name,),
        )
        subprocess.run(["rm", "-r", str(copy)], check=True)


def test_damaged_model_refused_by_every_loading_command(work, capsys, monkeypatch, png_tree, arch):
    monkeypatch.setenv(
        "CONVMIXER_JAX_CACHE", str(work.parent / (work.name + "-cache"))
    )  # not an output
    data = work / "data"
    png_tree(data, size=8)
    assert (
        cli.main(
            ["init-model", *arch, "--num-classes", "3", "--seed", "0", "--out", str(work / "m3")]
        )
        == 0
    )
    assert (
        cli.main(
            ["encrypt-model", "--key", str(work / "k.json"), str(work / "m3"), str(work / "em3")]
        )
        == 0
    )
    capsys.readouterr()
    for model in (work / "m3", work / "em3"):
        _flip_100_bytes(_largest_variables_file(model))
    big = _largest_variables_file(work / "m3").name
    m, em, d = work / "m3", work / "em3", data
    for argv in (
        ["predict", m, work / "x.npy", "--out", work / "l.npy"],
        ["evaluate", m, "--data-dir", d],
        ["attack", m, "--data-dir", d, "--num-keys", "2", "--quiet", "--out", work / "a.json"],
        ["encrypt-model", "--key", work / "k.json", m, work / "o1"],
        ["decrypt-model", "--key", work / "k.json", em, work / "o2"],
        [
            "rekey-model",
            "--old-key",
            work / "k.json",
            "--new-key",
            work / "k.json",
            em,
            work / "o3",
        ],
        ["average-models", m, m, "--data-dir", d, "--quiet", "--out", work / "o4"],
        [
            "train",
            "--data-dir",
            d,
            "--init-from",
            m,
            "--epochs",
            "1",
            "--batch-size",
            "6",
            "--workdir",
            work / "w",
            "--quiet",
            "--out",
            work / "o5",
        ],
        [
            "reproduce",
            "--checkpoint",
            m,
            "--data-dir",
            d,
            "--num-keys",
            "1",
            "--quiet",
            "--out",
            work / "o6",
        ],
        ["security-report", m, "--data-dir", d, "--quiet", "--out", work / "o7"],
    ):
        refused(capsys, argv, where=work, words=("variables/",))
    assert big  # the damaged file is named in each message above ("variables/<name>")


def test_nan_weights_are_refused(work, capsys):
    from convmixer_jax.files.model_dir import load_model, save_model

    config, variables, _ = load_model(work / "m")
    variables["params"]["head"]["bias"] = np.full_like(variables["params"]["head"]["bias"], np.nan)
    with pytest.raises(ValueError, match="NaN"):
        save_model(work / "nan-model", config, variables)
    assert not (work / "nan-model").exists()


# --------------------------------------------------------------------------- hostile inputs


def test_big_endian_images_are_read_as_their_values(work, capsys):
    x = np.random.default_rng(1).random((2, 8, 8, 3)).astype(np.float32)
    np.save(work / "be.npy", x.astype(">f4"))
    np.save(work / "le.npy", x)
    for name in ("be", "le"):
        assert (
            cli.main(
                [
                    "encrypt-images",
                    "--key",
                    str(work / "k.json"),
                    str(work / f"{name}.npy"),
                    str(work / f"e{name}.npy"),
                ]
            )
            == 0
        )
        assert (
            cli.main(
                [
                    "predict",
                    str(work / "m"),
                    str(work / f"{name}.npy"),
                    "--out",
                    str(work / f"l{name}.npy"),
                ]
            )
            == 0
        )
    np.testing.assert_array_equal(np.load(work / "ebe.npy"), np.load(work / "ele.npy"))
    np.testing.assert_array_equal(np.load(work / "lbe.npy"), np.load(work / "lle.npy"))
    capsys.readouterr()


def _npy_with_header(path: Path, shape, descr="<f4", payload=b"\0" * 100):
    hdr = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {tuple(shape)}, }}"
    hdr += " " * (118 - len(hdr)) + "\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(hdr)) + hdr.encode() + payload)


@pytest.mark.parametrize(
    "case, words",
    [
        ("empty", ("no pixels",)),
        ("huge_header", ("truncated", "12,288,000,000")),
        ("big_perm", ("outside 0..47",)),
        ("nested_key", ("nests JSON",)),
        ("huge_key", ("more than any key",)),
    ],
)
def test_hostile_inputs_get_one_line(work, capsys, case, words):
    key, images = work / "k.json", work / "x.npy"
    if case == "empty":
        np.save(work / "bad.npy", np.zeros((4, 0, 0, 3), np.uint8))
        images = work / "bad.npy"
    elif case == "huge_header":  # 286 GiB claimed, 100 bytes present: refused before allocating
        _npy_with_header(work / "bad.npy", (1000000, 32, 32, 3))
        images = work / "bad.npy"
    else:
        k = json.loads(key.read_text())
        if case == "big_perm":
            k["perm"][0] = 10**20
            (work / "bad.json").write_text(json.dumps(k))
        elif case == "nested_key":
            (work / "bad.json").write_text("[" * 100000 + "]" * 100000)
        else:
            (work / "bad.json").write_text(json.dumps(k) + " " * (2 << 20))
        key = work / "bad.json"
    refused(
        capsys, ["encrypt-images", "--key", key, images, work / "out.npy"], where=work, words=words
    )
    if case in ("empty", "huge_header"):
        refused(
            capsys,
            ["predict", work / "m", images, "--out", work / "l.npy"],
            where=work,
            words=words,
        )


def test_keyspace_of_a_large_block_prints_the_exact_integer(capsys):
    from math import comb, factorial

    assert cli.main(["keyspace", "--block-size", "40", "--channels", "3"]) == 0
    out = capsys.readouterr().out
    digits = out.split("C(pb, pb/2) = ")[1].split("\n")[0]
    sys.set_int_max_str_digits(0)
    assert int(digits) == factorial(4800) * comb(4800, 2400)
    assert "log2 = 56574.39" in out


def test_float_round_trip_is_within_one_ulp_and_uint8_is_exact(work):
    from convmixer_jax.scheme.images import decrypt_images, encrypt_images
    from convmixer_jax.scheme.keys import load_key

    key = load_key(work / "k.json")
    u8 = np.load(work / "x.npy")
    np.testing.assert_array_equal(np.asarray(decrypt_images(encrypt_images(u8, key), key)), u8)
    f = u8.astype(np.float32) / 255
    back = np.asarray(decrypt_images(encrypt_images(f, key), key))
    assert np.max(np.abs(back - f)) <= np.finfo(np.float32).eps  # 1 - (1 - x) is x to one ulp of 1


# --------------------------------------------------------------------------- signals and debris


def _cli(*argv, env=None, **kw):
    env = env or dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-m", "convmixer_jax.cli", *map(str, argv)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _wait_for_temporary(folder: Path, proc, timeout=120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(".cmj-" in p.name for p in folder.iterdir()):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.002)
    raise AssertionError("no temporary appeared")


def _debris(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".cmj-" in p.name or p.name.endswith(".tmp"))


@pytest.mark.parametrize("sig, code", [(signal.SIGKILL, -9), (signal.SIGTERM, 143)])
def test_killed_encrypt_images_leaves_nothing_after_the_next_run(tmp_path, work, sig, code):
    big = tmp_path / "big.npy"
    np.save(big, np.random.default_rng(2).integers(0, 256, (20000, 32, 32, 3), dtype=np.uint8))
    dest = tmp_path / "dest"
    dest.mkdir()
    proc = _cli("encrypt-images", "--key", work / "k.json", big, dest / "out.npy")
    _wait_for_temporary(dest, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert not (dest / "out.npy").exists()
    if sig == signal.SIGTERM:  # handled: cleaned up at once, one line
        assert _debris(dest) == [] and "Traceback" not in err and err.count("\n") == 1
    again = _cli("encrypt-images", "--key", work / "k.json", big, dest / "out.npy")
    assert again.wait(timeout=300) == 0, again.communicate()
    assert _debris(dest) == [] and (dest / "out.npy").exists()


def test_killed_encrypt_model_leaves_nothing_after_the_next_run(work):
    dest = work / "dest"
    dest.mkdir()
    for _attempt in range(20):  # the model write is short: kill at the first sight of its temporary
        proc = _cli("encrypt-model", "--key", work / "k.json", work / "m", dest / "em")
        try:
            _wait_for_temporary(dest, proc)
        except AssertionError:
            proc.wait()
            (dest / "em").exists() and subprocess.run(["rm", "-r", str(dest / "em")], check=True)
            continue
        proc.kill()
        proc.wait()
        break
    else:
        pytest.skip("the write was always too quick to interrupt")
    again = _cli("encrypt-model", "--key", work / "k.json", work / "m", dest / "em")
    assert again.wait(timeout=300) == 0, again.communicate()
    assert _debris(dest) == [] and sorted(p.name for p in dest.iterdir()) == ["em"]


def test_stale_temporaries_of_dead_writers_only_are_removed(tmp_path):
    # a writer is alive while it holds the lock file beside its temporary
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock = tmp_path / f".out.npy.cmj-{dead.pid}-abc789.lock"
    alive = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print(flush=True); time.sleep(30)",
            str(lock),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        alive.stdout.readline()
        stale = tmp_path / f".out.npy.cmj-{dead.pid}-abc123.tmp"
        stale.write_bytes(b"x")
        (tmp_path / f".m.cmj-{dead.pid}-def456.old").mkdir()
        live = tmp_path / f".out.npy.cmj-{dead.pid}-abc789.tmp"
        live.write_bytes(b"x")
        mine = tmp_path / ".out.npy.mine.tmp"  # a user's file of a similar name
        mine.write_bytes(b"x")
        atomic.write_text_atomic(tmp_path / "new.txt", "hi")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [live.name, lock.name, mine.name, "new.txt"]
        )
    finally:
        alive.kill()
        alive.wait()


@pytest.mark.parametrize(
    "sig, code", [(signal.SIGTERM, 143)]
)  # SIGINT takes the same path (exit 130)
def test_interrupted_training_leaves_complete_checkpoints_and_resumes(
    tmp_path, capsys, sig, code, png_tree, arch_args, config
):
    """A real process training on an image tree, its images decoded batch by batch, killed
    after a few epochs: it leaves complete checkpoints only, and --resume ends with the very
    parameters of an uninterrupted run."""
    from convmixer_jax.files.model_dir import load_model

    png_tree(tmp_path / "data", n_per_class=40, size=8)
    argv = [
        "train",
        "--data-dir",
        tmp_path / "data",
        *arch_args(dataclasses.replace(config, num_classes=3)),
        "--recipe",
        "fast",
        "--epochs",
        "24",
        "--batch-size",
        "8",
        "--no-data-cache",
        "--quiet",
    ]
    argv_run = [*argv, "--workdir", tmp_path / "w", "--out", tmp_path / "o"]
    env_cache = {"CONVMIXER_JAX_CACHE": str(tmp_path / "cache")}
    proc = _cli(*argv_run, env=dict(os.environ, PYTHONPATH=str(REPO), **env_cache))
    ckpt = tmp_path / "w" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (ckpt / "2").exists():
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
    assert all(p.name.isdigit() for p in ckpt.iterdir()), sorted(p.name for p in ckpt.iterdir())
    again = _cli(*argv_run, "--resume", env=dict(os.environ, PYTHONPATH=str(REPO), **env_cache))
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    assert "resumed from epoch" in out and json.loads(out.strip().splitlines()[-1])["epochs"] == 24
    assert not (tmp_path / "cache").exists()  # decoded batch by batch: nothing cached
    # the uninterrupted run (in this process) ends with the same parameters, bit for bit
    assert run(capsys, *argv, "--workdir", tmp_path / "w2", "--out", tmp_path / "o2")[0] == 0
    _, resumed, _ = load_model(tmp_path / "o")
    _, alone, _ = load_model(tmp_path / "o2")
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(alone), jax.tree.leaves(resumed), strict=True
    ):
        np.testing.assert_array_equal(b, a, err_msg=jax.tree_util.keystr(path))


def test_deferred_interrupts_hold_a_signal_until_the_block_ends():
    class Stop(Exception):
        pass

    def raise_stop(signum, frame):
        raise Stop(signum)

    previous = signal.signal(signal.SIGTERM, raise_stop)
    steps = []
    try:
        with pytest.raises(Stop):
            with atomic.deferred_interrupts():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # a handler that ran now would raise here
                steps.append("finished")
        assert steps == ["finished"]
        assert signal.getsignal(signal.SIGTERM) is raise_stop  # the caller's handler is back
        with atomic.deferred_interrupts():  # no signal: nothing raised
            steps.append("quiet")
        assert steps == ["finished", "quiet"]
    finally:
        signal.signal(signal.SIGTERM, previous)
