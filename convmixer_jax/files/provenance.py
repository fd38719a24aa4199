"""Run provenance: what a results file records about where and with what it was made."""

from __future__ import annotations

import platform
import sys


def device_description() -> str:
    """``'<platform>: <device kind> x<count>'`` of JAX's default backend, e.g. ``'cpu: cpu x1'``,
    with ``' in <P> processes'`` appended when several processes share the run."""
    import jax

    d = jax.devices()[0]
    kind = getattr(d, "device_kind", "") or d.platform
    procs = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
    return f"{d.platform}: {kind} x{jax.device_count()}{procs}"


def package_versions() -> dict:
    """Versions of Python and of the packages the results depend on."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("convmixer-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed (``sys.argv`` by default), for a results file; never holds a key's
    contents."""
    import shlex

    return " ".join(shlex.quote(a) for a in (sys.argv if argv is None else argv))


__all__ = ["device_description", "package_versions", "command_line"]
