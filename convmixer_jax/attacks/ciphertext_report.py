"""The security report's ciphertext-only section (docs/security.md).

For each number N of encrypted test images the provider has seen, fresh secret keys
encrypt N random test images and
:func:`~convmixer_jax.attacks.ciphertext_only.recover_key_ciphertext_only` attacks them;
recorded are the exact keys (the best guess equals the key), the keys the attack claims
(determined) and how many of those are wrong, the key positions right, and how well the
images decrypted with the recovered key match the plain ones (PSNR and SSIM from dm-pix,
on [0, 1] images).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from convmixer_jax.attacks.protocol import Attack, AttackContext, option

if TYPE_CHECKING:
    import numpy as np

    from convmixer_jax.scheme.keys import Key

#: The numbers of encrypted images attacked by default.
CIPHERTEXT_IMAGES = (1, 2, 5, 10, 100)
#: Public training images (the last ones of the training split) the block template is
#: estimated from.
TEMPLATE_IMAGES = 2000


def ciphertext_images_option():
    """The option ``ciphertext_images``, declared alike by every section that attacks
    encrypted queries (it is one option of the report)."""
    return option(
        CIPHERTEXT_IMAGES,
        "encrypted images the ciphertext-only attack sees (default {default})",
        metavar="N",
        minimum=1,
    )


@dataclass(frozen=True)
class CiphertextOnlyConfig:
    ciphertext_images: tuple[int, ...] = ciphertext_images_option()
    ciphertext_keys: int = option(
        10,
        "secret keys per ciphertext-only row (0: skip that attack; default {default})",
        metavar="K",
    )
    recovery_images: tuple[int, ...] = option(
        (1, 10, 100, 1000),
        "encrypted images of the image-recovery figure's rows, one key",
        minimum=1,
        command_line=False,
    )


def image_quality(plain, recovered) -> tuple[float, float]:
    """Mean PSNR (dB) and SSIM of (N, H, W, C) uint8 images against the plain ones."""
    import dm_pix
    import numpy as np

    a = np.asarray(plain, np.float32) / 255.0
    b = np.asarray(recovered, np.float32) / 255.0
    psnr = np.asarray(dm_pix.psnr(a, b))
    psnr = np.where(np.isfinite(psnr), psnr, 100.0)  # identical images: capped at 100 dB
    return float(np.mean(psnr)), float(np.mean(np.asarray(dm_pix.ssim(a, b))))


def _one(
    images: np.ndarray, key: Key, template, prior, model=None, public_images=None
) -> tuple[dict, np.ndarray]:
    """One attack on ``images`` (N, H, W, C) uint8 encrypted with ``key``: its measures and
    the images decrypted with its best guess."""
    import numpy as np

    from convmixer_jax.attacks.ciphertext_only import recover_key_ciphertext_only
    from convmixer_jax.scheme.images import decrypt_images, encrypt_images_reference
    from convmixer_jax.scheme.keys import fingerprint

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
    ns: Sequence[int] = CIPHERTEXT_IMAGES,
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
    import numpy as np
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
            f"claimed {row['claimed']} ({row['claimed_wrong']} wrong), "
            f"{row['seconds']:.1f} s per attack"
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
    import numpy as np

    from convmixer_jax.scheme.images import encrypt_images_reference

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
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the N = 1 row has one image, the others up to ``show``
    show = max(len(e[1]) for e in examples)
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


# ----------------------------------------------------------------------------- the section


def block_statistics(context: AttackContext) -> tuple[np.ndarray, object, object]:
    """``(public, template, prior)`` shared by the sections that attack encrypted queries:
    the last ``TEMPLATE_IMAGES`` training images at the test images' size ((N, H, W, C)
    uint8), their block-pair template and the shipped colour prior (None unless RGB)."""
    from convmixer_jax.attacks.ciphertext_only import block_template, default_prior, match_scale

    def compute():
        import numpy as np

        h, w = np.shape(context.test_data[0])[1:3]
        public = match_scale(np.asarray(context.train_data[0])[-TEMPLATE_IMAGES:], h, w)
        template = block_template(public, context.model_config.patch_size)
        return public, template, default_prior(context.model_config.channels)

    return context.shared("block_statistics", compute)


def run(context: AttackContext, config: CiphertextOnlyConfig) -> dict:
    """Rates by N under ``ciphertext_keys`` keys (with the row where the adversary also holds
    the encrypted model and the public images, if the report has them) and the
    image-recovery figure ``ciphertext_only.png`` under the first key."""
    import numpy as np

    from convmixer_jax.scheme.params import encrypt_params

    cfg, variables = context.model_config, context.variables
    public, template, prior = block_statistics(context)
    test_x = np.asarray(context.test_data[0])
    keys = context.keys(config.ciphertext_keys)

    def model_fn(key):
        return cfg, encrypt_params(variables, key, mean=cfg.mean, std=cfg.std)

    res = ciphertext_only_rate(
        test_x,
        keys,
        template,
        prior,
        ns=config.ciphertext_images,
        seed=context.seed(0),
        model_fn=model_fn if context.public_images is not None else None,
        public_images=context.public_images,
        progress=context.progress,
        log=context.log,
    )
    rows, examples = image_recovery(
        test_x, keys[0], template, prior, ns=config.recovery_images, seed=context.seed(1)
    )
    plot_image_recovery(examples, context.out_dir / "ciphertext_only.png")
    res.update(
        image_recovery=rows,
        prior="shipped CIFAR-10 prior (convmixer_jax/attacks/priors/cifar10-rgb)"
        if prior is not None
        else "none",
        public_images=len(public),
    )
    return res


def summary_lines(co: dict) -> list[str]:
    """The section of ``summary.md``: the rates by N and the image-recovery table."""
    if not co:
        return []
    lines = [
        "## Ciphertext-only key recovery",
        "",
        f"N encrypted test images, {co['rows'][0]['keys']} secret keys per row; template from "
        f"{co['public_images']:,} public training images; colour prior: {co['prior']}. "
        '"exact": the most likely key is the key; "claimed": the attack says it is '
        'determined (and writes it); "colour prior alone": exact keys had the channel order '
        'and sign been chosen without the JPEG trace (same layouts); "JPEG trace": attacks '
        "whose decrypted images showed one.",
        "",
        "| encrypted images | adversary also holds | keys | exact keys | colour prior alone | "
        "JPEG trace | claimed | claimed but wrong | positions right | PSNR (dB) | SSIM | "
        "seconds per attack |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in co["rows"]:
        holds = "the encrypted model + public images" if r["with_model"] else "-"
        prior_only = "-" if r["with_model"] else r.get("exact_prior_only", "")
        lines.append(
            f"| {r['images']:,} | {holds} | {r['keys']} | {r['exact']} | {prior_only} | "
            f"{r.get('jpeg_trace', '')} | {r['claimed']} | {r['claimed_wrong']} | "
            f"{r['positions_right']:.3f} | {r['psnr']:.1f} | {r['ssim']:.3f} | "
            f"{r['seconds']:.1f} |"
        )
    lines += [
        "",
        "Images decrypted with the key recovered from N encrypted images (one key; "
        "`ciphertext_only.png`):",
        "",
        "| N | exact key | PSNR (dB) | SSIM |",
        "| ---: | --- | ---: | ---: |",
    ]
    lines += [
        f"| {r['images']:,} | {'yes' if r['exact'] else 'no'} | {r['psnr']:.1f} | {r['ssim']:.3f} |"
        for r in co["image_recovery"]
    ]
    return lines + [""]


def describe(context: AttackContext, config: CiphertextOnlyConfig) -> str:
    return f"N in {list(config.ciphertext_images)}, {config.ciphertext_keys} keys each"


ATTACK = Attack(
    name="ciphertext_only",
    title="ciphertext-only key recovery",
    config_type=CiphertextOnlyConfig,
    run=run,
    summary=summary_lines,
    describe=describe,
    enabled=lambda config: bool(config.ciphertext_keys),
    families=("convmixer",),
    family_note=(
        "it recovers the key from the statistics of neighbouring blocks, which a ViT's "
        "block scrambling separates"
    ),
)
