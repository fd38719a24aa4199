"""How well the learned colour-variant prior (convmixer_jax.attacks.image_prior) tells
the 12 RGB variants (6 channel orders x 2 signs) apart on held-out CIFAR-10 images.

Trains on CIFAR-10 training images 0..44,999 and scores every variant of images
45,000..49,999::

    python benchmarks/image_prior_accuracy.py --data-dir ../shared/data/cifar10-jpeg \
        [--steps N] [--out FILE.json] [--prior DIR]

Printed (and written to --out as JSON): the training seconds; the 12-way accuracy per
image; the sign alone and the channel order alone (each from the prior's marginal);
the 12-way accuracy when the log-probs of k = 2 and 5 images under the same variant
are summed; the same under the group average the attack uses
(``image_prior.group_log_probs``, prefixed ``group_``), with how often its sign is
wrong when it leads by 3, 5 or 8 nats over 1, 2 or 5 images (``group_sign_margins``,
the calibration of the attack's colour margin); and the 12-way accuracy after each
variant image is JPEG re-encoded (quality 75, 4:2:0, as the data set's files), which
shows how much of the channel order is read from the source's own JPEG chroma
subsampling rather than the content.
"""

from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np


def marginal_accuracies(lp: np.ndarray, variants) -> dict:
    """lp: (V, N, V), lp[t, i] the log-probs of image i under true variant t -> accuracies."""
    v = len(variants)
    truth = np.arange(v)[:, None]
    negs = np.array([n for n, _ in variants])
    orders = sorted({o for _, o in variants})
    order_id = np.array([orders.index(o) for _, o in variants])
    p = np.exp(lp)
    p_neg = p[..., negs].sum(-1)
    p_order = np.stack([p[..., order_id == j].sum(-1) for j in range(len(orders))], -1)
    return {
        "acc12": float(np.mean(lp.argmax(-1) == truth)),
        "sign": float(np.mean((p_neg > 0.5) == negs[truth])),
        "order": float(np.mean(p_order.argmax(-1) == order_id[truth])),
    }


