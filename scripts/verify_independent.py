#!/usr/bin/env python
"""Check the committed CIFAR-10 results with code written from ../shared/docs/method.md,
without the library's keys, block transform, model encryption or JAX model.

    python scripts/verify_independent.py [--model results/cifar10/plain-model]
        [--data-dir ../shared/data/cifar10-jpeg] [--results results/cifar10/results.json]
        [--wrong-keys 10] [--seed N] [--out FILE.json]

What is independent here:
  - test images: decoded with Pillow straight from the class-subfolder JPEGs
    (labels = sorted folder names);
  - the key: ``numpy.random.default_rng`` permutation of the 48 block positions and a
    flip vector with exactly 24 ones (method.md, "Images");
  - image encryption: M x M blocks flattened in (row, column, channel) order,
    ``y[k] = x[perm[k]]``, then ``255 - y[k]`` where ``flip[k] == 1`` (uint8);
  - model encryption: the stem kernel as a (P*P*C, d) matrix with the same row order,
    ``E'[k] = E[perm[k]]``, negated where ``flip[k] == 1``;
  - the forward pass: PyTorch's ConvMixer (``benchmarks/torch_reference.py``, the
    locuslab definition with (x - 0.5) / 0.5 in front), float32 on CPU.
Only the stored weights are read with ``convmixer_jax.files.model_dir.load_model``.

Prints (and with --out writes) the accuracies and, with --results, their
differences from the committed ``results.json``. torch is a benchmark-only
dependency: ``pip install torch==2.14.1``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))


def load_test_images(data_dir: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from PIL import Image

    test = data_dir / "test"
    classes = sorted(p.name for p in test.iterdir() if p.is_dir())
    images, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted((test / name).iterdir()):
            with Image.open(f) as im:
                images.append(np.asarray(im.convert("RGB"), np.uint8))
            labels.append(label)
    return np.stack(images), np.asarray(labels), classes


def make_key(rng: np.random.Generator, m: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    pb = m * m * c
    perm = rng.permutation(pb)
    flip = np.zeros(pb, np.uint8)
    flip[rng.choice(pb, pb // 2, replace=False)] = 1
    return perm, flip


def encrypt_images(x: np.ndarray, perm: np.ndarray, flip: np.ndarray, m: int) -> np.ndarray:
    n, h, w, c = x.shape
    blocks = (
        x.reshape(n, h // m, m, w // m, m, c)
        .transpose(0, 1, 3, 2, 4, 5)
        .reshape(n, h // m, w // m, -1)
    )
    y = blocks[..., perm]
    y = np.where(flip.astype(bool), 255 - y, y).astype(np.uint8)
    return y.reshape(n, h // m, w // m, m, m, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, h, w, c)


def encrypt_stem(weight: np.ndarray, perm: np.ndarray, flip: np.ndarray) -> np.ndarray:
    """weight: torch layout (d, C, P, P) -> the encrypted weight, same layout."""
    d, c, p, _ = weight.shape
    e = weight.transpose(2, 3, 1, 0).reshape(p * p * c, d)  # row k = (i*P + j)*C + ch
    e2 = e[perm]
    e2 = np.where(flip.astype(bool)[:, None], -e2, e2)
    return e2.reshape(p, p, c, d).transpose(3, 2, 0, 1).copy()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "results/cifar10/plain-model"))
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared/data/cifar10-jpeg"))
    ap.add_argument(
        "--results",
        default=str(ROOT / "results/cifar10/results.json"),
        help="results.json to compare with ('' to skip)",
    )
    ap.add_argument("--wrong-keys", type=int, default=10)
    ap.add_argument("--seed", type=int, default=None, help="key seed (default: from the OS)")
    ap.add_argument("--out", help="also write the report here")
    args = ap.parse_args(argv)

    import torch
    from bench import copy_params_to_torch
    from torch_reference import torch_convmixer

    from convmixer_jax.files.model_dir import load_model

    config, variables, meta = load_model(args.model)
    if meta.get("encryption"):
        raise SystemExit(f"{args.model} is an encrypted model; pass the plain model")
    m = config.patch_size
    images, labels, classes = load_test_images(Path(args.data_dir))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = torch_convmixer(
        config.dim,
        config.depth,
        config.kernel_size,
        config.patch_size,
        config.num_classes,
        config.channels,
    ).eval()
    copy_params_to_torch(variables, model, torch, config.depth)
    plain_stem = model[0].weight.detach().numpy().copy()

    def predict(x_u8: np.ndarray) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for i in range(0, len(x_u8), 500):
                xb = torch.from_numpy(x_u8[i : i + 500]).permute(0, 3, 1, 2).float().div(255.0)
                out.append(model((xb - 0.5) / 0.5).argmax(1).numpy())
        return np.concatenate(out)

    def set_stem(w: np.ndarray) -> None:
        with torch.no_grad():
            model[0].weight.copy_(torch.from_numpy(w))

    seed = args.seed if args.seed is not None else int(np.random.SeedSequence().entropy % 2**63)
    rng = np.random.default_rng(seed)
    perm, flip = make_key(rng, m, config.channels)
    pred_base = predict(images)
    set_stem(encrypt_stem(plain_stem, perm, flip))
    enc_images = encrypt_images(images, perm, flip, m)
    pred_enc_plain = predict(images)
    pred_enc_enc = predict(enc_images)
    wrong = []
    for _ in range(args.wrong_keys):
        wp, wf = make_key(rng, m, config.channels)
        wrong.append(float(np.mean(predict(encrypt_images(images, wp, wf, m)) == labels)))
    report = {
        "test_images": int(len(images)),
        "classes": classes,
        "key_seed": args.seed,
        "baseline_plain": float(np.mean(pred_base == labels)),
        "encrypted_plain": float(np.mean(pred_enc_plain == labels)),
        "encrypted_encrypted": float(np.mean(pred_enc_enc == labels)),
        "identical_predictions": int(np.sum(pred_enc_enc == pred_base)),
        "wrong_keys": wrong,
        "wrong_keys_median": float(np.median(wrong)) if wrong else None,
        "forward": f"torch {torch.__version__} (benchmarks/torch_reference.py), float32, CPU",
    }
    if args.results:
        committed = json.loads(Path(args.results).read_text())
        report["committed"] = {
            k: committed[k]
            for k in (
                "test_images",
                "baseline_plain",
                "encrypted_plain",
                "encrypted_encrypted",
                "identical_predictions",
            )
        }
        if committed.get("wrong_keys"):
            report["committed"]["wrong_keys_median"] = float(np.median(committed["wrong_keys"]))
        report["baseline_difference_images"] = int(
            round(abs(report["baseline_plain"] - committed["baseline_plain"]) * len(images))
        )
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
