"""Importing the package changes nothing outside it; the command line applies the XLA:CPU
flag itself, before anything imports JAX (convmixer_jax/_xla_flags.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from convmixer_jax._xla_flags import apply_cpu_flags

ROOT = Path(__file__).parents[1]
FLAG = "--xla_cpu_experimental_ynn_fusion_type=individual_dot"
OTHER = "--xla_force_host_platform_device_count=2"


def _python(code: str, xla_flags: str | None, **env_extra: str) -> list[str]:
    """Run ``code`` in a fresh interpreter with XLA_FLAGS set to ``xla_flags`` (None: unset);
    return its stdout lines."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("XLA_FLAGS", "CONVMIXER_JAX_KEEP_XLA_FLAGS")
    }
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    env.update(env_extra)
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


@pytest.mark.parametrize("xla_flags", [None, OTHER, ""])
def test_import_leaves_the_environment_alone(xla_flags):
    code = (
        "import os, convmixer_jax\n"
        "convmixer_jax.PRESETS, convmixer_jax.TrainConfig\n"  # lazy names resolved too
        "from convmixer_jax import cli, model, scheme, training\n"
        "print(os.environ.get('XLA_FLAGS'))\n"
    )
    assert _python(code, xla_flags) == [str(xla_flags)]


# Records XLA_FLAGS at the moment JAX is first imported, then runs a command that uses JAX.
_CLI = """
import os, sys
seen = []
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "jax" and not seen:
            seen.append(os.environ.get("XLA_FLAGS"))
        return None
sys.meta_path.insert(0, Watch())
from convmixer_jax.cli import main
assert "jax" not in sys.modules
assert main(["keyspace", "--block-size", "2", "--channels", "1"]) == 0
assert "jax" in sys.modules
print(seen[0])
"""


@pytest.mark.parametrize(
    "xla_flags, keep, want",
    [
        (None, None, FLAG),
        (OTHER, None, f"{OTHER} {FLAG}"),
        ("--xla_cpu_experimental_ynn_fusion_type=default", None, None),  # the user's choice
        (OTHER, "1", OTHER),  # CONVMIXER_JAX_KEEP_XLA_FLAGS=1
    ],
)
def test_the_command_line_applies_the_flag_before_jax(xla_flags, keep, want):
    extra = {"CONVMIXER_JAX_KEEP_XLA_FLAGS": keep} if keep else {}
    lines = _python(_CLI, xla_flags, **extra)
    assert lines[-1] == (want if want is not None else xla_flags)


def test_apply_cpu_flags():
    env: dict[str, str] = {}
    assert apply_cpu_flags(env) and env == {"XLA_FLAGS": FLAG}
    assert not apply_cpu_flags(env) and env == {"XLA_FLAGS": FLAG}  # once only
    env = {"XLA_FLAGS": OTHER}
    assert apply_cpu_flags(env) and env["XLA_FLAGS"] == f"{OTHER} {FLAG}"
    env = {"CONVMIXER_JAX_KEEP_XLA_FLAGS": "1"}
    assert not apply_cpu_flags(env) and "XLA_FLAGS" not in env
    import convmixer_jax

    assert convmixer_jax.apply_cpu_flags is apply_cpu_flags
