"""Signals and what a person sees: SIGINT and SIGTERM at any moment of a command, errors
that name their path, progress bars that say what they measure, one line at the end.

A stopped command exits with 130 (SIGINT) or 143 (SIGTERM), prints exactly one line, writes
no output and leaves no temporary, wherever the signal lands: in an import, in a garbage
collector callback or a finalizer (where Python drops an exception), or in the middle of
the write. The real-process cases start the command through a small wrapper that marks
the moment just before ``main`` runs, and send the signal a given time after it.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hostile_helpers import assert_one_error_line, error_lines, refused_in_process, tree_digests

from convmixer_jax import cli

PROG = "convmixer-jax"
STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}
# Starts the command line as `convmixer-jax` does, marking the moment just before main runs.
# The marker appears once main has installed its SIGTERM handler (a thread watches for it):
# "when seconds after main starts" then never falls before the handler exists, where the
# interpreter's default action would end the process without a word.
WRAPPER = (
    "import pathlib, signal, sys, threading, time\n"
    "from convmixer_jax.cli.app import main\n"
    "def mark():\n"
    "    while signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):\n"
    "        time.sleep(0.0002)\n"
    "    pathlib.Path(sys.argv[1]).touch()\n"
    "threading.Thread(target=mark, daemon=True).start()\n"
    "sys.exit(main(sys.argv[2:]))\n"
)
# A signal ends the process within this many seconds (a few more where it lands in a C
# extension's import, which holds the interpreter and cannot be interrupted).
EXIT_AFTER_SIGNAL = 2.0
EXIT_AFTER_SIGNAL_IN_IMPORT = 8.0


def _debris(*folders) -> list[str]:
    return sorted(
        p.name for f in folders for p in Path(f).iterdir() if ".cmj-" in p.name or ".tmp" in p.name
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory, make_model_dir, tiny_config, png_tree):
    """A key, a tiny plain model and a folder of PNGs (read only)."""
    root = tmp_path_factory.mktemp("signals")
    assert (
        cli.main(
            ["keygen", "--block-size", "2", "--channels", "3", "--key-seed", "1", "--out"]
            + [str(root / "k.json")]
        )
        == 0
    )
    make_model_dir(root / "m", tiny_config)
    png_tree(root / "data", n_per_class=4, size=8)
    return root


def _command(name: str, work: Path, out: Path) -> list[str]:
    if name == "encrypt-model":
        return ["encrypt-model", "--key", work / "k.json", work / "m", "--out", out]
    if name == "encrypt-images":
        return ["encrypt-images", "--key", work / "k.json", work / "data" / "test" / "class0"] + [
            "--out",
            out,
        ]
    assert name == "init-model"
    return ["init-model", "--dim", "8", "--depth", "1", "--kernel-size", "3"] + [
        "--patch-size",
        "2",
        "--image-size",
        "8",
        "--out",
        out,
    ]


def _interrupt(argv, sig, when, *, dest: Path, marker: Path, timeout=300):
    """Run ``convmixer-jax ARGV`` as a process of its own and send it ``sig``: ``when``
    seconds after main starts, or ``"write"`` when the output's temporary (``.tmp``)
    appears in ``dest``. Returns (exit status, stderr, seconds from the signal to the exit, whether
    the process was still running when the signal was sent)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WRAPPER, str(marker), *map(str, argv)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + timeout
    try:
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.001)
        if when == "write":
            while not any(p.name.endswith(".tmp") for p in dest.iterdir()):
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
                time.sleep(0.001)
        else:
            time.sleep(when)
        running = proc.poll() is None
        sent = time.monotonic()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=timeout)
        return proc.returncode, err, time.monotonic() - sent, running
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


CASES = [
    ("encrypt-model", signal.SIGTERM, 0.0),
    ("encrypt-model", signal.SIGTERM, 0.05),
    ("encrypt-model", signal.SIGTERM, 0.3),
    ("encrypt-model", signal.SIGTERM, 0.7),
    ("encrypt-model", signal.SIGTERM, 1.5),
    ("encrypt-model", signal.SIGTERM, "write"),
    ("encrypt-model", signal.SIGINT, 0.7),
    ("encrypt-model", signal.SIGINT, "write"),
    ("encrypt-images", signal.SIGTERM, 0.7),
    ("encrypt-images", signal.SIGINT, "write"),
    ("init-model", signal.SIGINT, 1.5),
    ("encrypt-images", signal.SIGTERM, "write"),
]


