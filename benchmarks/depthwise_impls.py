#!/usr/bin/env python
"""Training-step and inference throughput of each exact depthwise formulation
on the current JAX backend (CPU, GPU or TPU).

    python benchmarks/depthwise_impls.py [--batch 256] [--steps 30] [--impls conv,toeplitz,shift]
                                         [--json FILE]

For each formulation of ``ConvMixerConfig.depthwise_impl`` this builds the
library's own train step (``convmixer_jax.training.loop.make_step`` with
``RECIPES['fast']``: AdamW one-cycle, on-device crop/flip/cutout, label
smoothing, as ``convmixer-jax train --recipe fast`` runs it) for ConvMixer-256/8
(k=9, p=4, 32x32x3) and times ``--steps`` steps after a warm-up, then times a
jitted inference ``apply`` on ``--infer-batch`` images (for 'toeplitz' on
``prepare_inference`` variables). It checks that all formulations give the same
logits (max abs difference printed) and prints one JSON line per formulation,
so that a run cut short still reports what it measured. ``resolve_depthwise_impl``
says which formulation ``'auto'`` picks on this backend.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import convmixer_jax  # noqa: E402

convmixer_jax.apply_cpu_flags()  # the XLA:CPU flag, as the command line applies it

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from convmixer_jax.model.convmixer import (  # noqa: E402
    PRESETS,
    ConvMixer,
    prepare_inference,
    resolve_depthwise_impl,
)
from convmixer_jax.training.loop import (  # noqa: E402
    RECIPES,
    init_variables,
    initial_state,
    make_optimizer,
    make_step,
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--batch", type=int, default=256, help="training batch (default 256, the fast recipe's)"
    )
    p.add_argument("--steps", type=int, default=30, help="timed training steps (default 30)")
    p.add_argument("--infer-batch", type=int, default=1000, help="inference batch (default 1000)")
    p.add_argument("--infer-steps", type=int, default=20, help="timed inference calls (default 20)")
    p.add_argument("--impls", default="conv,toeplitz,shift", help="formulations to time")
    p.add_argument("--json", help="also write all rows to this JSON file")
    args = p.parse_args(argv)

    base = PRESETS["paper"]
    grid = (base.grid_size, base.grid_size)
    device = jax.devices()[0]
    header = {
        "backend": jax.default_backend(),
        "device": getattr(device, "device_kind", str(device)),
        "jax": jax.__version__,
        "auto_picks": resolve_depthwise_impl("auto", grid),
        "batch": args.batch,
        "steps": args.steps,
        "infer_batch": args.infer_batch,
    }
    print(json.dumps(header), flush=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, (args.batch,)).astype(np.int32)
    x_infer = jnp.asarray(rng.random((args.infer_batch, 32, 32, 3), dtype=np.float32))
    variables = init_variables(base, 0)
    recipe = dataclasses.replace(RECIPES["fast"], batch_size=args.batch)
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    data_sh, repl = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    rows, ref_logits = [], None
    for impl in [s.strip() for s in args.impls.split(",") if s.strip()]:
        config = dataclasses.replace(base, depthwise_impl=impl)
        tx = make_optimizer(recipe, 50_000 // args.batch)
        step_fn = make_step(config, recipe, tx, data_sh, repl)
        state = jax.device_put(initial_state(recipe, tx, variables), repl)
        xb, yb = jax.device_put(images, data_sh), jax.device_put(labels, data_sh)
        t0 = time.perf_counter()
        state, loss, _ = step_fn(state, xb, yb)
        jax.block_until_ready(loss)
        compile_s = time.perf_counter() - t0
        for _ in range(3):
            state, loss, _ = step_fn(state, xb, yb)
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, loss, _ = step_fn(state, xb, yb)
        jax.block_until_ready(state)
        step_s = (time.perf_counter() - t0) / args.steps

        model = ConvMixer(config)
        infer = jax.jit(functools.partial(model.apply, train=False))
        v = (
            prepare_inference(config, variables)
            if impl == "toeplitz"
            else jax.device_put(variables)
        )
        logits = np.asarray(jax.block_until_ready(infer(v, x_infer)))
        t0 = time.perf_counter()
        for _ in range(args.infer_steps):
            out = infer(v, x_infer)
        jax.block_until_ready(out)
        infer_s = (time.perf_counter() - t0) / args.infer_steps
        if ref_logits is None:
            ref_logits = logits
        row = {
            "impl": impl,
            "train_compile_s": compile_s,
            "train_step_ms": 1e3 * step_s,
            "train_images_per_s": args.batch / step_s,
            "infer_images_per_s": args.infer_batch / infer_s,
            "max_abs_logit_diff_vs_first": float(np.max(np.abs(logits - ref_logits))),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({**header, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
