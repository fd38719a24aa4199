"""The ``convmixer-jax`` command line: keys, image and model encryption, training, evaluation.

Each subcommand parses its arguments and calls library functions
(:mod:`~convmixer_jax.keys`, :mod:`~convmixer_jax.blockwise`,
:mod:`~convmixer_jax.model_io`, :mod:`~convmixer_jax.evaluate`,
:mod:`~convmixer_jax.train`). JAX and Flax are imported inside the commands
so that ``--help`` answers at once.

A user error (bad file, key, image or model, existing output without
``--force``) prints one line ``convmixer-jax: error: ...`` on stderr, exits
with 1 (2 for a malformed command line) and leaves every output path as it
was. Every file is written under a temporary name beside its destination and
renamed into place when complete.
"""
from __future__ import annotations

import argparse
import json
import sys

PROG = "convmixer-jax"

_DESCRIPTION = """\
Block-wise encryption of ConvMixer models (Iijima & Kiya, 2022).

A trusted party trains a plain model (train), makes a secret key (keygen) and
encrypts the model with it (encrypt-model); the client encrypts its images with
the same key (encrypt-images); the provider runs the encrypted model on the
encrypted images (predict) and gets the plain model's outputs on the plain images.
"""

_EPILOG = """\
example:
  convmixer-jax keygen --block-size 4 --channels 3 --out key.json
  convmixer-jax init-model --preset paper --seed 0 --out plain_model
  convmixer-jax encrypt-model --key key.json plain_model enc_model
  convmixer-jax encrypt-images --key key.json images.npy enc_images.npy
  convmixer-jax predict enc_model enc_images.npy --out logits.npy

run 'convmixer-jax COMMAND --help' for the options of a command.
"""


class _UsageError(Exception):
    """A malformed command line (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line instead of exiting."""

    def error(self, message):  # noqa: D102 - argparse API
        raise _UsageError(f"{self.prog.removeprefix(PROG + ' ')}: {message} (see '{self.prog} --help')")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _seed(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer (seeds are >= 0), got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


# --------------------------------------------------------------------------- shared options


def _add_force(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="replace the output if it exists")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model architecture (explicit options override --preset; "
                             "the defaults are the paper's ConvMixer-256/8)")
    g.add_argument("--preset", choices=["paper"], help="start from a named architecture")
    g.add_argument("--dim", type=_positive_int, help="embedding width d (paper: 256)")
    g.add_argument("--depth", type=_positive_int, help="number of mixer blocks L (paper: 8)")
    g.add_argument("--kernel-size", type=_positive_int, help="depthwise kernel size k (paper: 9)")
    g.add_argument("--patch-size", type=_positive_int,
                   help="patch size P = encryption block size M (paper: 4)")
    g.add_argument("--num-classes", type=_positive_int, help="classifier outputs (paper: 10)")
    g.add_argument("--image-size", type=_positive_int,
                   help="input height = width, a multiple of the patch size (paper: 32)")
    g.add_argument("--channels", type=_positive_int, help="input channels C (paper: 3)")


_ARCH_OPTIONS = ("dim", "depth", "kernel_size", "patch_size", "num_classes", "image_size", "channels")


def _model_config(args):
    import dataclasses

    from convmixer_jax.model import PRESETS, ConvMixerConfig

    base = PRESETS[args.preset] if args.preset else ConvMixerConfig()
    overrides = {n: getattr(args, n) for n in _ARCH_OPTIONS if getattr(args, n) is not None}
    return dataclasses.replace(base, **overrides)


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", metavar="DIR",
                   help="local data: DIR/{train,test}/<class>/*.png|jpg or the CIFAR-10 binary "
                        "batches; without it CIFAR-10 comes from tensorflow-datasets")
    p.add_argument("--tfds-data-dir", metavar="DIR",
                   help="where tensorflow-datasets keeps its prepared data (without --data-dir)")


def _load_split(args, split: str):
    from convmixer_jax.data import load_split

    return load_split(split, data_dir=args.data_dir, tfds_data_dir=args.tfds_data_dir)


def _subset(images, labels, n: int | None, seed: int):
    from convmixer_jax.data import subset

    return subset(images, labels, n, seed)


# --------------------------------------------------------------------------- commands


def cmd_keygen(args) -> int:
    from convmixer_jax import keys
    from convmixer_jax.model_io import check_output_path, write_text_atomic

    check_output_path(args.out, args.force)
    key = keys.generate_key(args.block_size, args.channels, seed=args.seed)
    write_text_atomic(args.out, keys.key_file_text(key), force=args.force, private=True)
    if args.seed is not None:
        print(f"{PROG}: warning: a seeded key can be re-made by anyone who knows the seed; "
              "use --seed for experiments only", file=sys.stderr)
    print(keys.fingerprint(key))
    return 0


def _transform_images(args, encrypt: bool) -> int:
    import numpy as np

    from convmixer_jax import blockwise
    from convmixer_jax.keys import load_key
    from convmixer_jax.model_io import check_output_path, load_images, save_array

    check_output_path(args.output, args.force)
    key = load_key(args.key)
    images = load_images(args.input)
    blockwise.check_images(images, key)
    fn = blockwise.encrypt_images if encrypt else blockwise.decrypt_images
    result = np.asarray(fn(images, key)).astype(images.dtype, copy=False)
    save_array(args.output, result, force=args.force)
    print(f"{'encrypted' if encrypt else 'decrypted'} {result.shape} {result.dtype} -> {args.output}")
    return 0


def cmd_encrypt_images(args) -> int:
    return _transform_images(args, encrypt=True)


def cmd_decrypt_images(args) -> int:
    return _transform_images(args, encrypt=False)


