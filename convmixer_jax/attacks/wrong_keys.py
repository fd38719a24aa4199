"""Random wrong-key attack: accuracy of an encrypted model on test images
encrypted with keys other than the secret one (paper, section 4, Fig. 5).

Two exact strategies, both evaluating a chunk of keys per call with the key
axis folded into the image batch:

- ``'images'``: encrypt the test batch with each wrong key K' and run the
  encrypted model on it (the attack as the paper states it);
- ``'weights'``: the encrypted model on images encrypted with K' computes the
  same logits as the model ``decrypt_params(encrypted, K')`` on the plain
  images (both are the same linear map of each normalized block), so a sweep
  needs one copy of the images and one small patch-embedding kernel per key.

Each call evaluates ``key_chunk * batch_size`` (key, image) pairs as one
batch, so peak memory is bounded by that many images' activations, whatever
the number of keys. The default 4 x 125 = 500 pairs per call runs at the
speed of plain inference at its best batch on a 2-core AMD EPYC
(``python benchmarks/bench.py``; benchmarks/README.md); calls of 512 or 1,024
pairs are slower there (power-of-two strides conflict in the cache). The key axis
of each chunk is sharded over all devices of all processes (a one-axis global
``Mesh``): in a multi-process run (:mod:`convmixer_jax.parallel`) each process feeds
only its own keys of each chunk, images and model are replicated, and every process
receives all the counts, so the accuracies equal a one-process run's for the same keys.

Either model family (:mod:`convmixer_jax.model.build`). A ViT's key may carry block
scrambling (``Key.block_perm``): 'images' then scrambles the blocks of each encrypted
batch, and 'weights' folds the key into the patch embedding and the position embedding
(``vmap`` of the model's ``apply`` over the keys, the weights shared). A ConvMixer cannot
absorb block scrambling into its weights, so scrambling keys on a ConvMixer take
'images' (:func:`sweep_strategy` picks the strategy that applies).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from convmixer_jax.data.pipeline import batches as stream_batches
from convmixer_jax.data.pipeline import in_memory
from convmixer_jax.data.sources import Rows
from convmixer_jax.model.build import build_model
from convmixer_jax.model.convmixer import prepare_inference
from convmixer_jax.model.inference import iterate_batches
from convmixer_jax.parallel.global_arrays import (
    by_rows,
    global_mesh,
    pad_to_multiple,
    replicate,
    replicated,
    shard_rows,
    to_host,
)
from convmixer_jax.parallel.runtime import from_process_zero
from convmixer_jax.scheme.images import encrypt_images
from convmixer_jax.scheme.keys import Key, generate_key, random_keys
from convmixer_jax.scheme.params import decrypt_params

STRATEGIES = ("images", "weights")


def _to_unit_float(images: jax.Array) -> jax.Array:
    x = images.astype(jnp.float32)
    return x / 255.0 if images.dtype == jnp.uint8 else x


def key_mesh() -> Mesh:
    """A one-axis mesh ('keys',) over every device of every process."""
    return global_mesh("keys")


def _is_convmixer(config) -> bool:
    return getattr(config, "family", "convmixer") == "convmixer"


def sweep_strategy(config, keys: Key) -> str:
    """The faster exact strategy for ``keys`` on a model of ``config``: 'weights', except for
    keys that scramble blocks on a ConvMixer (its depthwise convolutions see which blocks are
    neighbours, so no change of its weights undoes a block permutation): 'images'."""
    return "images" if keys.scrambles and _is_convmixer(config) else "weights"


@functools.lru_cache(maxsize=None)
def _correct_fn(config, strategy: str, mesh: Mesh):
    """jit of the number of correct predictions per key of a chunk, keys
    sharded over ``mesh``, the counts replicated to every process.

    'images' encrypts the batch once per key (``vmap`` of :func:`encrypt_images`) and folds
    the key axis into the batch, so every layer runs one matrix product over (keys x
    images), as plain inference does. 'weights' on a ConvMixer decrypts the patch
    embedding once per key (``vmap`` of :func:`decrypt_params`) and evaluates all those
    stems on the one plain batch (``ConvMixer(stems=...)``); on a ViT it maps the model
    over the keys (``vmap`` of ``apply(decrypt_params(variables, key), images)``): the
    patch and position embeddings carry the key axis, every other weight is shared.
    """
    model = build_model(config)
    mean, std = config.mean, config.std

    def count(logits, labels, n_keys):
        pred = jnp.argmax(logits, -1).reshape(n_keys, -1)
        return jnp.sum(pred == labels[None, :], axis=1)

    def correct_images(variables, images, labels, keys):
        n_keys = keys.perm.shape[0]
        enc = jax.vmap(encrypt_images, in_axes=(None, 0))(images, keys)  # (K, N, H, W, C)
        enc = enc.reshape((-1,) + images.shape[1:])
        return count(model.apply(variables, _to_unit_float(enc), train=False), labels, n_keys)

    def correct_stems(variables, images, labels, keys):
        n_keys = keys.perm.shape[0]
        stem = variables["params"]["stem"]
        tree = {"params": {"stem": stem}}
        attacked = jax.vmap(lambda k: decrypt_params(tree, k, mean=mean, std=std))(keys)["params"][
            "stem"
        ]
        kernels = jnp.broadcast_to(attacked["kernel"], (n_keys,) + stem["kernel"].shape)
        biases = jnp.broadcast_to(attacked["bias"], (n_keys,) + stem["bias"].shape)
        logits = model.apply(
            variables, _to_unit_float(images), train=False, stems=(kernels, biases)
        )
        return count(logits, labels, n_keys)

    def correct_weights(variables, images, labels, keys):
        n_keys = keys.perm.shape[0]
        x = _to_unit_float(images)

        def logits(key):
            attacked = decrypt_params(variables, key, mean=mean, std=std)
            return model.apply(attacked, x, train=False)

        return count(jax.vmap(logits)(keys), labels, n_keys)  # logits (K, N, classes)

    if strategy == "images":
        fn = correct_images
    else:
        fn = correct_stems if _is_convmixer(config) else correct_weights
    repl, by_key = replicated(mesh), by_rows(mesh)
    return jax.jit(fn, in_shardings=(repl, repl, repl, by_key), out_shardings=repl)


def wrong_key_accuracies(
    config,
    variables,
    images,
    labels,
    keys: Key,
    *,
    strategy: str = "weights",
    key_chunk: int = 4,
    batch_size: int = 125,
    progress: bool = False,
    desc: str = "wrong keys",
) -> np.ndarray:
    """Accuracy in [0, 1] of ``variables`` (an encrypted model of either family) for each key
    of a batch.

    images: (N, H, W, C) uint8 or float in [0, 1], an array or a row reader of
    :mod:`convmixer_jax.data.sources` (e.g. ``open_split(...).images``); labels: (N,) int;
    keys: a batched :class:`Key` (perm (K, pb); block_perm (K, gh*gw) for keys that
    scramble blocks). Returns (K,) float64.
    Keys go ``key_chunk`` at a time and images ``batch_size`` at a time,
    folded into one batch of ``key_chunk * batch_size`` per call (the memory
    bound); the last image batch is padded to full size and the last key chunk
    to a multiple of the device count (at most two programs are compiled);
    padded keys and images are not counted. An array (in memory or mapped) is
    sliced key chunk by key chunk; a reader that decodes (an image tree, the CIFAR
    binaries) is read once, batch by batch, a few batches ahead in threads, each batch
    evaluated under every key before the next is read, so memory holds a few batches of
    images, never all N, and nothing is decoded twice. In a multi-process run every
    process passes the same arguments and gets the same result. ``progress`` shows a bar
    labelled ``desc`` and the keys done, e.g. ``wrong keys 12/100`` (for a reader, the
    images done, e.g. ``wrong keys 100 keys, images 500/10000``).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "weights" and sweep_strategy(config, keys) == "images":
        raise ValueError(
            "a ConvMixer cannot take block scrambling into its weights (its depthwise "
            "convolutions see which blocks are neighbours); use the strategy 'images'"
        )
    if not keys.batch_shape:
        raise ValueError(
            "keys must be a batch (perm of shape (K, pb)); use random_keys or stack_keys"
        )
    n_keys = keys.batch_shape[0]
    n = len(images)
    if n == 0 or n_keys == 0:
        raise ValueError("need at least one image and one key")
    mesh = key_mesh()
    n_dev = mesh.devices.size
    key_chunk = pad_to_multiple(key_chunk, n_dev)
    fn = _correct_fn(config, strategy, mesh)
    variables = replicate(
        prepare_inference(config, variables), mesh
    )  # depthwise matrices once, not per call
    labels = np.asarray(labels, np.int32)
    perm, flip = np.asarray(keys.perm), np.asarray(keys.flip)
    block_perm = None if keys.block_perm is None else np.asarray(keys.block_perm)
    correct = np.zeros(n_keys, np.int64)
    bsz = min(batch_size, n)
    chunks = list(iterate_batches(n_keys, key_chunk))
    n_batches = -(-n // bsz)

    def chunk_keys(k0: int, k1: int) -> Key:
        # The last chunk is padded only up to a multiple of the device count
        # (a second, smaller program is compiled for it rather than wasting work).
        rows = np.minimum(np.arange(k0, k0 + pad_to_multiple(k1 - k0, n_dev)), k1 - 1)
        return Key(
            shard_rows(perm, mesh, rows),
            shard_rows(flip, mesh, rows),
            keys.block_size,
            keys.channels,
            None if block_perm is None else shard_rows(block_perm, mesh, rows),
            keys.grid,
        )

    def count(k0: int, k1: int, chunk: Key, xb, yb) -> None:
        xb, yb = np.asarray(xb), np.asarray(yb, np.int32)
        if len(xb) < bsz:  # pad; padded labels are -1 and never match
            pad = bsz - len(xb)
            xb = np.concatenate([xb, np.zeros((pad,) + xb.shape[1:], xb.dtype)])
            yb = np.concatenate([yb, np.full(pad, -1, np.int32)])
        xb, yb = replicate((xb, yb), mesh)
        correct[k0:k1] += to_host(fn(variables, xb, yb, chunk))[: k1 - k0]
        if bar is not None:
            bar.update(1)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(chunks) * n_batches, desc=f"{desc} 0/{n_keys}", unit="block")
    if not (isinstance(images, Rows) and not in_memory(images)):
        # Slicing costs nothing: the keys outermost, the bar counting the keys done.
        for k0, k1 in chunks:
            chunk = chunk_keys(k0, k1)
            for b0, b1 in iterate_batches(n, bsz):
                count(k0, k1, chunk, images[b0:b1], labels[b0:b1])
            if bar is not None:
                bar.set_description(f"{desc} {k1}/{n_keys}")
    else:
        # A reader that decodes: every image batch read once (read ahead in threads while
        # the model runs) and evaluated under all the keys before the next one.
        all_chunks = [(k0, k1, chunk_keys(k0, k1)) for k0, k1 in chunks]
        done = 0
        for xb, yb in stream_batches(images, labels, batch_size=bsz, prefetch=2):
            for k0, k1, chunk in all_chunks:
                count(k0, k1, chunk, xb, yb)
            done += len(xb)
            if bar is not None:
                bar.set_description(f"{desc} {n_keys} keys, images {done}/{n}")
        if bar is not None:
            bar.set_description(f"{desc} {n_keys}/{n_keys}")
    if bar is not None:
        bar.close()
    return correct / n


