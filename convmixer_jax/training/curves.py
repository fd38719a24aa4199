"""Training curves: a picture of a run's ``train_log.json``.

``train`` writes one JSON entry per epoch (loss, train accuracy, test accuracy,
images/s); :func:`plot_training_curves` draws loss and accuracy against the
epoch, with the paper's reported accuracy as a reference line;
:func:`chain_train_logs` joins the logs of a run trained in stages.
"""

from __future__ import annotations

import json
from pathlib import Path

from convmixer_jax.files.atomic import save_figure_atomic

PAPER_BASELINE = 0.9046  # Iijima & Kiya (2022), Table 1, after 200 epochs of Adam


class TrainLogError(ValueError):
    """A file is not a training log that can be plotted."""


def read_train_log(path) -> dict:
    """The log of a training run: ``path`` is ``train_log.json`` or the directory holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / "train_log.json"
    if not path.is_file():
        raise TrainLogError(
            f"{path} does not exist; pass a training --workdir or its train_log.json"
        )
    try:
        history = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TrainLogError(
            f"{path} is not JSON ({e}); pass the train_log.json that `train` wrote"
        ) from None
    if not isinstance(history, dict) or not isinstance(history.get("epochs"), list):
        raise TrainLogError(
            f"{path} has no 'epochs' list; pass the train_log.json that `train` wrote"
        )
    if not history["epochs"]:
        raise TrainLogError(f"{path} holds no finished epoch yet; plot it after the first epoch")
    return history


def chain_train_logs(histories: list[dict]) -> dict:
    """One history from the logs of a run trained in stages (``train --init-from``).

    histories: the stages' ``train_log.json`` dicts, first stage first. The
    epochs are renumbered to count on across stages (stage 2's epoch 1 after a
    40-epoch stage 1 becomes epoch 41); ``stage_starts`` lists the epoch after
    which each later stage began, and ``recipe`` is the last stage's with
    ``epochs`` = the planned total.
    """
    if not histories:
        raise TrainLogError("no training log given")
    epochs, starts, planned, offset = [], [], 0, 0
    for i, h in enumerate(histories):
        if i:
            starts.append(offset)
        epochs += [dict(e, epoch=e["epoch"] + offset) for e in h["epochs"]]
        offset += h["epochs"][-1]["epoch"]
        planned += int((h.get("recipe") or {}).get("epochs") or h["epochs"][-1]["epoch"])
    last = histories[-1]
    return dict(
        last,
        epochs=epochs,
        stage_starts=starts,
        recipe=dict(last.get("recipe") or {}, epochs=planned),
    )


def plot_training_curves(history: dict, path, title: str | None = None) -> None:
    """Write a PNG of loss (left) and train / validation / test accuracy (right) per epoch.

    history: the dict of ``train_log.json`` (``epochs``: list of per-epoch entries
    with ``epoch``, ``train_loss``, ``train_accuracy`` and, if evaluated,
    ``test_accuracy``, ``val_accuracy``, ``val_accuracy_ema``). The file is replaced atomically.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = history["epochs"]
    ep = [e["epoch"] for e in epochs]
    fig, (ax_l, ax_a) = plt.subplots(1, 2, figsize=(9, 3.6))
    ax_l.plot(ep, [e["train_loss"] for e in epochs], color="tab:blue")
    ax_l.set_xlabel("epoch")
    ax_l.set_ylabel("training loss")
    ax_a.plot(
        ep, [e["train_accuracy"] for e in epochs], color="tab:blue", label="train (augmented)"
    )
    test = [(e["epoch"], e["test_accuracy"]) for e in epochs if e.get("test_accuracy") is not None]
    if test:
        ax_a.plot(
            *zip(*test, strict=True), color="tab:orange", label=f"test (last {test[-1][1]:.4f})"
        )
    for key, color, name in (
        ("val_accuracy", "tab:purple", "validation"),
        ("val_accuracy_ema", "tab:red", "validation, EMA weights"),
    ):
        val = [(e["epoch"], e[key]) for e in epochs if e.get(key) is not None]
        if val:
            ax_a.plot(*zip(*val, strict=True), color=color, label=f"{name} (last {val[-1][1]:.4f})")
    ax_a.axhline(
        PAPER_BASELINE, color="0.5", ls="--", lw=1, label=f"paper, 200 epochs ({PAPER_BASELINE})"
    )
    for i, start in enumerate(history.get("stage_starts") or []):
        for ax in (ax_l, ax_a):
            ax.axvline(
                start + 0.5,
                color="tab:green",
                ls=":",
                lw=1,
                label="warm start of a new stage" if ax is ax_a and i == 0 else None,
            )
    ax_a.set_xlabel("epoch")
    ax_a.set_ylabel("accuracy")
    ax_a.set_ylim(0, 1)
    ax_a.legend(fontsize=7, loc="lower right")
    recipe = history.get("recipe") or {}
    planned = recipe.get("epochs")
    stages = len(history.get("stage_starts") or []) + 1
    default = f"training: {len(epochs)} of {planned} epochs" if planned else "training"
    if stages > 1:
        default += f" in {stages} stages"
    fig.suptitle(title or default)
    fig.tight_layout()
    try:
        save_figure_atomic(fig, path, dpi=120)
    finally:
        plt.close(fig)


__all__ = [
    "read_train_log",
    "chain_train_logs",
    "plot_training_curves",
    "TrainLogError",
    "PAPER_BASELINE",
]
