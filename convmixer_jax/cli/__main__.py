"""``python -m convmixer_jax.cli``: the same as the ``convmixer-jax`` command."""

from convmixer_jax.cli.app import main

if __name__ == "__main__":
    raise SystemExit(main())
