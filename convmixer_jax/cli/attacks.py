"""Attacks: the wrong-key sweep, key recovery from pairs, the security report."""

from __future__ import annotations

import json
import sys

from convmixer_jax.cli.options import (
    add_batch_size,
    add_block_scrambling,
    add_data_options,
    add_distributed_options,
    add_force,
    add_key_seed,
    add_limit,
    add_quiet,
    add_seed,
    data_label,
    folder_listing,
    int_arg,
    load_split,
    open_split,
    positive_int,
    report_written,
    seed_arg,
    start_processes,
)


def _attack_model(args, config, variables, meta):
    """The encrypted variables to attack, the block grid (gh, gw) its wrong keys scramble
    (None: they do not) and a note on where the model came from."""
    from convmixer_jax.attacks.wrong_keys import key_grid, secret_key
    from convmixer_jax.files.model_dir import is_encrypted
    from convmixer_jax.scheme.keys import fingerprint
    from convmixer_jax.scheme.params import encrypt_params

    scramble = not args.no_block_scrambling
    if is_encrypted(meta):
        # the wrong keys take the form of the model's key: block scrambling if it had it
        grid = meta["encryption"].get("grid")
        return (
            variables,
            key_grid(config, scramble and grid is not None),
            {
                "model_key_fingerprint": meta["encryption"]["key_fingerprint"],
                "model_encrypted_by": "given",
            },
        )
    # A plain model: encrypt it first with a secret key (from --key-seed if given, for a
    # repeatable run; else the OS CSPRNG; process 0's in a multi-process run). Wrong keys
    # are independent of it.
    seed = None if args.key_seed is None else [args.key_seed, 0x5EC2E7]
    key = secret_key(config, seed=seed, block_scrambling=scramble)
    enc = encrypt_params(variables, key, mean=config.mean, std=config.std)
    return (
        enc,
        key.grid,
        {
            "model_key_fingerprint": fingerprint(key),
            "model_encrypted_by": "attack (secret key from --key-seed)"
            if seed
            else "attack (OS CSPRNG key)",
        },
    )