def cmd_init_model(args) -> int:
    from convmixer_jax.model_io import check_output_path, save_model
    from convmixer_jax.train import init_variables

    check_output_path(args.out, args.force)
    config = _model_config(args)
    variables = init_variables(config, args.seed)
    save_model(args.out, config, variables, force=args.force,
               extra={"created_by": "init-model", "seed": args.seed})
    print(f"plain model (dim {config.dim}, depth {config.depth}, patch {config.patch_size}) -> {args.out}")
    return 0


def cmd_encrypt_model(args) -> int:
    from convmixer_jax.keys import fingerprint, load_key
    from convmixer_jax.model_io import check_output_path, encrypt_model_dir

    check_output_path(args.output, args.force)
    key = load_key(args.key)
    encrypt_model_dir(args.input, args.output, key, force=args.force)
    print(f"encrypted model (key fingerprint {fingerprint(key)}) -> {args.output}")
    return 0


def cmd_decrypt_model(args) -> int:
    from convmixer_jax.keys import load_key
    from convmixer_jax.model_io import check_output_path, decrypt_model_dir

    check_output_path(args.output, args.force)
    decrypt_model_dir(args.input, args.output, load_key(args.key), force=args.force)
    print(f"plain model -> {args.output}")
    return 0


def cmd_rekey_model(args) -> int:
    from convmixer_jax.keys import fingerprint, load_key
    from convmixer_jax.model_io import check_output_path, rekey_model_dir

    check_output_path(args.output, args.force)
    old, new = load_key(args.old_key), load_key(args.new_key)
    rekey_model_dir(args.input, args.output, old, new, force=args.force)
    print(f"model re-encrypted (key fingerprint {fingerprint(new)}) -> {args.output}")
    return 0


def cmd_predict(args) -> int:
    import numpy as np

    from convmixer_jax.evaluate import check_model_images, predict_logits
    from convmixer_jax.model_io import check_output_path, load_images, load_model, save_array

    check_output_path(args.out, args.force)
    config, variables, _ = load_model(args.model)
    images = load_images(args.images)
    check_model_images(config, images)
    logits = predict_logits(config, variables, images, batch_size=args.batch_size)
    save_array(args.out, np.asarray(logits, np.float32), force=args.force)
    print(f"logits {logits.shape} -> {args.out}")
    return 0


def cmd_keyspace(args) -> int:
    from convmixer_jax import keys

    pb = keys.block_len(args.block_size, args.channels)
    n = keys.key_space(args.block_size, args.channels)
    log2 = keys.key_space_log2(args.block_size, args.channels)
    print(f"block size {args.block_size}, {args.channels} channels: pb = {pb}")
    print(f"keys = pb! * C(pb, pb/2) = {n}")
    print(f"log2 = {log2:.2f} (about 2^{log2:.2f})")
    return 0


def cmd_plot_training(args) -> int:
    from convmixer_jax.curves import chain_train_logs, plot_training_curves, read_train_log
    from convmixer_jax.model_io import check_output_path

    out = check_output_path(args.out, args.force)
    if out.suffix.lower() != ".png":
        raise _UsageError(f"--out {out} must end in .png (the curves are written as PNG)")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"the folder of --out, {out.parent}, does not exist; create it first")
    logs = [read_train_log(p) for p in args.log]
    history = logs[0] if len(logs) == 1 else chain_train_logs(logs)
    plot_training_curves(history, out)
    last = history["epochs"][-1]
    print(json.dumps({"plot": str(out), "epochs": len(history["epochs"]),
                      "test_accuracy": last.get("test_accuracy")}))
    return 0


def _warm_start(args, config):
    """(config, variables, init_from) of ``train --init-from MODEL_DIR``.

    The architecture is the starting model's; explicit architecture options
    must agree with it. Encrypted models are refused (training uses plain images).
    """
    from convmixer_jax.model_io import ModelDirError, is_encrypted, load_model

    start_config, variables, meta = load_model(args.init_from)
    if is_encrypted(meta):
        raise ModelDirError(f"--init-from {args.init_from} is an encrypted model (key fingerprint "
                            f"{meta['encryption']['key_fingerprint']}); training uses plain images, "
                            "so start from the plain model")
    asked = {n: getattr(args, n) for n in _ARCH_OPTIONS if getattr(args, n) is not None}
    if args.preset:
        asked = {n: getattr(config, n) for n in _ARCH_OPTIONS} | asked
    differ = {n: (v, getattr(start_config, n)) for n, v in asked.items() if getattr(start_config, n) != v}
    if differ:
        what = ", ".join(f"--{n.replace('_', '-')} {v} (model has {m})" for n, (v, m) in differ.items())
        raise ModelDirError(f"--init-from {args.init_from} has another architecture than asked: {what}; "
                            "drop the architecture options (the starting model's are used)")
    init_from = {"model": str(args.init_from), "epochs": meta.get("epochs"),
                 "train_seconds": meta.get("train_seconds"), "test_accuracy": meta.get("test_accuracy"),
                 "train_config": meta.get("train_config")}
    if meta.get("stage_epochs"):
        init_from["stage_epochs"] = meta["stage_epochs"]
    return start_config, variables, init_from


