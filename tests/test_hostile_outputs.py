"""Hostile outputs: ``--out`` inside an input, inside a model or another command's output,
``--force`` over what this command did not write, and temporaries of writers this process
cannot see (another PID namespace, another host). Each refusal exits non-zero with one
line and changes no file."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hostile_helpers import refused_in_process, tree_digests

from convmixer_jax import cli
from convmixer_jax.files import atomic, output_paths

REPO = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory, make_model_dir, tiny_config, png_tree):
    """Tiny inputs of every kind, made once: a plain model ``m``, an encrypted model ``em``,
    keys ``k.json`` and ``k2.json`` (block 2, 3 channels), an image-folder data set ``dv``,
    a folder of PNGs ``imgs``, arrays ``x.npy`` / ``ex.npy``, an empty training workdir
    ``w``."""
    from convmixer_jax.files.model_dir import encrypt_model_dir
    from convmixer_jax.scheme import keys
    from convmixer_jax.scheme.images import encrypt_images

    root = tmp_path_factory.mktemp("hostile-outputs-world")
    make_model_dir(root / "m", tiny_config, 0)
    key, key2 = keys.generate_key(2, 3, seed=1), keys.generate_key(2, 3, seed=2)
    (root / "k.json").write_text(keys.key_file_text(key))
    (root / "k2.json").write_text(keys.key_file_text(key2))
    encrypt_model_dir(root / "m", root / "em", key)
    png_tree(root / "dv", n_per_class=2, size=8)
    shutil.copytree(root / "dv" / "test" / "class0", root / "imgs")
    x = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    np.save(root / "x.npy", x)
    np.save(root / "ex.npy", np.asarray(encrypt_images(x, key)))
    (root / "w").mkdir()
    return root


@pytest.fixture()
def w(world, tmp_path):
    """A private copy of :func:`world` for one test (refusals must leave it as it is)."""
    dst = tmp_path / "w0"
    shutil.copytree(world, dst)
    return dst


@pytest.fixture(autouse=True)
def _library_writer():
    """Each test starts, and leaves, the library's default writing command."""
    reset = getattr(output_paths, "set_writing_command", lambda name: None)
    reset("convmixer-jax")
    yield
    reset("convmixer-jax")


# --------------------------------------------------------------------------- inside an input

# (name, argv with {W} for the world's folder): every --out lies inside an input of the
# command (or inside a model directory), and --force is given.
INSIDE = [
    ("predict", "predict {W}/m {W}/imgs --out {W}/m/config.json --force"),
    ("evaluate", "evaluate {W}/m --data-dir {W}/dv --out {W}/dv/test/class0/0.png --force"),
    ("evaluate-new", "evaluate {W}/m --data-dir {W}/dv --out {W}/dv/result.json --force"),
    ("encrypt-images", "encrypt-images --key {W}/k.json {W}/imgs --out {W}/imgs/enc --force"),
    ("decrypt-images", "decrypt-images --key {W}/k.json {W}/imgs --out {W}/imgs/d.npy --force"),
    ("encrypt-model", "encrypt-model --key {W}/k.json {W}/m --out {W}/m/variables/enc --force"),
    ("decrypt-model", "decrypt-model --key {W}/k.json {W}/em --out {W}/em/plain --force"),
    (
        "rekey-model",
        "rekey-model --old-key {W}/k.json --new-key {W}/k2.json {W}/em --out {W}/em/variables/r "
        "--force",
    ),
    ("init-model", "init-model --out {W}/m/variables/new --force {ARCH}"),
    ("keygen", "keygen --block-size 2 --channels 3 --out {W}/m/config.json --force"),
    (
        "recover-key",
        "recover-key --plain {W}/x.npy --encrypted {W}/ex.npy --block-size 2 "
        "--out {W}/em/config.json --force",
    ),
    ("attack", "attack {W}/m --data-dir {W}/dv --num-keys 2 --out {W}/dv/test/a.json --force"),
    ("train", "train --data-dir {W}/dv --workdir {W}/w --out {W}/dv/model --force {ARCH}"),
    ("export-model", "export-model --workdir {W}/w --out {W}/w/model --force"),
    (
        "average-models",
        "average-models {W}/m {W}/m --data-dir {W}/dv --out {W}/m/variables/avg --force",
    ),
    (
        "reproduce",
        "reproduce --checkpoint {W}/m --data-dir {W}/dv --num-keys 2 --out {W}/m/variables/r "
        "--force",
    ),
    ("security-report", "security-report {W}/m --data-dir {W}/dv --out {W}/dv/train/r --force"),
    (
        "scrambling-effect",
        "scrambling-effect {W}/m --data-dir {W}/dv --num-keys 2 --out {W}/m/variables/s --force",
    ),
    ("export-torch", "export-torch {W}/m --out {W}/m/w.safetensors --force"),
    ("plot-training", "plot-training {W}/m --out {W}/m/curves.png --force"),
    ("symlinked", "predict {W}/m {W}/imgs --out {W}/link/config.json --force"),
    ("dotdot", "predict {W}/m {W}/imgs --out {W}/imgs/../m/variables/../config.json --force"),
]


