"""What block scrambling adds to the pixel key, measured on trained models of either family.

For each plain model (a ConvMixer or a ViT) and the same test images, four accuracies:

- ``right_key`` (a): the encrypted model on images encrypted with the right key: the
  pixel key for a ConvMixer, the pixel key and a block key for a ViT (which takes the
  block key into its position embedding);
- ``right_pixel_key_wrong_blocks`` (b): the right pixel key with the blocks put in another
  order, under N random block permutations. On a ConvMixer, encrypted with the pixel key,
  the images are encrypted with that key and their blocks scrambled (which is the plain
  model on block-scrambled plain images); on a ViT, encrypted with the pixel key and its
  block key, the images are encrypted with the right pixel key and a wrong block key;
- ``wrong_keys`` (c): N random wrong pixel keys without block scrambling;
- ``wrong_keys_scrambled`` (d): N random wrong keys that also scramble the blocks;

with the plain model's accuracy on the plain images beside them. (b), (c) and (d) are
sweeps of :mod:`convmixer_jax.attacks.wrong_keys` (median, min, max and every accuracy).
:func:`scrambling_effect` writes ``scrambling.json`` and ``scrambling.md`` (one table, one
row per model); secret keys are never written, only their fingerprints.

Keys come from the OS CSPRNG unless ``key_seed`` is given; the seed of the random keys of
the sweeps is recorded either way.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from convmixer_jax.attacks.wrong_keys import (
    draw_attack_keys,
    secret_key,
    sweep_strategy,
    wrong_key_accuracies,
)
from convmixer_jax.experiment.paper import StepLabels
from convmixer_jax.files.provenance import device_description
from convmixer_jax.model.inference import accuracy
from convmixer_jax.parallel.runtime import from_process_zero
from convmixer_jax.scheme.images import encrypt_images
from convmixer_jax.scheme.keys import Key, fingerprint
from convmixer_jax.scheme.params import encrypt_params

#: The measured columns, in the order of the table: (results key, column title).
COLUMNS = (
    ("plain", "plain model, plain images"),
    ("right_key", "(a) right key"),
    ("right_pixel_key_wrong_blocks", "(b) right pixel key, blocks scrambled"),
    ("wrong_keys", "(c) wrong keys"),
    ("wrong_keys_scrambled", "(d) wrong keys, blocks scrambled"),
)


def spread(accuracies) -> dict:
    """Median, min and max of a sweep's accuracies (K,), with the accuracies."""
    acc = np.asarray(accuracies, np.float64)
    return {
        "median": float(np.median(acc)),
        "min": float(acc.min()),
        "max": float(acc.max()),
        "accuracies": [float(a) for a in acc],
    }


def with_block_perms(key: Key, block_perms, grid: tuple[int, int]) -> Key:
    """A batch of keys: ``key``'s pixel part (perm, flip) with each block permutation of
    ``block_perms`` (K, gh*gw) on the grid ``grid``."""
    block_perms = np.asarray(block_perms)
    k = len(block_perms)
    return Key(
        np.repeat(np.asarray(key.perm)[None], k, 0),
        np.repeat(np.asarray(key.flip)[None], k, 0),
        key.block_size,
        key.channels,
        block_perms,
        tuple(grid),
    )


def measure_scrambling(
    config,
    variables,
    images,
    labels,
    *,
    num_keys: int = 100,
    key_seed=None,
    sweep_seed: int = 0,
    progress: bool = False,
    label: Callable[[str], str] = str,
) -> dict:
    """The plain model's accuracy on ``images`` and the accuracies (a) to (d) of the model
    encrypted with a fresh key.

    config, variables: a plain model of either family. images: (N, H, W, C) uint8;
    labels: (N,) int. ``key_seed``: the secret key's seed (an int or a sequence of ints;
    None: the OS CSPRNG). ``sweep_seed``: the seed of the random keys of (b), (c) and
    (d), each from its own branch. ``progress`` shows one bar per measurement, labelled
    ``label(what)``. Returns the model's row of ``scrambling.json`` (accuracies in [0, 1]).
    """
    images, labels = np.asarray(images), np.asarray(labels)
    m, c, g = config.patch_size, config.channels, config.grid_size
    grid = (g, g)
    # a ViT takes the block key into its position embedding; a ConvMixer cannot
    key = secret_key(config, seed=key_seed)
    enc_vars = encrypt_params(variables, key, mean=config.mean, std=config.std)
    seed_b, seed_c, seed_d = (int(s) for s in np.random.SeedSequence(sweep_seed).generate_state(3))
    row = {
        "family": config.family,
        "grid": list(grid),
        "test_images": int(len(images)),
        "key_fingerprint": fingerprint(key),
        "model_key": "pixel key and block key" if key.scrambles else "pixel key",
        "num_keys": int(num_keys),
        "sweep_seed": int(sweep_seed),
    }
    row["plain"] = accuracy(
        config, variables, images, labels, progress=progress, desc=label("plain model")
    )
    row["right_key"] = accuracy(
        config,
        enc_vars,
        np.asarray(encrypt_images(images, key)),
        labels,
        progress=progress,
        desc=label("(a) encrypted model, right key"),
    )
    sweeps = (
        (
            "right_pixel_key_wrong_blocks",
            "(b) right pixel key, random block orders",
            with_block_perms(key, draw_attack_keys(seed_b, num_keys, m, c, grid).block_perm, grid),
        ),
        ("wrong_keys", "(c) wrong keys", draw_attack_keys(seed_c, num_keys, m, c)),
        (
            "wrong_keys_scrambled",
            "(d) wrong keys, blocks scrambled",
            draw_attack_keys(seed_d, num_keys, m, c, grid),
        ),
    )
    strategies = {}
    for name, what, keys in sweeps:
        strategies[name] = sweep_strategy(config, keys)
        acc = wrong_key_accuracies(
            config,
            enc_vars,
            images,
            labels,
            keys,
            strategy=strategies[name],
            progress=progress,
            desc=label(what),
        )
        row[name] = spread(acc)
    row["strategies"] = strategies
    return row


