"""recover-key: the key from encrypted images alone, or from plain/encrypted pairs."""

from __future__ import annotations

import json
import sys

from convmixer_jax.cli.options import (
    UsageError,
    add_data_options,
    add_force,
    add_quiet,
    add_seed,
    data_label,
    load_split,
    positive_int,
    report_written,
)


def cmd_recover_key(args) -> int:
    from convmixer_jax.files.atomic import check_output, write_text_atomic
    from convmixer_jax.scheme.keys import fingerprint, key_file_text

    check_output(
        args.out,
        args.force,
        inputs={"--plain": args.plain, "--encrypted": args.encrypted[0], "--model": args.model},
    )
    if args.plain is None:
        key = _recover_ciphertext_only(args)
    else:
        key = _recover_known_plaintext(args)
    write_text_atomic(args.out, key_file_text(key), force=args.force, private=True)
    print(fingerprint(key))
    report_written("recovered key", args.out)
    return 0


def _recover_known_plaintext(args):
    from convmixer_jax.attacks.known_plaintext import recover_key
    from convmixer_jax.files.arrays import load_images
    from convmixer_jax.scheme.images import ImageError

    for name in ("model", "public", "best_guess", "no_jpeg_trace", "block_scrambling", "grid"):
        if getattr(args, name):
            raise UsageError(
                f"--{name.replace('_', '-')} is for the ciphertext-only attack; "
                "drop it or drop --plain"
            )
    if len(args.encrypted) != 1:
        raise UsageError("with --plain, pass the encrypted images as one .npy, as the plain ones")
    plain = load_images(args.plain)
    encrypted = load_images(args.encrypted[0])
    if plain.shape != encrypted.shape:
        raise ImageError(
            f"{args.plain} holds shape {plain.shape} but {args.encrypted[0]} holds shape "
            f"{encrypted.shape}; pass each plain image with its own encrypted version"
        )
    result = recover_key(plain, encrypted, args.block_size)
    if not result.consistent:
        raise ValueError(
            "the pairs are not plain/encrypted images under one key of this block size "
            f"({result.reason})"
        )
    if result.key is None:
        raise ValueError(
            f"{result.undetermined} of the {result.block_len} positions of a block are "
            f"undetermined by these pairs ({result.num_blocks} blocks); use more image pairs, "
            "or less uniform ones (flat, repeated or gray regions leave positions ambiguous)"
        )
    return result.key


def _recover_ciphertext_only(args):
    import numpy as np

    from convmixer_jax.attacks.ciphertext_only import (
        SIGN_SIGMAS,
        block_template,
        default_prior,
        recover_key_ciphertext_only,
    )
    from convmixer_jax.attacks.image_prior import load_image_prior
    from convmixer_jax.files.image_files import load_image_inputs
    from convmixer_jax.scheme.images import check_pixel_values

    encrypted = np.asarray(load_image_inputs(args.encrypted)[0])
    if encrypted.ndim == 3:
        encrypted = encrypted[None]
    check_pixel_values(encrypted)
    n, h, w, c = encrypted.shape
    say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
    # the model first: a model that cannot be used is refused before any other work
    model, record = None, None
    if args.model:
        from convmixer_jax.files.model_dir import is_encrypted, load_model

        config, variables, meta = load_model(args.model)
        if not is_encrypted(meta):
            raise UsageError(
                f"{args.model} is a plain model; "
                "--model takes the encrypted model the provider holds"
            )
        if config.patch_size != args.block_size:
            raise UsageError(
                f"{args.model} has patch size {config.patch_size}, "
                f"not --block-size {args.block_size}"
            )
        model, record = (config, variables), meta["encryption"]
    grid = _scrambling_grid(args, record, h, w)
    public, where = _public_images(args, c, h, w)
    if grid is not None:
        return _recover_scrambled(args, encrypted, grid, model, (public, where), say)
    say(f"template from {len(public)} public images ({where}), {h} x {w}")
    template = block_template(public, args.block_size)
    prior = load_image_prior(args.prior) if args.prior else default_prior(c)
    res = recover_key_ciphertext_only(
        encrypted,
        args.block_size,
        template,
        prior=prior,
        model=model,
        public_images=public if model else None,
        seed=args.seed,
        jpeg_trace=not args.no_jpeg_trace,
        progress=not args.quiet,
    )
    summary = {
        "images": res.num_images,
        "blocks": res.num_blocks,
        "method": res.method,
        "determined": res.determined,
        "min_flip_support_sigmas": round(float(res.sign_support.min()), 2),
        "layout_margin_nats": round(res.layout_margin, 2),
        "colour_margin_nats": round(res.colour_margin, 2),
        "jpeg_trace": bool(len(res.jpeg_log_evidence)),
        "seconds": round(res.seconds, 1),
    }
    say(json.dumps(summary))
    if res.determined:
        return res.key
    flips_weak = bool(np.any(res.sign_support < SIGN_SIGMAS))
    if args.best_guess and not flips_weak:
        say(f"not determined ({res.reason}); writing the most likely key as asked (--best-guess)")
        return res.best_guess
    hint = (
        "these do not look like encrypted natural images"
        if flips_weak
        else "pass more encrypted images"
        + ("" if args.model else ", or the encrypted model with --model")
        + ", or --best-guess for the most likely key"
    )
    raise ValueError(f"cannot determine the key from {n} encrypted image(s): {res.reason}; {hint}")


