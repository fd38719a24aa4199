#!/usr/bin/env python
"""One depthwise layer of timm's ImageNet ConvMixers, each exact formulation side by side.

    python benchmarks/depthwise_grids.py [--batch 8] [--calls 5] [--json FILE]

timm's ConvMixers run on 224 x 224 images: a 32 x 32 patch grid for patch 7
(``convmixer_768_32``: dim 768, k 7; ``convmixer_1536_20``: dim 1536, k 9) and
16 x 16 for patch 14 (``convmixer_1024_20_ks9_p14``: dim 1024, k 9). For each
case this times a jitted forward of ``convmixer_jax.model.convmixer.depthwise``
(and, for 'toeplitz', of ``depthwise_with_matrices`` on matrices built once,
as ``prepare_inference`` holds them) on (dim, g, g, batch) activations, checks
that all formulations agree, and prints one JSON line per formulation with the
memory the prepared matrices of the whole model would take. The dense
matrices of a g x g grid hold g^4 values per channel, so 'toeplitz' is timed
only where one layer's matrices stay under ``--max-matrix-gib``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

# the package of this checkout, installed or not (imported in main, after the XLA flag is set)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = ("convmixer_1024_20_ks9_p14", "convmixer_768_32", "convmixer_1536_20")


def _time(fn, *args, calls: int) -> float:
    import jax

    jax.block_until_ready(fn(*args))  # compile
    t0 = time.perf_counter()
    for _ in range(calls):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / calls


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", type=int, default=8, help="images per call (default 8)")
    p.add_argument("--calls", type=int, default=5, help="timed calls per formulation (default 5)")
    p.add_argument(
        "--max-matrix-gib",
        type=float,
        default=1.0,
        help="time 'toeplitz' only where one layer's matrices stay below this (default 1 GiB)",
    )
    p.add_argument("--cases", default=",".join(CASES), help="presets to time")
    p.add_argument("--json", help="also write all rows to this JSON file")
    args = p.parse_args(argv)

    from convmixer_jax import apply_cpu_flags

    apply_cpu_flags()  # the XLA:CPU flag a user of the command line gets, before JAX starts
    import jax

    from convmixer_jax.files.provenance import device_description
    from convmixer_jax.model.convmixer import (
        PRESETS,
        depthwise,
        depthwise_with_matrices,
        resolve_depthwise_impl,
        toeplitz_matrices,
    )

    rows = []
    for name in args.cases.split(","):
        cfg = PRESETS[name]
        g, d, k = cfg.grid_size, cfg.dim, cfg.kernel_size
        rng = np.random.default_rng(0)
        x = jax.device_put(rng.standard_normal((d, g, g, args.batch), np.float32))
        kernel = jax.device_put(rng.standard_normal((k, k, 1, d), np.float32) / k)
        matrix_gib = d * g**4 * 4 / 2**30
        ref = None
        for impl in ("shift", "conv", "toeplitz"):
            if impl == "toeplitz":
                if matrix_gib > args.max_matrix_gib:
                    continue
                mats = jax.jit(toeplitz_matrices, static_argnums=(1, 2))(kernel, g, g)
                fn, fargs = jax.jit(depthwise_with_matrices), (x, mats)
            else:
                fn, fargs = jax.jit(lambda a, w, impl=impl: depthwise(a, w, impl)), (x, kernel)
            seconds = _time(fn, *fargs, calls=args.calls)
            out = np.asarray(fn(*fargs))
            ref = out if ref is None else ref
            row = {
                "case": name,
                "grid": g,
                "dim": d,
                "kernel": k,
                "batch": args.batch,
                "impl": impl,
                "ms_per_call": 1e3 * seconds,
                "images_per_second": args.batch / seconds,
                "max_abs_diff_vs_shift": float(np.max(np.abs(out - ref))),
                "model_matrices_gib": matrix_gib * cfg.depth,
                "auto_picks": resolve_depthwise_impl("auto", (g, g)),
                "device": device_description(),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
