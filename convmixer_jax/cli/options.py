"""Argument types and the options that several commands share."""

from __future__ import annotations

import argparse

from convmixer_jax.model.config import ACTIVATIONS, PAPER_SOURCE, PRESETS, REGISTRY, TIMM_NAMES
from convmixer_jax.training.recipes import RECIPES, TrainConfig

PROG = "convmixer-jax"


class UsageError(Exception):
    """A malformed command line (exit status 2)."""


class Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line instead of exiting."""

    def error(self, message):  # noqa: D102 - argparse API
        # the line begins "convmixer-jax: error: ", then the subcommand if there is one
        command = self.prog.removeprefix(PROG).strip()
        where = f"{command}: " if command else ""
        raise UsageError(f"{where}{message} (see '{self.prog} --help')")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def int_arg(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def seed_arg(text: str) -> int:
    value = int_arg(text)
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"expected a non-negative integer (seeds are >= 0), got {value}"
        )
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def add_force(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="replace the output if it exists")


# The options below mean the same thing, with the same default, in every command
# that has them (tests/test_cli_grammar.py checks every subcommand's --help).


def add_out(
    p: argparse.ArgumentParser,
    metavar: str,
    help_: str,
    *,
    positional_alias: bool | str = False,
) -> None:
    """``--out`` for the command's output, described by ``help_``.

    With ``positional_alias`` the older form, the output as the last positional argument,
    is still accepted (see :func:`resolve_out`); a string says when, e.g. ``"after a single
    IN.npy"``. The help says so after ``help_``, which describes ``--out`` alone.
    """
    note = ""
    if positional_alias:
        when = f" {positional_alias}" if isinstance(positional_alias, str) else ""
        note = f"; the older form, {metavar} as the last positional argument, is still accepted"
        note += when
    p.add_argument("--out", metavar=metavar, required=not positional_alias, help=help_ + note)


def resolve_out(args, positional: str | None) -> None:
    """Set ``args.out`` from ``--out`` or the older positional form; exactly one must be given."""
    if positional is not None and args.out is not None:
        raise UsageError(
            f"{args.command}: the output is given twice ({positional!r} and --out {args.out!r}); "
            f"give it once, with --out (see '{PROG} {args.command} --help')"
        )
    if positional is None and args.out is None:
        raise UsageError(
            f"{args.command}: the output is missing; give it with --out "
            f"(see '{PROG} {args.command} --help')"
        )
    if args.out is None:
        args.out = positional


SEED_HELP = (
    "seed of this command's non-secret randomness: --limit subsets, initialization, "
    "data order, augmentation (default 0)"
)
KEY_SEED_HELP = (
    "seed of the keys this command draws, for repeatable experiments "
    "(default: the OS CSPRNG; the seed used is recorded)"
)


def add_seed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=seed_arg, default=0, metavar="N", help=SEED_HELP)


def add_key_seed(p: argparse.ArgumentParser, *, old_seed_alias: bool = False) -> None:
    p.add_argument("--key-seed", type=seed_arg, metavar="N", help=KEY_SEED_HELP)
    if old_seed_alias:  # the option's former name, kept working but no longer shown
        p.add_argument("--seed", dest="key_seed", type=seed_arg, help=argparse.SUPPRESS)


def add_block_scrambling(p: argparse.ArgumentParser) -> None:
    """``--no-block-scrambling``: a ViT's keys without the block permutation."""
    p.add_argument(
        "--no-block-scrambling",
        action="store_true",
        help="on a ViT, the paper's pixel-only keys: the secret key drawn for a plain model "
        "and the wrong keys leave the blocks in place (by default a ViT's keys also scramble "
        "the block positions, which its position embedding absorbs, and so do the wrong keys "
        "against an encrypted ViT whose key did; a ConvMixer's keys never do)",
    )


def add_limit(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--limit",
        type=positive_int,
        metavar="K",
        help="a random subset of K test images, drawn with --seed (default: all)",
    )


