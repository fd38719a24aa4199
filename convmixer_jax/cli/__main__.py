"""``python -m convmixer_jax.cli``: the same as the ``convmixer-jax`` command."""
from convmixer_jax.cli.app import main

raise SystemExit(main())