def cmd_train(args) -> int:
    import dataclasses
    from pathlib import Path

    import numpy as np

    from convmixer_jax.blockwise import ImageError
    from convmixer_jax.data import DataError
    from convmixer_jax.evaluate import accuracy, check_model_images
    from convmixer_jax.model_io import check_output_path, save_model
    from convmixer_jax.train import RECIPES, total_train_seconds, train, warm_start_totals

    check_output_path(args.out, args.force)
    config = _model_config(args)
    init_variables_, init_from = None, None
    if args.init_from:
        config, init_variables_, init_from = _warm_start(args, config)
    overrides = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "holdout": args.holdout}
    recipe = dataclasses.replace(RECIPES[args.recipe], seed=args.seed,
                                 **{k: v for k, v in overrides.items() if v is not None})
    train_x, train_y, classes = _load_split(args, "train")
    test_x, test_y, _ = _load_split(args, "test")
    train_x, train_y = _subset(train_x, train_y, args.limit_train, args.seed)
    test_x, test_y = _subset(test_x, test_y, args.limit_test, args.seed)
    for name, x in (("training", train_x), ("test", test_x)):
        try:
            check_model_images(config, x)
        except ImageError as e:
            raise ImageError(f"{name} images do not fit the model: {e} "
                             "(set --image-size / --channels to match the data)") from None
    top = int(max(np.max(train_y, initial=0), np.max(test_y, initial=0)))
    if top >= config.num_classes:
        raise DataError(f"the data have labels up to {top} but the model has {config.num_classes} classes; "
                        f"pass --num-classes {top + 1}")
    # A recipe with a validation hold-out is judged on it alone: the test images are
    # scored once, for the final model, after training.
    per_epoch_test = None if recipe.holdout else (test_x, test_y)
    variables, history = train(config, recipe, (train_x, train_y), per_epoch_test, args.workdir,
                               resume=args.resume, progress=not args.quiet,
                               init_variables_=init_variables_, init_from=init_from)
    if history.get("epochs"):
        from convmixer_jax.curves import plot_training_curves

        plot_training_curves(history, Path(args.workdir) / "curves.png")
    acc = history["epochs"][-1].get("test_accuracy") if history.get("epochs") else None
    if acc is None:
        acc = accuracy(config, variables, test_x, test_y)
    last = history["epochs"][-1] if history.get("epochs") else {}
    extra = {"created_by": "train", "recipe": args.recipe, "train_config": recipe.to_dict(),
             "test_accuracy": acc, "train_images": history.get("train_images", len(train_x)),
             "test_images": len(test_x), "weights": history.get("weights", "raw"),
             "holdout": history.get("holdout"), "val_accuracy": last.get("val_accuracy"),
             "val_accuracy_ema": last.get("val_accuracy_ema"),
             "data": args.data_dir if args.data_dir else "tfds:cifar10", "classes": list(classes),
             "workdir": str(args.workdir),
             **warm_start_totals(init_from, len(history["epochs"]), total_train_seconds(history),
                                 planned=recipe.epochs)}
    save_model(args.out, config, variables, extra=extra, force=args.force)
    print(json.dumps({"test_accuracy": acc, "model": str(args.out), "epochs": extra["epochs"]}))
    return 0


def cmd_average_models(args) -> int:
    import time

    from convmixer_jax.averaging import average_variables, recalibrate_batch_stats
    from convmixer_jax.evaluate import accuracy, check_model_images
    from convmixer_jax.model_io import ModelDirError, check_output_path, is_encrypted, load_model, save_model
    from convmixer_jax.train import lineage_train_seconds

    check_output_path(args.out, args.force)
    if len(args.models) < 2:
        raise _UsageError(f"average-models needs at least two models, got {len(args.models)}")
    if args.weights is not None and len(args.weights) != len(args.models):
        raise _UsageError(f"--weights gives {len(args.weights)} numbers for {len(args.models)} models; "
                          "give one per model")
    loaded = [load_model(m) for m in args.models]
    for path, (config, _, meta) in zip(args.models, loaded):
        if is_encrypted(meta):
            raise ModelDirError(f"{path} is an encrypted model; average the plain models, then encrypt the "
                                "result (its BatchNorm statistics are measured on plain training images)")
        if config != loaded[0][0]:
            raise ModelDirError(f"{path} has another architecture than {args.models[0]} "
                                f"({config.to_dict()} vs {loaded[0][0].to_dict()}); only models of one "
                                "architecture can be averaged")
    config = loaded[0][0]
    train_x, train_y, _ = _load_split(args, "train")
    test_x, test_y, _ = _load_split(args, "test")
    train_x, _ = _subset(train_x, train_y, args.limit_train, args.seed)
    check_model_images(config, train_x)
    check_model_images(config, test_x)
    train_config = loaded[-1][2].get("train_config") or {}
    bn_batch = int(train_config.get("batch_size") or args.batch_size)
    augment = None
    if args.bn_images == "augmented" and train_config.get("augment"):
        import functools

        import jax

        from convmixer_jax.train import TrainConfig, augment_batch

        augment = jax.jit(functools.partial(augment_batch, cfg=TrainConfig.from_dict(train_config)))
    t0 = time.perf_counter()
    averaged = average_variables([v for _, v, _ in loaded], args.weights)
    averaged = recalibrate_batch_stats(config, averaged, train_x, batch_size=bn_batch, augment=augment,
                                       passes=args.bn_passes, seed=args.seed, progress=not args.quiet)
    seconds = time.perf_counter() - t0
    acc = accuracy(config, averaged, test_x, test_y, batch_size=args.batch_size, progress=not args.quiet)
    inputs = [{"model": str(m), "epochs": meta.get("epochs"), "test_accuracy": meta.get("test_accuracy"),
               "train_seconds": meta.get("train_seconds")} for m, (_, _, meta) in zip(args.models, loaded)]
    weights = args.weights or [1.0] * len(args.models)
    extra = {"created_by": "average-models", "averaged": inputs, "weights": [w / sum(weights) for w in weights],
             "epochs": max(int(meta.get("epochs") or 0) for _, _, meta in loaded),
             "train_seconds": lineage_train_seconds([meta for _, _, meta in loaded]) + seconds,
             "recalibration": {"train_images": int(len(train_x)), "seconds": seconds, "batch_size": bn_batch,
                               "augment": list(train_config.get("augment") or []) if augment else [],
                               "passes": args.bn_passes, "seed": args.seed},
             "test_accuracy": acc, "test_images": int(len(test_x)),
             "train_config": train_config or None,
             "data": args.data_dir if args.data_dir else "tfds:cifar10"}
    save_model(args.out, config, averaged, extra=extra, force=args.force)
    print(json.dumps({"test_accuracy": acc, "inputs": [i["test_accuracy"] for i in inputs],
                      "model": str(args.out)}))
    return 0


