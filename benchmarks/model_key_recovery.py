#!/usr/bin/env python
"""Key recovery from an encrypted model given the original weights (docs/security.md).

    python benchmarks/model_key_recovery.py [--model results/cifar10/plain-model]
        [--data-dir ../shared/data/cifar10-jpeg] [--keys 20] [--images 1000] [--out results/security/model_key_recovery.json]

For each of ``--keys`` secret keys (OS CSPRNG), encrypts the model, recovers the
key by matching the encrypted patch-embedding rows to the original ones, and
measures the fraction of the key recovered and the accuracy of the encrypted
model on test images encrypted with the recovered key (vs the plain baseline).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import convmixer_jax  # noqa: E402,F401
import numpy as np  # noqa: E402

from convmixer_jax.scheme.images import encrypt_images  # noqa: E402
from convmixer_jax.data import load_split, subset  # noqa: E402
from convmixer_jax.model.inference import accuracy  # noqa: E402
from convmixer_jax.scheme.keys import generate_key  # noqa: E402
from convmixer_jax.scheme.params import encrypt_params  # noqa: E402
from convmixer_jax.files.model_dir import load_model  # noqa: E402
from convmixer_jax.attacks.from_weights import recover_key_with_reference  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "results/cifar10/plain-model"))
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared/data/cifar10-jpeg"))
    p.add_argument("--keys", type=int, default=20)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--out", default=str(ROOT / "results/security/model_key_recovery.json"))
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    config, variables, meta = load_model(args.model)
    images, labels, _ = load_split("test", data_dir=args.data_dir)
    images, labels = subset(images, labels, args.images, 0)
    baseline = accuracy(config, variables, images, labels)
    rows = []
    for i in range(args.keys):
        key = generate_key(config.patch_size, config.channels)
        enc = encrypt_params(variables, key, mean=config.mean, std=config.std)
        rec = recover_key_with_reference(enc["params"]["stem"]["kernel"], variables["params"]["stem"]["kernel"])
        acc = None
        if rec.key is not None:
            acc = accuracy(config, enc, np.asarray(encrypt_images(images, rec.key)), labels)
        rows.append({"fraction_recovered": rec.fraction_correct(key), "valid_key": rec.key is not None,
                     "accuracy_with_recovered_key": acc, "min_abs_cosine": float(rec.similarity.min())})
        print(f"key {i + 1}/{args.keys}: {rows[-1]}", file=sys.stderr)
    out = {"experiment": "key recovery from the encrypted model with the original weights as reference",
           "command": shlex.join([sys.executable] + sys.argv), "model": args.model,
           "model_epochs": meta.get("epochs"), "model_epochs_planned": meta.get("epochs_planned"),
           "test_images": int(len(images)), "baseline_plain": baseline, "keys": rows,
           "mean_fraction_recovered": float(np.mean([r["fraction_recovered"] for r in rows])),
           "seconds": time.perf_counter() - t0}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out[k] for k in ("baseline_plain", "mean_fraction_recovered", "test_images")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
