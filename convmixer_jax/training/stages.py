"""A training run as a whole, as a library call: warm starts, runs trained in stages, exports.

These are what the ``train``, ``export-model`` and ``average-models`` commands do
besides parsing: each returns the variables and the provenance fields that go
into the model directory's ``config.json`` (see :func:`~convmixer_jax.files.model_dir.save_model`),
so a notebook gets the same records as the command line.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from convmixer_jax.files.model_dir import (
    ModelDirError,
    check_data_classes,
    is_encrypted,
    load_model,
    model_classes,
)
from convmixer_jax.model.convmixer import ConvMixerConfig
from convmixer_jax.model.inference import accuracy, check_model_images
from convmixer_jax.parallel.runtime import is_writer
from convmixer_jax.scheme.images import ImageError
from convmixer_jax.training.loop import load_checkpoint, total_train_seconds, train
from convmixer_jax.training.recipes import TrainConfig
from convmixer_jax.training.workdir import check_workdir, locked_workdir


def warm_start(model_dir, asked: dict | None = None) -> tuple[ConvMixerConfig, dict, dict]:
    """Begin training from the plain model in ``model_dir``: ``(config, variables, init_from)``.

    asked: architecture fields the caller asked for ({field: value}); each must
    equal the model's (the model's architecture is used). ``init_from`` records
    where the weights came from (epochs, seconds, test accuracy, recipe, stages)
    for :func:`warm_start_totals`. Encrypted models are refused: training uses plain images.
    """
    start_config, variables, meta = load_model(model_dir)
    if is_encrypted(meta):
        raise ModelDirError(
            f"--init-from {model_dir} is an encrypted model (key fingerprint "
            f"{meta['encryption']['key_fingerprint']}); training uses plain images, "
            "so start from the plain model"
        )
    differ = {
        n: (v, getattr(start_config, n))
        for n, v in (asked or {}).items()
        if getattr(start_config, n) != v
    }
    if differ:
        what = ", ".join(
            f"--{n.replace('_', '-')} {v} (model has {m})" for n, (v, m) in differ.items()
        )
        raise ModelDirError(
            f"--init-from {model_dir} has another architecture than asked: {what}; "
            "drop the architecture options (the starting model's are used)"
        )
    init_from = {
        "model": str(model_dir),
        "epochs": meta.get("epochs"),
        "train_seconds": meta.get("train_seconds"),
        "test_accuracy": meta.get("test_accuracy"),
        "train_config": meta.get("train_config"),
    }
    if meta.get("stage_epochs"):
        init_from["stage_epochs"] = meta["stage_epochs"]
    return start_config, variables, init_from


def warm_start_totals(
    init_from: dict | None, epochs: int, train_seconds: float, *, planned: int
) -> dict:
    """Provenance of a model trained in stages: total epochs and seconds.

    init_from: a run's ``init_from`` (None for a run from scratch), holding the
    starting model's ``epochs`` and ``train_seconds`` (and its ``stage_epochs``
    if it was itself warm-started); epochs / train_seconds /
    planned: this run's done and planned epochs and its seconds. Returns
    ``{'epochs', 'epochs_planned', 'train_seconds'}`` counting every stage,
    plus ``'stage_epochs'`` / ``'init_from'`` for a warm start.
    """
    prior_epochs = int((init_from or {}).get("epochs") or 0)
    prior_seconds = float((init_from or {}).get("train_seconds") or 0.0)
    totals = {
        "epochs": prior_epochs + epochs,
        "epochs_planned": prior_epochs + planned,
        "train_seconds": prior_seconds + train_seconds,
    }
    if not init_from:
        return totals
    prior_stages = [int(e) for e in init_from.get("stage_epochs") or [prior_epochs]]
    return {**totals, "stage_epochs": [*prior_stages, epochs], "init_from": init_from}


def lineage_train_seconds(metas: list[dict]) -> float:
    """Training seconds of several models' ``config.json`` metadata, each stage counted once.

    A model that another one was warm-started from is already in that one's
    ``train_seconds`` (see :func:`warm_start_totals`); it is recognized by what the
    other's ``init_from`` recorded about it (epochs, train_seconds, test_accuracy,
    train_config), not by its path, which changes when models are copied.
    """
    keys = ("epochs", "train_seconds", "test_accuracy", "train_config")
    starts = [m["init_from"] for m in metas if m.get("init_from")]
    return sum(
        float(m.get("train_seconds") or 0.0)
        for m in metas
        if not any(all(s.get(k) == m.get(k) for k in keys) for s in starts)
    )


def check_training_data(config: ConvMixerConfig, train_data, test_data, classes=None) -> None:
    """Raise ImageError / DataError unless both splits fit ``config`` (image shape, label
    range) and, when the data name their classes (``classes``), one output per class."""
    from convmixer_jax.data import DataError

    for name, (x, _) in (("training", train_data), ("test", test_data)):
        try:
            check_model_images(config, x)
        except ImageError as e:
            raise ImageError(
                f"{name} images do not fit the model: {e} "
                "(set --image-size / --channels to match the data)"
            ) from None
    if classes is not None and len(classes) != config.num_classes:
        shown = ", ".join(map(str, list(classes)[:5])) + (", ..." if len(classes) > 5 else "")
        raise DataError(
            f"the data have {len(classes)} classes ({shown}) but the model has "
            f"{config.num_classes} outputs; give --num-classes {len(classes)} or leave it out "
            "(it follows the data)"
        )
    top = int(max(np.max(train_data[1], initial=0), np.max(test_data[1], initial=0)))
    if top >= config.num_classes:
        raise DataError(
            f"the data have labels up to {top} but the model has {config.num_classes} classes; "
            f"pass --num-classes {top + 1}"
        )


def train_model(
    config: ConvMixerConfig,
    recipe: TrainConfig,
    train_data,
    test_data,
    workdir,
    *,
    recipe_name: str | None = None,
    resume: bool = False,
    warm: tuple[dict, dict] | None = None,
    data_label: str | None = None,
    classes=None,
    progress: bool = True,
    checkpoint_seconds: float | None = 300.0,
    workers: int = 0,
) -> tuple[dict, dict]:
    """Train, draw the curves into ``workdir/curves.png``, score the test split:
    ``(variables, meta)``.

    train_data / test_data: (images (N, H, W, C) uint8, labels (N,)). warm: the
    ``(variables, init_from)`` of :func:`warm_start`, or None for a fresh start.
    A recipe with a validation hold-out is judged on it alone: the test images
    are then scored once, for the final model, after training; otherwise every epoch.
    meta: the provenance fields for ``config.json`` (recipe, accuracies, epochs and
    seconds of every stage, ...). classes: the data's class names (one output each), or None.
    ``workdir`` is held (:func:`~convmixer_jax.training.workdir.locked_workdir`) until the
    curves are drawn; ``checkpoint_seconds``, ``workers``: see
    :func:`~convmixer_jax.training.loop.train`.
    """
    check_training_data(config, train_data, test_data, classes)
    init_variables_, init_from = warm if warm is not None else (None, None)
    per_epoch_test = None if recipe.holdout else test_data
    with locked_workdir(workdir):
        check_workdir(workdir, resume)
        variables, history = train(
            config,
            recipe,
            train_data,
            per_epoch_test,
            workdir,
            resume=resume,
            progress=progress,
            init_variables_=init_variables_,
            init_from=init_from,
            checkpoint_seconds=checkpoint_seconds,
            workers=workers,
        )
        if history.get("epochs") and is_writer():
            from convmixer_jax.training.curves import plot_training_curves

            plot_training_curves(history, Path(workdir) / "curves.png")
    last = history["epochs"][-1] if history.get("epochs") else {}
    acc = last.get("test_accuracy")
    if acc is None:
        acc = accuracy(config, variables, test_data[0], test_data[1])
    meta = {
        "created_by": "train",
        "recipe": recipe_name,
        "train_config": recipe.to_dict(),
        "test_accuracy": acc,
        "train_images": history.get("train_images", len(train_data[0])),
        "test_images": len(test_data[0]),
        "weights": history.get("weights", "raw"),
        "holdout": history.get("holdout"),
        "val_accuracy": last.get("val_accuracy"),
        "val_accuracy_ema": last.get("val_accuracy_ema"),
        "data": data_label,
        "classes": list(classes) if classes is not None else None,
        "workdir": str(workdir),
        **warm_start_totals(
            init_from, len(history["epochs"]), total_train_seconds(history), planned=recipe.epochs
        ),
    }
    return variables, meta


def export_checkpoint(
    workdir, *, data_label: str | None = None
) -> tuple[ConvMixerConfig, dict, dict]:
    """The newest epoch checkpoint of a training ``workdir`` as ``(config, variables, meta)``
    (the weights its validation split prefers, see
    :func:`~convmixer_jax.training.loop.choose_weights`). Reads only: a run may be training
    there; a damaged checkpoint is a one-line
    :class:`~convmixer_jax.training.workdir.CheckpointError`."""
    config, variables, info = load_checkpoint(workdir)
    log = info["log"] or {}
    totals = warm_start_totals(
        info["init_from"], info["epoch"], info["train_seconds"], planned=info["epochs_planned"]
    )
    meta = {
        "created_by": "export-model",
        "workdir": str(workdir),
        **totals,
        "train_config": info["recipe"],
        "test_accuracy": log.get(
            "test_accuracy_ema" if info["weights"] == "ema" else "test_accuracy"
        ),
        "train_accuracy": log.get("train_accuracy"),
        "data": data_label,
        "weights": info["weights"],
        "holdout": info["holdout"],
        "train_images": info["train_images"],
        "val_accuracy": log.get("val_accuracy"),
        "val_accuracy_ema": log.get("val_accuracy_ema"),
    }
    return config, variables, meta


def average_models(
    model_dirs,
    train_images,
    test_data,
    *,
    weights=None,
    bn_images: str = "augmented",
    bn_passes: int = 1,
    seed: int = 0,
    batch_size: int = 500,
    data_label: str | None = None,
    classes=None,
    progress: bool = True,
) -> tuple[ConvMixerConfig, dict, dict]:
    """Average plain models of one architecture and re-measure BatchNorm:
    ``(config, variables, meta)``.

    train_images: (N, H, W, C) uint8 for the statistics, measured in batches of the
    last model's training batch size under its recipe's augmentation
    (``bn_images='augmented'``) or as they are (``'plain'``); test_data: (images,
    labels) for the reported accuracy. meta counts every stage's seconds once
    (:func:`lineage_train_seconds`) plus the re-measurement. classes: the data's
    class names (checked against each model's, recorded), or None.
    """
    from convmixer_jax.training.averaging import average_variables, recalibrate_batch_stats

    if len(model_dirs) < 2:
        raise ValueError(f"average-models needs at least two models, got {len(model_dirs)}")
    if weights is not None and len(weights) != len(model_dirs):
        raise ValueError(
            f"--weights gives {len(weights)} numbers for {len(model_dirs)} models; give one "
            "per model"
        )
    loaded = [load_model(m) for m in model_dirs]
    for path, (config, _, meta) in zip(model_dirs, loaded, strict=True):
        if is_encrypted(meta):
            raise ModelDirError(
                f"{path} is an encrypted model; average the plain models, then encrypt the "
                "result (its BatchNorm statistics are measured on plain training images)"
            )
        if config != loaded[0][0]:
            raise ModelDirError(
                f"{path} has another architecture than {model_dirs[0]} "
                f"({config.to_dict()} vs {loaded[0][0].to_dict()}); only models of one "
                "architecture can be averaged"
            )
        check_data_classes(config, meta, classes, where=f"the data ({data_label})")
    config = loaded[0][0]
    test_x, test_y = test_data
    check_model_images(config, train_images)
    check_model_images(config, test_x)
    train_config = loaded[-1][2].get("train_config") or {}
    bn_batch = int(train_config.get("batch_size") or batch_size)
    augment = None
    if bn_images == "augmented" and train_config.get("augment"):
        import functools

        import jax

        from convmixer_jax.training.loop import augment_batch

        augment = jax.jit(functools.partial(augment_batch, cfg=TrainConfig.from_dict(train_config)))
    t0 = time.perf_counter()
    averaged = average_variables([v for _, v, _ in loaded], weights)
    averaged = recalibrate_batch_stats(
        config,
        averaged,
        train_images,
        batch_size=bn_batch,
        augment=augment,
        passes=bn_passes,
        seed=seed,
        progress=progress,
    )
    seconds = time.perf_counter() - t0
    acc = accuracy(config, averaged, test_x, test_y, batch_size=batch_size, progress=progress)
    inputs = [
        {
            "model": str(m),
            "epochs": meta.get("epochs"),
            "test_accuracy": meta.get("test_accuracy"),
            "train_seconds": meta.get("train_seconds"),
        }
        for m, (_, _, meta) in zip(model_dirs, loaded, strict=True)
    ]
    w = weights or [1.0] * len(model_dirs)
    meta = {
        "created_by": "average-models",
        "averaged": inputs,
        "weights": [x / sum(w) for x in w],
        "epochs": max(int(m.get("epochs") or 0) for _, _, m in loaded),
        "train_seconds": lineage_train_seconds([m for _, _, m in loaded]) + seconds,
        "recalibration": {
            "train_images": int(len(train_images)),
            "seconds": seconds,
            "batch_size": bn_batch,
            "augment": list(train_config.get("augment") or []) if augment else [],
            "passes": bn_passes,
            "seed": seed,
        },
        "test_accuracy": acc,
        "test_images": int(len(test_x)),
        "train_config": train_config or None,
        "data": data_label,
        "classes": list(classes) if classes is not None else model_classes(loaded[-1][2]),
    }
    return config, averaged, meta


__all__ = [
    "warm_start",
    "warm_start_totals",
    "lineage_train_seconds",
    "check_training_data",
    "train_model",
    "export_checkpoint",
    "average_models",
]
