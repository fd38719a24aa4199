"""Models: make, encrypt, decrypt, re-key, and run a model directory."""
from __future__ import annotations

import json

from convmixer_jax.cli.options import positive_int, seed_arg, add_force, add_model_options, model_config, add_data_options, load_split, subset


def cmd_init_model(args) -> int:
    from convmixer_jax.files.atomic import check_output
    from convmixer_jax.files.model_dir import save_model
    from convmixer_jax.training.loop import init_variables

    check_output(args.out, args.force, kind="model_dir")
    config = model_config(args)
    variables = init_variables(config, args.seed)
    save_model(args.out, config, variables, force=args.force,
               extra={"created_by": "init-model", "seed": args.seed})
    print(f"plain model (dim {config.dim}, depth {config.depth}, patch {config.patch_size}) -> {args.out}")
    return 0


def cmd_encrypt_model(args) -> int:
    from convmixer_jax.scheme.keys import fingerprint, load_key
    from convmixer_jax.files.atomic import check_output
    from convmixer_jax.files.model_dir import encrypt_model_dir

    check_output(args.output, args.force, kind="model_dir", inputs={"IN_MODEL": args.input, "--key": args.key})
    key = load_key(args.key)
    encrypt_model_dir(args.input, args.output, key, force=args.force)
    print(f"encrypted model (key fingerprint {fingerprint(key)}) -> {args.output}")
    return 0


def cmd_decrypt_model(args) -> int:
    from convmixer_jax.scheme.keys import load_key
    from convmixer_jax.files.atomic import check_output
    from convmixer_jax.files.model_dir import decrypt_model_dir

    check_output(args.output, args.force, kind="model_dir", inputs={"IN_MODEL": args.input, "--key": args.key})
    decrypt_model_dir(args.input, args.output, load_key(args.key), force=args.force)
    print(f"plain model -> {args.output}")
    return 0


def cmd_rekey_model(args) -> int:
    from convmixer_jax.scheme.keys import fingerprint, load_key
    from convmixer_jax.files.atomic import check_output
    from convmixer_jax.files.model_dir import rekey_model_dir

    check_output(args.output, args.force, kind="model_dir",
                 inputs={"IN_MODEL": args.input, "--old-key": args.old_key, "--new-key": args.new_key})
    old, new = load_key(args.old_key), load_key(args.new_key)
    rekey_model_dir(args.input, args.output, old, new, force=args.force)
    print(f"model re-encrypted (key fingerprint {fingerprint(new)}) -> {args.output}")
    return 0


def cmd_predict(args) -> int:
    import numpy as np

    from convmixer_jax.model.inference import check_model_images, predict_logits
    from convmixer_jax.files.atomic import check_output, save_array
    from convmixer_jax.files.arrays import load_images
    from convmixer_jax.files.model_dir import load_model

    check_output(args.out, args.force, inputs={"MODEL_DIR": args.model, "IMAGES": args.images})
    config, variables, _ = load_model(args.model)
    images = load_images(args.images)
    check_model_images(config, images)
    logits = predict_logits(config, variables, images, batch_size=args.batch_size)
    save_array(args.out, np.asarray(logits, np.float32), force=args.force)
    print(f"logits {logits.shape} -> {args.out}")
    return 0


def cmd_evaluate(args) -> int:
    import numpy as np

    from convmixer_jax.scheme.images import encrypt_images
    from convmixer_jax.model.inference import accuracy, check_model_images
    from convmixer_jax.scheme.keys import fingerprint, load_key
    from convmixer_jax.files.model_dir import check_key_fits_model, is_encrypted, load_model

    config, variables, meta = load_model(args.model)
    key = load_key(args.key) if args.key else None
    if key is not None:
        check_key_fits_model(config, key)
    images, labels, _ = load_split(args, "test")
    images, labels = subset(images, labels, args.limit, args.seed)
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


def register(add) -> None:
    """Add this group's subcommands with ``add(name, func, help, description)``."""
    p = add("init-model", cmd_init_model, "make a freshly initialized plain model directory")
    add_model_options(p)
    p.add_argument("--seed", type=seed_arg, required=True, metavar="N", help="initialization seed")
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="model directory to write")
    add_force(p)

    p = add("encrypt-model", cmd_encrypt_model, "encrypt a plain model with a key",
            "Encrypt the patch embedding of a plain model with a key (signed row permutation). "
            "The encrypted model on encrypted images computes the plain model on plain images. "
            "Only the key's fingerprint is recorded in the model directory.")
    p.add_argument("--key", required=True, metavar="KEY.json", help="key file from keygen")
    p.add_argument("input", metavar="IN_MODEL", help="plain model directory")
    p.add_argument("output", metavar="OUT_MODEL", help="encrypted model directory to write")
    add_force(p)

    p = add("decrypt-model", cmd_decrypt_model, "decrypt an encrypted model with its key",
            "Restore the plain model from an encrypted one; the key must be the one it was "
            "encrypted with (checked by fingerprint).")
    p.add_argument("--key", required=True, metavar="KEY.json", help="the key the model was encrypted with")
    p.add_argument("input", metavar="IN_MODEL", help="encrypted model directory")
    p.add_argument("output", metavar="OUT_MODEL", help="plain model directory to write")
    add_force(p)

    p = add("rekey-model", cmd_rekey_model, "move an encrypted model to a new key",
            "Re-encrypt a model encrypted with --old-key so that it works with --new-key "
            "(the paper's key update), without writing the plain model.")
    p.add_argument("--old-key", required=True, metavar="A.json", help="the key the model is encrypted with")
    p.add_argument("--new-key", required=True, metavar="B.json", help="the new key")
    p.add_argument("input", metavar="IN_MODEL", help="encrypted model directory")
    p.add_argument("output", metavar="OUT_MODEL", help="model directory to write")
    add_force(p)

    p = add("predict", cmd_predict, "logits of a model on images in a .npy file",
            "Run a model (plain or encrypted) on (N, H, W, C) images in a .npy file: uint8 is "
            "scaled by 1/255, float must lie in [0, 1]. Writes float32 logits (N, classes).")
    p.add_argument("model", metavar="MODEL_DIR", help="model directory")
    p.add_argument("images", metavar="IN.npy", help="images (encrypted ones for an encrypted model)")
    p.add_argument("--out", required=True, metavar="LOGITS.npy", help="logits to write")
    p.add_argument("--batch-size", type=positive_int, default=500, metavar="B", help="default 500")
    add_force(p)

    p = add("evaluate", cmd_evaluate, "test accuracy of a model, on plain or encrypted images",
            "Accuracy on the test split; with --key the test images are encrypted with that key "
            "first (the right key for an encrypted model, or a wrong one for an attack). Prints JSON.")
    p.add_argument("model", metavar="MODEL_DIR", help="model directory")
    add_data_options(p)
    p.add_argument("--key", metavar="KEY.json", help="encrypt the test images with this key")
    p.add_argument("--limit", type=positive_int, metavar="K", help="a random subset of K test images")
    p.add_argument("--seed", type=seed_arg, default=0, metavar="N", help="seed of the --limit subset (default 0)")
    p.add_argument("--batch-size", type=positive_int, default=500, metavar="B", help="default 500")
