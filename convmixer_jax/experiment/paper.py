"""The paper's experiment end to end: Table 1, Figure 4, Figure 5 and the key space.

``reproduce(...)`` trains (or loads) a plain ConvMixer, or loads a plain ViT, draws a
fresh secret key from the OS CSPRNG, encrypts the model, measures

- ``baseline_plain``: plain model, plain test images;
- ``encrypted_plain``: encrypted model, plain test images;
- ``encrypted_encrypted``: encrypted model, test images encrypted with the key;
- ``identical_predictions``: test images whose class from the encrypted model on
  encrypted images equals the plain model's on plain images;
- ``wrong_keys``: accuracies of the encrypted model on images encrypted with
  N random wrong keys (:mod:`convmixer_jax.attacks.wrong_keys`);

and writes ``results.json``, ``table1.md``, ``fig4.png`` and ``fig5.png`` into
the output directory. The secret key itself is never written: only its
fingerprint.

On a ViT the secret key and the wrong keys also scramble the block positions
(Kiya et al. 2023; ``docs/method.md``, "Extension: block scrambling and Vision
Transformers"), unless ``block_scrambling=False`` asks for the paper's pixel-only key;
the key space then counts the (gh*gw)! block orders too. The paper's numbers beside ours
are its ConvMixer's, so they are shown for a ConvMixer only.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import secrets
import time
from pathlib import Path
from typing import Callable

import numpy as np

from convmixer_jax.attacks.protocol import FAMILY_NAMES
from convmixer_jax.attacks.wrong_keys import (
    draw_attack_keys,
    key_grid,
    secret_key,
    wrong_key_accuracies,
)
from convmixer_jax.files.atomic import save_figure_atomic, write_text_atomic
from convmixer_jax.files.provenance import device_description
from convmixer_jax.model.inference import predict_logits
from convmixer_jax.parallel.runtime import from_process_zero
from convmixer_jax.scheme.images import encrypt_images
from convmixer_jax.scheme.keys import fingerprint, key_space_log2, key_space_text
from convmixer_jax.scheme.params import encrypt_params


def _as_is(what: str) -> str:
    return what


# Iijima & Kiya (2022), Table 1 and Fig. 5 (CIFAR-10, official data, 200 epochs).
PAPER = {
    "baseline_plain": 0.9046,
    "encrypted_plain": 0.1141,
    "encrypted_encrypted": 0.9046,
    "wrong_keys_range": [0.12, 0.20],
}


def evaluate_encryption(
    config,
    variables,
    key,
    images,
    labels,
    *,
    batch_size: int = 500,
    progress: bool = False,
    label: Callable[[str], str] = _as_is,
) -> dict:
    """Table 1's three accuracies and the identical-prediction count.

    images: (N, H, W, C) uint8; labels: (N,). Returns (accuracies dict, encrypted variables).
    ``progress`` shows one bar per model and image set, labelled ``label(what it runs)``
    (e.g. ``"encrypted model, plain images"``).
    """
    enc_vars = encrypt_params(variables, key, mean=config.mean, std=config.std)
    enc_images = np.asarray(encrypt_images(images, key))
    labels = np.asarray(labels)
    pred = {}
    for name, what, v, x in (
        ("baseline_plain", "plain model, plain images", variables, images),
        ("encrypted_plain", "encrypted model, plain images", enc_vars, images),
        ("encrypted_encrypted", "encrypted model, encrypted images", enc_vars, enc_images),
    ):
        logits = predict_logits(
            config, v, x, batch_size=batch_size, progress=progress, desc=label(what)
        )
        pred[name] = np.argmax(logits, 1)
    out = {name: float(np.mean(p == labels)) for name, p in pred.items()}
    out["identical_predictions"] = int(
        np.sum(pred["baseline_plain"] == pred["encrypted_encrypted"])
    )
    out.update(
        evaluate_tta(
            config,
            variables,
            enc_vars,
            key,
            images,
            labels,
            batch_size=batch_size,
            progress=progress,
            label=label,
        )
    )
    return out, enc_vars


def mirror_tta_logits(
    config,
    variables,
    images,
    *,
    encrypt_with=None,
    batch_size: int = 500,
    progress: bool = False,
    label: Callable[[str], str] = _as_is,
    what: str = "mirror TTA",
) -> np.ndarray:
    """Mean logits over each image and its horizontal mirror: (N, H, W, C) -> (N, classes).

    The mirror is taken of the plain image; with ``encrypt_with`` (a key) both views
    are then encrypted, as a client would send them to a provider that holds the
    encrypted model (mirroring an encrypted image is not the encryption of a mirror).
    Because the client mirrors before it encrypts, the encrypted model sees the encryption
    of each view, and computes the plain model's logits of it, for either family and
    with or without block scrambling.
    ``progress`` shows a bar per view, labelled ``label(what)`` and
    ``label(what + ", mirrored")``.
    """
    views = [np.asarray(images), np.asarray(images)[:, :, ::-1, :]]
    if encrypt_with is not None:
        views = [np.asarray(encrypt_images(v, encrypt_with)) for v in views]
    return sum(
        predict_logits(
            config, variables, v, batch_size=batch_size, progress=progress, desc=label(name)
        )
        for v, name in zip(views, (what, f"{what}, mirrored"), strict=True)
    ) / len(views)


def evaluate_tta(
    config,
    variables,
    enc_vars,
    key,
    images,
    labels,
    *,
    batch_size: int = 500,
    progress: bool = False,
    label: Callable[[str], str] = _as_is,
) -> dict:
    """Mirror test-time augmentation through the scheme: the plain model on plain views and the
    encrypted model on encrypted views (accuracies and the identical-prediction count);
    ``progress`` bars are labelled as in :func:`mirror_tta_logits`."""
    labels = np.asarray(labels)
    shared = {"batch_size": batch_size, "progress": progress, "label": label}
    plain = np.argmax(
        mirror_tta_logits(
            config, variables, images, what="mirror TTA: plain model, plain images", **shared
        ),
        1,
    )
    enc = np.argmax(
        mirror_tta_logits(
            config,
            enc_vars,
            images,
            encrypt_with=key,
            what="mirror TTA: encrypted model, encrypted images",
            **shared,
        ),
        1,
    )
    return {
        "baseline_plain_tta": float(np.mean(plain == labels)),
        "encrypted_encrypted_tta": float(np.mean(enc == labels)),
        "identical_predictions_tta": int(np.sum(plain == enc)),
    }


def table1_markdown(results: dict) -> str:
    """Table 1 in the paper's form with the paper's numbers beside ours."""

    def pct(v):
        return f"{100 * v:.2f} %"

    # the paper's numbers are its ConvMixer's: beside a ViT's they would compare nothing
    family = results.get("model", {}).get("family", "convmixer")
    convmixer = family == "convmixer"

    def paper(name):
        return pct(PAPER[name]) if convmixer else "-"

    n = results["test_images"]
    lines = [
        f"# Table 1: accuracy on {n:,} CIFAR-10 test images ({results.get('data', 'CIFAR-10')})",
        "",
        "| model \\ test images | plain (ours) | plain (paper) "
        "| encrypted, right key (ours) | encrypted, right key (paper) |",
        "| --- | --- | --- | --- | --- |",
        f"| baseline (plain model) | {pct(results['baseline_plain'])} "
        f"| {paper('baseline_plain')} | - | - |",
        f"| encrypted model | {pct(results['encrypted_plain'])} "
        f"| {paper('encrypted_plain')} | "
        f"{pct(results['encrypted_encrypted'])} | {paper('encrypted_encrypted')} |",
    ]
    if "baseline_plain_tta" in results:
        lines += [
            f"| baseline + mirror TTA (ours only) | {pct(results['baseline_plain_tta'])} "
            "| - | - | - |",
            "| encrypted model + mirror TTA (ours only) | - | - "
            f"| {pct(results['encrypted_encrypted_tta'])} | - |",
        ]
    lines += [
        "",
        "Identical predictions (encrypted model on encrypted images vs plain model on plain "
        f"images): {results['identical_predictions']:,} of {n:,}.",
        "",
    ]
    if "identical_predictions_tta" in results:
        lines += [
            "Mirror TTA: each image and its horizontal mirror (mirrored before encryption, both "
            "views encrypted by the client), logits averaged by the provider; identical "
            "predictions between the plain model with TTA on plain views and the encrypted "
            "model with TTA on encrypted views: "
            f"{results['identical_predictions_tta']:,} of {n:,}.",
            "",
        ]
    grid = results.get("grid")
    if not convmixer:
        lines += [
            f"The model is a {FAMILY_NAMES.get(family, family)}: the paper's numbers, for its "
            "ConvMixer, are not shown beside it. "
            + (
                f"Its key scrambles the {grid[0]} x {grid[1]} block positions as well."
                if grid
                else "Its key is the paper's pixel-only key (no block scrambling)."
            ),
            "",
        ]
    wk = np.asarray(results["wrong_keys"])
    if wk.size:
        paper_range = (
            f" (paper, Fig. 5: about {PAPER['wrong_keys_range'][0]:.2f} to "
            f"{PAPER['wrong_keys_range'][1]:.2f})"
            if convmixer
            else ""
        )
        scrambled = ", with block scrambling" if grid else ""
        lines += [
            f"Wrong keys ({wk.size} random keys{scrambled}, encrypted model): min "
            f"{wk.min():.4f}, median {np.median(wk):.4f}, max {wk.max():.4f}{paper_range}.",
            "",
        ]
    if grid:
        lines += [
            f"Key space: (gh*gw)! * pb! * C(pb, pb/2) = 2^{results['key_space_log2']:.2f} "
            f"(pb = {results['block_len']}, {grid[0]} x {grid[1]} block positions).",
            "",
        ]
    else:
        lines += [
            f"Key space: pb! * C(pb, pb/2) = 2^{results['key_space_log2']:.2f} "
            f"(pb = {results['block_len']}).",
            "",
        ]
    return "\n".join(lines)


def plot_fig4(
    images: np.ndarray,
    enc_images: np.ndarray,
    path: Path,
    block_size: int,
    *,
    scrambled: bool = False,
) -> None:
    """Original and encrypted example images side by side; ``scrambled``: the key also
    scrambles the block positions (said in the row's label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(images)
    fig, axes = plt.subplots(2, k, figsize=(1.6 * k, 3.6))
    axes = np.asarray(axes).reshape(2, k)
    for i in range(k):
        for row, arr, title in (
            (0, images, "original"),
            (
                1,
                enc_images,
                f"encrypted (M={block_size}" + (", blocks scrambled)" if scrambled else ")"),
            ),
        ):
            ax = axes[row, i]
            ax.imshow(arr[i], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(title, fontsize=8)
    fig.suptitle("Fig. 4: test images and their block-wise encryption")
    fig.tight_layout()
    save_figure_atomic(fig, path)
    plt.close(fig)


def plot_fig5(wrong_keys, results: dict, path: Path, *, paper_range: bool = True) -> None:
    """Box plot of wrong-key accuracies, with the right key and plain images for reference,
    and (``paper_range``) the range of the paper's Fig. 5."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    ax.boxplot([np.asarray(wrong_keys)], widths=0.5)
    ax.set_xticks([1], [f"{len(wrong_keys)} wrong keys"])
    ax.axhline(
        results["encrypted_encrypted"],
        color="tab:green",
        ls="--",
        lw=1,
        label=f"right key ({results['encrypted_encrypted']:.3f})",
    )
    ax.axhline(
        results["encrypted_plain"],
        color="tab:red",
        ls=":",
        lw=1,
        label=f"plain images ({results['encrypted_plain']:.3f})",
    )
    if paper_range:
        lo, hi = PAPER["wrong_keys_range"]
        ax.axhspan(lo, hi, color="0.85", zorder=0, label=f"paper, Fig. 5 ({lo:.2f}-{hi:.2f})")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title("Fig. 5: encrypted model, wrong keys")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    save_figure_atomic(fig, path)
    plt.close(fig)


class StepLabels:
    """Labels that number the progress bars of one run: ``[2/8] encrypted model, plain
    images``; ``StepLabels(total)(what)`` is the next step's label."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0

    def __call__(self, what: str) -> str:
        self.done += 1
        return f"[{self.done}/{self.total}] {what}"


def run_experiment(
    config,
    variables,
    test_data,
    out_dir,
    *,
    num_keys: int = 100,
    attack_seed: int | None = None,
    key_seed: int | None = None,
    strategy: str = "weights",
    block_scrambling: bool = True,
    provenance: dict | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """Encrypt ``variables`` (a plain model of either family) with a fresh key, measure
    everything, write the outputs.

    test_data: (images (N, H, W, C) uint8, labels (N,)). ``out_dir`` must exist; None
    writes nothing (the processes other than 0 of a multi-process run).
    ``block_scrambling``: on a ViT, the secret key and the wrong keys scramble the block
    positions too (False: the paper's pixel-only keys; a ConvMixer's keys never do).
    Returns the results dict (also written as results.json).
    """
    images, labels = test_data
    m, c = config.patch_size, config.channels
    grid = key_grid(config, block_scrambling)
    # one secret key and one attack seed for all processes of a multi-process run: process 0's
    key = secret_key(config, seed=key_seed, block_scrambling=block_scrambling)
    if attack_seed is None:
        attack_seed = int(from_process_zero(np.int64(secrets.randbits(31))))
    log(
        f"secret key drawn ({'seed ' + str(key_seed) if key_seed is not None else 'OS CSPRNG'}); "
        f"fingerprint {fingerprint(key)}"
    )
    t0 = time.perf_counter()
    # 3 evaluations, 2 x 2 mirror-TTA views, the wrong keys: each bar says which of them it is
    step = StepLabels(7 + (num_keys > 0))
    acc, enc_vars = evaluate_encryption(
        config, variables, key, images, labels, progress=progress, label=step
    )
    log(json.dumps(acc))
    wrong = []
    if num_keys > 0:
        keys = draw_attack_keys(attack_seed, num_keys, m, c, grid=grid)
        wrong = wrong_key_accuracies(
            config,
            enc_vars,
            images,
            labels,
            keys,
            strategy=strategy,
            progress=progress,
            desc=step("wrong keys"),
        ).tolist()
    results = {
        "test_images": int(len(images)),
        **acc,
        "wrong_keys": wrong,
        "wrong_keys_median": float(np.median(wrong)) if wrong else None,
        "wrong_keys_seed": int(attack_seed),
        "wrong_keys_strategy": strategy,
        "key_fingerprint": fingerprint(key),
        "key_source": "seed" if key_seed is not None else "os-csprng",
        "key_seed": key_seed,
        "block_size": m,
        "channels": c,
        "block_len": m * m * c,
        "block_scrambling": grid is not None,
        "grid": None if grid is None else list(grid),
        "key_space": key_space_text(m, c, grid=grid),
        "key_space_log2": key_space_log2(m, c, grid=grid),
        "model": config.to_dict(),
        "device": device_description(),
        "eval_seconds": time.perf_counter() - t0,
        "paper": PAPER,
    }
    results.update(provenance or {})
    if out_dir is None:
        return results
    out_dir = Path(out_dir)
    write_text_atomic(out_dir / "results.json", json.dumps(results, indent=1) + "\n", force=True)
    write_text_atomic(out_dir / "table1.md", table1_markdown(results), force=True)
    # one example from each of the first six classes present (the test set is often class-sorted)
    _, first = np.unique(np.asarray(labels), return_index=True)
    idx = np.sort(first)[:6] if len(first) >= 2 else np.arange(min(6, len(images)))
    plot_fig4(
        np.asarray(images)[idx],
        np.asarray(encrypt_images(np.asarray(images)[idx], key)),
        out_dir / "fig4.png",
        m,
        scrambled=grid is not None,
    )
    if wrong:
        plot_fig5(wrong, results, out_dir / "fig5.png", paper_range=config.family == "convmixer")
    return results


def checkpoint_provenance(model_dir, meta: dict) -> dict:
    """What ``results.json`` records about a trained model loaded from ``model_dir`` (its
    config.json ``meta``)."""
    return {
        "checkpoint": str(model_dir),
        "epochs": meta.get("epochs"),
        "train_seconds": meta.get("train_seconds"),
        "train_config": meta.get("train_config"),
        "data": meta.get("data"),
        **{
            k: meta[k]
            for k in ("stage_epochs", "init_from", "averaged", "recalibration")
            if k in meta
        },
    }


def reproduce(
    out,
    test_data,
    *,
    checkpoint=None,
    train_data=None,
    recipe=None,
    workdir=None,
    resume: bool = False,
    num_keys: int = 100,
    attack_seed: int | None = None,
    key_seed: int | None = None,
    strategy: str = "weights",
    block_scrambling: bool = True,
    data_label: str | None = None,
    classes=None,
    progress: bool = True,
    log=print,
) -> dict:
    """The whole experiment into the directory ``out`` (replaced as a whole, only once complete).

    Either ``checkpoint`` (a plain model directory of either family) or ``train_data`` and
    ``recipe`` (a :class:`~convmixer_jax.training.recipes.TrainConfig`; the paper's
    ConvMixer-256/8, with one output per class of the data, is trained from scratch in
    ``workdir``, and saved as ``out/plain-model``). test_data / train_data: (images
    (N, H, W, C) uint8, labels (N,)); train_data's images may also be a row reader of
    :mod:`convmixer_jax.data.sources` (training reads it batch by batch); classes: the
    data's class names, recorded in a model trained here. ``block_scrambling``: as in
    :func:`run_experiment`. Whether ``out`` may be replaced is the caller's check
    (:func:`~convmixer_jax.files.output_paths.check_output` with ``kind='results_dir'``).
    Returns the results dict.
    In a multi-process run every process calls this alike; the sweep's keys are split
    over them and process 0 alone logs and writes ``out``.
    """
    from convmixer_jax.files.atomic import staged_output_dir
    from convmixer_jax.files.model_dir import ModelDirError, is_encrypted, load_model, save_model
    from convmixer_jax.model.convmixer import PRESETS
    from convmixer_jax.model.inference import check_model_images
    from convmixer_jax.parallel.runtime import is_writer
    from convmixer_jax.training.loop import total_train_seconds, train

    out = Path(out)
    if not is_writer():
        progress, log = False, (lambda message: None)
    test_x, test_y = test_data
    if checkpoint is not None:
        config, variables, meta = load_model(checkpoint)
        if is_encrypted(meta):
            raise ModelDirError(
                f"{checkpoint} is an encrypted model; reproduce needs the plain "
                "model (decrypt-model it first)"
            )
        check_model_images(config, test_x)
        provenance, trained = checkpoint_provenance(checkpoint, meta), False
    else:
        if train_data is None or recipe is None:
            raise ValueError(
                "reproduce needs a checkpoint, or train_data and a recipe to train one"
            )
        # the paper's architecture with one output per class of these data
        num_classes = (
            len(classes) if classes is not None else int(max(train_data[1].max(), test_y.max())) + 1
        )
        config = dataclasses.replace(PRESETS["paper"], num_classes=num_classes)
        check_model_images(config, train_data[0])
        check_model_images(config, test_x)  # before training, not after it
        workdir = Path(workdir) if workdir else out.with_name(out.name + "-work")
        per_epoch_test = None if recipe.holdout else test_data
        variables, history = train(
            config, recipe, train_data, per_epoch_test, workdir, resume=resume, progress=progress
        )
        provenance = {
            "checkpoint": None,
            "epochs": recipe.epochs,
            "train_seconds": total_train_seconds(history),
            "train_config": recipe.to_dict(),
            "weights": history.get("weights"),
            "holdout": history.get("holdout"),
            "train_log": history["epochs"],
        }
        trained = True
    provenance["data"] = data_label
    if trained and classes is not None:
        provenance["classes"] = list(classes)
    experiment = functools.partial(
        run_experiment,
        config,
        variables,
        (test_x, test_y),
        num_keys=num_keys,
        attack_seed=attack_seed,
        key_seed=key_seed,
        strategy=strategy,
        block_scrambling=block_scrambling,
        provenance=provenance,
        progress=progress,
        log=log,
    )
    if not is_writer():
        return experiment(None)
    with staged_output_dir(out) as tmp:
        if trained:
            save_model(
                tmp / "plain-model",
                config,
                variables,
                extra={
                    "created_by": "reproduce",
                    **{k: v for k, v in provenance.items() if k != "train_log"},
                },
            )
        return experiment(tmp)