def _public_images(args, channels: int, height: int, width: int):
    """The public images of the attack, (N, height, width, C) uint8 (``--public`` or the
    training split of the data options, at the encrypted images' scale), and where they
    came from."""
    import numpy as np

    from convmixer_jax.attacks.ciphertext_only import match_scale
    from convmixer_jax.files.image_files import load_image_inputs

    if args.public:
        public = np.asarray(load_image_inputs(args.public)[0])
        where = " ".join(args.public)
    else:
        public, _, _ = load_split(args, "train")
        where = f"the training split of {data_label(args)}"
    if public.shape[-1] != channels:
        raise UsageError(
            f"the public images have {public.shape[-1]} channels, the encrypted ones {channels}; "
            "pass public images of the same kind with --public"
        )
    take = max(8, int(args.public_images * 1024 / (height * width)))
    return match_scale(public[:take], height, width), where


def _scrambling_grid(args, record: dict | None, height: int, width: int):
    """The grid (gh, gw) whose block positions the key scrambles, or None for the paper's
    key: asked for with --block-scrambling or --grid, or recorded by the encrypted model
    (``record``: its ``encryption`` record, None without --model)."""
    from convmixer_jax.scheme.keys import check_grid

    asked = args.block_scrambling or args.grid is not None
    recorded = None if record is None else record.get("grid")
    if asked and record is not None and recorded is None:
        raise UsageError(
            f"{args.model} was encrypted with a key without block scrambling; drop "
            "--block-scrambling and --grid to recover that key"
        )
    if not asked and recorded is None:
        return None
    m = args.block_size
    if height % m or width % m:
        raise UsageError(
            f"the encrypted images are {height} x {width}, not whole {m} x {m} blocks; a key "
            "with block scrambling covers whole images of its grid"
        )
    own = (height // m, width // m)
    if args.grid is not None and tuple(args.grid) != own:
        raise UsageError(
            f"--grid {args.grid[0]} {args.grid[1]} does not fit the encrypted images: "
            f"{height} x {width} pixels are a {own[0]} x {own[1]} grid of {m} x {m} blocks; "
            f"pass --grid {own[0]} {own[1]}"
        )
    if recorded is not None and tuple(recorded) != own:
        raise UsageError(
            f"{args.model}'s key scrambles a {recorded[0]} x {recorded[1]} grid of blocks but "
            f"the encrypted images are a {own[0]} x {own[1]} grid; pass images of the "
            f"model's size ({recorded[0] * m} x {recorded[1] * m})"
        )
    return check_grid(own)


def _recover_scrambled(args, encrypted, grid, model, public, say):
    """A key with block scrambling on ``grid``: from the encrypted ViT ``model`` (config,
    variables) with the encrypted images as its queries, or from the encrypted images
    alone. ``public``: (public images, where they came from)."""
    from convmixer_jax.attacks.block_key import (
        recover_scrambled_key_ciphertext_only,
        recover_scrambled_key_from_model,
    )

    n, h, w, c = encrypted.shape
    public, where = public
    if model is not None:
        for name in ("prior", "no_jpeg_trace"):
            if getattr(args, name):
                raise UsageError(
                    f"--{name.replace('_', '-')} has no use with --model on a key with block "
                    "scrambling (the encrypted model chooses the colours); drop it"
                )
        say(f"{len(public)} public images ({where}), {h} x {w}, for the model's confidence")
        rec = recover_scrambled_key_from_model(
            *model, queries=encrypted, public_images=public, seed=args.seed
        )
    else:
        from convmixer_jax.attacks.ciphertext_only import block_template, default_prior
        from convmixer_jax.attacks.image_prior import load_image_prior

        say(f"template from {len(public)} public images ({where}), {h} x {w}")
        template = block_template(public, args.block_size)
        prior = load_image_prior(args.prior) if args.prior else default_prior(c)
        rec = recover_scrambled_key_ciphertext_only(
            encrypted,
            args.block_size,
            template,
            prior=prior,
            public_images=public,
            seed=args.seed,
            jpeg_trace=not args.no_jpeg_trace,
        )
    summary = {
        "images": n,
        "grid": list(grid),
        "method": rec.method,
        "determined": rec.determined,
        "up_to_mirror": rec.up_to_mirror,
        "seconds": round(rec.seconds, 1),
    }
    say(json.dumps(summary))
    if rec.determined:
        return rec.key
    if args.best_guess and rec.structured:
        say(f"not determined ({rec.reason}); writing the most likely key as asked (--best-guess)")
        return rec.best_guess
    if not rec.structured:
        hint = (
            "the model's position embedding shows no grid to read the block key from"
            if model is not None
            else "these do not look like encrypted natural images"
        )
    elif rec.up_to_mirror:
        hint = (
            "the evidence leaves the key and its mirror twin (which decrypts every image to "
            "its mirror image); --best-guess writes the more likely of the two"
        )
    else:
        hint = (
            "pass more encrypted images"
            + ("" if model is not None else ", or the encrypted model with --model")
            + ", or --best-guess for the most likely key"
        )
    raise ValueError(f"cannot determine the key from {n} encrypted image(s): {rec.reason}; {hint}")


def register(add) -> None:
    """Add this group's subcommands with ``add(name, func, help, description)``."""
    p = add(
        "recover-key",
        cmd_recover_key,
        "recover a key from encrypted images (and plain ones, if known)",
        "Without --plain (ciphertext-only): recover the key from encrypted images alone, by the "
        "statistics natural images keep under the cipher (flips from correlation signs, the "
        "layout from block-pair statistics of public images, channel order and sign from a "
        "learned colour prior and, for images decoded from JPEGs, from the JPEG quantization "
        "lattice of their luma); with --model ENC_MODEL also from the encrypted model. A key "
        "with block scrambling (a ViT's; --block-scrambling or --grid, or a --model whose key "
        "scrambles blocks) is recovered from the images alone as a jigsaw of their blocks, or "
        "from the encrypted ViT's position embedding and kernel with the images as its "
        "queries. Writes the key only when every decision clears its margin (or with "
        "--best-guess), else says what is missing and exits non-zero. With --plain (known "
        "plaintext): the key from plain/encrypted pairs (.npy, (N, H, W, C) or (H, W, C), "
        "uint8 or float in [0, 1]), written only if the pairs determine every position. "
        "Prints the key's fingerprint.",
    )
    p.add_argument(
        "--encrypted",
        required=True,
        nargs="+",
        metavar="E",
        help="encrypted images: one .npy, or PNG/JPEG files or folders of them",
    )
    p.add_argument(
        "--plain", metavar="P.npy", help="the same images, plain (known-plaintext attack)"
    )
    p.add_argument(
        "--block-size", type=positive_int, required=True, metavar="M", help="block size M"
    )
    p.add_argument(
        "--model",
        metavar="ENC_MODEL_DIR",
        help="the encrypted model (ciphertext-only attack); an encrypted ViT whose key "
        "scrambles blocks gives the block key from its position embedding",
    )
    p.add_argument(
        "--block-scrambling",
        action="store_true",
        help="the key also scrambles the block positions (a ViT's key); its grid is the "
        "encrypted images' size / M",
    )
    p.add_argument(
        "--grid",
        type=positive_int,
        nargs=2,
        metavar=("GH", "GW"),
        help="as --block-scrambling, stating the grid of GH x GW blocks (checked against the "
        "images)",
    )
    p.add_argument(
        "--public",
        nargs="+",
        metavar="IMG",
        help="public natural images for the template, or for the confidence of an encrypted "
        "ViT whose key scrambles blocks (.npy, files or folders; default: the training split "
        "of the data options, rescaled to the encrypted images' size)",
    )
    p.add_argument(
        "--public-images",
        type=positive_int,
        default=2000,
        metavar="N",
        help="public images used at 32 x 32, fewer for larger images (default 2000)",
    )
    p.add_argument(
        "--prior",
        metavar="DIR",
        help="colour prior (default: the one shipped for RGB, trained on CIFAR-10 training images)",
    )
    p.add_argument(
        "--no-jpeg-trace",
        action="store_true",
        help="decide the channel order and sign by the colour prior alone, ignoring the JPEG "
        "quantization trace of JPEG-decoded images",
    )
    p.add_argument(
        "--best-guess",
        action="store_true",
        help="write the most likely key even when it is not determined (never for images "
        "whose flips are undetermined, nor from a position embedding without grid structure)",
    )
    add_data_options(p)
    add_seed(p)
    add_quiet(p)
    p.add_argument("--out", required=True, metavar="KEY.json", help="key file to write")
    add_force(p)