def summed_accuracy(lp: np.ndarray, k: int, seed: int = 0) -> float:
    """12-way accuracy of the summed log-probs of disjoint groups of k images under one variant."""
    v, n, _ = lp.shape
    groups = np.random.default_rng(seed).permutation(n)[: n // k * k].reshape(-1, k)
    hits = [np.mean(lp[t][groups].sum(1).argmax(-1) == t) for t in range(v)]
    return float(np.mean(hits))


def sign_margin_calibration(
    lp: np.ndarray, variants, ks=(1, 2, 5), thresholds=(3.0, 5.0, 8.0), seed: int = 0
) -> list[dict]:
    """How often the prior's sign is wrong when it leads by a margin, as the attack decides it.

    With the channel order known (the JPEG trace gives it), the attack's colour margin is
    the prior's sign margin: the summed log-prob of the true variant minus that of its
    negative, over a set of k images under one variant. lp: (V, N, V) as for
    :func:`marginal_accuracies`. For each k and threshold: the sets whose margin is at
    least the threshold in either direction (``decided``), and how many of those lean to
    the wrong sign (``wrong``).
    """
    from convmixer_jax.attacks.image_prior import variant_index

    v, n, _ = lp.shape
    neg = np.array([variant_index((not w[0], w[1]), variants) for w in variants])
    rows = []
    for k in ks:
        groups = np.random.default_rng(seed).permutation(n)[: n // k * k].reshape(-1, k)
        m = np.concatenate([(lp[t][:, t] - lp[t][:, neg[t]])[groups].sum(1) for t in range(v)])
        for th in thresholds:
            rows.append(
                {
                    "images": k,
                    "sets": int(m.size),
                    "threshold_nats": th,
                    "decided": int(np.sum(np.abs(m) >= th)),
                    "wrong": int(np.sum(m <= -th)),
                    "right_sign": float(np.mean(m > 0)),
                }
            )
    return rows


def jpeg_roundtrip(images_u8: np.ndarray, quality: int = 75) -> np.ndarray:
    """(N, H, W, 3) uint8 -> the same after JPEG encoding (4:2:0) and decoding with Pillow."""
    from PIL import Image

    out = np.empty_like(images_u8)
    for i, im in enumerate(images_u8):
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=quality, subsampling=2)
        out[i] = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default="../shared/data/cifar10-jpeg")
    ap.add_argument(
        "--steps", type=int, default=None, help="training steps (default: the library's)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--widths", default=None, help="conv stage widths, comma-separated (default: the library's)"
    )
    ap.add_argument("--convs-per-stage", type=int, default=None)
    ap.add_argument("--first-stride", type=int, default=None)
    ap.add_argument("--out", default=None, help="also write the numbers to this JSON file")
    ap.add_argument(
        "--save", default=None, metavar="DIR", help="also save the trained prior to DIR"
    )
    ap.add_argument(
        "--prior",
        default=None,
        metavar="DIR",
        help="score this saved prior (trained on images 0..44,999) instead of training one",
    )
    args = ap.parse_args(argv)

    import convmixer_jax

    convmixer_jax.apply_cpu_flags()  # the XLA:CPU flag, as the command line applies it
    from convmixer_jax.attacks import image_prior as ip
    from convmixer_jax.data.loader import load_split

    x, _, _ = load_split("train", data_dir=args.data_dir, progress=False)
    train, held = x[:45000], x[45000:50000]
    kw = (
        {}
        if args.steps is None
        else {"steps": args.steps or ip.train_image_prior.__kwdefaults__["steps"]}
    )
    arch = {
        k: v
        for k, v in (
            ("widths", args.widths and tuple(int(w) for w in args.widths.split(","))),
            ("convs_per_stage", args.convs_per_stage),
            ("first_stride", args.first_stride),
        )
        if v is not None
    }
    if arch:
        kw["config"] = ip.PriorConfig(**arch)
    t0 = time.perf_counter()
    if args.prior:
        prior = ip.load_image_prior(args.prior)
    else:
        prior = ip.train_image_prior(train, seed=args.seed, progress=True, **kw)
    train_s = None if args.prior else time.perf_counter() - t0
    if args.save:
        ip.save_image_prior(prior, args.save)

    held_f = held.astype(np.float32) / 255.0
    t0 = time.perf_counter()
    lp = np.stack(
        [ip.variant_log_probs(prior, ip.apply_variant(held_f, v)) for v in prior.variants]
    )
    score_s = time.perf_counter() - t0
    res = {
        "train_images": int(train.shape[0]),
        "held_out_images": int(held.shape[0]),
        "train_seconds": None if train_s is None else round(train_s, 1),
        "score_seconds_60k": round(score_s, 1),
        **marginal_accuracies(lp, prior.variants),
        "acc12_sum2": summed_accuracy(lp, 2),
        "acc12_sum5": summed_accuracy(lp, 5),
    }
    # averaged over each image's 12 variants and their mirrors, as the attack scores
    glp = np.stack([ip.group_log_probs(prior, ip.apply_variant(held_f, v)) for v in prior.variants])
    res.update({f"group_{k}": v for k, v in marginal_accuracies(glp, prior.variants).items()})
    res.update(group_acc12_sum2=summed_accuracy(glp, 2), group_acc12_sum5=summed_accuracy(glp, 5))
    res["group_sign_margins"] = sign_margin_calibration(glp, prior.variants)
    rej = np.stack(
        [
            ip.variant_log_probs(prior, jpeg_roundtrip(ip.apply_variant(held, v)))
            for v in prior.variants
        ]
    )
    res["acc12_rejpeg"] = marginal_accuracies(rej, prior.variants)["acc12"]
    res["order_rejpeg"] = marginal_accuracies(rej, prior.variants)["order"]
    res["settings"] = {
        "config": prior.config.to_dict(),
        "input_size": prior.input_size,
        "seed": args.seed,
        "steps": args.steps or ip.train_image_prior.__kwdefaults__["steps"],
    }
    if args.prior:
        res["settings"] = {
            "config": prior.config.to_dict(),
            "input_size": prior.input_size,
            "prior": args.prior,
        }
    print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
