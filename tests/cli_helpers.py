"""Running the command line in-process from tests."""

from __future__ import annotations

from convmixer_jax import cli


def run(capsys, *argv) -> tuple[int, str, str]:
    """``convmixer-jax ARGV`` in this process: (exit status, stdout, stderr)."""
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def ok(capsys, *argv) -> str:
    """Run ``argv``, expect exit status 0, return stdout."""
    rc, out, err = run(capsys, *argv)
    assert rc == 0, err
    return out
