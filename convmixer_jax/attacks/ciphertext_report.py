"""Measuring the ciphertext-only attack for the security report (docs/security.md).

For each number N of encrypted test images the provider has seen, fresh secret keys
encrypt N random test images and :func:`~convmixer_jax.attacks.ciphertext_only.recover_key_ciphertext_only`
attacks them; recorded are the exact keys (the best guess equals the key), the keys the
attack claims (determined) and how many of those are wrong, the key positions right,
and how well the images decrypted with the recovered key match the plain ones
(PSNR and SSIM from dm-pix, on [0, 1] images).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from convmixer_jax.attacks.ciphertext_only import recover_key_ciphertext_only
from convmixer_jax.scheme.images import decrypt_images, encrypt_images_reference
from convmixer_jax.scheme.keys import Key, fingerprint


def image_quality(plain, recovered) -> tuple[float, float]:
    """Mean PSNR (dB) and SSIM of (N, H, W, C) uint8 images against the plain ones."""
    import dm_pix

    a = np.asarray(plain, np.float32) / 255.0
    b = np.asarray(recovered, np.float32) / 255.0
    psnr = np.asarray(dm_pix.psnr(a, b))
    psnr = np.where(np.isfinite(psnr), psnr, 100.0)  # identical images: capped at 100 dB
    return float(np.mean(psnr)), float(np.mean(np.asarray(dm_pix.ssim(a, b))))


def _one(
    images: np.ndarray, key: Key, template, prior, model=None, public_images=None
) -> tuple[dict, np.ndarray]:
    enc = encrypt_images_reference(images, key)
    t0 = time.perf_counter()
    res = recover_key_ciphertext_only(
        enc, key.block_size, template, prior=prior, model=model, public_images=public_images
    )
    seconds = time.perf_counter() - t0
    g = res.best_guess
    right = (np.asarray(g.perm) == np.asarray(key.perm)) & (
        np.asarray(g.flip) == np.asarray(key.flip)
    )
    rec = np.asarray(decrypt_images(enc, g))
    psnr, ssim = image_quality(images, rec)
    exact = bool(right.all())
    po = res.colour_prior_guess  # the same layout with the colour prior alone (no JPEG trace)
    exact_prior_only = (
        exact
        if po is None
        else bool(np.array_equal(po.perm, key.perm) and np.array_equal(po.flip, key.flip))
    )
    return {
        "key_fingerprint": fingerprint(key),
        "exact": exact,
        "exact_prior_only": exact_prior_only,
        "jpeg_trace": bool(len(res.jpeg_log_evidence)),
        "claimed": res.determined,
        "claimed_wrong": bool(res.determined and not exact),
        "positions_right": float(right.mean()),
        "psnr": psnr,
        "ssim": ssim,
        "seconds": seconds,
        "layout_margin": res.layout_margin,
        "colour_margin": res.colour_margin,
        "reason": res.reason,
    }, rec


def ciphertext_only_rate(
    test_images: np.ndarray,
    keys: Sequence[Key],
    template,
    prior,
    *,
    ns: Sequence[int] = (1, 2, 5, 10, 100),
    seed: int = 0,
    model_fn=None,
    public_images=None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Rows by N (and, with ``model_fn``, a row with the encrypted model at N = 1).

    test_images: (N, H, W, C) uint8 plain test images; ``keys``: the secret keys (one
    trial each per N); ``model_fn(key) -> (config, encrypted_variables)`` for the row with
    the model (``public_images``: the unlabeled public images its kernel attack may use).
    """
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    rows = []
    settings = [(n, False) for n in ns] + ([(1, True)] if model_fn is not None else [])
    for n, with_model in settings:
        trials = []
        for key in tqdm(
            keys,
            desc=f"ciphertext-only N={n}{' + model' if with_model else ''}",
            disable=not progress,
            leave=False,
        ):
            idx = rng.choice(len(test_images), min(n, len(test_images)), replace=False)
            model = model_fn(key) if with_model else None
            trials.append(
                _one(
                    test_images[idx],
                    key,
                    template,
                    prior,
                    model=model,
                    public_images=public_images if with_model else None,
                )[0]
            )
        row = {
            "images": n,
            "with_model": with_model,
            "keys": len(trials),
            "exact": sum(t["exact"] for t in trials),
            "exact_prior_only": sum(t["exact_prior_only"] for t in trials),
            "jpeg_trace": sum(t["jpeg_trace"] for t in trials),
            "claimed": sum(t["claimed"] for t in trials),
            "claimed_wrong": sum(t["claimed_wrong"] for t in trials),
            "positions_right": float(np.mean([t["positions_right"] for t in trials])),
            "psnr": float(np.mean([t["psnr"] for t in trials])),
            "ssim": float(np.mean([t["ssim"] for t in trials])),
            "seconds": float(np.mean([t["seconds"] for t in trials])),
            "trials": trials,
        }
        log(
            f"  N = {n}{' + model' if with_model else ''}: exact {row['exact']}/{row['keys']} "
            f"(colour prior alone {row['exact_prior_only']}), "
            f"claimed {row['claimed']} ({row['claimed_wrong']} wrong), {row['seconds']:.1f} s per attack"
        )
        rows.append(row)
    return {"rows": rows}


def image_recovery(
    test_images: np.ndarray,
    key: Key,
    template,
    prior,
    *,
    ns=(1, 10, 100, 1000),
    seed: int = 0,
    show: int = 3,
) -> tuple[list[dict], list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]]:
    """One key, N = ``ns`` encrypted test images each: PSNR/SSIM of the recovered images and
    the first ``show`` (plain, encrypted, recovered) images of each N for the figure."""
    rng = np.random.default_rng(seed)
    rows, examples = [], []
    for n in ns:
        idx = rng.choice(len(test_images), min(n, len(test_images)), replace=False)
        row, rec = _one(test_images[idx], key, template, prior)
        rows.append({"images": len(idx), **row})
        enc = encrypt_images_reference(test_images[idx[:show]], key)
        examples.append((len(idx), test_images[idx[:show]], enc, rec[:show]))
    return rows, examples


def plot_image_recovery(examples, path: Path) -> None:
    """A grid: one row per N, columns (plain, encrypted, recovered) for each shown image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    show = max(
        len(e[1]) for e in examples
    )  # the N = 1 row has one image, the others up to ``show``
    fig, axes = plt.subplots(
        len(examples), 3 * show, figsize=(1.4 * 3 * show, 1.6 * len(examples) + 0.4), squeeze=False
    )
    for ax in axes.ravel():
        ax.axis("off")
    titled = set()
    for r, (n, plain, enc, rec) in enumerate(examples):
        for i in range(len(plain)):
            for j, (img, name) in enumerate(
                ((plain, "plain"), (enc, "encrypted"), (rec, "recovered"))
            ):
                ax = axes[r, 3 * i + j]
                ax.axis("on")
                ax.imshow(
                    np.asarray(img[i]).squeeze(),
                    cmap="gray" if img.shape[-1] == 1 else None,
                    interpolation="nearest",
                )
                ax.set_xticks([])
                ax.set_yticks([])
                if 3 * i + j not in titled:  # the first row that fills a column names it
                    titled.add(3 * i + j)
                    ax.set_title(name, fontsize=8)
            axes[r, 0].set_ylabel(f"N = {n:,}", fontsize=8)
    fig.suptitle(
        "Ciphertext-only: test images decrypted with the key\nrecovered from N encrypted images",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
