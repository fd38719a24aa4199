"""Models: make, encrypt, decrypt, re-key, seal, and run a model directory."""

from __future__ import annotations

import argparse
import json

from convmixer_jax.cli.options import (
    UsageError,
    add_batch_size,
    add_data_options,
    add_distributed_options,
    add_force,
    add_limit,
    add_model_options,
    add_out,
    add_quiet,
    add_resize,
    add_seed,
    add_workers,
    data_label,
    model_config,
    open_split,
    positive_int,
    resolve_out,
    start_processes,
)


def cmd_init_model(args) -> int:
    from convmixer_jax.files.atomic import check_output
    from convmixer_jax.files.model_dir import save_model
    from convmixer_jax.scheme.keys import block_len
    from convmixer_jax.training.loop import init_variables

    check_output(args.out, args.force, kind="model_dir")
    config = model_config(args)
    # A model is made to be encrypted: refuse the one shape with no key but the identity
    # (patch 1 on one channel, pb = 1); odd pb is fine (floor(pb/2) flips).
    block_len(config.patch_size, config.channels)
    variables = init_variables(config, args.seed)
    save_model(
        args.out,
        config,
        variables,
        force=args.force,
        extra={"created_by": "init-model", "seed": args.seed},
    )
    what = "ViT" if config.family == "vit" else "model"
    print(
        f"plain {what} (dim {config.dim}, depth {config.depth}, "
        f"patch {config.patch_size}) -> {args.out}"
    )
    return 0


def cmd_encrypt_model(args) -> int:
    from convmixer_jax.files.atomic import check_output
    from convmixer_jax.files.model_dir import encrypt_model_dir
    from convmixer_jax.scheme.keys import fingerprint, load_key

    resolve_out(args, args.output)
    check_output(
        args.out, args.force, kind="model_dir", inputs={"IN_MODEL": args.input, "--key": args.key}
    )
    key = load_key(args.key)
    encrypt_model_dir(args.input, args.out, key, force=args.force)
    print(f"encrypted model (key fingerprint {fingerprint(key)}) -> {args.out}")
    return 0


def cmd_decrypt_model(args) -> int:
    from convmixer_jax.files.atomic import check_output
    from convmixer_jax.files.model_dir import decrypt_model_dir
    from convmixer_jax.scheme.keys import load_key

    resolve_out(args, args.output)
    check_output(
        args.out, args.force, kind="model_dir", inputs={"IN_MODEL": args.input, "--key": args.key}
    )
    decrypt_model_dir(args.input, args.out, load_key(args.key), force=args.force)
    print(f"plain model -> {args.out}")
    return 0


def cmd_rekey_model(args) -> int:
    from convmixer_jax.files.atomic import check_output
    from convmixer_jax.files.model_dir import rekey_model_dir
    from convmixer_jax.scheme.keys import fingerprint, load_key

    resolve_out(args, args.output)
    check_output(
        args.out,
        args.force,
        kind="model_dir",
        inputs={"IN_MODEL": args.input, "--old-key": args.old_key, "--new-key": args.new_key},
    )
    old, new = load_key(args.old_key), load_key(args.new_key)
    rekey_model_dir(args.input, args.out, old, new, force=args.force)
    print(f"model re-encrypted (key fingerprint {fingerprint(new)}) -> {args.out}")
    return 0


def cmd_seal_model(args) -> int:
    from convmixer_jax.files.atomic import check_output
    from convmixer_jax.files.model_dir import seal_model_dir

    check_output(args.out, args.force, kind="model_dir", inputs={"IN_MODEL": args.input})
    _, why = seal_model_dir(args.input, args.out, force=args.force)
    state = "it was sealed and intact" if why is None else "accepted as it is now"
    print(f"sealed model ({args.input}: {state}) -> {args.out}")
    return 0


def display_name(text: str, separator: str = ": ") -> str:
    """``text`` (a file or class name) as ``predict`` prints it: unchanged when it is
    ordinary, else quoted and escaped as a Python string literal (``repr``). A name is
    not ordinary when it holds a character that is not printable (a line break or any
    other control, format or separator character but the space), ``separator``, or
    begins with a quote; so no name can forge or blur a line of the output."""
    if text.isprintable() and separator not in text and not text.startswith(("'", '"')):
        return text
    return repr(text)


def _top_classes(logits, k: int, names) -> list[list[dict]]:
    """Per image, the k most likely classes: [{"class", "index", "probability"}, ...]."""
    import numpy as np

    z = logits - logits.max(axis=1, keepdims=True)
    prob = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    order = np.argsort(-prob, axis=1, kind="stable")[:, :k]
    return [
        [
            {
                "class": names[c] if names else str(int(c)),
                "index": int(c),
                "probability": float(row[c]),
            }
            for c in idx
        ]
        for idx, row in zip(order, prob, strict=True)
    ]


