"""The security report's section on recovering a key with block scrambling from the
encrypted ViT (:func:`~convmixer_jax.attacks.block_key.recover_scrambled_key_from_model`).

For each of ``vit_model_keys`` secret keys with block scrambling, the plain ViT is
encrypted; the adversary holds the encrypted model, ``vit_model_queries`` test images
encrypted with the key (the client's queries) and the report's unlabeled public images.
Recorded per key: the pixel-key positions right, whether the pixel key, the block key and
the whole key are exact (and exact up to the mirror twin, which a model trained with
horizontal flips cannot tell from the key), whether the position embedding alone gave the
block key up to the grid's symmetries, how much layout the patch-embedding kernel shows
against its null (a kernel near its random initialization shows none, and the pixel key's
candidates then come from the queries), whether the jigsaw of the queries was determined,
what the attack claimed, and the seconds it took.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from convmixer_jax.attacks.protocol import Attack, AttackContext, option

if TYPE_CHECKING:
    from convmixer_jax.scheme.keys import Key


@dataclass(frozen=True)
class ViTModelRecoveryConfig:
    vit_model_keys: int = option(
        10,
        "secret keys with block scrambling the encrypted-ViT attack runs under "
        "(0: skip that attack; default {default})",
        metavar="K",
    )
    vit_model_queries: int = option(
        1,
        "encrypted test images the encrypted-ViT adversary also sees (default {default})",
        metavar="N",
        minimum=0,
    )


def key_measures(guess: Key, key: Key, *, determined: bool, up_to_mirror: bool) -> dict:
    """How a recovered key with block scrambling compares with the secret one: pixel
    positions right, exact pixel key / block key / key, exact up to the mirror twin,
    blocks placed right, and whether the attack's claim (exact, or up to the mirror) was
    wrong."""
    import numpy as np

    from convmixer_jax.attacks.block_key import (
        blocks_placed_right,
        mirrored_key,
        pixel_positions_right,
        same_scrambling_key,
    )
    from convmixer_jax.attacks.kernel_algebra import same_key

    exact = same_scrambling_key(guess, key)
    twin = same_scrambling_key(guess, mirrored_key(key))
    return {
        "pixel_positions_right": pixel_positions_right(guess, key),
        "exact_pixel_key": same_key(guess, key),
        "exact_block_key": bool(np.array_equal(guess.block_perm, key.block_perm)),
        "exact": exact,
        "exact_up_to_mirror": exact or twin,
        "blocks_placed_right": blocks_placed_right(guess.block_perm, key.block_perm),
        "claimed": determined,
        "claimed_up_to_mirror": up_to_mirror,
        "claimed_wrong": bool((determined and not exact) or (up_to_mirror and not (exact or twin))),
    }


def vit_model_recovery(
    config,
    variables,
    test_images,
    keys,
    *,
    queries: int = 1,
    public_images=None,
    seed: int = 0,
    log=lambda m: None,
) -> dict:
    """The encrypted-ViT attack under each of ``keys`` (keys with block scrambling on the
    model's grid). test_images: (N, H, W, C) uint8 from which ``queries`` random images
    per key are encrypted as the client's queries; public_images: (N, H, W, C) unlabeled
    images for the model's confidence, or None. Returns the trials and their totals."""
    import numpy as np

    from convmixer_jax.attacks.block_key import recover_scrambled_key_from_model
    from convmixer_jax.scheme.images import encrypt_images_reference
    from convmixer_jax.scheme.keys import fingerprint
    from convmixer_jax.scheme.params import encrypt_params

    rng = np.random.default_rng(seed)
    test_images = np.asarray(test_images)
    trials = []
    for i, key in enumerate(keys):
        enc_vars = encrypt_params(variables, key, mean=config.mean, std=config.std)
        q = None
        if queries:
            idx = rng.choice(len(test_images), min(queries, len(test_images)), replace=False)
            q = encrypt_images_reference(test_images[idx], key)
        t0 = time.perf_counter()
        rec = recover_scrambled_key_from_model(
            config, enc_vars, queries=q, public_images=public_images, seed=seed + i
        )
        seconds = time.perf_counter() - t0
        pos = rec.position
        trial = {
            "key_fingerprint": fingerprint(key),
            **key_measures(
                rec.best_guess, key, determined=rec.determined, up_to_mirror=rec.up_to_mirror
            ),
            "position_candidates_hold_key": any(
                np.array_equal(c, key.block_perm) for c in pos.candidates
            ),
            "position_claimed": pos.determined,
            "position_margin": pos.margin,
            "position_fit": pos.fit,
            "position_null_fit": float(np.max(pos.null_fits)) if len(pos.null_fits) else None,
            "kernel_structure": rec.kernel_structure[0],
            "kernel_null": rec.kernel_structure[1],
            "jigsaw_claimed": bool(rec.jigsaw is not None and rec.jigsaw.determined),
            "seconds": seconds,
            "reason": rec.reason,
        }
        trials.append(trial)
        log(
            f"  key {i + 1}/{len(keys)}: pixel positions {trial['pixel_positions_right']:.2f}, "
            f"exact {trial['exact']} (up to mirror {trial['exact_up_to_mirror']}), claimed "
            f"{trial['claimed']} (up to mirror {trial['claimed_up_to_mirror']}), {seconds:.0f} s"
        )
    counted = (
        "exact_pixel_key",
        "exact_block_key",
        "exact",
        "exact_up_to_mirror",
        "position_candidates_hold_key",
        "position_claimed",
        "jigsaw_claimed",
        "claimed",
        "claimed_up_to_mirror",
        "claimed_wrong",
    )
    totals = {name: sum(bool(t[name]) for t in trials) for name in counted}
    return {
        "keys": len(trials),
        "queries": queries,
        "public_images": 0 if public_images is None else len(public_images),
        **totals,
        "pixel_positions_right": float(np.mean([t["pixel_positions_right"] for t in trials])),
        "blocks_placed_right": float(np.mean([t["blocks_placed_right"] for t in trials])),
        "seconds": float(np.mean([t["seconds"] for t in trials])),
        "trials": trials,
    }


def run(context: AttackContext, config: ViTModelRecoveryConfig) -> dict:
    import numpy as np

    from convmixer_jax.attacks.wrong_keys import key_grid

    cfg = context.model_config
    keys = context.keys(config.vit_model_keys, 0, grid=key_grid(cfg))
    public = None if context.public_images is None else np.asarray(context.public_images)
    res = vit_model_recovery(
        cfg,
        context.variables,
        context.test_data[0],
        keys,
        queries=config.vit_model_queries,
        public_images=public,
        seed=context.seed(0),
        log=context.log,
    )
    res["per_key_seconds"] = res.pop("seconds")
    return res


def summary_lines(r: dict) -> list[str]:
    """The section of ``summary.md``."""
    if not r:
        return []
    holds = ["the encrypted ViT"]
    if r["queries"]:
        holds.append(f"{r['queries']} encrypted quer{'y' if r['queries'] == 1 else 'ies'}")
    if r["public_images"]:
        holds.append(f"{r['public_images']:,} unlabeled public images")
    k = r["keys"]
    return [
        "## Key recovery from the encrypted ViT (block scrambling)",
        "",
        f"The adversary holds {', '.join(holds)}; {k} secret keys with block scrambling. "
        '"up to mirror": the key or its mirror twin, which decrypts every query to its '
        "mirror image and which a model trained with horizontal flips cannot tell from the "
        'key; "block key up to the grid\'s symmetries": the position embedding alone, '
        "before the symmetry is chosen.",
        "",
        "| keys | pixel positions right | exact pixel keys | block key up to the grid's "
        "symmetries | exact block keys | exact keys | exact up to mirror | claimed | claimed "
        "up to mirror | claimed but wrong | blocks placed right | seconds per key |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {k} | {r['pixel_positions_right']:.3f} | {r['exact_pixel_key']} | "
        f"{r['position_candidates_hold_key']} | {r['exact_block_key']} | {r['exact']} | "
        f"{r['exact_up_to_mirror']} | {r['claimed']} | {r['claimed_up_to_mirror']} | "
        f"{r['claimed_wrong']} | {r['blocks_placed_right']:.3f} | {r['per_key_seconds']:.0f} |",
        "",
    ]


def describe(context: AttackContext, config: ViTModelRecoveryConfig) -> str:
    return f"{config.vit_model_keys} keys, {config.vit_model_queries} encrypted queries each"


ATTACK = Attack(
    name="vit_model_recovery",
    title="key recovery from the encrypted ViT",
    config_type=ViTModelRecoveryConfig,
    run=run,
    summary=summary_lines,
    describe=describe,
    enabled=lambda config: bool(config.vit_model_keys),
    seconds_key="seconds",
    families=("vit",),
    family_note="it reads the block key off the ViT's position embedding",
)
