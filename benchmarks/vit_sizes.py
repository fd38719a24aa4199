"""Training speed of candidate CIFAR-size ViTs (4 x 4 patches on 32 x 32 RGB).

Times the package's training step (``training.step.make_train_step`` with AdamW and the
one-hot cross-entropy, no augmentation) on random uint8-range images, after one warm-up
step, for each architecture given as ``DIM,DEPTH,HEADS,MLP_RATIO`` (default: the
``vit_cifar`` preset and three neighbours). Prints one JSON line per architecture: its
parameter count, images per second and the minutes one 45,000-image epoch would take.

    python benchmarks/vit_sizes.py [--batch 128] [--steps 6] [192,7,3,2 ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "archs", nargs="*", default=["192,7,3,2", "192,6,3,4", "256,6,4,2", "128,8,4,2"]
    )
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args(argv)

    import convmixer_jax

    convmixer_jax.apply_cpu_flags()
    import jax
    import jax.numpy as jnp
    import optax
    from machine import cores, cpu_model, loadavg

    from convmixer_jax.model.build import build_model, init_variables
    from convmixer_jax.model.config import ViTConfig
    from convmixer_jax.training.step import make_train_step, one_hot_cross_entropy

    print(
        json.dumps(
            {
                "cpu": cpu_model(),
                "cores": cores(),
                "loadavg": loadavg(),
                "python": platform.python_version(),
                "jax": jax.__version__,
                "batch": args.batch,
                "steps": args.steps,
            }
        )
    )
    rng = jax.random.PRNGKey(0)
    for spec in args.archs:
        dim, depth, heads, ratio = spec.split(",")
        cfg = ViTConfig(
            dim=int(dim),
            depth=int(depth),
            num_heads=int(heads),
            mlp_ratio=float(ratio),
            patch_size=4,
            num_classes=10,
            image_size=32,
            class_token=False,
            global_pool="avg",
        )
        params = init_variables(cfg, 0)["params"]
        step = make_train_step(
            build_model(cfg), optax.adamw(1e-3), one_hot_cross_entropy(10), batch_norm=None
        )
        state = {"params": params, "opt_state": step.init_opt_state(params)}
        x = jax.random.uniform(rng, (args.batch, 32, 32, 3))
        y = jnp.arange(args.batch, dtype=jnp.int32) % 10
        state, *_ = step(state, x, y)
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, *_ = step(state, x, y)
        jax.block_until_ready(state)
        rate = args.batch * args.steps / (time.perf_counter() - t0)
        n = sum(p.size for p in jax.tree.leaves(params))
        print(
            json.dumps(
                {
                    "arch": spec,
                    "params": int(n),
                    "images_per_second": round(rate, 1),
                    "minutes_per_45k_epoch": round(45000 / rate / 60, 1),
                }
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