def cmd_predict(args) -> int:
    import numpy as np

    from convmixer_jax.files.atomic import check_output, save_array, write_text_atomic
    from convmixer_jax.files.image_files import load_image_inputs
    from convmixer_jax.files.model_dir import load_model, model_classes
    from convmixer_jax.model.inference import check_model_images, predict_logits

    if args.out is not None:
        out = check_output(
            args.out, args.force, inputs={"MODEL_DIR": args.model, "IMAGES": args.images}
        )
        if out.suffix.lower() not in (".npy", ".json"):
            raise UsageError(
                f"--out {out} must end in .npy (the logits) or .json (the top classes per image)"
            )
    config, variables, meta = load_model(args.model)
    resize = None if args.resize is None else (args.resize or config.image_size)
    images, names = load_image_inputs(args.images, resize=resize, crop_pct=args.crop_pct)
    check_model_images(config, images)
    logits = predict_logits(
        config, variables, images, batch_size=args.batch_size, progress=not args.quiet
    )
    classes = model_classes(meta)
    if classes is not None and len(classes) != config.num_classes:
        classes = None
    names = names if names is not None else [f"{args.images[0]}[{i}]" for i in range(len(images))]
    top = _top_classes(logits, min(args.top, config.num_classes), classes)
    if args.out is None or str(args.out).lower().endswith(".json"):
        lines = [
            f"{display_name(n)}: "
            + ", ".join(f"{display_name(t['class'], ', ')} {t['probability']:.3f}" for t in row)
            for n, row in zip(names, top, strict=True)
        ]
    if args.out is None:
        print("\n".join(lines))
        return 0
    if str(args.out).lower().endswith(".npy"):
        save_array(args.out, np.asarray(logits, np.float32), force=args.force)
        print(f"logits {logits.shape} -> {args.out}")
    else:
        doc = {
            "model": str(args.model),
            "classes_known": classes is not None,
            "predictions": [{"image": n, "top": row} for n, row in zip(names, top, strict=True)],
        }
        write_text_atomic(args.out, json.dumps(doc, indent=1) + "\n", force=args.force)
        print(f"top-{len(top[0]) if top else 0} classes of {len(top)} images -> {args.out}")
    return 0


def cmd_evaluate(args) -> int:
    import numpy as np

    from convmixer_jax.data import subset_indices
    from convmixer_jax.data.pipeline import batches
    from convmixer_jax.files.atomic import check_output, write_text_atomic
    from convmixer_jax.files.model_dir import (
        check_data_classes,
        check_key_fits_model,
        is_encrypted,
        load_model,
    )
    from convmixer_jax.model.inference import check_model_images, evaluate_batches
    from convmixer_jax.parallel.runtime import is_writer
    from convmixer_jax.scheme.images import encrypt_images
    from convmixer_jax.scheme.keys import fingerprint, load_key

    start_processes(args)
    if args.out is not None:
        check_output(
            args.out,
            args.force,
            inputs={"MODEL_DIR": args.model, "--key": args.key, "--data-dir": args.data_dir},
        )
    config, variables, meta = load_model(args.model)
    key = load_key(args.key) if args.key else None
    if key is not None:
        check_key_fits_model(config, key)
    resize = None if args.resize is None else (args.resize or config.image_size)
    split = open_split(args, "test", resize=resize)
    check_data_classes(config, meta, split.classes, where=f"the test data ({data_label(args)})")
    rows = subset_indices(len(split), args.limit, args.seed)
    if rows is not None:
        split = split.take(rows)
    check_model_images(config, split.images)
    transform = None
    if key is not None:  # after any resize: the blocks are those of the model's input grid

        def transform(images):
            return np.asarray(encrypt_images(images, key))

    stream = batches(split.images, split.labels, batch_size=args.batch_size, workers=args.workers)
    scores = evaluate_batches(
        config,
        variables,
        stream,
        transform=transform,
        progress=not args.quiet,
        total=len(split),
        desc="evaluate" + (" (encrypted images)" if key is not None else ""),
    )
    enc = meta.get("encryption")
    result = {
        "accuracy": scores["top1"],
        "top5_accuracy": scores["top5"],
        "images": scores["images"],
        "encrypted_images": key is not None,
        "model_encrypted": is_encrypted(meta),
        "key_fingerprint": fingerprint(key) if key is not None else None,
        "model_key_fingerprint": enc["key_fingerprint"] if enc else None,
        "model": str(args.model),
        "data": data_label(args),
        "limit": args.limit,
        "seed": args.seed,
    }
    if not is_writer():  # one process writes and reports; every process measured the same
        return 0
    if args.out is not None:
        write_text_atomic(args.out, json.dumps(result, indent=1) + "\n", force=args.force)
    print(json.dumps(result))
    return 0


