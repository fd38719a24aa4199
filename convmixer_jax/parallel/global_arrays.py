"""The global device mesh, and arrays on it built from what each process holds.

In a multi-process run every process sees all devices (``jax.devices()``) but
addresses only its own (``jax.local_devices()``). An array sharded over the mesh is
built with ``jax.make_array_from_callback``: each process is asked only for the rows
of its own devices, so it feeds just its share (of the keys of a sweep, of the images
of a training batch). Replicated values (weights, the images every key is tried on)
are put on each process's devices from that process's identical copy. With one
process all of this is ordinary single-host sharding.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def global_mesh(axis: str) -> Mesh:
    """A one-axis mesh named ``axis`` over every device of every process."""
    return Mesh(np.asarray(jax.devices()), (axis,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def by_rows(mesh: Mesh) -> NamedSharding:
    """The leading axis split over the mesh's one axis."""
    return NamedSharding(mesh, P(mesh.axis_names[0]))


def replicate(tree, mesh: Mesh):
    """Every leaf of ``tree`` (numpy, or arrays this process can read) as a replicated global array.

    Every process must pass the same values; each supplies its own devices' copies.
    """
    sharding = replicated(mesh)
    if (
        jax.process_count() == 1
    ):  # every device is this process's: a plain transfer (no copy if already there)
        return jax.device_put(tree, sharding)

    def put(leaf):
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def shard_rows(source, mesh: Mesh, rows: np.ndarray | None = None) -> jax.Array:
    """The global array ``source[rows]`` (all of ``source`` if ``rows`` is None), split by rows.

    source: (N, ...) array-like, the same on every process (it may be a memory map);
    rows: (B,) int indices, B a multiple of the mesh size. Only this process's rows
    are read from ``source``.
    """
    n = len(source) if rows is None else len(rows)
    shape = (n,) + tuple(np.shape(source)[1:])

    def local(index):
        sl = index[0]
        picked = source[sl] if rows is None else source[np.asarray(rows)[sl]]
        return np.asarray(picked)[(slice(None),) + tuple(index[1:])]

    return jax.make_array_from_callback(shape, by_rows(mesh), local)


def process_rows(mesh: Mesh, n: int) -> tuple[int, int]:
    """``(start, stop)``: the rows of an (n, ...) array split by rows over ``mesh``
    (:func:`by_rows`) that this process's devices hold, one contiguous range."""
    held = sorted(
        {
            index[0].indices(n)[:2]
            for index in by_rows(mesh).addressable_devices_indices_map((n,)).values()
        }
    )
    start, stop = held[0][0], held[-1][1]
    if sum(b - a for a, b in held) != stop - start:
        raise ValueError(
            f"this process's devices hold rows {held} of {n}, not one range; "
            "order the mesh's devices by process"
        )
    return start, stop


def from_process_rows(local, mesh: Mesh, n: int) -> jax.Array:
    """The global (n, ...) array split by rows whose rows ``process_rows(mesh, n)`` are
    ``local`` (stop - start, ...): what each process supplies when it read only its own rows
    (equal to :func:`shard_rows` of the whole batch)."""
    start, stop = process_rows(mesh, n)
    local = np.asarray(local)
    if len(local) != stop - start:
        raise ValueError(f"this process holds rows {start}..{stop - 1} of {n}, got {len(local)}")

    def part(index):
        a, b, _ = index[0].indices(n)
        return local[(slice(a - start, b - start),) + tuple(index[1:])]

    return jax.make_array_from_callback((n,) + local.shape[1:], by_rows(mesh), part)


def to_host(tree):
    """Replicated (or single-process) arrays of ``tree`` as numpy; every process gets the values."""
    return jax.tree.map(np.asarray, tree)


def pad_to_multiple(n: int, k: int) -> int:
    """The smallest multiple of ``k`` that is >= ``n``."""
    return -(-n // k) * k


__all__ = [
    "from_process_rows",
    "global_mesh",
    "process_rows",
    "replicated",
    "by_rows",
    "replicate",
    "shard_rows",
    "to_host",
    "pad_to_multiple",
]
