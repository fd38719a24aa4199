"""Key recovery from an encrypted ViT with block scrambling, stage by stage: what the
position embedding, the patch-embedding kernel, the queries and the model's confidence
each give, and what the whole attack
(:func:`~convmixer_jax.attacks.block_key.recover_scrambled_key_from_model`) recovers.

    python benchmarks/vit_key_recovery.py results/cifar10-vit/workdir --keys 4 \\
        --data-dir ../shared/data/cifar10-jpeg --out /tmp/vit_key_recovery.json

The model is a training workdir (its newest checkpoint) or a model directory of a plain
ViT. For each of ``--keys`` secret keys with block scrambling (the OS CSPRNG unless
``--seed`` is given; only fingerprints are written), the model is encrypted and attacked
with ``--queries`` encrypted test images and ``--public-images`` unlabeled training images
(the last ones, as the security report takes them). Printed per key and in total:

- position embedding alone: whether its candidates hold the block key (up to the grid's
  symmetries), the blocks placed right and the blocks in their right grid row (best
  symmetry), its fit against rows without grid structure, its margin and claim;
- kernel: :func:`~convmixer_jax.attacks.block_key.kernel_structure` against its null,
  and whether the kernel's candidates, and the queries' own, hold the pixel key;
- how much the model uses position: its accuracy on the public images under the key,
  and with the blocks in a random order (the key's pixel key kept);
- the whole attack: exact pixel / block keys, exact keys (and up to the mirror twin), the
  blocks the jigsaw placed right (best symmetry), claims, wrong claims and seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def _load(path: str):
    """(config, variables) of the plain ViT in a training workdir or a model directory."""
    p = Path(path)
    if (p / "checkpoints").exists() or (p / "train_log.json").exists():
        from convmixer_jax.training.loop import load_checkpoint

        config, variables, _ = load_checkpoint(p)
        return config, variables
    from convmixer_jax.files.model_dir import load_model

    config, variables, _ = load_model(p)
    return config, variables


def _best_over_symmetries(block_perm, true_perm, grid) -> tuple[float, float]:
    """(blocks placed right, blocks in their right grid row), each the best over the grid's
    symmetries applied to ``block_perm``."""
    from convmixer_jax.attacks.position_embedding import grid_symmetries

    gw = grid[1]
    true_perm = np.asarray(true_perm)
    placed = rows = 0.0
    for g in grid_symmetries(grid):
        q = g[np.asarray(block_perm)]
        placed = max(placed, float(np.mean(q == true_perm)))
        rows = max(rows, float(np.mean(q // gw == true_perm // gw)))
    return placed, rows


def one_key(config, variables, key, queries, public, public_labels, seed: int) -> dict:
    from convmixer_jax.attacks import block_key as bk
    from convmixer_jax.attacks.ciphertext_only import block_template
    from convmixer_jax.attacks.from_weights import recover_key_from_structure
    from convmixer_jax.attacks.kernel_algebra import same_key
    from convmixer_jax.attacks.position_embedding import (
        block_perm_from_pos_embed,
        patch_position_rows,
    )
    from convmixer_jax.attacks.vit_model_report import key_measures
    from convmixer_jax.model.inference import predict_logits
    from convmixer_jax.scheme.images import encrypt_images_reference
    from convmixer_jax.scheme.keys import fingerprint, make_key
    from convmixer_jax.scheme.params import encrypt_params, stem_of

    enc = encrypt_params(variables, key, mean=config.mean, std=config.std)
    grid = key.grid
    out: dict = {"key_fingerprint": fingerprint(key)}
    # (a) the position embedding alone
    t0 = time.perf_counter()
    rows, _ = patch_position_rows(enc)
    pos = block_perm_from_pos_embed(rows, grid, seed=seed)
    placed, in_row = _best_over_symmetries(pos.block_perm, key.block_perm, grid)
    out["position"] = {
        "candidates_hold_key": any(np.array_equal(c, key.block_perm) for c in pos.candidates),
        "blocks_placed_right": placed,
        "blocks_in_right_row": in_row,
        "fit": pos.fit,
        "null_fit": float(pos.null_fits.max()),
        "structured": pos.structured,
        "margin": pos.margin,
        "determined": pos.determined,
        "seconds": time.perf_counter() - t0,
    }
    # (b) the pixel key's candidates
    kernel = np.asarray(stem_of(enc)[0]["kernel"])
    score, null = bk.kernel_structure(kernel, seed=seed)
    structure = recover_key_from_structure(kernel, seed=seed)
    from_queries, _ = bk.pixel_keys_from_queries(
        queries, block_template(public, key.block_size), seed=seed
    )
    out["pixel"] = {
        "kernel_structure": score,
        "kernel_null": null,
        "kernel_candidates_hold_key": any(same_key(k, key) for k in structure.candidates),
        "query_candidates_hold_key": any(same_key(k, key) for k in from_queries),
    }
    # (c) how much the model uses the positions of its tokens
    shuffled = make_key(
        key.perm,
        key.flip,
        key.block_size,
        key.channels,
        np.random.default_rng(seed).permutation(len(key.block_perm)),
        grid,
    )
    acc = {}
    for name, k in (("key", key), ("random_block_order", shuffled)):
        lg = predict_logits(config, enc, encrypt_images_reference(public, k))
        acc[name] = float(np.mean(np.argmax(lg, 1) == public_labels))
    out["model_accuracy_on_public"] = acc
    # (d) the whole attack
    t0 = time.perf_counter()
    rec = bk.recover_scrambled_key_from_model(
        config, enc, queries=queries, public_images=public, seed=seed
    )
    out["attack"] = {
        **key_measures(
            rec.best_guess, key, determined=rec.determined, up_to_mirror=rec.up_to_mirror
        ),
        "jigsaw_placed_right": (
            _best_over_symmetries(rec.jigsaw.block_perm, key.block_perm, grid)[0]
            if rec.jigsaw is not None
            else None
        ),
        "reason": rec.reason,
        "notes": rec.notes,
        "seconds": time.perf_counter() - t0,
    }
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a training workdir or a model directory of a plain ViT")
    ap.add_argument("--data-dir", default="../shared/data/cifar10-jpeg")
    ap.add_argument("--keys", type=int, default=4, help="secret keys with block scrambling")
    ap.add_argument("--queries", type=int, default=1, help="encrypted test images per key")
    ap.add_argument("--public-images", type=int, default=256, help="the last training images")
    ap.add_argument(
        "--seed", type=int, default=None, help="seeded keys and images (default: OS CSPRNG keys)"
    )
    ap.add_argument("--out", default=None, help="write the trials and totals as JSON here")
    args = ap.parse_args(argv)

    from convmixer_jax import apply_cpu_flags

    apply_cpu_flags()
    from convmixer_jax.attacks.wrong_keys import key_grid
    from convmixer_jax.data.loader import load_split
    from convmixer_jax.scheme.images import encrypt_images_reference
    from convmixer_jax.scheme.keys import generate_key

    config, variables = _load(args.model)
    grid = key_grid(config)
    tr_x, tr_y, _ = load_split("train", data_dir=args.data_dir, progress=False)
    te_x, _, _ = load_split("test", data_dir=args.data_dir, progress=False)
    public, public_labels = tr_x[-args.public_images :], tr_y[-args.public_images :]
    rng = np.random.default_rng(args.seed)
    trials = []
    for i in range(args.keys):
        key = generate_key(
            config.patch_size,
            config.channels,
            None if args.seed is None else args.seed * 1000 + i,
            grid=grid,
        )
        idx = rng.choice(len(te_x), args.queries, replace=False)
        queries = encrypt_images_reference(te_x[idx], key)
        t = one_key(config, variables, key, queries, public, public_labels, seed=i)
        trials.append(t)
        a, p, x = t["position"], t["pixel"], t["attack"]
        print(
            f"key {i + 1}/{args.keys}: position holds {a['candidates_hold_key']} placed "
            f"{a['blocks_placed_right']:.2f} rows {a['blocks_in_right_row']:.2f} fit "
            f"{a['fit']:.3f}/{a['null_fit']:.3f} margin {a['margin']:.1f}; kernel "
            f"{p['kernel_structure']:.3f}/{p['kernel_null']:.3f} holds "
            f"{p['kernel_candidates_hold_key']}, queries hold {p['query_candidates_hold_key']}; "
            f"accuracy {t['model_accuracy_on_public']['key']:.3f} / random order "
            f"{t['model_accuracy_on_public']['random_block_order']:.3f}; attack: pixel "
            f"{x['exact_pixel_key']} block {x['exact_block_key']} exact {x['exact']} (mirror "
            f"{x['exact_up_to_mirror']}) jigsaw {x['jigsaw_placed_right']} claimed "
            f"{x['claimed']} wrong {x['claimed_wrong']} {x['seconds']:.0f} s",
            flush=True,
        )

    def count(stage, name):
        return sum(bool(t[stage][name]) for t in trials)

    totals = {
        "keys": len(trials),
        "queries": args.queries,
        "public_images": len(public),
        "position_candidates_hold_key": count("position", "candidates_hold_key"),
        "position_claimed": count("position", "determined"),
        "position_blocks_placed_right": float(
            np.mean([t["position"]["blocks_placed_right"] for t in trials])
        ),
        "kernel_candidates_hold_key": count("pixel", "kernel_candidates_hold_key"),
        "query_candidates_hold_key": count("pixel", "query_candidates_hold_key"),
        **{
            name: count("attack", name)
            for name in (
                "exact_pixel_key",
                "exact_block_key",
                "exact",
                "exact_up_to_mirror",
                "claimed",
                "claimed_up_to_mirror",
                "claimed_wrong",
            )
        },
        "seconds_per_attack": float(np.mean([t["attack"]["seconds"] for t in trials])),
    }
    print(json.dumps(totals, indent=1))
    res = {"model": args.model, "seed": args.seed, "totals": totals, "trials": trials}
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
