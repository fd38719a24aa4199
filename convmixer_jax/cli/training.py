"""Training: train, export a checkpoint, average models, plot the curves."""

from __future__ import annotations

import argparse
import json

from convmixer_jax.cli.options import (
    ARCH_OPTIONS,
    PROG,
    UsageError,
    add_batch_size,
    add_data_options,
    add_distributed_options,
    add_force,
    add_model_options,
    add_quiet,
    add_recipe,
    add_seed,
    add_workers,
    arch_options,
    data_label,
    load_split,
    model_config,
    open_split,
    positive_float,
    positive_int,
    recipe_from_args,
    start_processes,
    subset,
)


def cmd_plot_training(args) -> int:
    from pathlib import Path

    from convmixer_jax.files.atomic import check_output
    from convmixer_jax.training.curves import chain_train_logs, plot_training_curves, read_train_log

    # the input is each log file, not the workdir holding it: the curves may go beside it
    logs = [Path(p) / "train_log.json" if Path(p).is_dir() else Path(p) for p in args.log]
    out = check_output(args.out, args.force, inputs={"the log": logs})
    if out.suffix.lower() != ".png":
        raise UsageError(f"--out {out} must end in .png (the curves are written as PNG)")
    if not out.parent.is_dir():
        raise FileNotFoundError(
            f"the folder of --out, {out.parent}, does not exist; create it first"
        )
    logs = [read_train_log(p) for p in args.log]
    history = logs[0] if len(logs) == 1 else chain_train_logs(logs)
    plot_training_curves(history, out)
    last = history["epochs"][-1]
    scores = {
        k: last[k] for k in ("test_accuracy", "val_accuracy", "val_accuracy_ema") if k in last
    }
    print(json.dumps({"plot": str(out), "epochs": len(history["epochs"]), **scores}))
    return 0


def cmd_train(args) -> int:
    import dataclasses

    from convmixer_jax.data import DataError
    from convmixer_jax.files.atomic import check_output
    from convmixer_jax.files.model_dir import save_model
    from convmixer_jax.parallel.runtime import is_writer
    from convmixer_jax.training.stages import train_model, warm_start
    from convmixer_jax.training.workdir import check_workdir, locked_workdir

    start_processes(args)
    check_output(
        args.out,
        args.force,
        kind="model_dir",
        inputs={
            "--init-from": args.init_from,
            "--data-dir": args.data_dir,
            "--workdir": args.workdir,
        },
    )
    config = model_config(args)
    warm = None
    if args.init_from:
        asked = {n: getattr(args, n) for n in ARCH_OPTIONS if getattr(args, n) is not None}
        if args.preset:
            asked = {n: getattr(config, n) for n in arch_options(config)} | asked
        config, start, init_from = warm_start(args.init_from, asked)
        warm = (start, init_from)
    # one run per workdir, held from here on: a second run is refused before it touches it
    with locked_workdir(args.workdir):
        check_workdir(args.workdir, args.resume)  # before any work
        # read as training goes (CIFAR binaries mapped, image trees decoded once into a
        # mapped cache or, when too large for one, per batch), never all held in memory
        cache = not args.no_data_cache
        train_split, test_split = (
            open_split(args, "train", cache=cache),
            open_split(args, "test", cache=cache),
        )
        classes = train_split.classes
        if warm is None and args.num_classes is None and classes is not None:
            config = dataclasses.replace(config, num_classes=len(classes))  # one per class
        elif args.num_classes is not None and classes is not None:
            if len(classes) != args.num_classes:
                raise DataError(
                    f"--num-classes {args.num_classes}, but the data have {len(classes)} "
                    f"classes; drop --num-classes (it follows the data) or give "
                    f"--num-classes {len(classes)}"
                )
        train_x, train_y = _subset_split(train_split, args.limit_train, args.seed)
        test_x, test_y = _subset_split(test_split, args.limit_test, args.seed)
        recipe = recipe_from_args(args, len(train_x))
        try:
            variables, meta = train_model(
                config,
                recipe,
                (train_x, train_y),
                (test_x, test_y),
                args.workdir,
                recipe_name=args.recipe,
                resume=args.resume,
                warm=warm,
                classes=classes,
                data_label=data_label(args),
                progress=not args.quiet,
                checkpoint_seconds=args.checkpoint_minutes * 60.0,
                workers=args.workers,
            )
        except KeyboardInterrupt as e:  # main prints e.message: add the exact command
            if getattr(e, "saved_checkpoint", None) is not None:
                e.message = e.message.replace("with --resume", f"with: {_resume_command(args)}")
            raise
    if is_writer():  # one process writes the model; every process trained the same weights
        save_model(args.out, config, variables, extra=meta, force=args.force)
        print(
            json.dumps(
                {
                    "test_accuracy": meta["test_accuracy"],
                    "model": str(args.out),
                    "epochs": meta["epochs"],
                }
            )
        )
    return 0


