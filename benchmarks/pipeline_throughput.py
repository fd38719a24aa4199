"""Training img/s through the data pipeline, side by side: arrays in memory, the mapped
decoded cache, and the image tree decoded batch by batch.

    python benchmarks/pipeline_throughput.py                        # 5,000 CIFAR-10 images
    python benchmarks/pipeline_throughput.py --limit-train 1280 --rounds 1 --preset paper

Trains a model (``--preset``, default the paper's ConvMixer-256/8) with
``convmixer_jax.training.loop.train`` for 2 epochs of the ``paper`` recipe (batch 128, no
hold-out, no EMA, no per-epoch evaluation, progress off, a temporary workdir) on the same
``--limit-train`` training images of a class-folder JPEG tree (``--data-dir``), read three
ways:

- (a) ``memory``: ``load_split``, the split decoded into NumPy arrays in memory (then the
  subset's rows copied out), as training read before it streamed;
- (b) ``cache``: ``open_split(..., cache=True)``, the decoded tree mapped from its
  ``.npy`` cache file, the subset a view;
- (c) ``decode``: ``open_split(..., cache=False)``, every batch's JPEGs decoded when the
  batch is read (threads; ``--workers`` for processes).

Each round runs (a), (b), (c) in turn (``--rounds`` rounds). A run's first epoch includes
compiling the step, so the img/s of a run is its second epoch's (the training log's
``images_per_second``: the epoch's steps, reading included, without the checkpoint
written after it); the median over rounds is printed with the ratios b/a and c/a, then one
JSON line with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from convmixer_jax import apply_cpu_flags  # noqa: E402

WAYS = ("memory", "cache", "decode")


def open_ways(data_dir: str, limit: int, seed: int) -> dict:
    """The three ways' (images, labels) of the same ``limit`` training rows."""
    from convmixer_jax.data import load_split, open_split, subset_indices

    cached = open_split("train", data_dir=data_dir, cache=True, progress=True)
    rows = subset_indices(len(cached), limit, seed)
    rows = np.arange(len(cached)) if rows is None else rows
    decoded = open_split("train", data_dir=data_dir, cache=False, progress=False)
    images, labels, _ = load_split("train", data_dir=data_dir, progress=False)
    ways = {
        "memory": (np.ascontiguousarray(images[rows]), labels[rows]),
        "cache": (cached.images.take(rows), cached.labels[rows]),
        "decode": (decoded.images.take(rows), decoded.labels[rows]),
    }
    del images
    first = np.asarray(ways["memory"][0][:8])
    for way in ("cache", "decode"):  # the same pixels every way
        if not np.array_equal(np.asarray(ways[way][0][:8]), first):
            raise SystemExit(f"the {way} rows differ from the in-memory rows")
    return ways


def time_run(config, recipe, data, workers: int) -> dict:
    """One 2-epoch training run: each epoch's img/s from the training log."""
    from convmixer_jax.training.loop import train

    with tempfile.TemporaryDirectory(prefix="pipeline-throughput-") as work:
        start = time.perf_counter()
        _, history = train(
            config,
            recipe,
            data,
            None,
            work,
            progress=False,
            log=lambda message: None,
            checkpoint_seconds=None,
            workers=workers,
        )
        wall = time.perf_counter() - start
    per_epoch = [e["images_per_second"] for e in history["epochs"]]
    return {"img_per_s": per_epoch[-1], "epochs_img_per_s": per_epoch, "wall_s": wall}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="../shared/data/cifar10-jpeg")
    p.add_argument("--limit-train", type=int, default=5000, metavar="N")
    p.add_argument("--preset", default="paper", help="model preset (default paper)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=0, help="worker processes for (c)")
    p.add_argument("--seed", type=int, default=0, help="the subset's seed")
    args = p.parse_args(argv)
    apply_cpu_flags()
    import dataclasses

    from convmixer_jax.model.convmixer import PRESETS
    from convmixer_jax.training.recipes import RECIPES

    config = dataclasses.replace(PRESETS[args.preset], num_classes=10)
    recipe = dataclasses.replace(
        RECIPES["paper"], epochs=2, batch_size=args.batch_size, holdout=0, ema_decay=0.0
    )
    t0 = time.perf_counter()
    ways = open_ways(args.data_dir, args.limit_train, args.seed)
    opened = time.perf_counter() - t0
    print(f"opened {args.limit_train:,} training images three ways in {opened:.1f} s")
    runs: dict[str, list] = {w: [] for w in WAYS}
    for r in range(args.rounds):
        for way in WAYS:
            run = time_run(config, recipe, ways[way], args.workers if way == "decode" else 0)
            runs[way].append(run)
            print(
                f"round {r + 1} {way:>6}: {run['img_per_s']:7.1f} img/s (second epoch; "
                f"first {run['epochs_img_per_s'][0]:.1f}, with compilation), "
                f"{run['wall_s']:.0f} s",
                flush=True,
            )
    median = {w: statistics.median(x["img_per_s"] for x in runs[w]) for w in WAYS}
    b_a, c_a = median["cache"] / median["memory"], median["decode"] / median["memory"]
    print(
        f"median img/s: (a) memory {median['memory']:.1f}, (b) cache {median['cache']:.1f}, "
        f"(c) decode {median['decode']:.1f}; b/a {b_a:.3f}, c/a {c_a:.3f}"
    )
    print(
        json.dumps(
            {
                "runs": runs,
                "median_img_per_s": median,
                "b_over_a": b_a,
                "c_over_a": c_a,
                "preset": args.preset,
                "images": args.limit_train,
                "batch_size": args.batch_size,
                "workers": args.workers,
                "rounds": args.rounds,
                "cpu_count": os.cpu_count(),
                "load_average": os.getloadavg(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
