"""The security report's ciphertext-only section for keys with block scrambling
(:func:`~convmixer_jax.attacks.block_key.recover_scrambled_key_ciphertext_only`).

For each number N of encrypted test images the provider has seen, fresh secret keys with
block scrambling encrypt N random test images and the attack recovers the key from them,
the block template and colour prior of the ConvMixer section
(:func:`~convmixer_jax.attacks.ciphertext_report.block_statistics`) and the same public
images, which also choose the orientation of the whole image. In the rows "+ the
encrypted model's kernel" the adversary also holds the encrypted ViT and takes the pixel
key's candidates from its patch-embedding kernel instead of the blocks' covariance.
Recorded: exact pixel keys, exact block keys, exact keys (and up to the mirror twin),
the attack's claims and how many were wrong, blocks placed right, and PSNR/SSIM of the
images decrypted with the best guess (dm-pix, on [0, 1] images).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from convmixer_jax.attacks.ciphertext_report import ciphertext_images_option
from convmixer_jax.attacks.protocol import Attack, AttackContext, option


@dataclass(frozen=True)
class ViTCiphertextConfig:
    ciphertext_images: tuple[int, ...] = ciphertext_images_option()
    vit_ciphertext_keys: int = option(
        10,
        "secret keys with block scrambling per ViT ciphertext-only row "
        "(0: skip that attack; default {default})",
        metavar="K",
    )
    vit_kernel_images: tuple[int, ...] = option(
        (10,),
        "numbers of encrypted images of the ViT ciphertext-only rows in which the adversary "
        "also holds the encrypted model's kernel (default {default})",
        metavar="N",
        minimum=1,
    )


def _one(images, key, template, prior, public, kernel=None, seed: int = 0) -> dict:
    """One attack on ``images`` (N, H, W, C) uint8 encrypted with ``key``: its measures."""
    import numpy as np

    from convmixer_jax.attacks.block_key import recover_scrambled_key_ciphertext_only
    from convmixer_jax.attacks.ciphertext_report import image_quality
    from convmixer_jax.attacks.vit_model_report import key_measures
    from convmixer_jax.scheme.images import decrypt_images, encrypt_images_reference
    from convmixer_jax.scheme.keys import fingerprint

    enc = encrypt_images_reference(images, key)
    pixel_key = None
    t0 = time.perf_counter()
    if kernel is not None:
        from convmixer_jax.attacks.from_weights import recover_key_from_structure

        pixel_key = recover_key_from_structure(kernel, seed=seed).key
    rec = recover_scrambled_key_ciphertext_only(
        enc,
        key.block_size,
        template,
        prior=prior,
        public_images=public,
        pixel_key=pixel_key,
        seed=seed,
    )
    seconds = time.perf_counter() - t0
    g = rec.best_guess
    psnr, ssim = image_quality(images, np.asarray(decrypt_images(enc, g)))
    return {
        "key_fingerprint": fingerprint(key),
        **key_measures(g, key, determined=rec.determined, up_to_mirror=rec.up_to_mirror),
        "jigsaw_claimed": bool(rec.jigsaw is not None and rec.jigsaw.determined),
        "psnr": psnr,
        "ssim": ssim,
        "seconds": seconds,
        "reason": rec.reason,
    }


def vit_ciphertext_rates(
    test_images,
    keys,
    template,
    prior,
    public,
    *,
    ns=(1, 2, 5, 10, 100),
    kernel_ns=(10,),
    kernel_fn=None,
    seed: int = 0,
    progress: bool = False,
    log=lambda m: None,
) -> dict:
    """Rows by N (and, with ``kernel_fn(key) -> (P, P, C, dim)`` the encrypted model's
    patch-embedding kernel, rows at each N of ``kernel_ns`` with its pixel-key candidates).
    test_images: (N, H, W, C) uint8 plain test images; keys: keys with block scrambling on
    their grid; public: (N, H, W, C) uint8 public images at the same size."""
    import numpy as np
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    test_images = np.asarray(test_images)
    settings = [(n, False) for n in ns]
    if kernel_fn is not None:
        settings += [(n, True) for n in kernel_ns]
    counted = (
        "exact_pixel_key",
        "exact_block_key",
        "exact",
        "exact_up_to_mirror",
        "jigsaw_claimed",
        "claimed",
        "claimed_up_to_mirror",
        "claimed_wrong",
    )
    rows = []
    for n, with_kernel in settings:
        trials = []
        label = f"N={n}{' + kernel' if with_kernel else ''}"
        for i, key in enumerate(
            tqdm(keys, desc=f"ViT ciphertext-only {label}", disable=not progress, leave=False)
        ):
            idx = rng.choice(len(test_images), min(n, len(test_images)), replace=False)
            kernel = kernel_fn(key) if with_kernel else None
            trials.append(
                _one(test_images[idx], key, template, prior, public, kernel, seed=seed + i)
            )
        row = {
            "images": n,
            "with_kernel": with_kernel,
            "keys": len(trials),
            **{name: sum(bool(t[name]) for t in trials) for name in counted},
            **{
                name: float(np.mean([t[name] for t in trials]))
                for name in ("blocks_placed_right", "psnr", "ssim", "seconds")
            },
            "trials": trials,
        }
        log(
            f"  {label}: exact {row['exact']}/{row['keys']} (up to mirror "
            f"{row['exact_up_to_mirror']}), claimed {row['claimed']} (up to mirror "
            f"{row['claimed_up_to_mirror']}, {row['claimed_wrong']} wrong), "
            f"{row['seconds']:.1f} s per attack"
        )
        rows.append(row)
    return {"rows": rows}


def run(context: AttackContext, config: ViTCiphertextConfig) -> dict:
    import numpy as np

    from convmixer_jax.attacks.ciphertext_report import block_statistics
    from convmixer_jax.attacks.wrong_keys import key_grid
    from convmixer_jax.scheme.params import encrypt_params, stem_of

    cfg, variables = context.model_config, context.variables
    public, template, prior = block_statistics(context)
    keys = context.keys(config.vit_ciphertext_keys, 0, grid=key_grid(cfg))

    def kernel_fn(key):
        enc = encrypt_params(variables, key, mean=cfg.mean, std=cfg.std)
        return np.asarray(stem_of(enc)[0]["kernel"])

    res = vit_ciphertext_rates(
        np.asarray(context.test_data[0]),
        keys,
        template,
        prior,
        public,
        ns=config.ciphertext_images,
        kernel_ns=config.vit_kernel_images,
        kernel_fn=kernel_fn,
        seed=context.seed(0),
        progress=context.progress,
        log=context.log,
    )
    res["public_images"] = len(public)
    return res


def summary_lines(r: dict) -> list[str]:
    """The section of ``summary.md``."""
    if not r:
        return []
    lines = [
        "## Ciphertext-only key recovery with block scrambling (ViT)",
        "",
        f"N encrypted test images, {r['rows'][0]['keys']} secret keys with block scrambling "
        f"per row; template, colour prior and orientation from {r['public_images']:,} public "
        'training images. "+ kernel": the pixel key\'s candidates come from the encrypted '
        'model\'s patch-embedding kernel. "up to mirror": the key or its mirror twin (every '
        "image decrypted to its mirror image: no image statistic tells them apart, so PSNR "
        'and SSIM, against the unmirrored images, are low for it); "jigsaw claimed": the '
        'block placement was determined; "claimed": the whole key.',
        "",
        "| encrypted images | adversary also holds | keys | exact pixel keys | exact block "
        "keys | exact keys | exact up to mirror | jigsaw claimed | claimed | claimed up to "
        "mirror | claimed but wrong | blocks placed right | PSNR (dB) | SSIM | seconds per "
        "attack |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
        "---: | ---: | ---: |",
    ]
    for row in r["rows"]:
        holds = "the encrypted model's kernel" if row["with_kernel"] else "-"
        lines.append(
            f"| {row['images']:,} | {holds} | {row['keys']} | {row['exact_pixel_key']} | "
            f"{row['exact_block_key']} | {row['exact']} | {row['exact_up_to_mirror']} | "
            f"{row['jigsaw_claimed']} | {row['claimed']} | {row['claimed_up_to_mirror']} | "
            f"{row['claimed_wrong']} | {row['blocks_placed_right']:.3f} | {row['psnr']:.1f} | "
            f"{row['ssim']:.3f} | {row['seconds']:.1f} |"
        )
    return lines + [""]


def describe(context: AttackContext, config: ViTCiphertextConfig) -> str:
    return (
        f"N in {list(config.ciphertext_images)}, {config.vit_ciphertext_keys} keys each; "
        f"with the kernel at N in {list(config.vit_kernel_images)}"
    )


ATTACK = Attack(
    name="vit_ciphertext_only",
    title="ciphertext-only key recovery with block scrambling",
    config_type=ViTCiphertextConfig,
    run=run,
    summary=summary_lines,
    describe=describe,
    enabled=lambda config: bool(config.vit_ciphertext_keys),
    families=("vit",),
    family_note="it undoes a ViT key's block scrambling",
)