@pytest.mark.parametrize("name, argv", INSIDE, ids=[n for n, _ in INSIDE])
def test_out_inside_an_input_is_refused_and_changes_nothing(
    w, capsys, arch_args, tiny_config, name, argv
):
    if name == "symlinked":
        os.symlink(w / "m", w / "link")
    arch = " ".join(arch_args(tiny_config))
    argv = argv.format(W=w, ARCH=arch).split()
    refused_in_process(capsys, argv, watch=[w], contains="lies inside")


def test_out_inside_a_model_that_is_no_input_is_refused(w, capsys):
    # the model is not an input of keygen, but it is a model: its files are its own
    refused_in_process(
        capsys,
        ["keygen", "--block-size", "2", "--channels", "3", "--out", w / "m" / "notes.json"],
        watch=[w],
        contains="model directory",
    )


def test_a_key_is_replaced_only_by_a_command_that_makes_keys(w, capsys):
    line = refused_in_process(
        capsys,
        ["predict", w / "m", w / "imgs", "--out", w / "k.json", "--force"],
        watch=[w],
        contains="key file",
    )
    assert "keygen" in line
    # keygen itself may replace a key it is asked to replace
    assert (
        cli.main(
            [
                "keygen",
                "--block-size",
                "2",
                "--channels",
                "3",
                "--out",
                str(w / "k.json"),
                "--force",
            ]
        )
        == 0
    )
    capsys.readouterr()


# --------------------------------------------------------------------------- ownership


