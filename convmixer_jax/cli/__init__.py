"""The ``convmixer-jax`` command line: a thin layer over the library, one module per group of
commands."""

from convmixer_jax.cli.app import build_parser, main  # noqa: F401
