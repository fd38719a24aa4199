"""What the JPEG trace (convmixer_jax.attacks.jpeg_trace) adds to the colour prior when
the ciphertext-only attack picks the channel order and sign of decrypted images.

Each held-out CIFAR-10 training image (45,000 onwards; the shipped prior was trained on
0..44,999) gets a random one of the 12 colour variants; sets of k = 1, 2 and 5 images
share one variant, as the images of one key do. Scored per set: the 12-way accuracy of
the prior alone (``image_prior.group_log_probs``, summed over the set), of the trace
alone (``jpeg_trace.jpeg_log_evidence``, which fixes the channel order but, at the data
set's quality 75, not the sign) and of the two added up, as the attack adds them. The
same again after every image is resampled (bicubic up to 64 x 64 and back with an
antialiased filter), which wipes the trace; there the sum must equal the prior::

    python benchmarks/jpeg_trace_accuracy.py --data-dir ../shared/data/cifar10-jpeg \
        [--images 1000] [--out results/security/jpeg_trace.json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def score_sets(images: np.ndarray, truth: np.ndarray, k: int, prior) -> dict:
    """images: (S*k, H, W, 3) uint8 with the variant truth[s] applied to set s -> accuracies."""
    from convmixer_jax.attacks.image_prior import COLOUR_VARIANTS, group_log_probs
    from convmixer_jax.attacks.jpeg_trace import jpeg_log_evidence

    lp = group_log_probs(prior, images).reshape(len(truth), k, -1).sum(1)
    t0 = time.perf_counter()
    ev = np.stack(
        [jpeg_log_evidence(images[s * k : (s + 1) * k], COLOUR_VARIANTS) for s in range(len(truth))]
    )
    seconds = (time.perf_counter() - t0) / len(truth)
    # every variant's channel-order id: the index of the variant with its channel order, unnegated
    orders = np.array([COLOUR_VARIANTS.index((False, o)) for _, o in COLOUR_VARIANTS])
    trace = np.ptp(ev, axis=1) > 1e-6
    return {
        "sets": int(len(truth)),
        "images_per_set": k,
        "prior_12way": float(np.mean(lp.argmax(1) == truth)),
        "trace_order": float(np.mean(orders[ev.argmax(1)] == orders[truth])),
        "with_trace_12way": float(np.mean((lp + ev).argmax(1) == truth)),
        "trace_present": float(np.mean(trace)),
        "trace_seconds_per_set": seconds,
    }


def resample(images: np.ndarray) -> np.ndarray:
    """Bicubic to twice the size, then back with an antialiased filter (no 8 x 8 lattice left)."""
    from convmixer_jax.attacks.ciphertext_only import match_scale

    n, h, w, _ = images.shape
    return match_scale(match_scale(images, 2 * h, 2 * w), h, w)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default="../shared/data/cifar10-jpeg")
    ap.add_argument(
        "--images", type=int, default=1000, help="held-out images per set size (default 1000)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the results here as JSON")
    args = ap.parse_args()

    from convmixer_jax import apply_cpu_flags

    apply_cpu_flags()  # the XLA:CPU flag a user of the command line gets, before JAX starts
    from convmixer_jax.attacks.ciphertext_only import default_prior
    from convmixer_jax.attacks.image_prior import COLOUR_VARIANTS, apply_variant
    from convmixer_jax.data.loader import load_split

    train, _, _ = load_split("train", data_dir=args.data_dir, progress=False)
    held = np.asarray(train)[45000:]
    prior = default_prior(3)
    rng = np.random.default_rng(args.seed)
    out = {
        "held_out": "CIFAR-10 (JPEG copy) training images 45,000..49,999",
        "seed": args.seed,
        "rows": [],
    }
    for k in (1, 2, 5):
        sets = args.images // k
        idx = rng.choice(len(held), sets * k, replace=False)
        truth = rng.integers(0, len(COLOUR_VARIANTS), sets)
        for source, imgs in (("as decoded", held[idx]), ("resampled", resample(held[idx]))):
            x = np.concatenate(
                [
                    apply_variant(imgs[s * k : (s + 1) * k], COLOUR_VARIANTS[t])
                    for s, t in enumerate(truth)
                ]
            )
            row = {"images": source, **score_sets(x, truth, k, prior)}
            print(json.dumps(row), flush=True)
            out["rows"].append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