def cell(value) -> str:
    """A table cell: an accuracy, or a sweep's median (min-max), to 4 decimals."""
    if isinstance(value, dict):
        return f"{value['median']:.4f} ({value['min']:.4f}-{value['max']:.4f})"
    return f"{value:.4f}"


def scrambling_markdown(results: dict) -> str:
    """``scrambling.md``: one table, one row per model."""
    rows = results["models"]
    n = {r["test_images"] for r in rows}
    k = {r["num_keys"] for r in rows}
    lines = [
        "# Block scrambling: accuracy under the right and wrong keys",
        "",
        f"{', '.join(f'{v:,}' for v in sorted(n))} test images ({results['data']}); "
        f"{', '.join(map(str, sorted(k)))} random keys per sweep, shown as median (min-max). "
        "(a) the encrypted model on images encrypted with its key (a ConvMixer's key is a "
        "pixel key, a ViT's a pixel key and a block key); (b) the right pixel key with the "
        "blocks in a random order; (c) random pixel keys; (d) random keys that also "
        "scramble the blocks.",
        "",
        "| model | family | grid | " + " | ".join(title for _, title in COLUMNS) + " |",
        "| --- | --- | --- |" + " ---: |" * len(COLUMNS),
    ]
    for r in rows:
        grid = f"{r['grid'][0]} x {r['grid'][1]}"
        cells = " | ".join(cell(r[name]) for name, _ in COLUMNS)
        lines.append(f"| `{r['model']}` | {r['family']} | {grid} | {cells} |")
    lines += [
        "",
        f"Secret keys: {results['key_source']}; only their fingerprints are recorded "
        "(scrambling.json). Random keys of the sweeps: seed "
        f"{results['sweep_seed']}.",
        "",
    ]
    return "\n".join(lines)


def scrambling_effect(
    models: Sequence[tuple[str, object, dict]],
    test_data,
    out,
    *,
    num_keys: int = 100,
    key_seed: int | None = None,
    data_label: str = "",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Measure every model and write ``out/scrambling.json`` and ``out/scrambling.md``.

    models: (name, config, variables) of plain models of either family, all taking the
    test images. test_data: (images (N, H, W, C) uint8, labels (N,) int). ``key_seed``:
    model i's secret key is ``[key_seed, i]``'s and the sweeps' random keys come from
    ``key_seed`` (None: the OS CSPRNG, and a random sweep seed, recorded). ``out`` is
    replaced as a whole once everything is measured; whether it may be is the caller's
    check (:func:`~convmixer_jax.files.output_paths.check_output` with
    ``kind='results_dir'``). Returns what ``scrambling.json`` holds.
    """
    from convmixer_jax.files.atomic import staged_output_dir

    images, labels = test_data
    sweep_seed = (
        key_seed if key_seed is not None else int(from_process_zero(np.int64(secrets.randbits(31))))
    )
    step = StepLabels(5 * len(models))
    rows = []
    for i, (name, config, variables) in enumerate(models):
        row = measure_scrambling(
            config,
            variables,
            images,
            labels,
            num_keys=num_keys,
            key_seed=None if key_seed is None else [key_seed, i],
            sweep_seed=int(np.random.SeedSequence([sweep_seed, i]).generate_state(1)[0]),
            progress=progress,
            label=lambda what, name=name: step(f"{name}: {what}"),
        )
        rows.append({"model": str(name), **row})
        log(f"{name}: " + ", ".join(f"{title} {cell(row[key])}" for key, title in COLUMNS))
    results = {
        "models": rows,
        "data": data_label,
        "key_source": "seed" if key_seed is not None else "os-csprng",
        "key_seed": key_seed,
        "sweep_seed": int(sweep_seed),
        "device": device_description(),
    }
    with staged_output_dir(out) as tmp:
        Path(tmp, "scrambling.json").write_text(json.dumps(results, indent=1) + "\n")
        Path(tmp, "scrambling.md").write_text(scrambling_markdown(results))
    return results


__all__ = [
    "COLUMNS",
    "cell",
    "measure_scrambling",
    "scrambling_effect",
    "scrambling_markdown",
    "spread",
    "with_block_perms",
]
