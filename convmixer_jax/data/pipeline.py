"""Batches of a split through Grain: rows read and decoded in threads or worker processes,
a bounded buffer, in row order (:func:`~convmixer_jax.data.pipeline.batches`) or in a
training order whose position can be saved and restored
(:func:`~convmixer_jax.data.pipeline.train_batches`).

Each Grain element is one whole batch, read by one thread with the reader's
``images[rows]`` (:mod:`convmixer_jax.data.sources`): ``threads`` batches are decoded at a
time, at most ``prefetch`` batches wait in the buffer, so memory is bounded by the batch
size, never by the number of images. With ``workers`` > 0 the batches are read in that many
worker processes (Grain's ``mp_prefetch``: worker ``w`` reads batches ``w``, ``w +
workers``, ... and they are handed out in order), for decoding that would hold the GIL.
Worker processes are started fresh (spawn) and import the package, which takes seconds:
worth it for full-size JPEGs, not for CIFAR.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import numpy as np

from convmixer_jax.data.sources import ArrayRows


def default_threads() -> int:
    """Threads that read batches by default: the CPU count, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def in_memory(images) -> bool:
    """Whether ``images`` are an array (in memory or mapped), read without decoding."""
    return isinstance(images, (np.ndarray, ArrayRows))


def _check_counts(batch_size: int, workers: int, threads: int | None, prefetch: int | None):
    for name, value, least in (
        ("batch_size", batch_size, 1),
        ("workers", workers, 0),
        ("threads", threads, 0),
        ("prefetch", prefetch, 0),
    ):
        if value is not None and (not isinstance(value, (int, np.integer)) or value < least):
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


#: glibc's ``mallopt`` parameter of the size from which ``malloc`` maps memory of its own.
_M_MMAP_THRESHOLD = -3
#: The size set for it when decoded images stream: glibc's initial threshold.
_MMAP_THRESHOLD = 128 * 1024
_malloc_fixed = False


def _fix_malloc_threshold() -> None:
    """Keep glibc's ``malloc`` from raising its mmap threshold while images stream.

    Each decoded image (a 256 x 256 RGB JPEG is 192 KiB) is larger than glibc's initial
    mmap threshold (128 KiB), so its buffer is mapped and unmapped; glibc then raises the
    threshold to that size, and from there on such buffers come from the heaps of the
    decoding threads, which keep what they were given: a process's memory grows over its
    first few thousand images before it levels off. Setting the threshold (``mallopt``)
    turns that adjustment off, so memory stays flat from the start. Done once, the first
    time a decoding reader streams; elsewhere than glibc nothing happens.
    """
    global _malloc_fixed
    if _malloc_fixed:
        return
    _malloc_fixed = True
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    except (OSError, AttributeError):  # not glibc: its malloc behaves as it does
        pass


def _read_options(images, workers: int, threads: int | None, prefetch: int | None):
    import grain

    if not in_memory(images):
        _fix_malloc_threshold()

    if threads is None:
        threads = 1 if workers else (0 if in_memory(images) else default_threads())
    if prefetch is None:
        prefetch = max(1, threads)
    return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)


def _in_processes(dataset, workers: int):
    """``dataset`` (a Grain IterDataset) read in ``workers`` processes; unchanged for 0."""
    if not workers:
        return dataset
    import grain
    from absl import flags

    # Grain 0.2.18 reads an absl flag when it starts workers, which raises in a program that
    # never parsed absl flags (google/grain#1355); the defaults are what we want.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    # Batches come back pickled, not in shared memory: on Python < 3.13 every block a worker
    # made is reported as leaked when the interpreter exits (the parent attaching to it
    # registers it twice with the resource tracker), one warning line per run.
    no_shm = grain.experimental.DatasetOptions(min_shm_size=2**62)
    dataset = grain.experimental.WithOptionsIterDataset(dataset, no_shm)
    return dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))


class ReadBatch:
    """Batch ``b`` of ``rows``: (images[rows[b*B:(b+1)*B]] (B, H, W, C), labels of those
    rows (B,) or None). A picklable callable, so that worker processes can run it."""

    def __init__(self, images, labels, rows: np.ndarray, batch_size: int):
        self.images, self.labels, self.rows, self.batch_size = images, labels, rows, batch_size

    def __call__(self, b: int):
        if not in_memory(self.images):  # in a worker process too
            _fix_malloc_threshold()
        rows = self.rows[b * self.batch_size : (b + 1) * self.batch_size]
        images = np.asarray(self.images[rows])
        return images, None if self.labels is None else np.asarray(self.labels)[rows]


