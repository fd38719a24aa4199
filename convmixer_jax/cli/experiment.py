"""The paper's experiment, and what block scrambling adds to its key."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from convmixer_jax.cli.options import (
    RECIPE_OVERRIDES,
    UsageError,
    add_block_scrambling,
    add_data_options,
    add_distributed_options,
    add_force,
    add_key_seed,
    add_limit,
    add_quiet,
    add_recipe,
    add_seed,
    data_label,
    folder_listing,
    int_arg,
    open_split,
    positive_int,
    recipe_from_args,
    report_written,
    seed_arg,
    start_processes,
)


def _used_rows(split, limit: int | None, seed: int):
    """(images (n, H, W, C) uint8, labels (n,) int32) of the seeded subset of ``limit`` rows
    that :func:`~convmixer_jax.data.subset` picks from ``split`` (all rows if ``limit`` is
    None), in memory: only those rows are read."""
    import numpy as np

    from convmixer_jax.data import subset_indices

    rows = subset_indices(len(split), limit, seed)
    if rows is not None:
        split = split.take(rows)
    return np.asarray(split.images), split.labels


def cmd_reproduce(args) -> int:
    from convmixer_jax.experiment.paper import reproduce
    from convmixer_jax.files.atomic import check_output
    from convmixer_jax.parallel.runtime import is_writer

    if args.checkpoint:
        training = (*RECIPE_OVERRIDES, "workdir", "resume")
        given = [
            f"--{n.replace('_', '-')}" for n in training if getattr(args, n) not in (None, False)
        ]
        if given:
            raise UsageError(
                f"reproduce: {', '.join(given)} set how a model is trained, and --checkpoint "
                "trains none; leave them out, or leave out --checkpoint to train one"
            )
    start_processes(args)
    out = check_output(
        args.out,
        args.force,
        kind="results_dir",
        inputs={
            "--checkpoint": args.checkpoint,
            "--workdir": args.workdir,
            "--data-dir": args.data_dir,
        },
    )
    test = open_split(args, "test", cache=True)
    classes = test.classes
    if args.checkpoint:
        from convmixer_jax.files.model_dir import check_data_classes, load_model_meta

        config, meta = load_model_meta(args.checkpoint)
        check_data_classes(config, meta, classes, where=f"the test data ({data_label(args)})")
    test_x, test_y = _used_rows(test, args.limit, args.seed)
    train_data, recipe = None, None
    if not args.checkpoint:
        # training reads its batches from the opened split (mapped, or decoded per batch)
        train = open_split(args, "train", cache=True)
        recipe = recipe_from_args(args, len(train))
        train_data = (train.images, train.labels)
    results = reproduce(
        out,
        (test_x, test_y),
        checkpoint=args.checkpoint,
        train_data=train_data,
        recipe=recipe,
        workdir=args.workdir,
        resume=args.resume,
        num_keys=args.num_keys,
        attack_seed=args.attack_seed if args.attack_seed is not None else args.key_seed,
        key_seed=args.key_seed,
        strategy=args.strategy,
        block_scrambling=not args.no_block_scrambling,
        data_label=data_label(args),
        classes=classes,
        progress=not args.quiet,
        log=lambda m: print(m, file=sys.stderr),
    )
    summary = {
        k: results[k]
        for k in (
            "test_images",
            "baseline_plain",
            "encrypted_plain",
            "encrypted_encrypted",
            "identical_predictions",
            "wrong_keys_median",
            "block_scrambling",
            "key_space_log2",
        )
    }
    if is_writer():
        print(json.dumps(summary))
        report_written(folder_listing(out), out)
    return 0


def cmd_scrambling_effect(args) -> int:
    from convmixer_jax.experiment.scrambling import scrambling_effect
    from convmixer_jax.files.atomic import check_output
    from convmixer_jax.files.model_dir import (
        ModelDirError,
        check_data_classes,
        is_encrypted,
        load_model,
        load_model_meta,
    )
    from convmixer_jax.model.inference import check_model_images
    from convmixer_jax.scheme.images import ImageError

    out = check_output(
        args.out,
        args.force,
        kind="results_dir",
        inputs={"MODEL_DIR": args.models, "--data-dir": args.data_dir},
    )
    metas = []
    for model in args.models:  # config.json only: refused before any data is read
        config, meta = load_model_meta(model)
        if is_encrypted(meta):
            raise ModelDirError(
                f"{model} is an encrypted model; scrambling-effect needs the plain model "
                "(it encrypts it with a fresh key itself; decrypt-model it first)"
            )
        metas.append((config, meta))
    test = open_split(args, "test", cache=True)
    classes = test.classes
    test_x, test_y = _used_rows(test, args.limit, args.seed)
    for model, (config, meta) in zip(args.models, metas, strict=True):
        check_data_classes(
            config, meta, classes, where=f"{model}: the test data ({data_label(args)})"
        )
        try:
            check_model_images(config, test_x)
        except ImageError as e:
            raise ImageError(f"{model}: {e}") from None
    models = [(str(model), *load_model(model)[:2]) for model in args.models]
    scrambling_effect(
        models,
        (test_x, test_y),
        out,
        num_keys=args.num_keys,
        key_seed=args.key_seed,
        data_label=data_label(args),
        progress=not args.quiet,
        log=(lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr)),
    )
    print(Path(out, "scrambling.md").read_text(), end="")
    report_written(folder_listing(out), out)
    return 0


def register(add) -> None:
    """Add this group's subcommands with ``add(name, func, help, description)``."""
    p = add(
        "reproduce",
        cmd_reproduce,
        "the paper's experiment: Table 1, Fig. 4, Fig. 5, key space",
        "Train (or load with --checkpoint) the plain ConvMixer-256/8, draw a fresh secret "
        "key from the OS CSPRNG, encrypt the model and write results.json, table1.md, "
        "fig4.png and fig5.png to --out. --checkpoint may also be a plain ViT, whose keys "
        "then scramble the block positions too (see --no-block-scrambling). The key is never "
        "written; results.json holds its fingerprint. Runs over several processes too: the "
        "sweep's keys (and any training's batches) are split over all their devices, process "
        "0 writes.",
    )
    add_data_options(p)
    p.add_argument(
        "--checkpoint", metavar="MODEL_DIR", help="a trained plain model (skip training)"
    )
    add_recipe(p)
    p.add_argument("--workdir", metavar="DIR", help="training checkpoints (default OUT-work)")
    p.add_argument("--resume", action="store_true", help="continue training from --workdir")
    p.add_argument(
        "--num-keys", type=int_arg, default=100, metavar="N", help="random wrong keys (default 100)"
    )
    add_limit(p)
    add_seed(p)
    add_key_seed(p)
    p.add_argument(
        "--attack-seed",
        type=seed_arg,
        metavar="N",
        help="a separate seed for the wrong keys only (default: --key-seed, else random; recorded)",
    )
    p.add_argument(
        "--strategy",
        choices=["images", "weights"],
        default="weights",
        help="how the wrong-key sweep runs: encrypt the test images with each key, or fold "
        "each key into the patch embedding (same accuracies; default weights)",
    )
    add_block_scrambling(p)
    add_quiet(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    add_force(p)
    add_distributed_options(p)

    p = add(
        "scrambling-effect",
        cmd_scrambling_effect,
        "what block scrambling adds to the key, on plain ConvMixers and ViTs",
        "For each plain model (ConvMixer or ViT), encrypt it with a fresh secret key (a "
        "ViT's also scrambles the block positions) and measure its accuracy on the test "
        "images (a) with the right key, (b) with the right pixel key and the blocks in random "
        "orders, (c) with N random wrong keys and (d) with N random wrong keys that also "
        "scramble the blocks, beside the plain model's. Writes scrambling.json and "
        "scrambling.md (one table, one row per model) to --out; keys are never written, "
        "only their fingerprints.",
    )
    p.add_argument(
        "models", nargs="+", metavar="MODEL_DIR", help="plain model directories (either family)"
    )
    add_data_options(p)
    p.add_argument(
        "--num-keys",
        type=positive_int,
        default=100,
        metavar="N",
        help="random keys of each sweep (b, c, d) (default 100)",
    )
    add_limit(p)
    add_seed(p)
    add_key_seed(p)
    add_quiet(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    add_force(p)