def register(add) -> None:
    """Add this group's subcommands with ``add(name, func, help, description)``."""
    p = add(
        "init-model",
        cmd_init_model,
        "make a freshly initialized plain model directory",
        "Make a plain model with freshly initialized weights: the paper's ConvMixer by "
        "default, or any --preset (a ViT preset makes a Vision Transformer), with the "
        "architecture options overriding the preset's values.",
    )
    add_model_options(p)
    add_seed(p)
    add_out(p, "MODEL_DIR", "model directory to write")
    add_force(p)

    p = add(
        "encrypt-model",
        cmd_encrypt_model,
        "encrypt a plain model with a key",
        "Encrypt the patch embedding of a plain model with a key (signed row permutation); "
        "a key made with --block-scrambling also permutes the patch rows of a ViT's position "
        "embedding (a ConvMixer refuses such a key). The encrypted model on encrypted images "
        "computes the plain model on plain images. Only the key's fingerprint is recorded in "
        "the model directory.",
    )
    p.add_argument("--key", required=True, metavar="KEY.json", help="key file from keygen")
    p.add_argument("input", metavar="IN_MODEL", help="plain model directory")
    p.add_argument("output", metavar="OUT", nargs="?", help=argparse.SUPPRESS)
    add_out(p, "MODEL_DIR", "encrypted model directory to write", positional_alias=True)
    add_force(p)

    p = add(
        "decrypt-model",
        cmd_decrypt_model,
        "decrypt an encrypted model with its key",
        "Restore the plain model from an encrypted one; the key must be the one it was "
        "encrypted with (checked by fingerprint).",
    )
    p.add_argument(
        "--key", required=True, metavar="KEY.json", help="the key the model was encrypted with"
    )
    p.add_argument("input", metavar="IN_MODEL", help="encrypted model directory")
    p.add_argument("output", metavar="OUT", nargs="?", help=argparse.SUPPRESS)
    add_out(p, "MODEL_DIR", "plain model directory to write", positional_alias=True)
    add_force(p)

    p = add(
        "rekey-model",
        cmd_rekey_model,
        "move an encrypted model to a new key",
        "Re-encrypt a model encrypted with --old-key so that it works with --new-key "
        "(the paper's key update), without writing the plain model.",
    )
    p.add_argument(
        "--old-key", required=True, metavar="A.json", help="the key the model is encrypted with"
    )
    p.add_argument("--new-key", required=True, metavar="B.json", help="the new key")
    p.add_argument("input", metavar="IN_MODEL", help="encrypted model directory")
    p.add_argument("output", metavar="OUT", nargs="?", help=argparse.SUPPRESS)
    add_out(p, "MODEL_DIR", "model directory to write", positional_alias=True)
    add_force(p)

    p = add(
        "seal-model",
        cmd_seal_model,
        "seal a model directory that was changed on purpose",
        "Every command that loads a model refuses one whose config.json or weights changed "
        "after it was saved, or that carries no seal (model_sha256 in config.json). When you "
        "changed a model on purpose and trust it, this writes it, as it is now, to a new "
        "sealed model directory; IN_MODEL is left as it is. The 'notes' field of config.json "
        "is never sealed: edit it freely.",
    )
    p.add_argument("input", metavar="IN_MODEL", help="model directory to seal")
    add_out(p, "MODEL_DIR", "sealed model directory to write")
    add_force(p)

    p = add(
        "predict",
        cmd_predict,
        "a model's predictions on images: top classes or logits",
        "Run a model (plain or encrypted) on images: PNG/JPEG files, folders of them, or one .npy "
        "file (N, H, W, C) (uint8 is scaled by 1/255; float must lie in [0, 1]). Without --out it "
        "prints the --top most likely classes per image (by name when the model records its class "
        "names); --out X.npy writes float32 logits (N, classes), --out X.json the top classes.",
    )
    p.add_argument("model", metavar="MODEL_DIR", help="model directory")
    p.add_argument(
        "images",
        metavar="IMAGES",
        nargs="+",
        help="PNG/JPEG files or folders, or one .npy (encrypted images for an encrypted model)",
    )
    p.add_argument(
        "--out",
        metavar="LOGITS.npy|TOP.json",
        help="write the logits (.npy) or the top classes (.json)",
    )
    p.add_argument(
        "--top",
        type=positive_int,
        default=3,
        metavar="K",
        help="classes shown per image (default 3)",
    )
    add_resize(p, to_model=True)
    add_batch_size(p)
    add_quiet(p)
    add_force(p)

    p = add(
        "evaluate",
        cmd_evaluate,
        "test accuracy of a model, on plain or encrypted images",
        "Top-1 ('accuracy') and top-5 accuracy on the test split; with --key the test images "
        "are encrypted with that key first, after any --resize (the right key for an encrypted "
        "model, or a wrong one for an attack). The images stream: they are read and decoded "
        "batch by batch (threads, or --workers processes), so memory does not grow with their "
        "number; a bar shows images/s. A data set whose classes do not match the model's "
        "(count, or names when both are known) is refused. Prints JSON; --out also writes it. "
        "Runs over several processes too: each batch is split over all their devices, process "
        "0 reports.",
    )
    p.add_argument("model", metavar="MODEL_DIR", help="model directory")
    add_data_options(p)
    p.add_argument("--key", metavar="KEY.json", help="encrypt the test images with this key")
    add_resize(p, to_model=True)
    add_limit(p)
    add_seed(p)
    add_batch_size(p)
    add_workers(p)
    add_quiet(p)
    p.add_argument("--out", metavar="RESULT.json", help="also write the result JSON here")
    add_force(p)
    add_distributed_options(p)