@pytest.mark.parametrize(
    "command, sig, when", CASES, ids=[f"{c}-{s.name}-{w}" for c, s, w in CASES]
)
def test_a_signal_at_any_moment_ends_the_command_with_one_line(tmp_path, work, command, sig, when):
    dest = tmp_path / "dest"
    dest.mkdir()
    out = dest / "out"
    before = tree_digests(work)
    rc, err, seconds, running = _interrupt(
        _command(command, work, out), sig, when, dest=dest, marker=tmp_path / "started"
    )
    if not running:  # a fast machine finished the command first: nothing to check
        assert rc == 0, err
        pytest.skip(f"{command} ended within {when} s, before the signal")
    assert rc == STATUS[sig], err
    assert "Exception ignored" not in err, err
    line = assert_one_error_line(err)
    assert err.strip() == line, err  # nothing else on stderr
    assert ("terminated (SIGTERM)" if sig == signal.SIGTERM else "interrupted") in line
    assert not out.exists() and _debris(dest) == [], sorted(os.listdir(dest))
    assert tree_digests(work) == before
    limit = EXIT_AFTER_SIGNAL if when == "write" else EXIT_AFTER_SIGNAL_IN_IMPORT
    assert seconds < limit, f"exited {seconds:.1f} s after the signal"


def test_sigterm_to_the_installed_command_soon_after_it_starts(tmp_path, work):
    """`python -m convmixer_jax.cli`, SIGTERM 0.7 s after the process starts (as a user who
    changes their mind at once)."""
    dest = tmp_path / "dest"
    dest.mkdir()
    out = dest / "em"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "convmixer_jax.cli",
            *map(str, _command("encrypt-model", work, out)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.7)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert err.strip() == assert_one_error_line(err, contains="terminated (SIGTERM)"), err
    assert not out.exists() and _debris(dest) == []


# --------------------------------------------------------------------------- dropped signals


class _Finalized:
    """An object whose finalizer sends a signal: the handler then runs inside ``__del__``,
    where Python drops any exception it raises."""

    def __init__(self, sig):
        self.sig = sig

    def __del__(self):
        signal.raise_signal(self.sig)


def _in_finalizer(sig):
    _Finalized(sig)


def _in_gc_callback(sig):
    def callback(phase, info):
        gc.callbacks.remove(callback)
        signal.raise_signal(sig)

    gc.callbacks.append(callback)
    gc.collect()


