"""The paper's experiment."""
from __future__ import annotations

import json
import sys

from convmixer_jax.cli.options import positive_int, int_arg, seed_arg, add_force, add_data_options, load_split, subset


def cmd_reproduce(args) -> int:
    import dataclasses

    from convmixer_jax.experiment.paper import reproduce
    from convmixer_jax.files.atomic import check_output
    from convmixer_jax.training.loop import RECIPES

    out = check_output(args.out, args.force, kind="results_dir", inputs={"--checkpoint": args.checkpoint, "--workdir": args.workdir,
                                                        "--data-dir": args.data_dir})
    test_x, test_y, _ = load_split(args, "test")
    test_x, test_y = subset(test_x, test_y, args.limit, args.seed)
    train_data, recipe = None, None
    if not args.checkpoint:
        recipe = dataclasses.replace(RECIPES[args.recipe], seed=args.seed,
                                     **({"epochs": args.epochs} if args.epochs else {}))
        train_x, train_y, _ = load_split(args, "train")
        train_data = (train_x, train_y)
    results = reproduce(out, (test_x, test_y), checkpoint=args.checkpoint, train_data=train_data, recipe=recipe,
                        workdir=args.workdir, resume=args.resume, num_keys=args.num_keys,
                        attack_seed=args.attack_seed, key_seed=args.key_seed, strategy=args.strategy,
                        data_label=args.data_dir if args.data_dir else "tfds:cifar10", progress=not args.quiet,
                        log=lambda m: print(m, file=sys.stderr))
    summary = {k: results[k] for k in ("test_images", "baseline_plain", "encrypted_plain", "encrypted_encrypted",
                                       "identical_predictions", "wrong_keys_median", "key_space_log2")}
    print(json.dumps(summary))
    return 0


def register(add) -> None:
    """Add this group's subcommands with ``add(name, func, help, description)``."""
    p = add("reproduce", cmd_reproduce, "the paper's experiment: Table 1, Fig. 4, Fig. 5, key space",
            "Train (or load with --checkpoint) the plain ConvMixer-256/8, draw a fresh secret key from the "
            "OS CSPRNG, encrypt the model and write results.json, table1.md, fig4.png and fig5.png to --out. "
            "The key is never written; results.json holds its fingerprint.")
    add_data_options(p)
    p.add_argument("--checkpoint", metavar="MODEL_DIR", help="a trained plain model (skip training)")
    p.add_argument("--recipe", choices=["paper", "fast", "strong"], default="fast",
                   help="training recipe (default fast; strong: RandAugment, EMA, 5,000 training images held out)")
    p.add_argument("--epochs", type=positive_int, metavar="E", help="override the recipe's epochs")
    p.add_argument("--workdir", metavar="DIR", help="training checkpoints (default OUT-work)")
    p.add_argument("--resume", action="store_true", help="continue training from --workdir")
    p.add_argument("--num-keys", type=int_arg, default=100, metavar="N", help="random wrong keys (default 100)")
    p.add_argument("--limit", type=positive_int, metavar="K", help="a random subset of K test images")
    p.add_argument("--seed", type=seed_arg, default=0, metavar="N", help="training seed and --limit subset (default 0)")
    p.add_argument("--key-seed", type=seed_arg, metavar="N",
                   help="reproducible secret key (experiments only; default: OS CSPRNG)")
    p.add_argument("--attack-seed", type=seed_arg, metavar="N", help="seed of the wrong keys (default: random, recorded)")
    p.add_argument("--strategy", choices=["images", "weights"], default="weights", help="wrong-key sweep strategy")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    add_force(p)