def _subset_split(split, n: int | None, seed: int):
    """(images, labels) of the seeded random subset of ``n`` rows of ``split`` that
    :func:`~convmixer_jax.data.subset` picks (all rows if n is None): a view, nothing read."""
    from convmixer_jax.data.loader import subset_indices

    rows = subset_indices(len(split), n, seed)
    split = split if rows is None else split.take(rows)
    return split.images, split.labels


def _resume_command(args) -> str:
    """The command line that continues this ``train`` run: the same arguments and
    ``--resume`` (quoted for a POSIX shell)."""
    import shlex
    import sys

    argv = getattr(args, "argv", None)
    if argv is None:
        argv = sys.argv[1:] if sys.argv[1:2] == [args.command] else None
    if argv is None:  # called as a library function: the options are unknown here
        return f"{PROG} {args.command} ... --resume"
    argv = [str(a) for a in argv]
    return shlex.join([PROG, *argv, *([] if "--resume" in argv else ["--resume"])])


def cmd_average_models(args) -> int:
    from convmixer_jax.files.atomic import check_output
    from convmixer_jax.files.model_dir import save_model
    from convmixer_jax.training.stages import average_models

    check_output(
        args.out,
        args.force,
        kind="model_dir",
        inputs={"the input model": args.models, "--data-dir": args.data_dir},
    )
    if len(args.models) < 2:
        raise UsageError(f"average-models needs at least two models, got {len(args.models)}")
    if args.weights is not None and len(args.weights) != len(args.models):
        raise UsageError(
            f"--weights gives {len(args.weights)} numbers for {len(args.models)} models; "
            "give one per model"
        )
    train_x, train_y, classes = load_split(args, "train")
    test_x, test_y, _ = load_split(args, "test")
    train_x, _ = subset(train_x, train_y, args.limit_train, args.seed)
    config, averaged, meta = average_models(
        args.models,
        train_x,
        (test_x, test_y),
        weights=args.weights,
        bn_images=args.bn_images,
        bn_passes=args.bn_passes,
        seed=args.seed,
        batch_size=args.batch_size,
        data_label=data_label(args),
        classes=classes,
        progress=not args.quiet,
    )
    save_model(args.out, config, averaged, extra=meta, force=args.force)
    print(
        json.dumps(
            {
                "test_accuracy": meta["test_accuracy"],
                "inputs": [i["test_accuracy"] for i in meta["averaged"]],
                "model": str(args.out),
            }
        )
    )
    return 0


def cmd_export_model(args) -> int:
    from convmixer_jax.files.atomic import check_output
    from convmixer_jax.files.model_dir import save_model
    from convmixer_jax.training.stages import export_checkpoint

    check_output(args.out, args.force, kind="model_dir", inputs={"--workdir": args.workdir})
    config, variables, meta = export_checkpoint(args.workdir, data_label=args.data_label)
    save_model(args.out, config, variables, extra=meta, force=args.force)
    print(
        json.dumps(
            {
                "model": str(args.out),
                "epoch": meta["epochs"],
                "of": meta["epochs_planned"],
                "test_accuracy": meta["test_accuracy"],
            }
        )
    )
    return 0


