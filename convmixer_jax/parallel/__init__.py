"""Runs over several processes with JAX's multi-controller runtime (``jax.distributed``).

- :mod:`~convmixer_jax.parallel.runtime`: starting the process group (explicit
  coordinator, or a cluster JAX detects), which process writes;
- :mod:`~convmixer_jax.parallel.global_arrays`: the global device mesh and the
  arrays on it, each process supplying only its own rows.

A one-process run goes through the same code: its mesh is its own devices.
"""