def cmd_evaluate(args) -> int:
    import numpy as np

    from convmixer_jax.blockwise import encrypt_images
    from convmixer_jax.evaluate import accuracy, check_model_images
    from convmixer_jax.keys import fingerprint, load_key
    from convmixer_jax.model_io import check_key_fits_model, is_encrypted, load_model

    config, variables, meta = load_model(args.model)
    key = load_key(args.key) if args.key else None
    if key is not None:
        check_key_fits_model(config, key)
    images, labels, _ = _load_split(args, "test")
    images, labels = _subset(images, labels, args.limit, args.seed)
    check_model_images(config, images)
    if key is not None:
        images = np.asarray(encrypt_images(images, key))
    acc = accuracy(config, variables, images, labels, batch_size=args.batch_size)
    enc = meta.get("encryption")
    print(json.dumps({"accuracy": acc, "images": int(len(images)), "encrypted_images": key is not None,
                      "model_encrypted": is_encrypted(meta),
                      "key_fingerprint": fingerprint(key) if key is not None else None,
                      "model_key_fingerprint": enc["key_fingerprint"] if enc else None}))
    return 0


def _attack_model(args, config, variables, meta):
    """The encrypted variables to attack and a note on where they came from."""
    from convmixer_jax.keys import fingerprint, generate_key
    from convmixer_jax.model_encryption import encrypt_params
    from convmixer_jax.model_io import is_encrypted

    if is_encrypted(meta):
        return variables, {"model_key_fingerprint": meta["encryption"]["key_fingerprint"],
                           "model_encrypted_by": "given"}
    # A plain model: encrypt it first with a secret key (from --seed if given, for a
    # repeatable run; else the OS CSPRNG). Wrong keys are independent of it.
    seed = None if args.seed is None else [args.seed, 0x5EC2E7]
    key = generate_key(config.patch_size, config.channels, seed=seed)
    enc = encrypt_params(variables, key, mean=config.mean, std=config.std)
    return enc, {"model_key_fingerprint": fingerprint(key),
                 "model_encrypted_by": "attack (secret key from --seed)" if seed else "attack (OS CSPRNG key)"}


def cmd_attack(args) -> int:
    import secrets
    import time

    import numpy as np

    from convmixer_jax.attack import draw_attack_keys, wrong_key_accuracies
    from convmixer_jax.evaluate import check_model_images
    from convmixer_jax.model_io import check_output_path, load_model, write_text_atomic
    from convmixer_jax.reproduce import device_description

    check_output_path(args.out, args.force)
    config, variables, meta = load_model(args.model)
    images, labels, _ = _load_split(args, "test")
    images, labels = _subset(images, labels, args.limit, 0 if args.seed is None else args.seed)
    check_model_images(config, images)
    enc_vars, origin = _attack_model(args, config, variables, meta)
    seed = args.seed if args.seed is not None else secrets.randbits(31)
    keys = draw_attack_keys(seed, args.num_keys, config.patch_size, config.channels)
    t0 = time.perf_counter()
    acc = wrong_key_accuracies(config, enc_vars, images, labels, keys, strategy=args.strategy,
                               key_chunk=args.key_chunk, batch_size=args.batch_size,
                               progress=not args.quiet)
    seconds = time.perf_counter() - t0
    result = {"model": str(args.model), **origin, "test_images": int(len(images)),
              "num_keys": int(args.num_keys), "seed": int(seed), "strategy": args.strategy,
              "accuracies": [float(a) for a in acc], "median": float(np.median(acc)),
              "min": float(np.min(acc)), "max": float(np.max(acc)), "seconds": seconds,
              "key_image_pairs_per_second": len(images) * args.num_keys / seconds,
              "device": device_description()}
    write_text_atomic(args.out, json.dumps(result, indent=1) + "\n", force=args.force)
    print(json.dumps({k: result[k] for k in ("num_keys", "test_images", "strategy", "median", "min", "max")}))
    return 0


def cmd_reproduce(args) -> int:
    import dataclasses
    from pathlib import Path

    from convmixer_jax.evaluate import check_model_images
    from convmixer_jax.model import PRESETS
    from convmixer_jax.model_io import (ModelDirError, check_replaceable_dir, is_encrypted, load_model, save_model,
                                        staged_output_dir)
    from convmixer_jax.reproduce import run_experiment
    from convmixer_jax.train import RECIPES, total_train_seconds, train

    out = check_replaceable_dir(args.out, args.force, {"--checkpoint": args.checkpoint, "--workdir": args.workdir,
                                                        "--data-dir": args.data_dir})
    test_x, test_y, _ = _load_split(args, "test")
    test_x, test_y = _subset(test_x, test_y, args.limit, args.seed)
    if args.checkpoint:
        config, variables, meta = load_model(args.checkpoint)
        if is_encrypted(meta):
            raise ModelDirError(f"{args.checkpoint} is an encrypted model; reproduce needs the plain "
                                "model (decrypt-model it first)")
        provenance = {"checkpoint": str(args.checkpoint), "epochs": meta.get("epochs"),
                      "train_seconds": meta.get("train_seconds"),
                      "train_config": meta.get("train_config"), "data": meta.get("data"),
                      **{k: meta[k] for k in ("stage_epochs", "init_from", "averaged", "recalibration") if k in meta}}
        trained = None
    else:
        config = PRESETS["paper"]
        recipe = RECIPES[args.recipe]
        if args.epochs:
            recipe = dataclasses.replace(recipe, epochs=args.epochs)
        recipe = dataclasses.replace(recipe, seed=args.seed)
        train_x, train_y, _ = _load_split(args, "train")
        workdir = Path(args.workdir) if args.workdir else out.with_name(out.name + "-work")
        variables, history = train(config, recipe, (train_x, train_y), (test_x, test_y), workdir,
                                   resume=args.resume, progress=not args.quiet)
        provenance = {"checkpoint": None, "epochs": recipe.epochs, "train_seconds": total_train_seconds(history),
                      "train_config": recipe.to_dict(), "train_log": history["epochs"]}
        trained = (config, variables, provenance)
    provenance["data"] = args.data_dir if args.data_dir else "tfds:cifar10"
    check_model_images(config, test_x)
    with staged_output_dir(out) as tmp:
        if trained is not None:
            save_model(tmp / "plain-model", config, variables,
                       extra={"created_by": "reproduce", **{k: v for k, v in provenance.items() if k != "train_log"}})
        results = run_experiment(config, variables, (test_x, test_y), tmp, num_keys=args.num_keys,
                                 attack_seed=args.attack_seed, key_seed=args.key_seed,
                                 strategy=args.strategy, provenance=provenance, progress=not args.quiet,
                                 log=lambda m: print(m, file=sys.stderr))
    summary = {k: results[k] for k in ("test_images", "baseline_plain", "encrypted_plain", "encrypted_encrypted",
                                       "identical_predictions", "wrong_keys_median", "key_space_log2")}
    print(json.dumps(summary))
    return 0