@pytest.mark.parametrize("where", [_in_finalizer, _in_gc_callback], ids=["finalizer", "gc"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_whose_exception_python_drops_still_stops_the_command(
    tmp_path, capsys, monkeypatch, sig, where
):
    """The handler runs where an exception cannot propagate (a finalizer or a garbage
    collector callback, as JAX's): the command still stops before writing, with one line."""
    from convmixer_jax.scheme import keys

    generate_key = keys.generate_key

    def interrupted_generate_key(*args, **kwargs):
        where(sig)
        return generate_key(*args, **kwargs)

    monkeypatch.setattr(keys, "generate_key", interrupted_generate_key)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    out = tmp_path / "k.json"
    line = refused_in_process(
        capsys,
        ["keygen", "--block-size", "2", "--channels", "3", "--out", out],
        watch=[tmp_path],
        status=STATUS[sig],
    )
    assert ("terminated" if sig == signal.SIGTERM else "interrupted") in line
    assert not out.exists()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


def test_a_second_signal_while_stopping_changes_nothing(tmp_path, capsys, monkeypatch):
    """SIGINT, then SIGTERM while the first one's line is being made: still one line, 130."""
    from convmixer_jax.cli import keys as key_commands

    class Stopped(KeyboardInterrupt):
        @property
        def message(self):
            signal.raise_signal(signal.SIGTERM)
            return "stopped"

    def cmd(args):
        raise Stopped

    monkeypatch.setattr(key_commands, "cmd_keygen", cmd)
    argv = ["keygen", "--block-size", "2", "--channels", "3", "--out", tmp_path / "k.json"]
    line = refused_in_process(capsys, argv, watch=[tmp_path], status=130)
    assert line == f"{PROG}: error: interrupted; stopped"


# --------------------------------------------------------------------------- disk full


def test_disk_full_on_a_folder_output_names_the_folder(tmp_path, capsys, monkeypatch, work):
    """Disk full while a folder of PNGs is written: one line that says so and names the
    output (the operating system's error names no path)."""

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pathlib.Path, "write_bytes", full)
    out = tmp_path / "enc"
    line = refused_in_process(
        capsys,
        ["encrypt-images", "--key", work / "k.json", work / "data" / "test" / "class0"]
        + ["--out", out],
        watch=[tmp_path, work],
        status=1,
        contains="no space left on device",
    )
    assert str(out) in line and "[Errno" not in line, line
    assert not out.exists()


def test_disk_full_inside_a_library_error_is_one_line(tmp_path, capsys, monkeypatch, work):
    """A library that wraps the disk-full OSError in an exception of its own (Orbax raises
    a bare Exception): still one line naming the output, not a traceback."""
    from convmixer_jax.files import model_dir

    def orbax_like_failure(*args, **kwargs):
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as e:
            raise Exception("Failed to write the checkpoint") from e  # noqa: TRY002

    monkeypatch.setattr(model_dir, "encrypt_model_dir", orbax_like_failure)
    out = tmp_path / "em"
    line = refused_in_process(
        capsys,
        ["encrypt-model", "--key", work / "k.json", work / "m", "--out", out],
        watch=[tmp_path, work],
        status=1,
        contains="no space left on device",
    )
    assert str(out) in line


def _small_filesystem_available() -> bool:
    try:
        r = subprocess.run(
            ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt && echo ok"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.stdout.strip() == "ok"


@pytest.mark.skipif(
    sys.platform != "linux" or not _small_filesystem_available(),
    reason="needs a user namespace to mount a small tmpfs",
)
@pytest.mark.parametrize("command", ["encrypt-model", "encrypt-images"])
def test_a_real_full_disk_is_one_line_naming_the_output(tmp_path, work, command):
    """The output's folder is an 8 KiB tmpfs (mounted in a namespace of the command's own):
    exit 1, one line that says the disk is full and names the output, nothing left."""
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "out"
    argv = [sys.executable, "-m", "convmixer_jax.cli", *_command(command, work, out)]
    script = f"mount -t tmpfs -o size=8k tmpfs '{disk}' && " + " ".join(f"'{a}'" for a in argv)
    script += f"; status=$?; ls -A '{disk}'; exit $status"
    before = tree_digests(work)
    r = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 1, r.stderr
    assert r.stdout.strip() == "", r.stdout  # nothing left in the full folder
    assert tree_digests(work) == before
    line = assert_one_error_line(r.stderr, contains="no space left on device")
    assert r.stderr.strip() == line, r.stderr  # no log of Orbax's threads either
    assert f"while writing {out};" in line, line


# --------------------------------------------------------------------------- progress bars


def test_an_interrupt_prints_its_line_after_the_bar_is_closed(tmp_path, capsys, monkeypatch):
    """A command stopped with a bar on screen: the bar is closed first, the error line is a
    line of its own, and nothing is drawn after it."""
    from tqdm import tqdm

    from convmixer_jax.cli import keys as key_commands

    def cmd(args):
        bar = tqdm(total=10, desc="working", file=sys.stderr)
        bar.update(3)
        raise KeyboardInterrupt

    monkeypatch.setattr(key_commands, "cmd_keygen", cmd)
    rc = cli.main(["keygen", "--block-size", "2", "--channels", "3", "--out", str(tmp_path / "k")])
    err = capsys.readouterr().err
    assert rc == 130
    gc.collect()  # a bar left open would draw itself again when collected
    err += capsys.readouterr().err
    assert err.endswith("\n") and err.split("\n")[-2].startswith(f"{PROG}: error: interrupted"), err
    assert len(error_lines(err)) == 1 and not list(tqdm._instances)


def test_an_interrupt_carries_the_message_of_what_was_kept(tmp_path, capsys, monkeypatch):
    """Code stopped halfway (training) raises an interrupt with a ``message`` (what it saved,
    how to go on): that is the line's detail."""
    from convmixer_jax.cli import keys as key_commands

    class Stopped(KeyboardInterrupt):
        message = "epoch 3 of 40 is saved in W; continue with: convmixer-jax train ... --resume"

    def cmd(args):
        raise Stopped

    monkeypatch.setattr(key_commands, "cmd_keygen", cmd)
    argv = ["keygen", "--block-size", "2", "--channels", "3", "--out", tmp_path / "k"]
    line = refused_in_process(capsys, argv, watch=[tmp_path], status=130)
    assert line == f"{PROG}: error: interrupted; {Stopped.message}"


def test_reproduce_labels_every_bar_and_names_what_it_wrote(tmp_path, capsys, tiny_trained_model):
    """Each progress bar says what it measures and which step of how many it is; the
    command ends with a line naming what it wrote."""
    out = tmp_path / "rep"
    argv = ["reproduce", "--checkpoint", tiny_trained_model.model_dir]
    argv += ["--data-dir", tiny_trained_model.data_dir, "--num-keys", "3", "--out", out]
    assert cli.main([str(a) for a in argv]) == 0
    captured = capsys.readouterr()
    json.loads(captured.out.strip().splitlines()[-1])  # stdout is still the summary
    err = captured.err.replace("\r", "\n")
    for label in (
        "[1/8] plain model, plain images",
        "[2/8] encrypted model, plain images",
        "[3/8] encrypted model, encrypted images",
        "[4/8] mirror TTA: plain model, plain images",
        "[5/8] mirror TTA: plain model, plain images, mirrored",
        "[6/8] mirror TTA: encrypted model, encrypted images",
        "[7/8] mirror TTA: encrypted model, encrypted images, mirrored",
        "[8/8] wrong keys 3/3",
    ):
        assert label in err, label
    assert "predict:" not in err
    last = captured.err.strip().splitlines()[-1]
    assert last.endswith(f"-> {out}") and "table1.md" in last and "fig5.png" in last, last


def test_commands_that_print_data_name_their_output_on_stderr(tmp_path, capsys):
    """keygen prints the fingerprint alone on stdout, and where the key went on stderr."""
    out = tmp_path / "k.json"
    argv = ["keygen", "--block-size", "2", "--channels", "3", "--out", str(out)]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert len(captured.out.split()) == 1
    assert captured.err.strip().splitlines()[-1] == f"secret key -> {out}"
