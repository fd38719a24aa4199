"""XLA:CPU settings applied before JAX starts its backend.

On XLA:CPU (jax 0.10) the YNNPACK library fusion pulls whole chains of
elementwise ops into a matrix-product fusion and materializes every scalar
constant they use as a full-size tensor (``wrapped_broadcast``), which costs
an extra pass over memory per constant.  Restricting the library fusion to
individual matrix products keeps the fast matrix kernel and lets XLA's own
loop fusion handle GELU/BatchNorm: +40 % inference throughput for the
paper's ConvMixer on the development machine (benchmarks/RESULTS.md).

The flag is added only if the user has not set ``xla_cpu_experimental_ynn_fusion_type``
themselves, and never if ``CONVMIXER_JAX_KEEP_XLA_FLAGS=1``.  XLA reads
``XLA_FLAGS`` once, when the first computation starts the backend; importing
convmixer_jax after that changes nothing.
"""

from __future__ import annotations

import os

_FLAG = "--xla_cpu_experimental_ynn_fusion_type=individual_dot"


def apply_cpu_flags(environ=os.environ) -> bool:
    """Add the CPU fusion flag to ``XLA_FLAGS``; return True if added."""
    if environ.get("CONVMIXER_JAX_KEEP_XLA_FLAGS") == "1":
        return False
    flags = environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in flags:
        return False
    environ["XLA_FLAGS"] = (flags + " " + _FLAG).strip()
    return True
