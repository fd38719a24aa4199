"""The security report's section on known-plaintext recovery of a key with block scrambling
(:func:`~convmixer_jax.attacks.vit_known_plaintext.recover_scrambled_key_known_plaintext`).

For each of ``vit_kp_keys`` secret keys with block scrambling on the ViT's grid and each
number n of ``vit_kp_pairs``, n random test images are encrypted with the key and the
attack gets the plain images with their encryptions. Recorded per trial: whether the
pixel key, the block key and the whole key came out exact, what the attack claimed (and
whether a claim was wrong), the pixel positions and blocks it got right, those it left
undetermined, and the seconds it took.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

from convmixer_jax.attacks.protocol import Attack, AttackContext, option


@dataclass(frozen=True)
class ViTKnownPlaintextConfig:
    vit_kp_keys: int = option(
        10,
        "secret keys with block scrambling the ViT known-plaintext attack runs under "
        "(0: skip that attack; default {default})",
        metavar="K",
        minimum=0,
    )
    vit_kp_pairs: tuple[int, ...] = option(
        (1, 2),
        "plain/encrypted image pair counts of the ViT known-plaintext attack (default {default})",
        metavar="N",
        minimum=1,
    )


def vit_known_plaintext_rate(
    images,
    keys,
    *,
    pairs: Sequence[int] = (1, 2),
    seed: int = 0,
    log=lambda message: None,
) -> dict:
    """The known-plaintext attack on keys with block scrambling, per number of pairs.

    images: (N, H, W, C) uint8 test images of the keys' grid (H = gh*M, W = gw*M). keys:
    keys with block scrambling on that grid. For each n in ``pairs`` and each key, n
    distinct random images (drawn with ``seed``) are encrypted with the key and the key
    recovered from the pairs. Returns one row per n (counts over the keys, means over
    them) with its trials; keys appear by fingerprint only.
    """
    import numpy as np

    from convmixer_jax.attacks.block_key import blocks_placed_right
    from convmixer_jax.attacks.vit_known_plaintext import recover_scrambled_key_known_plaintext
    from convmixer_jax.scheme.images import encrypt_images_reference
    from convmixer_jax.scheme.keys import fingerprint

    images = np.asarray(images)
    rng = np.random.default_rng(seed)
    rows = []
    for n in pairs:
        if n > len(images):
            raise ValueError(
                f"{n} pairs requested but only {len(images)} test images given; "
                "lower --vit-kp-pairs"
            )
        trials = []
        for key in keys:
            x = images[rng.choice(len(images), n, replace=False)]
            z = encrypt_images_reference(x, key)
            t0 = time.perf_counter()
            r = recover_scrambled_key_known_plaintext(x, z, key.block_size, key.grid)
            seconds = time.perf_counter() - t0
            perm, flip = np.asarray(key.perm), np.asarray(key.flip)
            exact_pixel = bool(np.array_equal(r.perm, perm) and np.array_equal(r.flip, flip))
            exact_block = bool(np.array_equal(r.block_perm, np.asarray(key.block_perm)))
            trials.append(
                {
                    "key_fingerprint": fingerprint(key),
                    "exact_pixel_key": exact_pixel,
                    "exact_block_key": exact_block,
                    "exact": exact_pixel and exact_block,
                    "claimed": r.determined,
                    "claimed_wrong": bool(r.determined and not (exact_pixel and exact_block)),
                    "consistent": r.consistent,
                    "pixel_positions_right": float(np.mean((r.perm == perm) & (r.flip == flip))),
                    "blocks_placed_right": blocks_placed_right(r.block_perm, key.block_perm),
                    "undetermined_positions": r.undetermined_positions,
                    "undetermined_blocks": r.undetermined_blocks,
                    "seconds": seconds,
                    "reason": r.reason,
                }
            )
        counted = ("exact_pixel_key", "exact_block_key", "exact", "claimed", "claimed_wrong")
        row = {
            "pairs": int(n),
            "keys": len(trials),
            **{name: sum(t[name] for t in trials) for name in counted},
            "inconsistent": sum(not t["consistent"] for t in trials),
        }
        for name in (
            "pixel_positions_right",
            "blocks_placed_right",
            "undetermined_positions",
            "undetermined_blocks",
        ):
            row[name] = float(np.mean([t[name] for t in trials])) if trials else 0.0
        row["max_undetermined_positions"] = max(
            (t["undetermined_positions"] for t in trials), default=0
        )
        row["max_undetermined_blocks"] = max((t["undetermined_blocks"] for t in trials), default=0)
        row["per_key_seconds"] = float(np.mean([t["seconds"] for t in trials])) if trials else 0.0
        row["trials"] = trials
        rows.append(row)
        log(
            f"  {n} pair{'s' if n != 1 else ''}: exact keys {row['exact']}/{row['keys']}, "
            f"claimed {row['claimed']} (wrong {row['claimed_wrong']}), mean undetermined "
            f"positions {row['undetermined_positions']:.2f}, blocks "
            f"{row['undetermined_blocks']:.2f}"
        )
    return {"rows": rows}


def run(context: AttackContext, config: ViTKnownPlaintextConfig) -> dict:
    """The trials draw from all the test images, not only the evaluation subset. The keys:
    ``generate_key(M, C, seed=[key_seed, i], grid=grid)`` with the attack's
    :meth:`~convmixer_jax.attacks.protocol.AttackContext.key_seed`, or from the OS CSPRNG
    when the report has no seed."""
    import numpy as np

    from convmixer_jax.attacks.wrong_keys import key_grid
    from convmixer_jax.scheme.keys import generate_key

    cfg = context.model_config
    grid = key_grid(cfg)
    seed = context.key_seed(0)
    keys = [
        generate_key(
            cfg.patch_size, cfg.channels, seed=None if seed is None else [seed, i], grid=grid
        )
        for i in range(config.vit_kp_keys)
    ]
    res = vit_known_plaintext_rate(
        np.asarray(context.test_data[0]),
        keys,
        pairs=config.vit_kp_pairs,
        seed=context.seed(0),
        log=context.log,
    )
    pb = cfg.patch_size**2 * cfg.channels
    return {"keys": len(keys), "grid": list(grid), "block_len": pb, **res}


def summary_lines(r: dict) -> list[str]:
    """The section of ``summary.md``: one table row per number of pairs."""
    if not r or not r.get("rows"):
        return []
    gh, gw = r["grid"]
    lines = [
        "## Known-plaintext key recovery on the ViT (block scrambling)",
        "",
        f"The adversary holds n plain test images and their encryptions under one key with "
        f"block scrambling on the {gh} x {gw} grid; {r['keys']} secret keys per row. A key is "
        "claimed only when the pairs admit no other.",
        "",
        "| pairs | keys | exact keys | exact pixel keys | exact block keys | claimed | "
        f"claimed but wrong | blocks placed right | mean undetermined positions (of "
        f"{r['block_len']}) | mean undetermined blocks (of {gh * gw}) | seconds per key |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {w['pairs']} | {w['keys']} | {w['exact']} | {w['exact_pixel_key']} | "
        f"{w['exact_block_key']} | {w['claimed']} | {w['claimed_wrong']} | "
        f"{w['blocks_placed_right']:.3f} | {w['undetermined_positions']:.2f} | "
        f"{w['undetermined_blocks']:.2f} | {w['per_key_seconds']:.3f} |"
        for w in r["rows"]
    ]
    return lines + [""]


def describe(context: AttackContext, config: ViTKnownPlaintextConfig) -> str:
    return f"{config.vit_kp_keys} keys, pairs {list(config.vit_kp_pairs)}"


ATTACK = Attack(
    name="vit_known_plaintext",
    title="known-plaintext key recovery on the ViT",
    config_type=ViTKnownPlaintextConfig,
    run=run,
    summary=summary_lines,
    describe=describe,
    enabled=lambda config: bool(config.vit_kp_keys),
    families=("vit",),
    family_note=(
        "it pairs plain blocks with the encrypted blocks a key with block scrambling moved; "
        "the ConvMixer's key leaves them in place (its own known-plaintext section)"
    ),
)
