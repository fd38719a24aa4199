"""The process group of a multi-process run, and who writes.

Every process runs the same program (JAX's multi-controller model). :func:`start`
joins the group before JAX does anything else: with an explicit coordinator
(``coordinator_address``, ``num_processes``, ``process_id``), or, given none of
them, through JAX's own cluster detection (SLURM, Open MPI, Cloud TPU, Kubernetes)
when it finds more than one process. On CPU the cross-process collectives need an
implementation switched on: :func:`start` selects gloo. Results are written by
process 0 alone (:func:`is_writer`); the others compute the same values and write
nothing.
"""

from __future__ import annotations

import dataclasses

import jax

_started: "Group | None" = None


class DistributedError(ValueError):
    """A process group that cannot be formed as asked (bad options, JAX already running)."""


@dataclasses.dataclass(frozen=True)
class Group:
    """How this process joined: ``via`` is 'single', 'explicit' or the detected cluster's name."""

    via: str
    num_processes: int
    process_id: int
    coordinator_address: str | None = None


def parse_address(text: str) -> tuple[str, int]:
    """``'HOST:PORT'`` -> (host, port); :class:`DistributedError` unless the port is 1..65535."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(
            f"--coordinator-address {text!r} is not HOST:PORT with a port in 1..65535; "
            "give process 0's host and a free port, e.g. 10.0.0.1:12345"
        )
    return host, int(port)


def detect_cluster() -> tuple[str, int] | None:
    """(name, process count) of the cluster environment JAX's auto-detection finds, when it
    has more than one process; else None. Reads only the environment (and, on a Cloud TPU
    VM, its metadata server), never starts JAX's backends."""
    try:
        from jax._src.clusters import ClusterEnv  # JAX's detection; private, so guarded
    except ImportError:
        return None
    for env in ClusterEnv._cluster_types:
        if env.opt_in_only_method:
            continue
        try:
            if env.is_env_present() and (n := int(env.get_process_count())) > 1:
                return env.__name__, n
        except Exception:  # noqa: BLE001 - a half-configured environment is not a cluster to join
            continue
    return None


def check_options(
    coordinator_address: str | None, num_processes: int | None, process_id: int | None
) -> None:
    """Raise :class:`DistributedError` unless the three options are all given and consistent,
    or all left out (``num_processes=1`` alone, or with process 0, is a one-process run)."""
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if num_processes == 1 and coordinator_address is None and process_id in (None, 0):
        return
    if any(given) and not all(given):
        raise DistributedError(
            "--coordinator-address, --num-processes and --process-id go together: give all "
            "three on every process (or none, on a cluster JAX detects)"
        )
    if not any(given):
        return
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise DistributedError(
            f"--process-id {process_id} is not in 0..{num_processes - 1}; number the "
            f"{num_processes} processes 0 to {num_processes - 1}, one id each"
        )
    parse_address(coordinator_address)


def start(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: int = 300,
) -> Group:
    """Join (or form) the process group; call before anything else runs JAX.

    With no arguments: a detected cluster of several processes is joined, otherwise
    this is a one-process run. Calling it again with the same arguments returns the
    same :class:`Group`; other arguments, or a first call after JAX has started
    computing, raise :class:`DistributedError`.
    """
    global _started
    check_options(coordinator_address, num_processes, process_id)
    explicit = coordinator_address is not None and num_processes is not None and num_processes > 1
    cluster = None if explicit or num_processes == 1 else detect_cluster()
    if explicit:
        want = Group("explicit", num_processes, process_id, coordinator_address)
    elif cluster is not None:
        want = Group(cluster[0], cluster[1], -1)  # the id comes from the cluster
    else:
        want = Group("single", 1, 0)
    if _started is not None:
        same = (want.via, want.num_processes, want.coordinator_address) == (
            _started.via,
            _started.num_processes,
            _started.coordinator_address,
        ) and want.process_id in (-1, _started.process_id)
        if not same:
            raise DistributedError(
                f"this process already runs as {_started}; it cannot join {want} as well"
            )
        return _started
    if want.via == "single":
        _started = want
        return _started
    # XLA:CPU has no cross-process collectives unless one is chosen; the setting only
    # concerns the CPU client, so it is harmless where the devices are GPUs or TPUs.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        if explicit:
            jax.distributed.initialize(
                coordinator_address, num_processes, process_id, initialization_timeout=timeout_s
            )
        else:
            jax.distributed.initialize(initialization_timeout=timeout_s)
    except RuntimeError as e:
        if any(word in str(e).lower() for word in ("before", "already", "once")):
            raise DistributedError(
                "jax.distributed must start before JAX computes anything in this process; "
                "start the process group first (a fresh process)"
            ) from None
        raise DistributedError(
            f"could not join the process group at {coordinator_address or want.via}: "
            f"{' '.join(str(e).split())[:300]}; check that every process got the same "
            "address and that process 0 is running"
        ) from None
    _started = Group(want.via, jax.process_count(), jax.process_index(), coordinator_address)
    return _started


def from_process_zero(tree):
    """Process 0's value of ``tree`` (numpy arrays and numbers) on every process.

    For what one process draws at random (an OS-CSPRNG key, a seed) and all must share;
    with one process it returns ``tree`` itself.
    """
    if jax.process_count() == 1:
        return tree
    import numpy as np
    from jax.experimental import multihost_utils

    return jax.tree.map(
        np.asarray, multihost_utils.broadcast_one_to_all(jax.tree.map(np.asarray, tree))
    )


def process_index() -> int:
    """This process's index, 0..process_count()-1."""
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_writer() -> bool:
    """True on the one process that writes outputs (process 0)."""
    return jax.process_index() == 0


__all__ = [
    "DistributedError",
    "Group",
    "start",
    "check_options",
    "parse_address",
    "detect_cluster",
    "from_process_zero",
    "process_index",
    "process_count",
    "is_writer",
]