def cmd_security_report(args) -> int:
    import dataclasses
    import tempfile
    from pathlib import Path

    from convmixer_jax.evaluate import check_model_images
    from convmixer_jax.model_io import ModelDirError, check_replaceable_dir, is_encrypted, load_model
    from convmixer_jax.security_report import run_security_report
    from convmixer_jax.train import RECIPES, train

    out = check_replaceable_dir(args.out, args.force, {"MODEL_DIR": args.model_dir,
                                                        "--reference-model": args.reference_model,
                                                        "--data-dir": args.data_dir})
    config, variables, meta = load_model(args.model_dir)
    if is_encrypted(meta):
        raise ModelDirError(f"{args.model_dir} is an encrypted model; the report needs the plain model "
                            "(it encrypts it with fresh keys itself)")
    train_x, train_y, _ = _load_split(args, "train")
    test_x, test_y, _ = _load_split(args, "test")
    check_model_images(config, test_x[:1])
    say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
    if args.reference_model:
        ref_config, reference, ref_meta = load_model(args.reference_model)
        if ref_config.to_dict() != config.to_dict() or is_encrypted(ref_meta):
            raise ModelDirError(f"{args.reference_model} must be a plain model of the same architecture "
                                f"as {args.model_dir}")
        ref_note = (f"{args.reference_model} (epochs {ref_meta.get('epochs')}, test accuracy "
                    f"{ref_meta.get('test_accuracy')})")
    elif args.reference_epochs > 0:
        recipe = dataclasses.replace(RECIPES["fast"], epochs=args.reference_epochs, seed=args.reference_seed)
        rx, ry = _subset(train_x, train_y, args.reference_train_images, args.reference_seed)
        say(f"training an independent reference: seed {args.reference_seed}, {len(rx)} images, "
            f"{args.reference_epochs} epochs of the fast recipe")
        with tempfile.TemporaryDirectory(prefix="convmixer-reference-") as work:
            reference, _ = train(config, recipe, (rx, ry), None, work, progress=not args.quiet, log=say)
        ref_note = (f"trained by the report: seed {args.reference_seed}, {len(rx)} training images, "
                    f"{args.reference_epochs} epochs of the fast recipe")
    else:
        reference, ref_note = None, ""
    run_security_report(
        config, variables, (train_x, train_y), (test_x, test_y), out, model_dir=args.model_dir,
        model_note=f"epochs {meta.get('epochs')} of {meta.get('epochs_planned', meta.get('epochs'))}, "
                   f"test accuracy {meta.get('test_accuracy')}",
        data_label=args.data_dir or "tfds:cifar10", reference_variables=reference, reference_note=ref_note,
        kp_pairs=args.pairs, kp_trials=args.trials, recovery_keys=args.recovery_keys,
        eval_images=args.eval_images, public_images=args.public_images, finetune_sizes=args.finetune_sizes, finetune_modes=args.finetune_modes,
        finetune_steps=args.finetune_steps, seed=args.seed, force=args.force, progress=not args.quiet, log=say)
    print(Path(out, "summary.md").read_text())
    return 0


def cmd_recover_key(args) -> int:
    from convmixer_jax.blockwise import ImageError
    from convmixer_jax.key_recovery import recover_key
    from convmixer_jax.keys import fingerprint, key_file_text
    from convmixer_jax.model_io import check_output_path, load_images, write_text_atomic

    check_output_path(args.out, args.force)
    plain = load_images(args.plain)
    encrypted = load_images(args.encrypted)
    if plain.shape != encrypted.shape:
        raise ImageError(f"{args.plain} holds shape {plain.shape} but {args.encrypted} holds shape "
                         f"{encrypted.shape}; pass each plain image with its own encrypted version")
    result = recover_key(plain, encrypted, args.block_size)
    if not result.consistent:
        raise ValueError("the pairs are not plain/encrypted images under one key of this block size "
                         f"({result.reason})")
    if result.key is None:
        raise ValueError(f"{result.undetermined} of the {result.block_len} positions of a block are "
                         f"undetermined by these pairs ({result.num_blocks} blocks); use more image pairs, "
                         "or less uniform ones (flat, repeated or gray regions leave positions ambiguous)")
    write_text_atomic(args.out, key_file_text(result.key), force=args.force, private=True)
    print(fingerprint(result.key))
    return 0


