"""Keys: make one, and the size of the key space."""

from __future__ import annotations

import sys

from convmixer_jax.cli.options import (
    PROG,
    UsageError,
    add_force,
    add_key_seed,
    add_out,
    positive_int,
    report_written,
)


def _usage(command: str, text: str) -> UsageError:
    return UsageError(f"{command}: {text} (see '{PROG} {command} --help')")


def _grid(args, command: str) -> tuple[int, int] | None:
    """The block grid that ``--image-size S`` or ``--grid GH GW`` gives, or None."""
    if args.grid is not None:
        return tuple(args.grid)
    if args.image_size is None:
        return None
    s, m = args.image_size, args.block_size
    if s % m:
        raise _usage(
            command,
            f"--image-size {s} is not a multiple of --block-size {m}; the images must split "
            f"into whole {m} x {m} blocks (e.g. --image-size {(s // m + 1) * m})",
        )
    return s // m, s // m


def cmd_keygen(args) -> int:
    from convmixer_jax.files.atomic import check_output, write_text_atomic
    from convmixer_jax.scheme import keys

    if not args.block_scrambling and (args.image_size is not None or args.grid is not None):
        given = "--image-size" if args.image_size is not None else "--grid"
        raise _usage(
            "keygen",
            f"{given} sets the grid of block scrambling; add --block-scrambling "
            f"(or drop {given} for a key without it)",
        )
    grid = _grid(args, "keygen")
    if args.block_scrambling and grid is None:
        raise _usage(
            "keygen",
            "--block-scrambling binds the key to one image size; give it with --image-size S "
            "(square images) or --grid GH GW",
        )
    keys.block_len(args.block_size, args.channels)  # bad sizes are refused before any output
    if grid is not None:
        keys.check_grid(grid)
    check_output(args.out, args.force)
    key = keys.generate_key(args.block_size, args.channels, seed=args.key_seed, grid=grid)
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

    grid = _grid(args, "keyspace")
    pb = keys.block_len(args.block_size, args.channels)
    log2 = keys.key_space_log2(args.block_size, args.channels, grid)
    print(f"block size {args.block_size}, {args.channels} channels: pb = {pb}")
    half = "pb/2" if pb % 2 == 0 else "(pb-1)/2"  # floor(pb/2) ones in the flip vector
    formula = f"pb! * C(pb, {half})"
    exact = pb <= EXACT_KEYSPACE_MAX_PB
    if grid is not None:
        gh, gw = keys.check_grid(grid)
        m = args.block_size
        print(
            f"block scrambling: a {gh} x {gw} grid ({gh * m} x {gw * m} images), "
            f"gh*gw = {gh * gw} block positions"
        )
        formula = f"(gh*gw)! * {formula}"
        exact = exact and gh * gw <= EXACT_KEYSPACE_MAX_PB
    if exact:
        text = keys.key_space_text(args.block_size, args.channels, grid)
        print(f"keys = {formula} = {text}")
    else:
        digits = int(log2 * 0.30102999566398120) + 1
        print(
            f"keys = {formula}, an integer of {digits:,} digits (printed exactly up to "
            f"pb = {EXACT_KEYSPACE_MAX_PB:,}"
            + (f" and gh*gw = {EXACT_KEYSPACE_MAX_PB:,})" if grid is not None else ")")
        )
    print(f"log2 = {log2:.2f} (about 2^{log2:.2f})")
    if grid is not None:
        pixel = keys.key_space_log2(args.block_size, args.channels)
        print(f"of which pixel key log2 = {pixel:.2f}, block positions log2 = {log2 - pixel:.2f}")
    return 0


EXACT_KEYSPACE_MAX_PB = 20000


def _add_grid_options(p, what: str) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--image-size",
        type=positive_int,
        metavar="S",
        help=f"{what} square S x S images (S a multiple of M): a grid of S/M x S/M blocks",
    )
    g.add_argument(
        "--grid",
        type=positive_int,
        nargs=2,
        metavar=("GH", "GW"),
        help=f"{what} a grid of GH x GW blocks (images of GH*M x GW*M pixels)",
    )


def register(add) -> None:
    """Add this group's subcommands with ``add(name, func, help, description)``."""
    p = add(
        "keygen",
        cmd_keygen,
        "make a secret key (pixel permutation and flip vector, optionally block scrambling)",
        "Make a secret key for block size M and C channels and write "
        "it as JSON. Without --key-seed the key comes from the "
        "operating system's CSPRNG. With --block-scrambling the key also permutes the "
        "block positions (for Vision Transformers), which binds it to one image size, given "
        "by --image-size or --grid. Prints only the key's fingerprint (and, on stderr, "
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
    p.add_argument(
        "--block-scrambling",
        action="store_true",
        help="also permute the block positions (a key for Vision Transformers; needs "
        "--image-size or --grid)",
    )
    _add_grid_options(p, "with --block-scrambling, the key is for")
    add_key_seed(p, old_seed_alias=True)
    add_out(p, "KEY.json", "key file to write (kept secret)")
    add_force(p)

    p = add(
        "keyspace",
        cmd_keyspace,
        "size of the key space, pb! * C(pb, floor(pb/2)), times (gh*gw)! with a grid",
        "Print the number of keys for block size M and C channels, pb! * C(pb, floor(pb/2)) "
        "with pb = M*M*C, exactly and as log2. With --image-size or --grid, the keys with "
        "block scrambling on that grid: (gh*gw)! times as many.",
    )
    p.add_argument(
        "--block-size", type=positive_int, required=True, metavar="M", help="block size M"
    )
    p.add_argument("--channels", type=positive_int, required=True, metavar="C", help="channels C")
    _add_grid_options(p, "count keys with block scrambling for")
