"""Images: block-wise encryption and decryption of image files (.npy arrays, PNG and JPEG)."""

from __future__ import annotations

import argparse

from convmixer_jax.cli.options import add_force, add_out, add_resize, resolve_out


def _split_output(args) -> list[str]:
    """The inputs of ``IN [IN ...] --out OUT`` or of the older ``IN.npy OUT``; sets ``args.out``."""
    from convmixer_jax.files.image_files import image_input_kind

    inputs = list(args.inputs)
    # The older form: without --out, the output as a last positional, accepted only after a single
    # non-image input (IN.npy OUT), so that 'a.png b.png' never takes b.png for the output. With
    # --out every positional is an input.
    positional = None
    if args.out is None and len(inputs) == 2 and image_input_kind(inputs[0]) == "npy":
        positional = inputs.pop()
    resolve_out(args, positional)  # a usage error naming --out when there is no output
    return inputs


def _transform_images(args, encrypt: bool) -> int:
    import numpy as np

    from convmixer_jax.files.image_files import (
        check_image_output,
        load_image_inputs,
        output_format,
        write_image_outputs,
    )
    from convmixer_jax.scheme import images as blockwise
    from convmixer_jax.scheme.keys import load_key

    inputs = _split_output(args)
    out = args.out
    fmt = output_format(out)  # a lossy or unknown format is refused before any work
    key = load_key(args.key)
    images, names = load_image_inputs(inputs, resize=args.resize, crop_pct=args.crop_pct)
    blockwise.check_images(images, key)
    n = len(names) if names is not None else int(np.prod(images.shape[:-3]))
    check_image_output(
        out,
        n_inputs=n,
        from_files=names is not None,
        force=args.force,
        inputs={"IN": inputs, "--key": args.key},
        names=names,
        images=images,
    )
    fn = blockwise.encrypt_images if encrypt else blockwise.decrypt_images
    result = np.asarray(fn(images, key)).astype(images.dtype, copy=False)
    write_image_outputs(out, result, names, force=args.force)
    verb = "encrypted" if encrypt else "decrypted"
    if fmt == "folder":
        print(f"{verb} {n} images {result.shape[1:]} {result.dtype} -> {out} ({n} PNG files)")
    else:
        print(f"{verb} {result.shape} {result.dtype} -> {out}")
    return 0


def cmd_encrypt_images(args) -> int:
    return _transform_images(args, encrypt=True)


def cmd_decrypt_images(args) -> int:
    return _transform_images(args, encrypt=False)


def register(add) -> None:
    """Add this group's subcommands with ``add(name, func, help, description)``."""
    for name, func, verb in (
        ("encrypt-images", cmd_encrypt_images, "Encrypt"),
        ("decrypt-images", cmd_decrypt_images, "Decrypt"),
    ):
        p = add(
            name,
            func,
            f"{verb.lower()} images block by block with a key",
            f"{verb} images block by block with a key. The input is one .npy file, (N, H, "
            "W, C) or one (H, W, C) image, uint8 (0..255) or float in [0, 1]; or PNG/JPEG "
            "files and folders of them (8-bit; all of one size and channel count). H and "
            "W must be divisible by the key's block size and C equal its channels; a key "
            "made with --block-scrambling takes only the image size it was made for. The "
            "output format follows its name: OUT.npy one array (the input's shape and "
            "dtype), OUT.png one image (uint8 only), a folder (a name without a suffix, "
            "or an existing folder) one PNG per input file, names kept (cat.jpg -> "
            "cat.png). JPEG and other lossy outputs are refused: they would change the "
            "encrypted pixels, and the model would no longer compute the plain model's "
            "function. The older form IN.npy OUT is deprecated but still accepted.",
        )
        p.add_argument("--key", required=True, metavar="KEY.json", help="key file from keygen")
        p.add_argument(
            "inputs",
            nargs="+",
            metavar="IN",
            help="one .npy file, or PNG/JPEG files and/or folders (a folder: its *.png, *.jpg, "
            "*.jpeg files, sorted by name, not recursive)",
        )
        # the grammar's hidden positional alias; argparse never fills it after IN [IN ...], so
        # _split_output takes the older form's OUT from the inputs
        p.add_argument("output", metavar="OUT", nargs="?", help=argparse.SUPPRESS)
        add_out(
            p,
            "OUT",
            "OUT.npy (one array), OUT.png (one image) or a folder (one PNG per input image)",
            positional_alias="after a single IN.npy",
        )
        if name == "encrypt-images":  # a client resizes first, then encrypts on the model's grid
            add_resize(p, to_model=False)
        else:
            p.set_defaults(resize=None, crop_pct=0.96)
        add_force(p)
