"""Images: block-wise encryption and decryption of image files."""
from __future__ import annotations


from convmixer_jax.cli.options import add_force


def _transform_images(args, encrypt: bool) -> int:
    import numpy as np

    from convmixer_jax.scheme import images as blockwise
    from convmixer_jax.scheme.keys import load_key
    from convmixer_jax.files.atomic import check_output, save_array
    from convmixer_jax.files.arrays import load_images

    check_output(args.output, args.force, inputs={"IN": args.input, "--key": args.key})
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


def register(add) -> None:
    """Add this group's subcommands with ``add(name, func, help, description)``."""
    for name, func, verb in (("encrypt-images", cmd_encrypt_images, "Encrypt"),
                             ("decrypt-images", cmd_decrypt_images, "Decrypt")):
        p = add(name, func, f"{verb.lower()} images block by block with a key",
                f"{verb} images in a .npy file, (N, H, W, C) or one (H, W, C) image, uint8 (0..255) or "
                "float in [0, 1], H and W divisible by the key's block size. The output has the "
                "input's shape and dtype.")
        p.add_argument("--key", required=True, metavar="KEY.json", help="key file from keygen")
        p.add_argument("input", metavar="IN.npy", help="images to read")
        p.add_argument("output", metavar="OUT.npy", help="images to write")
        add_force(p)
