#!/usr/bin/env python
"""Wrong-key sweep throughput and peak memory (issue 4, items 3 and 4).

    python benchmarks/sweep.py [--images 10000] [--num-keys 10,100] [--loop-keys 4]
                               [--key-chunk 8] [--batch-size 250] [--model results/cifar10/plain-model]
                               [--data-dir ../shared/data/cifar10-jpeg] [--out benchmarks/RESULTS.md]

Measures on the current machine, each case in a fresh subprocess so that its
peak resident memory (``ru_maxrss``) is its own:

- single-key inference: images/s of the model on plain test images;
- the sweep, strategies ``images`` and ``weights`` (``convmixer_jax.attack``,
  vmapped over key chunks, key axis sharded over all devices), for each N in
  ``--num-keys``: key-image pairs/s and peak RSS;
- a Python loop of per-key jitted calls (``wrong_key_accuracies_loop``) over
  ``--loop-keys`` keys: key-image pairs/s.

Appends a dated section to ``--out``. Without ``--model`` (or when it does not
exist) a randomly initialized paper model is timed (throughput does not depend
on the weights); without the data directory, random uint8 images are used.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _case(args) -> dict:
    """Run one case in this process and return its numbers (called in a subprocess)."""
    sys.path.insert(0, str(ROOT))
    import convmixer_jax  # noqa: F401
    import jax
    import numpy as np

    from convmixer_jax.attack import draw_attack_keys, wrong_key_accuracies, wrong_key_accuracies_loop
    from convmixer_jax.evaluate import accuracy
    from convmixer_jax.keys import generate_key
    from convmixer_jax.model import PRESETS
    from convmixer_jax.model_encryption import encrypt_params
    from convmixer_jax.train import init_variables

    if args.model and Path(args.model).exists():
        from convmixer_jax.model_io import load_model

        config, variables, _ = load_model(args.model)
    else:
        config, variables = PRESETS["paper"], init_variables(PRESETS["paper"], 0)
    if args.data_dir and Path(args.data_dir).exists():
        from convmixer_jax.data import load_split, subset

        images, labels, _ = load_split("test", data_dir=args.data_dir)
        images, labels = subset(images, labels, args.images, 0)
    else:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (args.images, config.image_size, config.image_size, config.channels),
                              dtype=np.uint8)
        labels = rng.integers(0, config.num_classes, args.images)
    enc = encrypt_params(variables, generate_key(config.patch_size, config.channels, seed=[1, 2]),
                         mean=config.mean, std=config.std)
    n = len(images)
    if args.case == "single":
        accuracy(config, enc, images[: args.batch_size], labels[: args.batch_size], batch_size=args.batch_size)
        t0 = time.perf_counter()
        accuracy(config, enc, images, labels, batch_size=args.batch_size)
        sec = time.perf_counter() - t0
        rate = n / sec
    else:
        keys = draw_attack_keys(3, args.n, config.patch_size, config.channels)
        warm = draw_attack_keys(4, 1, config.patch_size, config.channels)
        if args.case == "loop":
            wrong_key_accuracies_loop(config, enc, images[: args.batch_size], labels[: args.batch_size], warm,
                                      batch_size=args.batch_size)
            t0 = time.perf_counter()
            wrong_key_accuracies_loop(config, enc, images, labels, keys, batch_size=args.batch_size)
        else:
            wrong_key_accuracies(config, enc, images[: args.batch_size], labels[: args.batch_size], warm,
                                 strategy=args.case, key_chunk=args.key_chunk, batch_size=args.batch_size)
            t0 = time.perf_counter()
            wrong_key_accuracies(config, enc, images, labels, keys, strategy=args.case,
                                 key_chunk=args.key_chunk, batch_size=args.batch_size)
        sec = time.perf_counter() - t0
        rate = n * args.n / sec
    return {"case": args.case, "keys": args.n, "images": n, "seconds": sec, "rate": rate,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "devices": [str(d) for d in jax.devices()]}


def run_case(args, case: str, n: int) -> dict:
    cmd = [sys.executable, __file__, "--_case", case, "--_n", str(n), "--images", str(args.images),
           "--key-chunk", str(args.key_chunk), "--batch-size", str(args.batch_size)]
    if args.model:
        cmd += ["--model", args.model]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    print(f"[sweep] {case} N={n} ...", file=sys.stderr, flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def section(args, rows: list[dict]) -> str:
    import platform

    single = next(r for r in rows if r["case"] == "single")
    lines = [f"## {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC: wrong-key sweep, "
             f"{platform.processor() or platform.machine()}, devices {single['devices']}", "",
             f"- Command: `{shlex.join([sys.executable] + sys.argv)}`",
             f"- Model: {args.model if args.model and Path(args.model).exists() else 'random paper preset'}; "
             f"{single['images']:,} test images; key chunk {args.key_chunk}, batch {args.batch_size}", "",
             "| case | keys | key-image pairs/s (images/s for single key) | vs single-key inference | peak RSS MiB |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['keys']} | {r['rate']:.1f} | {r['rate'] / single['rate']:.2f} | "
                     f"{r['peak_rss_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--num-keys", default="10,100")
    p.add_argument("--loop-keys", type=int, default=4)
    p.add_argument("--key-chunk", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--model", default=str(ROOT / "results/cifar10/plain-model"))
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared/data/cifar10-jpeg"))
    p.add_argument("--out", default=str(HERE / "RESULTS.md"))
    p.add_argument("--_case", help=argparse.SUPPRESS)
    p.add_argument("--_n", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._case:
        args.case, args.n = args._case, args._n
        print(json.dumps(_case(args)))
        return 0
    rows = [run_case(args, "single", 1)]
    for n in (int(v) for v in args.num_keys.split(",")):
        for strategy in ("images", "weights"):
            rows.append(run_case(args, strategy, n))
    rows.append(run_case(args, "loop", args.loop_keys))
    text = section(args, rows)
    with open(args.out, "a") as f:
        f.write("\n" + text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
