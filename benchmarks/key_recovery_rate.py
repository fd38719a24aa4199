#!/usr/bin/env python
"""How often known plain/encrypted pairs of real CIFAR-10 images reveal the whole key.

    python benchmarks/key_recovery_rate.py [--data-dir ../shared/data/cifar10-jpeg]
        [--trials 200] [--pairs 1 2 4] [--seed 0] [--out results/security/key_recovery.json]

For each number of pairs n and each of T trials: draw a random key (M = 4, C = 3, seeded
from --seed), draw n distinct random test images, encrypt them with the library
(``blockwise.encrypt_images``) and run :func:`convmixer_jax.attacks.known_plaintext.recover_key` on
the plain/encrypted pairs. Reports, per n, the fraction of trials in which exactly the
key used was recovered, the mean (and maximum) number of the 48 positions left
undetermined, and how many trials were inconsistent (should be none). Writes JSON with
the command line, seed and per-trial counts, and prints a small table.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # measure this checkout, installed or not

from convmixer_jax.scheme import images as blockwise, keys  # noqa: E402
from convmixer_jax.data import load_split  # noqa: E402
from convmixer_jax.attacks.known_plaintext import recover_key  # noqa: E402

M, C = 4, 3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg"),
                    help="local CIFAR-10 (default ../shared/data/cifar10-jpeg from the repository root)")
    ap.add_argument("--trials", type=int, default=200, help="trials per number of pairs (default 200)")
    ap.add_argument("--pairs", type=int, nargs="+", default=[1, 2, 4], help="numbers of pairs (default 1 2 4)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the keys and image draws (default 0)")
    ap.add_argument("--out", default=str(ROOT / "results" / "security" / "key_recovery.json"),
                    help="JSON to write (default results/security/key_recovery.json)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    images, _, _ = load_split("test", data_dir=args.data_dir)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(args.seed)
    pb = M * M * C
    rows = []
    t1 = time.perf_counter()
    for n in args.pairs:
        undetermined, exact, inconsistent, gray = [], 0, 0, 0
        for _ in range(args.trials):
            key = keys.make_key(rng.permutation(pb), rng.permutation(np.repeat([0, 1], pb // 2)), M, C)
            x = images[rng.choice(len(images), n, replace=False)]
            z = np.asarray(blockwise.encrypt_images(x, key))
            r = recover_key(x, z, M)
            inconsistent += not r.consistent
            undetermined.append(r.undetermined)
            gray += bool((x[..., 0] == x[..., 1]).all() and (x[..., 1] == x[..., 2]).all())
            if r.key is not None and np.array_equal(r.key.perm, key.perm) and np.array_equal(r.key.flip, key.flip):
                exact += 1
        u = np.asarray(undetermined)
        rows.append({"pairs": n, "trials": args.trials, "exact_key_rate": exact / args.trials,
                     "mean_undetermined": float(u.mean()), "max_undetermined": int(u.max()),
                     "trials_with_undetermined": int((u > 0).sum()), "inconsistent_trials": inconsistent,
                     "all_gray_trials": gray,
                     "undetermined_histogram": {str(int(v)): int((u == v).sum()) for v in np.unique(u)}})
    run_s = time.perf_counter() - t1

    result = {
        "experiment": "known-plaintext key recovery from plain/encrypted CIFAR-10 test image pairs",
        "command": shlex.join(["python", *(sys.argv if argv is None else ["benchmarks/key_recovery_rate.py", *argv])]),
        "seed": args.seed, "block_size": M, "channels": C, "positions": pb,
        "data": {"dir": args.data_dir, "split": "test", "images": int(len(images)),
                 "note": "CIFAR-10 (JPEG copy)"},
        "key_source": "numpy default_rng(seed) permutations (experiment only)",
        "encryption": "convmixer_jax.scheme.images.encrypt_images",
        "results": rows, "seconds": {"load": round(load_s, 2), "trials": round(run_s, 2)},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"key recovery on CIFAR-10 test pairs (M = {M}, C = {C}, pb = {pb}, seed {args.seed})")
    print(f"{'pairs':>5} {'trials':>6} {'exact key':>9} {'mean undet.':>11} {'max undet.':>10} {'inconsistent':>12}")
    for r in rows:
        print(f"{r['pairs']:>5} {r['trials']:>6} {r['exact_key_rate']:>9.3f} {r['mean_undetermined']:>11.3f} "
              f"{r['max_undetermined']:>10} {r['inconsistent_trials']:>12}")
    print(f"-> {out} ({run_s:.1f} s for the trials)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
