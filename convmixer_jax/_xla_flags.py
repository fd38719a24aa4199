"""The XLA:CPU flag the package recommends, applied by the entry points before JAX starts.

On XLA:CPU (jax 0.10) the YNNPACK library fusion pulls whole chains of
elementwise ops into a matrix-product fusion and materializes every scalar
constant they use as a full-size tensor (``wrapped_broadcast``), which costs
an extra pass over memory per constant.  Restricting the library fusion to
individual matrix products keeps the fast matrix kernel and lets XLA's own
loop fusion handle GELU/BatchNorm, which makes CPU inference of the paper's
ConvMixer markedly faster (``docs/design.md``, "Speed"; the measurements are in
``benchmarks/README.md``).

Importing the package changes nothing: :func:`apply_cpu_flags` (also
``convmixer_jax.apply_cpu_flags``) sets the flag, and the command line, the
benchmarks and the notebook call it first thing.  A program of your own calls
it before its first JAX computation: XLA reads ``XLA_FLAGS`` once, when the
first computation starts the backend, so a later call changes nothing.  The
flag is added only if ``XLA_FLAGS`` does not already set
``xla_cpu_experimental_ynn_fusion_type``, and never if
``CONVMIXER_JAX_KEEP_XLA_FLAGS=1``.
"""

from __future__ import annotations

import os

_FLAG = "--xla_cpu_experimental_ynn_fusion_type=individual_dot"


def apply_cpu_flags(environ=os.environ) -> bool:
    """Add the CPU fusion flag to ``environ["XLA_FLAGS"]`` (default: this process's
    environment); return True if it was added, False if left as it was."""
    if environ.get("CONVMIXER_JAX_KEEP_XLA_FLAGS") == "1":
        return False
    flags = environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in flags:
        return False
    environ["XLA_FLAGS"] = (flags + " " + _FLAG).strip()
    return True