def cmd_export_model(args) -> int:
    from convmixer_jax.model_io import check_output_path, save_model
    from convmixer_jax.train import load_checkpoint, warm_start_totals

    check_output_path(args.out, args.force)
    config, variables, info = load_checkpoint(args.workdir)
    log = info["log"] or {}
    totals = warm_start_totals(info["init_from"], info["epoch"], info["train_seconds"],
                               planned=info["epochs_planned"])
    extra = {"created_by": "export-model", "workdir": str(args.workdir), **totals,
             "train_config": info["recipe"],
             "test_accuracy": log.get("test_accuracy_ema" if info["weights"] == "ema" else "test_accuracy"),
             "train_accuracy": log.get("train_accuracy"), "data": args.data_label,
             "weights": info["weights"], "holdout": info["holdout"], "train_images": info["train_images"],
             "val_accuracy": log.get("val_accuracy"), "val_accuracy_ema": log.get("val_accuracy_ema")}
    save_model(args.out, config, variables, extra=extra, force=args.force)
    print(json.dumps({"model": str(args.out), "epoch": extra["epochs"], "of": extra["epochs_planned"],
                      "test_accuracy": extra["test_accuracy"]}))
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description=_DESCRIPTION, epilog=_EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name, func, help_, description=None):
        p = sub.add_parser(name, help=help_, description=description or help_)
        p.set_defaults(func=func)
        return p

    p = add("keygen", cmd_keygen, "make a secret key (pixel permutation and flip vector)",
            "Make a secret key for block size M and C channels and write it as JSON. Without --seed "
            "the key comes from the operating system's CSPRNG. Prints only the key's fingerprint.")
    p.add_argument("--block-size", type=_positive_int, required=True, metavar="M",
                   help="block size M (= the model's patch size)")
    p.add_argument("--channels", type=_positive_int, required=True, metavar="C", help="image channels C")
    p.add_argument("--seed", type=_seed, metavar="N", help="reproducible key, for experiments only")
    p.add_argument("--out", required=True, metavar="KEY.json", help="key file to write (kept secret)")
    _add_force(p)

    for name, func, verb in (("encrypt-images", cmd_encrypt_images, "Encrypt"),
                             ("decrypt-images", cmd_decrypt_images, "Decrypt")):
        p = add(name, func, f"{verb.lower()} images block by block with a key",
                f"{verb} images in a .npy file, (N, H, W, C) or one (H, W, C) image, uint8 (0..255) or "
                "float in [0, 1], H and W divisible by the key's block size. The output has the "
                "input's shape and dtype.")
        p.add_argument("--key", required=True, metavar="KEY.json", help="key file from keygen")
        p.add_argument("input", metavar="IN.npy", help="images to read")
        p.add_argument("output", metavar="OUT.npy", help="images to write")
        _add_force(p)

    p = add("init-model", cmd_init_model, "make a freshly initialized plain model directory")
    _add_model_options(p)
    p.add_argument("--seed", type=_seed, required=True, metavar="N", help="initialization seed")
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="model directory to write")
    _add_force(p)

    p = add("encrypt-model", cmd_encrypt_model, "encrypt a plain model with a key",
            "Encrypt the patch embedding of a plain model with a key (signed row permutation). "
            "The encrypted model on encrypted images computes the plain model on plain images. "
            "Only the key's fingerprint is recorded in the model directory.")
    p.add_argument("--key", required=True, metavar="KEY.json", help="key file from keygen")
    p.add_argument("input", metavar="IN_MODEL", help="plain model directory")
    p.add_argument("output", metavar="OUT_MODEL", help="encrypted model directory to write")
    _add_force(p)

    p = add("decrypt-model", cmd_decrypt_model, "decrypt an encrypted model with its key",
            "Restore the plain model from an encrypted one; the key must be the one it was "
            "encrypted with (checked by fingerprint).")
    p.add_argument("--key", required=True, metavar="KEY.json", help="the key the model was encrypted with")
    p.add_argument("input", metavar="IN_MODEL", help="encrypted model directory")
    p.add_argument("output", metavar="OUT_MODEL", help="plain model directory to write")
    _add_force(p)

    p = add("rekey-model", cmd_rekey_model, "move an encrypted model to a new key",
            "Re-encrypt a model encrypted with --old-key so that it works with --new-key "
            "(the paper's key update), without writing the plain model.")
    p.add_argument("--old-key", required=True, metavar="A.json", help="the key the model is encrypted with")
    p.add_argument("--new-key", required=True, metavar="B.json", help="the new key")
    p.add_argument("input", metavar="IN_MODEL", help="encrypted model directory")
    p.add_argument("output", metavar="OUT_MODEL", help="model directory to write")
    _add_force(p)

    p = add("predict", cmd_predict, "logits of a model on images in a .npy file",
            "Run a model (plain or encrypted) on (N, H, W, C) images in a .npy file: uint8 is "
            "scaled by 1/255, float must lie in [0, 1]. Writes float32 logits (N, classes).")
    p.add_argument("model", metavar="MODEL_DIR", help="model directory")
    p.add_argument("images", metavar="IN.npy", help="images (encrypted ones for an encrypted model)")
    p.add_argument("--out", required=True, metavar="LOGITS.npy", help="logits to write")
    p.add_argument("--batch-size", type=_positive_int, default=500, metavar="B", help="default 500")
    _add_force(p)

    p = add("keyspace", cmd_keyspace, "size of the key space, pb! * C(pb, pb/2)")
    p.add_argument("--block-size", type=_positive_int, required=True, metavar="M", help="block size M")
    p.add_argument("--channels", type=_positive_int, required=True, metavar="C", help="channels C")

    p = add("plot-training", cmd_plot_training, "plot a training run's loss and accuracy per epoch",
            "Draw the per-epoch training loss and train / test accuracy of a training run "
            "(its --workdir or train_log.json; works while the run is going) as a PNG. Several "
            "logs, first stage first, draw a run trained in stages (train --init-from) as one.")
    p.add_argument("log", metavar="WORKDIR_OR_LOG", nargs="+",
                   help="training --workdir, or its train_log.json (several: the stages in order)")
    p.add_argument("--out", required=True, metavar="CURVES.png", help="PNG to write")
    _add_force(p)

    p = add("train", cmd_train, "train a plain model and save it",
            "Train a ConvMixer on plain images with a recipe (paper: Adam 1e-3, batch 128, 200 "
            "epochs), checkpointing every epoch into --workdir, then save the plain model with "
            "its recipe and final test accuracy in config.json.")
    _add_data_options(p)
    p.add_argument("--recipe", choices=["paper", "fast", "strong"], default="paper",
                   help="training recipe (default paper; strong: fast + RandAugment, EMA, 5,000 held out)")
    p.add_argument("--epochs", type=_positive_int, metavar="E", help="override the recipe's epochs")
    p.add_argument("--batch-size", type=_positive_int, metavar="B", help="override the recipe's batch size")
    p.add_argument("--lr", type=_positive_float, help="override the recipe's (peak) learning rate")
    p.add_argument("--holdout", type=_seed, metavar="N",
                   help="override the recipe's validation hold-out: N training images, stratified, "
                        "not trained on (0: none)")
    _add_model_options(p)
    p.add_argument("--seed", type=_seed, default=0, metavar="N",
                   help="initialization, data order, augmentation and --limit-* subsets (default 0)")
    p.add_argument("--workdir", required=True, metavar="DIR", help="checkpoints and train_log.json")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --workdir")
    p.add_argument("--init-from", metavar="MODEL_DIR",
                   help="warm start: begin from this plain model's weights (and architecture) with a "
                        "fresh optimizer and schedule, e.g. a second one-cycle; the saved model counts "
                        "the epochs and seconds of both stages")
    p.add_argument("--limit-train", type=_positive_int, metavar="N", help="train on a random subset of N images")
    p.add_argument("--limit-test", type=_positive_int, metavar="N", help="test on a random subset of N images")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="model directory to write")
    _add_force(p)

    p = add("average-models", cmd_average_models, "average plain models' weights and re-measure BatchNorm",
            "Average the weights of two or more plain models of one architecture (a uniform model soup, "
            "as at the end of stochastic weight averaging; meant for models of one training lineage, "
            "e.g. a model and its train --init-from continuation), re-estimate every BatchNorm's "
            "statistics on the training images (shuffled, in batches of the training batch size, "
            "under the training augmentation of the last model's recipe unless --bn-images plain), "
            "report the test accuracy and save the result as a plain model. Compare with the inputs' "
            "test accuracy (results/cifar10/README.md).")
    p.add_argument("models", nargs="+", metavar="MODEL_DIR", help="plain model directories (two or more)")
    _add_data_options(p)
    p.add_argument("--weights", type=_positive_float, nargs="+", metavar="W",
                   help="one positive weight per model (default equal)")
    p.add_argument("--limit-train", type=_positive_int, metavar="N",
                   help="measure BatchNorm statistics on a random subset of N training images")
    p.add_argument("--bn-images", choices=["augmented", "plain"], default="augmented",
                   help="measure BatchNorm statistics on training images under the recipe's augmentation "
                        "(crop/flip/cutout from the last model's train_config; default) or as they are")
    p.add_argument("--bn-passes", type=_positive_int, default=1, metavar="P",
                   help="passes over the training images for the statistics (default 1)")
    p.add_argument("--seed", type=_seed, default=0, metavar="N",
                   help="seed of the --limit-train subset, the shuffling and the augmentation (default 0)")
    p.add_argument("--batch-size", type=_positive_int, default=500, metavar="B",
                   help="test evaluation batch size (default 500); the statistics use the training batch size")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="model directory to write")
    _add_force(p)

    p = add("evaluate", cmd_evaluate, "test accuracy of a model, on plain or encrypted images",
            "Accuracy on the test split; with --key the test images are encrypted with that key "
            "first (the right key for an encrypted model, or a wrong one for an attack). Prints JSON.")
    p.add_argument("model", metavar="MODEL_DIR", help="model directory")
    _add_data_options(p)
    p.add_argument("--key", metavar="KEY.json", help="encrypt the test images with this key")
    p.add_argument("--limit", type=_positive_int, metavar="K", help="a random subset of K test images")
    p.add_argument("--seed", type=_seed, default=0, metavar="N", help="seed of the --limit subset (default 0)")
    p.add_argument("--batch-size", type=_positive_int, default=500, metavar="B", help="default 500")
    p = add("export-model", cmd_export_model, "save the newest epoch checkpoint of a training run as a model",
            "Turn the newest Orbax epoch checkpoint in a training --workdir into a plain model "
            "directory (for predict, evaluate, encrypt-model, reproduce --checkpoint), recording the "
            "epoch, the recipe and that epoch's test accuracy.")
    p.add_argument("--workdir", required=True, metavar="DIR", help="training directory (train --workdir)")
    p.add_argument("--data-label", default=None, metavar="TEXT", help="what the model was trained on (recorded)")
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="model directory to write")
    _add_force(p)

    p = add("attack", cmd_attack, "accuracy of an encrypted model under random wrong keys",
            "Evaluate an encrypted model on test images encrypted with N random wrong keys, drawn "
            "as a batch with jax.random and evaluated under vmap in chunks (memory stays bounded). "
            "A plain model is first encrypted with a secret key (from --seed if given). Writes JSON.")
    p.add_argument("model", metavar="MODEL_DIR", help="model directory (encrypted, or plain)")
    _add_data_options(p)
    p.add_argument("--num-keys", type=_positive_int, required=True, metavar="N", help="number of wrong keys")
    p.add_argument("--limit", type=_positive_int, metavar="K", help="a random subset of K test images")
    p.add_argument("--seed", type=_seed, metavar="S",
                   help="seed of the wrong keys (and the --limit subset); default: a random one, recorded")
    p.add_argument("--strategy", choices=["images", "weights"], default="weights",
                   help="encrypt the images with each key, or fold each key into the patch embedding "
                        "(same accuracies; default weights)")
    p.add_argument("--key-chunk", type=_positive_int, default=4, metavar="K",
                   help="keys per call, folded into the batch with the images (default 4)")
    p.add_argument("--batch-size", type=_positive_int, default=125, metavar="B",
                   help="images per call; a call evaluates K x B pairs (default 125: 500 pairs)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, metavar="FILE.json", help="results to write")
    _add_force(p)

    p = add("reproduce", cmd_reproduce, "the paper's experiment: Table 1, Fig. 4, Fig. 5, key space",
            "Train (or load with --checkpoint) the plain ConvMixer-256/8, draw a fresh secret key from the "
            "OS CSPRNG, encrypt the model and write results.json, table1.md, fig4.png and fig5.png to --out. "
            "The key is never written; results.json holds its fingerprint.")
    _add_data_options(p)
    p.add_argument("--checkpoint", metavar="MODEL_DIR", help="a trained plain model (skip training)")
    p.add_argument("--recipe", choices=["paper", "fast"], default="fast", help="training recipe (default fast)")
    p.add_argument("--epochs", type=_positive_int, metavar="E", help="override the recipe's epochs")
    p.add_argument("--workdir", metavar="DIR", help="training checkpoints (default OUT-work)")
    p.add_argument("--resume", action="store_true", help="continue training from --workdir")
    p.add_argument("--num-keys", type=_int, default=100, metavar="N", help="random wrong keys (default 100)")
    p.add_argument("--limit", type=_positive_int, metavar="K", help="a random subset of K test images")
    p.add_argument("--seed", type=_seed, default=0, metavar="N", help="training seed and --limit subset (default 0)")
    p.add_argument("--key-seed", type=_seed, metavar="N",
                   help="reproducible secret key (experiments only; default: OS CSPRNG)")
    p.add_argument("--attack-seed", type=_seed, metavar="N", help="seed of the wrong keys (default: random, recorded)")
    p.add_argument("--strategy", choices=["images", "weights"], default="weights", help="wrong-key sweep strategy")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    _add_force(p)

    p = add("security-report", cmd_security_report, "attacks beyond the paper, measured on a trained model",
            "Known-plaintext key recovery rate, key recovery from the encrypted model (with the original "
            "weights, with an independently trained reference, from the encrypted model alone) and the "
            "fine-tuning attack; writes security.json, summary.md and PNG plots to --out. The defaults "
            "finish in about 30 minutes on a 2-core CPU. Secret keys come from the OS CSPRNG unless "
            "--seed is given; only fingerprints are written.")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="the plain trained model")
    _add_data_options(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--reference-model", metavar="DIR",
                   help="an independently trained plain model of the same architecture (default: train one)")
    p.add_argument("--reference-epochs", type=_int, default=2, metavar="E",
                   help="epochs of the reference trained when --reference-model is not given (0: skip; default 2)")
    p.add_argument("--reference-train-images", type=_positive_int, default=10000, metavar="N",
                   help="training images of that reference (default 10000)")
    p.add_argument("--reference-seed", type=_seed, default=1, metavar="N", help="its seed (default 1)")
    p.add_argument("--pairs", type=_positive_int, nargs="+", default=[1, 2, 4], metavar="N",
                   help="known-plaintext pair counts (default 1 2 4)")
    p.add_argument("--trials", type=_positive_int, default=200, metavar="T", help="trials per pair count (default 200)")
    p.add_argument("--recovery-keys", type=_positive_int, default=3, metavar="K",
                   help="secret keys per model-recovery attack (default 3)")
    p.add_argument("--eval-images", type=_positive_int, default=2000, metavar="N",
                   help="test images for the accuracies (default 2000)")
    p.add_argument("--public-images", type=_int, default=256, metavar="N",
                   help="unlabeled training images the model-recovery adversary may use (0: none; default 256)")
    p.add_argument("--finetune-sizes", type=_positive_int, nargs="+", default=[100, 500, 1000, 5000], metavar="N",
                   help="labeled plain images of the fine-tuning adversary (default 100 500 1000 5000)")
    p.add_argument("--finetune-modes", nargs="+", choices=["stem", "all", "scratch"],
                   default=["stem", "all", "scratch"], help="what is trained (default: all three)")
    p.add_argument("--finetune-steps", type=_positive_int, metavar="S",
                   help="steps per fine-tuning run (default: grows with n, see finetune_attack.default_steps)")
    p.add_argument("--seed", type=_seed, metavar="N", help="repeatable keys and subsets (default: OS CSPRNG keys)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    _add_force(p)

    p = add("recover-key", cmd_recover_key, "recover a key from plain/encrypted image pairs",
            "Known-plaintext attack: recover the key from plain images and the same images "
            "encrypted with it (.npy, (N, H, W, C) or (H, W, C), uint8 or float in [0, 1]). Writes "
            "the key file only if the pairs determine every position of the key; prints its fingerprint.")
    p.add_argument("--plain", required=True, metavar="P.npy", help="plain images")
    p.add_argument("--encrypted", required=True, metavar="E.npy", help="the same images, encrypted")
    p.add_argument("--block-size", type=_positive_int, required=True, metavar="M", help="block size M")
    p.add_argument("--out", required=True, metavar="KEY.json", help="key file to write")
    _add_force(p)
    return parser


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 600 else text[:597] + "..."


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.func(args)
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except _UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        # Library errors (InvalidKeyError, ImageError, ModelDirError, DataError,
        # KeyModelMismatch are ValueErrors) and file errors: one line, no traceback.
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
