"""Keys: make one, and the size of the key space."""

from __future__ import annotations

import sys

from convmixer_jax.cli.options import (
    PROG,
    add_force,
    add_key_seed,
    add_out,
    positive_int,
    report_written,
)


def cmd_keygen(args) -> int:
    from convmixer_jax.files.atomic import check_output, write_text_atomic
    from convmixer_jax.scheme import keys

    check_output(args.out, args.force)
    key = keys.generate_key(args.block_size, args.channels, seed=args.key_seed)
    write_text_atomic(args.out, keys.key_file_text(key), force=args.force, private=True)
    if args.key_seed is not None:
        print(
            f"{PROG}: warning: a seeded key can be re-made by anyone who knows the seed; "
            "use --key-seed for experiments only",
            file=sys.stderr,
        )
    print(keys.fingerprint(key))
    report_written("secret key", args.out)
    return 0


def cmd_keyspace(args) -> int:
    from convmixer_jax.scheme import keys

    pb = keys.block_len(args.block_size, args.channels)
    log2 = keys.key_space_log2(args.block_size, args.channels)
    print(f"block size {args.block_size}, {args.channels} channels: pb = {pb}")
    half = "pb/2" if pb % 2 == 0 else "(pb-1)/2"  # floor(pb/2) ones in the flip vector
    if pb <= EXACT_KEYSPACE_MAX_PB:
        text = keys.key_space_text(args.block_size, args.channels)
        print(f"keys = pb! * C(pb, {half}) = {text}")
    else:
        digits = int(log2 * 0.30102999566398120) + 1
        print(
            f"keys = pb! * C(pb, {half}), an integer of {digits:,} digits (printed exactly up to "
            f"pb = {EXACT_KEYSPACE_MAX_PB:,})"
        )
    print(f"log2 = {log2:.2f} (about 2^{log2:.2f})")
    return 0


EXACT_KEYSPACE_MAX_PB = 20000


def register(add) -> None:
    """Add this group's subcommands with ``add(name, func, help, description)``."""
    p = add(
        "keygen",
        cmd_keygen,
        "make a secret key (pixel permutation and flip vector)",
        "Make a secret key for block size M and C channels and write "
        "it as JSON. Without --key-seed the key comes from the "
        "operating system's CSPRNG. Prints only the key's fingerprint (and, on stderr, "
        "where the key went).",
    )
    p.add_argument(
        "--block-size",
        type=positive_int,
        required=True,
        metavar="M",
        help="block size M (= the model's patch size)",
    )
    p.add_argument(
        "--channels", type=positive_int, required=True, metavar="C", help="image channels C"
    )
    add_key_seed(p, old_seed_alias=True)
    add_out(p, "KEY.json", "key file to write (kept secret)")
    add_force(p)

    p = add("keyspace", cmd_keyspace, "size of the key space, pb! * C(pb, floor(pb/2))")
    p.add_argument(
        "--block-size", type=positive_int, required=True, metavar="M", help="block size M"
    )
    p.add_argument("--channels", type=positive_int, required=True, metavar="C", help="channels C")