def _closing(iterator) -> Iterator:
    """Yield from a Grain iterator and close it (its threads, its worker processes) at the
    end, also when the consumer stops early."""
    try:
        yield from iterator
    finally:
        iterator.close()


def batches(
    images,
    labels=None,
    *,
    batch_size: int,
    indices=None,
    workers: int = 0,
    threads: int | None = None,
    prefetch: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """The rows of ``images`` in order, as batches: (images (B, H, W, C), labels (B,) or None).

    images: an array or a row reader (N, H, W, C); labels: (N,) or None; indices: the rows
    to read, in this order (default all); the last batch is short. An array (in memory or
    mapped) is sliced directly, with no thread and no copy of a batch of consecutive rows.
    A reader is read through Grain: ``threads`` (default :func:`default_threads`; 1 per
    worker process) read whole batches at once, at most ``prefetch`` batches (default
    ``threads``) wait; ``workers`` > 0 reads in that many worker processes. Errors of the
    reader (a damaged image) are raised here as they were raised there.
    """
    _check_counts(batch_size, workers, threads, prefetch)
    n = len(images)
    rows = np.arange(n) if indices is None else np.asarray(indices, np.intp)
    if in_memory(images):
        array = images.array if isinstance(images, ArrayRows) else images
        return _array_batches(array, labels, rows if indices is not None else None, batch_size)
    import grain

    count = -(-len(rows) // batch_size)
    dataset = grain.MapDataset.range(count).map(ReadBatch(images, labels, rows, batch_size))
    dataset = dataset.to_iter_dataset(_read_options(images, workers, threads, prefetch))
    return _closing(iter(_in_processes(dataset, workers)))


def _array_batches(array, labels, rows, batch_size: int):
    n = len(array) if rows is None else len(rows)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        if rows is None:
            picked = slice(start, stop)
        else:
            picked = rows[start:stop]
        yield array[picked], None if labels is None else np.asarray(labels)[picked]


class ReadStep:
    """The batch of training step ``s``: the rows ``order_fn(s)`` (B,) of images and labels.
    A picklable callable (``order_fn`` is pickled with cloudpickle for worker processes)."""

    def __init__(self, images, labels, order_fn: Callable, batch_size: int):
        self.images, self.labels = images, labels
        self.order_fn, self.batch_size = order_fn, batch_size

    def __call__(self, step: int):
        if not in_memory(self.images):  # in a worker process too
            _fix_malloc_threshold()
        rows = np.asarray(self.order_fn(int(step)), np.intp)
        if rows.shape != (self.batch_size,):
            raise ValueError(
                f"order_fn({int(step)}) gave rows of shape {rows.shape}; "
                f"a training batch is ({self.batch_size},)"
            )
        return np.asarray(self.images[rows]), np.asarray(self.labels)[rows]


def train_batches(
    images,
    labels,
    order_fn: Callable[[int], np.ndarray],
    batch_size: int,
    *,
    steps: int,
    start_step: int = 0,
    workers: int = 0,
    threads: int | None = None,
    prefetch: int | None = None,
):
    """An iterator of the training batches of steps ``start_step .. steps - 1``: (images (B,
    H, W, C), labels (B,)) with the rows ``order_fn(step)`` (B,) of ``images`` (an array
    or a row reader) and ``labels`` (N,).

    It is a Grain ``DatasetIterator`` over ``MapDataset.range(start_step, steps)``:
    ``it.get_state()`` after k batches is a small dict (``{"next_index": k}`` without worker
    processes) that a new iterator of the same arguments takes with ``it.set_state(state)``
    to go on with batch k + 1 exactly; a training loop saves it beside its checkpoint, or
    starts a new iterator at the checkpoint's ``start_step`` (``order_fn`` being a function
    of the step alone, both give the same batches). ``threads`` default to 0 for an array
    (read in the calling thread) and :func:`default_threads` for a reader; ``workers``,
    ``prefetch`` as in :func:`batches`. Close it with ``it.close()`` when done early.
    """
    _check_counts(batch_size, workers, threads, prefetch)
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step {start_step} must lie in 0..steps ({steps})")
    import grain

    dataset = grain.MapDataset.range(start_step, steps).map(
        ReadStep(images, labels, order_fn, batch_size)
    )
    dataset = dataset.to_iter_dataset(_read_options(images, workers, threads, prefetch))
    return iter(_in_processes(dataset, workers))


__all__ = [
    "ReadBatch",
    "ReadStep",
    "batches",
    "default_threads",
    "in_memory",
    "train_batches",
]
