"""Argument types and the options that several commands share."""
from __future__ import annotations

import argparse

PROG = "convmixer-jax"


class UsageError(Exception):
    """A malformed command line (exit status 2)."""


class Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line instead of exiting."""

    def error(self, message):  # noqa: D102 - argparse API
        raise UsageError(f"{self.prog.removeprefix(PROG + ' ')}: {message} (see '{self.prog} --help')")


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
        raise argparse.ArgumentTypeError(f"expected a non-negative integer (seeds are >= 0), got {value}")
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


def add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model architecture (explicit options override --preset; "
                             "the defaults are the paper's ConvMixer-256/8)")
    g.add_argument("--preset", choices=["paper"], help="start from a named architecture")
    g.add_argument("--dim", type=positive_int, help="embedding width d (paper: 256)")
    g.add_argument("--depth", type=positive_int, help="number of mixer blocks L (paper: 8)")
    g.add_argument("--kernel-size", type=positive_int, help="depthwise kernel size k (paper: 9)")
    g.add_argument("--patch-size", type=positive_int,
                   help="patch size P = encryption block size M (paper: 4)")
    g.add_argument("--num-classes", type=positive_int, help="classifier outputs (paper: 10)")
    g.add_argument("--image-size", type=positive_int,
                   help="input height = width, a multiple of the patch size (paper: 32)")
    g.add_argument("--channels", type=positive_int, help="input channels C (paper: 3)")


ARCH_OPTIONS = ("dim", "depth", "kernel_size", "patch_size", "num_classes", "image_size", "channels")


def model_config(args):
    import dataclasses

    from convmixer_jax.model.convmixer import PRESETS, ConvMixerConfig

    base = PRESETS[args.preset] if args.preset else ConvMixerConfig()
    overrides = {n: getattr(args, n) for n in ARCH_OPTIONS if getattr(args, n) is not None}
    return dataclasses.replace(base, **overrides)


def add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", metavar="DIR",
                   help="local data: DIR/{train,test}/<class>/*.png|jpg or the CIFAR-10 binary "
                        "batches; without it CIFAR-10 comes from tensorflow-datasets")
    p.add_argument("--tfds-data-dir", metavar="DIR",
                   help="where tensorflow-datasets keeps its prepared data (without --data-dir)")


def load_split(args, split: str):
    from convmixer_jax.data import load_split

    return load_split(split, data_dir=args.data_dir, tfds_data_dir=args.tfds_data_dir)


def subset(images, labels, n: int | None, seed: int):
    from convmixer_jax.data import subset

    return subset(images, labels, n, seed)


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 600 else text[:597] + "..."
