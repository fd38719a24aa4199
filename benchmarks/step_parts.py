#!/usr/bin/env python
"""Where a training recipe's step spends its time: the step with one part removed at a time.

    python benchmarks/step_parts.py [--recipe strong] [--rounds 3] [--steps 5] [--json FILE]

Each case is the library's jitted training step (``training.loop.make_step``, the
shardings ``train`` uses, state donated) of the paper's ConvMixer-256/8 with the
recipe changed in one respect: without RandAugment, without any augmentation,
without the EMA, with Adam and no gradient clipping in place of the recipe's
optimizer, and at half the batch (each only where it changes something). Two more
rows time the on-device augmentation alone (``augment_batch``, for a recipe that
augments) and the per-epoch scoring of the validation split
(``model.inference.accuracy`` on ``holdout`` images, raw weights and, with an
EMA, the EMA weights as ``train`` does). The cases run in interleaved rounds in
one process, the order reversed every round; a row's time is the median over
rounds of the per-step median. Ratios between rows of one run are the result;
absolute times depend on what else holds the CPU.

Prints a Markdown section (and JSON with ``--json``); append it to
``benchmarks/RESULTS.md`` by hand or with ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import convmixer_jax  # noqa: E402

convmixer_jax.apply_cpu_flags()  # the XLA:CPU flag, as the command line applies it

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from machine import cores, cpu_model  # noqa: E402  (benchmarks/machine.py, beside this file)

from convmixer_jax.files.provenance import device_description  # noqa: E402
from convmixer_jax.model.convmixer import PRESETS  # noqa: E402
from convmixer_jax.model.inference import accuracy  # noqa: E402
from convmixer_jax.training.loop import (  # noqa: E402
    RECIPES,
    augment_batch,
    init_variables,
    initial_state,
    make_optimizer,
    make_step,
)


def variants(recipe) -> dict:
    """The recipe and its one-change variants that apply to it, by row name."""
    out = {"recipe as trained": recipe}
    if "randaugment" in recipe.augment:
        out["without RandAugment"] = dataclasses.replace(
            recipe, augment=tuple(a for a in recipe.augment if a != "randaugment")
        )
    if recipe.augment:
        out["without augmentation"] = dataclasses.replace(recipe, augment=())
    if recipe.ema_decay:
        out["without EMA"] = dataclasses.replace(recipe, ema_decay=0.0)
    if recipe.optimizer != "adam" or recipe.grad_clip:
        out["Adam, no clipping"] = dataclasses.replace(
            recipe, optimizer="adam", grad_clip=None, weight_decay=0.0
        )
    if recipe.batch_size % 2 == 0:
        out["half batch (per image)"] = dataclasses.replace(
            recipe, batch_size=recipe.batch_size // 2
        )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--recipe", default="strong", choices=sorted(RECIPES), help="recipe (default strong)"
    )
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument(
        "--steps", type=int, default=5, help="timed steps per case and round (default 5)"
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="a 16-wide, 1-deep model: a smoke run, not a measurement",
    )
    p.add_argument("--json", help="also write the numbers to this JSON file")
    p.add_argument("--out", help="append the Markdown section to this file")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        raise SystemExit("--rounds and --steps must be >= 1")

    config = PRESETS["paper"]
    if args.tiny:
        config = dataclasses.replace(config, dim=16, depth=1)
    recipe = RECIPES[args.recipe]
    cases = variants(recipe)
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    data_sh, repl = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    variables = init_variables(config, seed=0)
    rng = np.random.default_rng(0)
    full = recipe.batch_size
    images = rng.integers(
        0, 256, (full, config.image_size, config.image_size, config.channels), dtype=np.uint8
    )
    labels = rng.integers(0, config.num_classes, full).astype(np.int32)

    steps_per_epoch = (50_000 - recipe.holdout) // full  # CIFAR-10's training split
    runners, first_call = {}, {}
    for name, cfg in cases.items():
        tx = make_optimizer(cfg, steps_per_epoch)
        step = make_step(config, cfg, tx, data_sh, repl)
        holder = {"state": jax.device_put(initial_state(cfg, tx, variables), repl)}
        xb = jax.device_put(images[: cfg.batch_size], data_sh)
        yb = jax.device_put(labels[: cfg.batch_size], data_sh)

        def run(step=step, holder=holder, xb=xb, yb=yb):
            st, loss, correct = step(holder["state"], xb, yb)
            jax.block_until_ready((st, loss, correct))
            holder["state"] = st

        t0 = time.perf_counter()
        run()
        first_call[name] = time.perf_counter() - t0
        runners[name] = (run, cfg.batch_size)
        print(f"compiled {name!r} in {first_call[name]:.1f} s", file=sys.stderr)

    if recipe.augment:
        aug = jax.jit(lambda r, x: augment_batch(r, x, recipe))
        xa = jax.device_put(images)
        jax.block_until_ready(aug(jax.random.PRNGKey(0), xa))
        runners["augment_batch alone"] = (
            lambda: jax.block_until_ready(aug(jax.random.PRNGKey(1), xa)),
            full,
        )

    times = {name: [] for name in runners}
    for r in range(args.rounds):
        order = list(runners) if r % 2 == 0 else list(reversed(runners))
        for name in order:
            fn, _ = runners[name]
            fn()  # one untimed call per round
            per = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                fn()
                per.append(time.perf_counter() - t0)
            times[name].append(statistics.median(per))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    val_rows = {}
    if recipe.holdout:
        vx = rng.integers(
            0,
            256,
            (recipe.holdout, config.image_size, config.image_size, config.channels),
            dtype=np.uint8,
        )
        vy = rng.integers(0, config.num_classes, recipe.holdout)
        accuracy(config, variables, vx[:500], vy[:500])  # compile
        per = []
        for _ in range(max(1, args.rounds)):
            t0 = time.perf_counter()
            accuracy(config, variables, vx, vy)
            per.append(time.perf_counter() - t0)
        scored = 2 if recipe.ema_decay else 1
        val_rows = {
            "images": recipe.holdout,
            "weight_sets": scored,
            "seconds_per_epoch": statistics.median(per) * scored,
        }

    base = statistics.median(times["recipe as trained"])
    rows = []
    for name, (_, batch) in runners.items():
        t = statistics.median(times[name])
        per_image = t / batch
        rows.append(
            {
                "case": name,
                "batch": batch,
                "ms_per_call": 1e3 * t,
                "images_per_second": batch / t,
                "per_image_vs_recipe": per_image / (base / full),
                "rounds_ms": [round(1e3 * x, 1) for x in times[name]],
                "first_call_s": first_call.get(name),
            }
        )
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": (
            device_description()
            if jax.default_backend() != "cpu"
            else f"{cpu_model()}, {cores()} cores"
        ),
        "command": "python benchmarks/step_parts.py "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        "recipe": args.recipe,
        "model": f"ConvMixer-{config.dim}/{config.depth}",
        "rows": rows,
        "validation": val_rows,
        "train_seconds_per_epoch": steps_per_epoch * base,
        "jax": jax.__version__,
    }
    md = markdown(info, args)
    print(md)
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=1) + "\n")
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + md)
    return 0


def markdown(info: dict, args) -> str:
    lines = [
        f"## {info['date']}: the `{info['recipe']}` recipe's training step, part by part, "
        f"{info['device']}",
        "",
        f"`{info['command']}` ({info['model']}; {args.rounds} interleaved rounds of {args.steps} "
        "timed steps per case, order reversed every round; median over rounds of the per-step "
        "median)." + (" *Tiny model: a smoke run, not a measurement.*" if args.tiny else ""),
        "",
        "| case | batch | ms per call | images/s | time per image vs the recipe | ms per round |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in info["rows"]:
        lines.append(
            f"| {r['case']} | {r['batch']} | {r['ms_per_call']:.1f} | {r['images_per_second']:.1f} "
            "| "
            f"{r['per_image_vs_recipe']:.3f} | {', '.join(str(x) for x in r['rounds_ms'])} |"
        )
    v = info["validation"]
    if v:
        lines += [
            "",
            f"Scoring the {v['images']:,} validation images with {v['weight_sets']} set(s) of "
            f"weights takes {v['seconds_per_epoch']:.1f} s per epoch, against "
            f"{info['train_seconds_per_epoch']:.0f} s of training steps "
            f"({100 * v['seconds_per_epoch'] / info['train_seconds_per_epoch']:.1f} %).",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
