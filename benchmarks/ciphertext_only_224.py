"""Ciphertext-only key recovery at M = 7 on 224 x 224 images (pb = 147, odd): CIFAR-10 test
images upsampled with ``match_scale``, the template from 40 upsampled training images (the
last 40, never the test images), the shipped colour prior.

    python benchmarks/ciphertext_only_224.py --ns 1 2 5 10 100 --keys 2 \\
        --out results/security/ciphertext_only_224.json

Keys come from the OS CSPRNG unless ``--seed`` is given; only their fingerprints are written.
Per N: exact keys (the most likely key is the key), keys right up to the channel order,
keys the attack claims, claims that are wrong, positions right and seconds per attack.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default="../shared/data/cifar10-jpeg")
    ap.add_argument(
        "--ns", type=int, nargs="+", default=[1, 2, 5, 10, 100], help="encrypted images per attack"
    )
    ap.add_argument("--keys", type=int, default=2, help="secret keys per N")
    ap.add_argument("--starts", type=int, default=12, help="layout-search starts")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--block-size", type=int, default=7)
    ap.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seeded keys and images (default: keys from the OS CSPRNG)",
    )
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)

    from convmixer_jax import apply_cpu_flags

    apply_cpu_flags()  # the XLA:CPU flag a user of the command line gets, before JAX starts
    from convmixer_jax.attacks.ciphertext_only import (
        block_template,
        colour_key,
        default_prior,
        match_scale,
        recover_key_ciphertext_only,
    )
    from convmixer_jax.attacks.image_prior import colour_variants
    from convmixer_jax.data.loader import load_split
    from convmixer_jax.files.provenance import device_description
    from convmixer_jax.scheme.images import encrypt_images_reference
    from convmixer_jax.scheme.keys import fingerprint, generate_key

    m, size = args.block_size, args.size
    tr, _, _ = load_split("train", data_dir=args.data_dir, progress=False)
    te, _, _ = load_split("test", data_dir=args.data_dir, progress=False)
    t0 = time.perf_counter()
    template = block_template(match_scale(tr[-40:], size, size), m)
    template_s = time.perf_counter() - t0
    prior = default_prior(3)
    rng = np.random.default_rng(args.seed)
    rows = []
    for n in args.ns:
        trials = []
        for t in range(args.keys):
            key = generate_key(m, 3, seed=None if args.seed is None else int(rng.integers(2**31)))
            idx = rng.choice(len(te), n, replace=False)
            enc = encrypt_images_reference(match_scale(te[idx], size, size), key)
            r = recover_key_ciphertext_only(enc, m, template, prior=prior, starts=args.starts)
            g = r.best_guess
            exact = bool(np.array_equal(g.perm, key.perm) and np.array_equal(g.flip, key.flip))
            layout = any(
                np.array_equal(colour_key(g, v).perm, key.perm) for v in colour_variants(3)
            )
            right = float(
                np.mean(
                    (np.asarray(g.perm) == np.asarray(key.perm))
                    & (np.asarray(g.flip) == np.asarray(key.flip))
                )
            )
            trials.append(
                {
                    "key_fingerprint": fingerprint(key),
                    "exact": exact,
                    "layout_up_to_colour": layout,
                    "claimed": r.determined,
                    "positions_right": right,
                    "seconds": r.seconds,
                    "layout_margin": r.layout_margin,
                    "colour_margin": r.colour_margin,
                    "reason": r.reason,
                }
            )
            print(
                n, t, exact, layout, r.determined, f"{r.seconds:.0f} s", r.reason[:80], flush=True
            )
        rows.append(
            {
                "images": n,
                "keys": len(trials),
                "exact": sum(x["exact"] for x in trials),
                "layout_up_to_colour": sum(x["layout_up_to_colour"] for x in trials),
                "claimed": sum(x["claimed"] for x in trials),
                "claimed_wrong": sum(x["claimed"] and not x["exact"] for x in trials),
                "positions_right": float(np.mean([x["positions_right"] for x in trials])),
                "seconds_per_attack": float(np.mean([x["seconds"] for x in trials])),
                "trials": trials,
            }
        )
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "trials"}), flush=True)
    res = {
        "size": size,
        "block_size": m,
        "pb": m * m * 3,
        "starts": args.starts,
        "template_images": 40,
        "template_seconds": template_s,
        "device": device_description(),
        "key_source": "os-csprng" if args.seed is None else "seed",
        "rows": rows,
    }
    if args.out:
        from convmixer_jax.files.atomic import write_json_atomic

        write_json_atomic(args.out, res)
    return res


if __name__ == "__main__":
    main()
