"""The ``convmixer-jax`` command line: keys, image and model encryption, training, evaluation.

Each subcommand parses its arguments and calls library functions
(:mod:`~convmixer_jax.scheme.keys`, :mod:`~convmixer_jax.scheme.images`,
:mod:`~convmixer_jax.files.model_dir`, :mod:`~convmixer_jax.model.inference`,
:mod:`~convmixer_jax.training.loop`). JAX and Flax are imported inside the commands
so that ``--help`` answers at once.

A user error (bad file, key, image or model, existing output without
``--force``) prints one line ``convmixer-jax: error: ...`` on stderr, exits
with 1 (2 for a malformed command line) and leaves every output path as it
was. Every file is written under a temporary name beside its destination and
renamed into place when complete.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from convmixer_jax._xla_flags import apply_cpu_flags
from convmixer_jax.cli import attacks, experiment, images, keys, models, recover, torch_io, training
from convmixer_jax.cli.options import PROG, Parser, UsageError, one_line

_DESCRIPTION = """\
Block-wise encryption of ConvMixer models (Iijima & Kiya, 2022).

A trusted party trains a plain model (train), makes a secret key (keygen) and
encrypts the model with it (encrypt-model); the client encrypts its images with
the same key (encrypt-images); the provider runs the encrypted model on the
encrypted images (predict) and gets the plain model's outputs on the plain images.
"""

_EPILOG = """\
example:
  convmixer-jax keygen --block-size 4 --channels 3 --out key.json
  convmixer-jax init-model --preset paper --seed 0 --out plain_model
  convmixer-jax encrypt-model --key key.json plain_model --out enc_model
  convmixer-jax encrypt-images --key key.json photos/ --out enc_photos/
  convmixer-jax predict enc_model enc_photos/

run 'convmixer-jax COMMAND --help' for the options of a command.
"""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("convmixer-jax")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG,
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parser.subcommands = {}

    def add(name, func, help_, description=None):
        p = sub.add_parser(name, help=help_, description=description or help_)
        p.set_defaults(func=func)
        parser.subcommands[name] = p
        return p

    for group in (keys, images, models, torch_io, training, attacks, recover, experiment):
        group.register(add)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that every write cleans up as on Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status.

    0 on success, 1 for bad input (one line on stderr, nothing written), 2 for a
    malformed command line, 130 on SIGINT and 143 on SIGTERM (temporaries removed).
    First adds the package's XLA:CPU flag to ``XLA_FLAGS``
    (``convmixer_jax.apply_cpu_flags``), before any command imports JAX.
    """
    apply_cpu_flags()
    parser = build_parser()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # report it against the subcommand, whose --help lists what it takes
            parser.subcommands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
        return args.func(args)
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except Terminated:
        print(
            f"{PROG}: error: terminated (SIGTERM); nothing was left half-written", file=sys.stderr
        )
        return 143
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, OverflowError, RecursionError) as e:
        # Library errors (InvalidKeyError, ImageError, ModelDirError, DataError,
        # KeyModelMismatch are ValueErrors) and file errors: one line, no traceback.
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        return 1
    except MemoryError:
        print(
            f"{PROG}: error: out of memory; use fewer images per file or a smaller --batch-size",
            file=sys.stderr,
        )
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


__all__ = ["main", "build_parser"]