def register(add) -> None:
    """Add this group's subcommands with ``add(name, func, help, description)``."""
    p = add(
        "plot-training",
        cmd_plot_training,
        "plot a training run's loss and accuracy per epoch",
        "Draw the per-epoch training loss and train / test accuracy of a training run "
        "(its --workdir or train_log.json; works while the run is going) as a PNG. Several "
        "logs, first stage first, draw a run trained in stages (train --init-from) as one.",
    )
    p.add_argument(
        "log",
        metavar="WORKDIR_OR_LOG",
        nargs="+",
        help="training --workdir, or its train_log.json (several: the stages in order)",
    )
    p.add_argument("--out", required=True, metavar="CURVES.png", help="PNG to write")
    add_force(p)

    p = add(
        "train",
        cmd_train,
        "train a plain model and save it",
        "Train a ConvMixer on plain images with a recipe (--recipe), checkpointing into "
        "--workdir at every epoch's end and every few minutes (--checkpoint-minutes), then "
        "save the plain model with its recipe and final test accuracy in config.json. The "
        "model has one output per class of the data unless --num-classes says otherwise. "
        "One run at a time uses a --workdir (it is locked while the run lasts). Runs over "
        "several processes too: each batch is split over all their devices, --workdir is "
        "one shared folder, process 0 writes the model.",
    )
    add_data_options(p)
    add_workers(p)
    p.add_argument(
        "--no-data-cache",
        action="store_true",
        help="decode an image tree's images batch by batch as training reads them, instead of "
        "once into a memory-mapped cache file (trees over 2 GiB decoded are never cached)",
    )
    add_recipe(p)
    p.add_argument(
        "--batch-size", dest="train_batch_size", type=positive_int, help=argparse.SUPPRESS
    )  # former name
    add_model_options(p)
    add_seed(p)
    p.add_argument(
        "--workdir",
        required=True,
        metavar="DIR",
        help="checkpoints and train_log.json (locked while the run lasts)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in --workdir, at its exact step",
    )
    p.add_argument(
        "--checkpoint-minutes",
        type=positive_float,
        default=5.0,
        metavar="M",
        help="inside an epoch, save a checkpoint when M minutes have passed since the last "
        "one (default 5); every epoch's end is saved too",
    )
    p.add_argument(
        "--init-from",
        metavar="MODEL_DIR",
        help="warm start: begin from this plain model's weights (and architecture) with a "
        "fresh optimizer and schedule, e.g. a second one-cycle; the saved model counts "
        "the epochs and seconds of both stages",
    )
    p.add_argument(
        "--limit-train", type=positive_int, metavar="N", help="train on a random subset of N images"
    )
    p.add_argument(
        "--limit-test", type=positive_int, metavar="N", help="test on a random subset of N images"
    )
    add_quiet(p)
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="model directory to write")
    add_force(p)
    add_distributed_options(p)

    p = add(
        "average-models",
        cmd_average_models,
        "average plain models' weights and re-measure BatchNorm",
        "Average the weights of two or more plain models of one architecture (a uniform model "
        "soup, as at the end of stochastic weight averaging; meant for models of one training "
        "lineage, e.g. a model and its train --init-from continuation), re-estimate every "
        "BatchNorm's statistics on the training images (shuffled, in batches of the last "
        "model's training batch size, under the training augmentation of the last model's "
        "recipe unless --bn-images plain), report the test accuracy and save the result as a "
        "plain model. Compare with the inputs' test accuracy (results/cifar10/README.md).",
    )
    p.add_argument(
        "models", nargs="+", metavar="MODEL_DIR", help="plain model directories (two or more)"
    )
    add_data_options(p)
    p.add_argument(
        "--weights",
        type=positive_float,
        nargs="+",
        metavar="W",
        help="one positive weight per model (default equal)",
    )
    p.add_argument(
        "--limit-train",
        type=positive_int,
        metavar="N",
        help="measure BatchNorm statistics on a random subset of N training images",
    )
    p.add_argument(
        "--bn-images",
        choices=["augmented", "plain"],
        default="augmented",
        help="measure BatchNorm statistics on training images under the recipe's augmentation "
        "(crop/flip/cutout from the last model's train_config; default) or as they are",
    )
    p.add_argument(
        "--bn-passes",
        type=positive_int,
        default=1,
        metavar="P",
        help="passes over the training images for the statistics (default 1)",
    )
    add_seed(p)
    add_batch_size(p)
    add_quiet(p)
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="model directory to write")
    add_force(p)

    p = add(
        "export-model",
        cmd_export_model,
        "save the newest epoch checkpoint of a training run as a model",
        "Turn the newest Orbax epoch checkpoint in a training --workdir into a plain model "
        "directory (for predict, evaluate, encrypt-model, reproduce --checkpoint), recording the "
        "epoch, the recipe and that epoch's test accuracy.",
    )
    p.add_argument(
        "--workdir", required=True, metavar="DIR", help="training directory (train --workdir)"
    )
    p.add_argument(
        "--data-label",
        default=None,
        metavar="TEXT",
        help="what the model was trained on (recorded)",
    )
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="model directory to write")
    add_force(p)