def wrong_key_accuracies_loop(
    config, variables, images, labels, keys: Key, *, batch_size: int = 250
) -> np.ndarray:
    """The same attack as a plain Python loop over keys (reference for tests and benchmarks)."""
    from convmixer_jax.model.inference import accuracy

    out = []
    for i in range(keys.batch_shape[0]):
        enc = np.asarray(encrypt_images(images, keys[i]))
        out.append(accuracy(config, variables, enc, labels, batch_size=batch_size))
    return np.asarray(out)


def draw_attack_keys(
    seed: int, n: int, block_size: int, channels: int, grid: tuple[int, int] | None = None
) -> Key:
    """``n`` random wrong keys from ``jax.random`` with ``seed`` (recorded with results).

    With ``grid`` (gh, gw) the keys also scramble the blocks of that grid (block_perm
    (n, gh*gw)); without it they are the paper's pixel-only keys.
    """
    grid = None if grid is None else tuple(grid)
    return jax.device_get(random_keys(jax.random.PRNGKey(seed), n, block_size, channels, grid=grid))


def key_grid(config, block_scrambling: bool = True) -> tuple[int, int] | None:
    """The block grid (gh, gw) that a key for a model of ``config`` scrambles: the model's
    grid for a ViT (whose position embedding absorbs a block permutation) when
    ``block_scrambling``; None for a ConvMixer, or without ``block_scrambling`` (the
    paper's pixel-only key)."""
    if not block_scrambling or _is_convmixer(config):
        return None
    return (config.grid_size, config.grid_size)


def secret_key(config, *, seed=None, block_scrambling: bool = True) -> Key:
    """A fresh secret key for a model of ``config``, the same on every process of a
    multi-process run (process 0's draw): from the OS CSPRNG, or from ``seed`` (an int or a
    sequence of ints, for repeatable experiments). It scrambles blocks as
    :func:`key_grid` says."""
    grid = key_grid(config, block_scrambling)
    m, c = config.patch_size, config.channels
    key = generate_key(m, c, seed, grid=grid)
    perm, flip, block_perm = from_process_zero(
        (np.asarray(key.perm), np.asarray(key.flip), key.block_perm)
    )
    return dataclasses.replace(key, perm=perm, flip=flip, block_perm=block_perm)