def cmd_attack(args) -> int:
    import secrets
    import time

    import numpy as np

    from convmixer_jax.attacks.wrong_keys import draw_attack_keys, wrong_key_accuracies
    from convmixer_jax.data import subset_indices
    from convmixer_jax.files.atomic import check_output, write_text_atomic
    from convmixer_jax.files.model_dir import check_data_classes, load_model
    from convmixer_jax.files.provenance import device_description
    from convmixer_jax.model.inference import check_model_images
    from convmixer_jax.parallel.runtime import from_process_zero, is_writer

    start_processes(args)
    check_output(
        args.out, args.force, inputs={"MODEL_DIR": args.model, "--data-dir": args.data_dir}
    )
    config, variables, meta = load_model(args.model)
    # opened, not loaded: only the --limit rows are read, batch by batch, as the sweep goes
    # (an image tree of CIFAR size through its memory-mapped decoded cache)
    split = open_split(args, "test", cache=True)
    check_data_classes(config, meta, split.classes, where=f"the test data ({data_label(args)})")
    rows = subset_indices(len(split), args.limit, args.seed)
    if rows is not None:
        split = split.take(rows)
    images, labels = split.images, split.labels
    check_model_images(config, images)
    enc_vars, grid, origin = _attack_model(args, config, variables, meta)
    # several processes: all attack with process 0's key seed
    seed = (
        args.key_seed
        if args.key_seed is not None
        else int(from_process_zero(np.int64(secrets.randbits(31))))
    )
    keys = draw_attack_keys(seed, args.num_keys, config.patch_size, config.channels, grid)
    t0 = time.perf_counter()
    # --batch-size counts model inputs per call, as everywhere: key_chunk keys x images
    per_call_images = max(1, args.batch_size // args.key_chunk)
    acc = wrong_key_accuracies(
        config,
        enc_vars,
        images,
        labels,
        keys,
        strategy=args.strategy,
        key_chunk=args.key_chunk,
        batch_size=per_call_images,
        progress=not args.quiet,
    )
    seconds = time.perf_counter() - t0
    result = {
        "model": str(args.model),
        **origin,
        "test_images": int(len(images)),
        "num_keys": int(args.num_keys),
        "key_seed": int(seed),
        "key_seed_source": "--key-seed" if args.key_seed is not None else "os-csprng (recorded)",
        "seed": args.seed,
        "limit": args.limit,
        "data": data_label(args),
        "strategy": args.strategy,
        "block_scrambling": grid is not None,
        "grid": None if grid is None else list(grid),
        "accuracies": [float(a) for a in acc],
        "median": float(np.median(acc)),
        "min": float(np.min(acc)),
        "max": float(np.max(acc)),
        "seconds": seconds,
        "key_image_pairs_per_second": len(images) * args.num_keys / seconds,
        "device": device_description(),
    }
    if is_writer():  # one process writes and reports; the others computed the same accuracies
        write_text_atomic(args.out, json.dumps(result, indent=1) + "\n", force=args.force)
        print(
            json.dumps(
                {
                    k: result[k]
                    for k in ("num_keys", "test_images", "strategy", "median", "min", "max")
                }
            )
        )
        report_written("wrong-key accuracies", args.out)
    return 0


def cmd_security_report(args) -> int:
    from pathlib import Path

    from convmixer_jax.attacks.report import (
        ReportInputs,
        SecurityReportConfig,
        applicable_attacks,
        report_options,
        run_security_report,
    )
    from convmixer_jax.files.atomic import check_output
    from convmixer_jax.files.model_dir import (
        ModelDirError,
        check_data_classes,
        is_encrypted,
        load_model,
    )
    from convmixer_jax.model.inference import check_model_images

    out = check_output(
        args.out,
        args.force,
        kind="results_dir",
        inputs={
            "MODEL_DIR": args.model_dir,
            "--reference-model": args.reference_model,
            "--data-dir": args.data_dir,
        },
    )
    config, variables, meta = load_model(args.model_dir)
    if is_encrypted(meta):
        raise ModelDirError(
            f"{args.model_dir} is an encrypted model; the report needs the plain model "
            "(it encrypts it with fresh keys itself)"
        )
    applicable_attacks(config)  # a family no attack applies to: refused before any data
    train_x, train_y, _ = load_split(args, "train")
    test_x, test_y, classes = load_split(args, "test")
    check_data_classes(config, meta, classes, where=f"the test data ({data_label(args)})")
    check_model_images(config, test_x[:1])
    say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
    options = {s.name: getattr(args, s.name) for s in report_options() if s.command_line}
    epochs = f"epochs {meta.get('epochs')} of {meta.get('epochs_planned', meta.get('epochs'))}"
    inputs = ReportInputs(
        model_config=config,
        variables=variables,
        train_data=(train_x, train_y),
        test_data=(test_x, test_y),
        model_dir=args.model_dir,
        model_note=f"{epochs}, test accuracy {meta.get('test_accuracy')}",
        data_label=data_label(args),
    )
    run_security_report(
        inputs,
        SecurityReportConfig.from_options(**options, key_seed=args.key_seed),
        out,
        force=args.force,
        progress=not args.quiet,
        log=say,
    )
    print(Path(out, "summary.md").read_text())
    report_written(folder_listing(out), out)
    return 0


def add_report_options(p) -> None:
    """The security report's options, generated from its config
    (:func:`convmixer_jax.attacks.report.report_options`): a field ``name`` is
    ``--name`` with its default, help, metavar and choices; an int with minimum 1 must be
    positive, with minimum 0 non-negative; a tuple takes one or more values."""
    from convmixer_jax.attacks.report import report_options

    int_types = {1: positive_int, 0: seed_arg, None: int_arg}
    for spec in report_options():
        if not spec.command_line:
            continue
        kwargs = {"default": spec.default, "help": spec.help}
        if spec.type is int:
            kwargs["type"] = int_types[spec.minimum]
        if spec.metavar:
            kwargs["metavar"] = spec.metavar
        if spec.choices:
            kwargs["choices"] = list(spec.choices)
        if spec.many:
            kwargs["nargs"] = "+"
        p.add_argument(spec.flag, **kwargs)


def _report_description() -> str:
    from convmixer_jax.attacks.report import ATTACKS

    titles = "; ".join(a.title for a in ATTACKS)
    return (
        f"Runs, in this order: {titles}. Writes security.json, summary.md and PNG plots to "
        "--out. docs/security.md explains each section and gives the command of its run and "
        "how long it took. Secret keys come from the OS CSPRNG unless --key-seed is given; "
        "only fingerprints are written."
    )


def register(add) -> None:
    """Add this group's subcommands with ``add(name, func, help, description)``."""
    p = add(
        "attack",
        cmd_attack,
        "accuracy of an encrypted model under random wrong keys",
        "Evaluate an encrypted model on test images encrypted with N random wrong keys, drawn "
        "as a batch with jax.random and evaluated under vmap in chunks (memory stays bounded). "
        "A plain model is first encrypted with a secret key (from --key-seed if given). On a "
        "ViT the keys also scramble the block positions (see --no-block-scrambling). Writes "
        "JSON. Runs over several processes too: the keys are split over all their devices, "
        "process 0 writes.",
    )
    p.add_argument("model", metavar="MODEL_DIR", help="model directory (encrypted, or plain)")
    add_data_options(p)
    p.add_argument(
        "--num-keys", type=positive_int, required=True, metavar="N", help="number of wrong keys"
    )
    add_limit(p)
    add_seed(p)
    add_key_seed(p)
    p.add_argument(
        "--strategy",
        choices=["images", "weights"],
        default="weights",
        help="encrypt the images with each key, or fold each key into the patch embedding "
        "(same accuracies; default weights)",
    )
    p.add_argument(
        "--key-chunk",
        type=positive_int,
        default=4,
        metavar="K",
        help="keys per call, folded into the batch with the images: a call runs K keys x "
        "(B / K) images (default 4)",
    )
    add_batch_size(p)
    add_block_scrambling(p)
    add_quiet(p)
    p.add_argument("--out", required=True, metavar="FILE.json", help="results to write")
    add_force(p)
    add_distributed_options(p)

    p = add(
        "security-report",
        cmd_security_report,
        "attacks beyond the paper, measured on a trained model",
        _report_description(),
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="the plain trained model")
    add_data_options(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    add_report_options(p)
    add_key_seed(p, old_seed_alias=True)
    add_quiet(p)
    add_force(p)