def test_force_never_replaces_another_commands_folder(w, capsys):
    out = w / "enc"
    assert (
        cli.main(["encrypt-images", "--key", str(w / "k.json"), str(w / "imgs"), "--out", str(out)])
        == 0
    )
    capsys.readouterr()
    refused_in_process(
        capsys,
        [
            "reproduce",
            "--checkpoint",
            w / "m",
            "--data-dir",
            w / "dv",
            "--num-keys",
            "2",
            "--force",
            "--out",
            out,
        ],
        watch=[w],
        contains="encrypt-images",
    )
    refused_in_process(
        capsys,
        ["security-report", w / "m", "--data-dir", w / "dv", "--force", "--out", out],
        watch=[w],
        contains="encrypt-images",
    )
    # the same kind of command may replace it: decrypting into the folder encrypt-images wrote
    assert (
        cli.main(
            [
                "decrypt-images",
                "--key",
                str(w / "k.json"),
                str(w / "imgs"),
                "--out",
                str(out),
                "--force",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert output_paths.read_manifest(out)["command"] == "decrypt-images"


def test_force_never_replaces_a_folder_with_an_unlisted_or_changed_file(w, capsys):
    out = w / "enc"
    argv = ["encrypt-images", "--key", w / "k.json", w / "imgs", "--out", out, "--force"]
    assert cli.main([str(a) for a in argv]) == 0
    capsys.readouterr()
    (out / "mine.png").write_bytes((w / "imgs" / "0.png").read_bytes())  # a PNG of the user's
    refused_in_process(capsys, argv, watch=[w], contains="mine.png")
    (out / "mine.png").unlink()
    (out / "1.png").write_bytes(b"edited")
    refused_in_process(capsys, argv, watch=[w], contains="1.png")
    # a folder of an older release, whose marker lists nothing, is not taken either
    (out / "1.png").unlink()
    (out / output_paths.RESULTS_MARKER).write_text("written by convmixer-jax\n")
    refused_in_process(capsys, argv, watch=[w], contains="did not write")


def test_a_model_directory_is_replaced_only_whole_with_nothing_unlisted(
    w, capsys, arch_args, tiny_config
):
    argv = ["init-model", *arch_args(tiny_config), "--seed", "3", "--force", "--out", w / "m"]
    # what encrypt-model --out m/variables/enc wrote before it was refused
    shutil.copytree(w / "em" / "variables", w / "m" / "variables" / "enc")
    refused_in_process(capsys, argv, watch=[w], contains="variables/enc")
    shutil.rmtree(w / "m" / "variables" / "enc")
    # a weight file changed since the model was written
    victim = sorted(p for p in (w / "m" / "variables").rglob("*") if p.is_file())[0]
    data = victim.read_bytes()
    victim.write_bytes(data + b"\0")
    refused_in_process(capsys, argv, watch=[w], contains="changed")
    victim.write_bytes(data)
    assert cli.main([str(a) for a in argv]) == 0  # the model as written is replaced, whole
    capsys.readouterr()


def test_disk_full_on_a_folder_output_names_the_folder(w, capsys, monkeypatch):
    from convmixer_jax.files import image_files

    def full(image):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(image_files, "encode_png", full)
    line = refused_in_process(
        capsys,
        ["encrypt-images", "--key", w / "k.json", w / "imgs", "--out", w / "enc"],
        watch=[w],
        contains=str(w / "enc"),
    )
    assert "no space left" in line.lower() and "Errno" not in line


def test_manifest_formats_match_their_owners():
    from convmixer_jax.data import download
    from convmixer_jax.files import model_dir
    from convmixer_jax.scheme import keys

    assert output_paths.DATA_MARKER == download.MARKER
    assert output_paths.MODEL_FORMAT == model_dir.MODEL_FORMAT
    assert output_paths.KEY_FORMAT == keys.KEY_FORMAT


# --------------------------------------------------------------------------- temporaries

HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from convmixer_jax.files.atomic import temporary_name
    tmp = temporary_name(Path(sys.argv[1]))
    tmp.write_bytes(b"half written")
    print(tmp, flush=True)
    time.sleep(120)
    """
)

LOCKER = textwrap.dedent(
    """
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
    time.sleep(120)
    """
)


def _python(code: str, *args) -> subprocess.Popen:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()


def test_a_temporary_is_kept_while_its_writer_lives_and_removed_after(tmp_path):
    writer = _python(HOLDER, tmp_path / "out.npy")
    try:
        tmp = Path(writer.stdout.readline().strip())
        assert tmp.is_file()
        assert atomic.remove_stale_temporaries(tmp_path) == []
        atomic.write_text_atomic(tmp_path / "other.txt", "x")  # every write sweeps first
        assert tmp.is_file()
    finally:
        _stop(writer)
    assert atomic.remove_stale_temporaries(tmp_path) == [tmp]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.txt"]


def test_liveness_follows_the_lock_not_the_process_id(tmp_path):
    # a writer in another PID namespace: the id in the name is of no live process here (a
    # finished child's), but the writer holds the lock
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stem = f".enc.cmj-{gone.pid}-aaaa1111"
    live = tmp_path / f"{stem}.tmp"
    (live / "sub").mkdir(parents=True)
    (live / "sub" / "0022.png").write_bytes(b"png")
    locker = _python(LOCKER, tmp_path / f"{stem}.lock")
    try:
        assert locker.stdout.readline().strip() == "locked"
        # and a dead writer whose id is alive here (this test's own, and init's)
        dead = []
        for pid in (os.getpid(), 1):
            stale = tmp_path / f".out.npy.cmj-{pid}-bbbb{pid}.tmp"
            stale.write_bytes(b"x")
            (tmp_path / f".out.npy.cmj-{pid}-bbbb{pid}.lock").write_bytes(b"")  # free
            dead.append(stale)
        orphan = tmp_path / ".m.cmj-77-cccc2222.old"  # no lock file at all
        orphan.mkdir()
        mine = tmp_path / ".out.npy.mine.tmp"  # a user's file of a similar name
        mine.write_bytes(b"x")
        removed = atomic.remove_stale_temporaries(tmp_path)
        assert sorted(removed) == sorted([*dead, orphan])
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [live.name, f"{stem}.lock", mine.name]
        )
        assert (live / "sub" / "0022.png").read_bytes() == b"png"
    finally:
        _stop(locker)
    assert atomic.remove_stale_temporaries(tmp_path) == [live]
    assert sorted(p.name for p in tmp_path.iterdir()) == [mine.name]


def test_a_running_write_survives_a_sweep_from_another_process(tmp_path):
    # the write of a folder output in this process, the sweep in another one
    out = tmp_path / "enc"
    with atomic.staged_output_dir(out) as tmp:
        (tmp / "0.png").write_bytes(b"a")
        sweep = _python(
            "import sys; from convmixer_jax.files.atomic import remove_stale_temporaries as r; "
            "print(len(r(sys.argv[1])))",
            tmp_path,
        )
        assert sweep.communicate(timeout=120)[0].strip() == "0"
        (tmp / "1.png").write_bytes(b"b")
    assert sorted(p.name for p in out.iterdir()) == [output_paths.RESULTS_MARKER, "0.png", "1.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc"]


def test_a_killed_writer_leaves_nothing_after_the_next_write(tmp_path):
    writer = _python(HOLDER, tmp_path / "out.npy")
    tmp = Path(writer.stdout.readline().strip())
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert tmp.exists()
    atomic.write_text_atomic(tmp_path / "out.npy", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npy"]


def test_nothing_outside_the_output_changes_when_a_folder_write_fails(tmp_path):
    (tmp_path / "keep.txt").write_text("k")
    before = tree_digests(tmp_path)
    with pytest.raises(RuntimeError):
        with atomic.staged_output_dir(tmp_path / "out") as tmp:
            (tmp / "a").write_text("a")
            raise RuntimeError("midway")
    assert tree_digests(tmp_path) == before
    assert output_paths.read_manifest(tmp_path) is None  # a plain folder has no manifest