def non_negative_int(text: str) -> int:
    value = int_arg(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def add_workers(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workers",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="processes that read and decode images (default 0: threads of this process; "
        "worth it for full-size JPEGs)",
    )


def add_batch_size(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=500,
        metavar="B",
        help="images per forward pass of the model (default 500)",
    )


def add_resize(p: argparse.ArgumentParser, *, to_model: bool) -> None:
    """``--resize`` (timm's evaluation transform) and ``--crop-pct``; with ``to_model`` the
    size may be left out and is then the model's input size."""
    what = (
        "images of any size: resize the shorter side to SIZE / crop-pct (bicubic) "
        "and crop the centre"
    )
    if to_model:
        p.add_argument(
            "--resize",
            type=positive_int,
            nargs="?",
            const=0,
            metavar="SIZE",
            help=f"{what} SIZE x SIZE, as timm evaluates (SIZE left out: the model's input size)",
        )
    else:
        p.add_argument(
            "--resize",
            type=positive_int,
            metavar="SIZE",
            help=f"{what} SIZE x SIZE, as timm evaluates; encryption happens after it, "
            "on that grid",
        )
    p.add_argument(
        "--crop-pct",
        type=positive_float,
        default=0.96,
        metavar="F",
        help="the centre crop's share of the resized shorter side "
        "(default 0.96, timm's ConvMixers)",
    )


DEFAULT_RECIPE = "strong"  # the committed model's


def describe_recipe(recipe: TrainConfig) -> str:
    """One line of ``--recipe``'s help: the optimizer, schedule, length and augmentation."""
    schedule = "one-cycle, peak " if recipe.schedule == "onecycle" else ""
    parts = [f"{recipe.optimizer} {schedule}lr {recipe.lr:g}", f"{recipe.epochs} epochs"]
    if recipe.augment:
        parts.append("+".join(recipe.augment))
    if recipe.ema_decay:
        parts.append("an EMA of the weights")
    if recipe.holdout:
        parts.append(f"{recipe.holdout:,} training images held out to choose by")
    return ", ".join(parts)


def add_recipe(p: argparse.ArgumentParser) -> None:
    """--recipe (one of :data:`~convmixer_jax.training.recipes.RECIPES`) and the overrides
    every training command takes."""
    p.add_argument(
        "--recipe",
        choices=list(RECIPES),
        default=DEFAULT_RECIPE,
        help=f"training recipe (default {DEFAULT_RECIPE}, the committed model's): "
        + "; ".join(f"{name}: {describe_recipe(r)}" for name, r in RECIPES.items()),
    )
    p.add_argument("--epochs", type=positive_int, metavar="E", help="override the recipe's epochs")
    p.add_argument(
        "--train-batch-size",
        type=positive_int,
        metavar="B",
        help="override the recipe's training batch size",
    )
    p.add_argument("--lr", type=positive_float, help="override the recipe's (peak) learning rate")
    p.add_argument(
        "--holdout",
        type=seed_arg,
        metavar="N",
        help="override the recipe's validation hold-out: N training images, stratified, "
        "not trained on (0: none)",
    )


# the command-line overrides of a recipe: argparse name -> TrainConfig field
RECIPE_OVERRIDES = {
    "epochs": "epochs",
    "train_batch_size": "batch_size",
    "lr": "lr",
    "holdout": "holdout",
}


def recipe_from_args(args, train_images: int):
    """The ``--recipe`` with the command line's overrides, seeded by ``--seed``.

    Refuses, as a usage error, a hold-out that ``train_images`` images cannot give.
    """
    import dataclasses

    given = {field: getattr(args, name) for name, field in RECIPE_OVERRIDES.items()}
    recipe = dataclasses.replace(
        RECIPES[args.recipe], seed=args.seed, **{k: v for k, v in given.items() if v is not None}
    )
    if recipe.holdout >= train_images:
        raise UsageError(
            f"{args.command}: the {args.recipe} recipe holds {recipe.holdout} training images out "
            f"for validation, but there are only {train_images}; pass --holdout N with "
            f"N < {train_images} (0: none)"
        )
    return recipe


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "model architecture (explicit options override --preset; "
        "the defaults are the paper's ConvMixer-256/8)"
    )
    g.add_argument(
        "--preset",
        choices=PRESET_NAMES,
        help="start from a named architecture: this project's CIFAR-size models ("
        + ", ".join(n for n, preset in REGISTRY.items() if preset.source == PAPER_SOURCE)
        + ") or one of timm's ImageNet ConvMixers and ViTs ("
        + ", ".join(TIMM_NAMES)
        + "); a ViT preset makes a Vision Transformer",
    )
    g.add_argument("--dim", type=positive_int, help="embedding width d (paper: 256)")
    g.add_argument(
        "--depth", type=positive_int, help="number of mixer or transformer blocks L (paper: 8)"
    )
    g.add_argument(
        "--kernel-size", type=positive_int, help="ConvMixer: depthwise kernel size k (paper: 9)"
    )
    g.add_argument("--num-heads", type=positive_int, help="ViT: attention heads (divide --dim)")
    g.add_argument(
        "--mlp-ratio", type=positive_float, help="ViT: MLP width as a multiple of --dim"
    )
    g.add_argument(
        "--patch-size", type=positive_int, help="patch size P = encryption block size M (paper: 4)"
    )
    g.add_argument("--num-classes", type=positive_int, help="classifier outputs (paper: 10)")
    g.add_argument(
        "--image-size",
        type=positive_int,
        help="input height = width, a multiple of the patch size (paper: 32)",
    )
    g.add_argument("--channels", type=positive_int, help="input channels C (paper: 3)")
    g.add_argument(
        "--activation",
        choices=list(ACTIVATIONS),
        help="ConvMixer: activation after every convolution "
        "(paper: gelu, exact; timm's convmixer_768_32: relu)",
    )


ARCH_OPTIONS = (
    "dim",
    "depth",
    "kernel_size",
    "patch_size",
    "num_classes",
    "image_size",
    "channels",
    "activation",
    "num_heads",
    "mlp_ratio",
)
# --preset's choices: the registry's names (convmixer_jax.model.config imports no JAX)
PRESET_NAMES = list(PRESETS)


def arch_options(config) -> tuple[str, ...]:
    """The architecture options that apply to ``config``'s family."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(config)}
    return tuple(n for n in ARCH_OPTIONS if n in fields)


def model_config(args):
    """The architecture (a ConvMixerConfig or a ViTConfig) of ``--preset`` (default: the
    paper's ConvMixer) with the architecture options given on the command line; an option
    of the other family is refused."""
    import dataclasses

    from convmixer_jax.model.config import ConvMixerConfig

    base = PRESETS[args.preset] if args.preset else ConvMixerConfig()
    given = {n: getattr(args, n) for n in ARCH_OPTIONS if getattr(args, n, None) is not None}
    foreign = sorted(set(given) - set(arch_options(base)))
    if foreign:
        flags = ", ".join("--" + n.replace("_", "-") for n in foreign)
        raise ValueError(
            f"{flags} does not apply to a {base.family} model; drop it or choose a preset of "
            "the other family"
        )
    return dataclasses.replace(base, **given)


def add_distributed_options(p: argparse.ArgumentParser) -> None:
    """The options of a multi-process run (one group, the same on every command that has it)."""
    g = p.add_argument_group(
        "several processes (jax.distributed; automatic on SLURM, Open MPI, Cloud TPU "
        "and Kubernetes clusters JAX detects, otherwise these three on every process)"
    )
    g.add_argument(
        "--coordinator-address",
        metavar="HOST:PORT",
        help="process 0's host and a free port, the same on every process",
    )
    g.add_argument(
        "--num-processes",
        type=positive_int,
        metavar="N",
        help="how many processes run this command",
    )
    g.add_argument("--process-id", type=seed_arg, metavar="I", help="this process's number, 0..N-1")


def start_processes(args):
    """Join the process group the options (or the cluster) describe; the first thing a
    command that has :func:`add_distributed_options` does, before JAX computes anything.
    Returns the :class:`~convmixer_jax.parallel.runtime.Group`; on processes other than 0,
    ``args.quiet`` is set (one process reports)."""
    from convmixer_jax.parallel.runtime import DistributedError, check_options, start

    try:
        check_options(args.coordinator_address, args.num_processes, args.process_id)
    except DistributedError as e:
        raise UsageError(f"{args.command}: {e}") from None
    group = start(args.coordinator_address, args.num_processes, args.process_id)
    if group.process_id != 0:
        args.quiet = True
    return group


def add_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "data (default: the official CIFAR binary release, downloaded once "
        "into the cache and checked against its SHA-256)"
    )
    g.add_argument(
        "--dataset",
        choices=["cifar10", "cifar100"],
        default="cifar10",
        help="which data set to download or open from tfds (default cifar10; "
        "cifar100 uses the fine labels)",
    )
    g.add_argument(
        "--data-dir",
        metavar="DIR",
        help="a local copy instead: DIR/{train,test}/<class>/*.png|jpg or the CIFAR "
        "binary batches (for offline machines)",
    )
    g.add_argument(
        "--download-url",
        metavar="URL",
        help="a mirror of the binary release (env CONVMIXER_JAX_CIFAR10_URL / _CIFAR100_URL)",
    )
    g.add_argument(
        "--download-sha256",
        metavar="HEX",
        help="the mirror's archive SHA-256 (env CONVMIXER_JAX_CIFAR10_SHA256 / _CIFAR100_SHA256)",
    )
    g.add_argument(
        "--tfds-data-dir",
        metavar="DIR",
        help="read a data set prepared by tensorflow-datasets in DIR instead "
        "(needs the tfds extra)",
    )


def _data_source(args, resize: int | None) -> dict:
    """The data options as the keyword arguments of ``load_split`` / ``open_split``."""
    if args.data_dir is not None and (
        args.download_url or args.download_sha256 or args.tfds_data_dir
    ):
        raise UsageError(
            "--data-dir reads a local copy; it cannot be combined with --download-url, "
            "--download-sha256 or --tfds-data-dir"
        )
    return dict(
        data_dir=args.data_dir,
        dataset=args.dataset,
        download_url=args.download_url,
        download_sha256=args.download_sha256,
        tfds_data_dir=args.tfds_data_dir,
        progress=not getattr(args, "quiet", False),
        resize=resize,
        **({"crop_pct": args.crop_pct} if resize is not None else {}),
    )


def open_split(args, split: str, *, resize: int | None = None, cache: bool = False):
    """:func:`convmixer_jax.data.sources.open_split` of ``split`` from the data options: a ``Split``
    whose images (N,H,W,C) uint8 are read when indexed, labels (N,) int32, class names;
    ``resize`` as in :func:`load_split`, ``cache`` as in ``open_split``."""
    from convmixer_jax.data import open_split

    return open_split(split, **_data_source(args, resize), cache=cache)


def load_split(args, split: str, *, resize: int | None = None):
    """(images (N,H,W,C) uint8, labels (N,) int32, class names) of ``split`` from the data options;
    ``resize``: timm's evaluation transform to that size, with ``args.crop_pct``."""
    from convmixer_jax.data import load_split

    return load_split(split, **_data_source(args, resize))


def data_label(args) -> str:
    """What the data options read, for provenance records."""
    if args.data_dir:
        return args.data_dir
    if args.tfds_data_dir:
        return f"tfds:{args.dataset}"
    return f"{args.dataset} binary release" + (
        f" from {args.download_url}" if args.download_url else ""
    )


def subset(images, labels, n: int | None, seed: int):
    from convmixer_jax.data import subset

    return subset(images, labels, n, seed)


def report_written(what: str, path) -> None:
    """End a command whose stdout is its data (a fingerprint, JSON, a report) with the
    line ``WHAT -> PATH`` on stderr, as the other commands end with one on stdout."""
    import sys

    print(f"{what} -> {path}", file=sys.stderr)


def folder_listing(path) -> str:
    """What a written folder holds, for :func:`report_written`: its visible entries, sorted
    (folders with a trailing ``/``)."""
    from pathlib import Path

    entries = [e for e in Path(path).iterdir() if not e.name.startswith(".")]
    return ", ".join(sorted(e.name + ("/" if e.is_dir() else "") for e in entries))


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 600 else text[:597] + "..."
