"""What every hostile-input case checks: the exit status, exactly one error line, and that
nothing outside the declared output changed (a plain module, not a test module)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from convmixer_jax import cli

PROG = "convmixer-jax"


def tree_digests(*roots) -> dict[str, str]:
    """{path: digest} of every file, link and folder under ``roots`` (links not followed;
    a folder's digest is its sorted entry names, so an added or removed file shows)."""
    out = {}
    for root in roots:
        root = Path(root)
        if not os.path.lexists(root):
            continue
        paths = [root] + (
            sorted(root.rglob("*")) if root.is_dir() and not root.is_symlink() else []
        )
        for p in paths:
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[str(p)] = "dir:" + ",".join(sorted(os.listdir(p)))
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[str(p)] = "special"
    return out


def error_lines(stderr: str) -> list[str]:
    """The lines of ``stderr`` that are the command's error (``convmixer-jax: error: ...``
    or ``convmixer-jax: interrupted ...``), ignoring progress-bar redraws."""
    return [ln for ln in stderr.replace("\r", "\n").splitlines() if ln.startswith(PROG + ":")]


def assert_one_error_line(stderr: str, *, contains: str | None = None) -> str:
    """Exactly one error line, no traceback; returns it."""
    assert "Traceback" not in stderr, stderr
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    if contains is not None:
        assert contains in lines[0], lines[0]
    return lines[0]


def refused_in_process(capsys, argv, *, watch, contains=None, status=None) -> str:
    """Run ``convmixer-jax ARGV`` in this process and check it is refused: a non-zero exit
    (``status`` if given), one error line (holding ``contains``), and no change to any
    file under the ``watch`` paths. Returns the error line."""
    before = tree_digests(*watch)
    rc = cli.main([str(a) for a in argv])
    _, err = capsys.readouterr()
    assert rc != 0 if status is None else rc == status, (rc, err)
    line = assert_one_error_line(err, contains=contains)
    assert tree_digests(*watch) == before, "files changed under " + ", ".join(map(str, watch))
    return line


def refused_subprocess(argv, *, watch, contains=None, status=None, cwd=None, env=None, timeout=600):
    """The same as :func:`refused_in_process`, as a real ``python -m convmixer_jax.cli``
    process (for signals, locks and anything that needs a process of its own)."""
    before = tree_digests(*watch)
    r = subprocess.run(
        [sys.executable, "-m", "convmixer_jax.cli", *map(str, argv)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )
    assert r.returncode != 0 if status is None else r.returncode == status, (r.returncode, r.stderr)
    line = assert_one_error_line(r.stderr, contains=contains)
    assert tree_digests(*watch) == before, "files changed under " + ", ".join(map(str, watch))
    return line
