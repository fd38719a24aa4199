"""The security report's section on key recovery from the encrypted model, by adversaries
holding the original weights, an independently trained model, unlabeled public images,
or the encrypted model alone (:mod:`~convmixer_jax.attacks.from_weights`,
:mod:`~convmixer_jax.attacks.from_model`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from convmixer_jax.attacks.protocol import (
    EVAL_BATCH_SIZE,
    Attack,
    AttackContext,
    option,
    seeded_keys,
)

if TYPE_CHECKING:
    from convmixer_jax.model.convmixer import ConvMixerConfig


@dataclass(frozen=True)
class ModelRecoveryConfig:
    recovery_keys: int = option(
        3, "secret keys per model-recovery attack (default {default})", metavar="K", minimum=1
    )


#: What each adversary holds, by its name in the results.
ATTACK_LABELS = {
    "original_weights": "the original plain weights",
    "independent_reference": "an independently trained model",
    "independent_reference_public_images": (
        "an independently trained model + unlabeled public images"
    ),
    "encrypted_model_only": "the encrypted model only",
    "encrypted_model_public_images": "the encrypted model + unlabeled public images",
}


def _adversaries(config, variables, reference_variables, public_images) -> dict[str, Callable]:
    """Name -> attack(encrypted variables) -> recovery, for what is given."""
    import numpy as np

    from convmixer_jax.attacks import from_model
    from convmixer_jax.attacks import from_weights as mkr

    def kernel(v):
        return v["params"]["stem"]["kernel"]

    attacks: dict[str, Callable] = {
        "original_weights": lambda enc: mkr.recover_key_with_reference(
            kernel(enc), kernel(variables)
        ),
    }
    if reference_variables is not None:
        ref_kernel = np.asarray(kernel(reference_variables))
        attacks["independent_reference"] = lambda enc: mkr.recover_key_with_independent_reference(
            kernel(enc), ref_kernel
        )
        if public_images is not None:
            attacks["independent_reference_public_images"] = lambda enc: (
                from_model.rerank_by_confidence(
                    mkr.recover_key_with_independent_reference(kernel(enc), ref_kernel),
                    config,
                    enc,
                    public_images,
                )
            )
    attacks["encrypted_model_only"] = lambda enc: from_model.recover_key_from_encrypted_model(
        config, enc
    )
    if public_images is not None:
        attacks["encrypted_model_public_images"] = lambda enc: (
            from_model.recover_key_from_encrypted_model(config, enc, public_images)
        )
    return attacks


def model_recovery(
    config: ConvMixerConfig,
    variables,
    images,
    labels,
    *,
    reference_variables=None,
    public_images=None,
    num_keys: int = 3,
    seed: int | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
    baseline_accuracy: float | None = None,
    log: Callable[[str], None] = lambda m: None,
) -> dict:
    """Key recovery from the encrypted model by several adversaries, ``num_keys`` secret keys each.

    variables: the plain model; images/labels: (N, H, W, C) uint8 and (N,) int test data
    for the accuracy with a recovered key. ``reference_variables``: an independently
    trained model of the same architecture; ``public_images``: (N, H, W, C) unlabeled
    images of the task's kind (not the test images). Attacks needing what is not given are
    skipped. Keys come from the OS CSPRNG when ``seed`` is None. ``baseline_accuracy``:
    the plain model's accuracy on these images, if already measured. Returns, per attack
    and key, the measures of :func:`~convmixer_jax.attacks.from_model.evaluate_recovery`
    and the accuracy of the encrypted model on test images encrypted with the recovered
    key; and per attack their means.
    """
    import numpy as np

    from convmixer_jax.attacks import from_model
    from convmixer_jax.model.inference import accuracy
    from convmixer_jax.scheme.images import encrypt_images
    from convmixer_jax.scheme.keys import fingerprint
    from convmixer_jax.scheme.params import encrypt_params

    if baseline_accuracy is None:
        baseline_accuracy = accuracy(config, variables, images, labels, batch_size=batch_size)
    attacks = _adversaries(config, variables, reference_variables, public_images)
    out: dict[str, Any] = {
        "baseline_plain": baseline_accuracy,
        "test_images": int(len(images)),
        "public_images": None if public_images is None else int(len(public_images)),
        "attacks": {name: {"adversary_holds": ATTACK_LABELS[name], "keys": []} for name in attacks},
    }
    for i, key in enumerate(seeded_keys(num_keys, config.patch_size, config.channels, seed)):
        enc = dict(encrypt_params(variables, key, mean=config.mean, std=config.std))
        for name, attack in attacks.items():
            t0 = time.perf_counter()
            rec = attack(enc)
            seconds = time.perf_counter() - t0
            row = {
                "key_fingerprint": fingerprint(key),
                "seconds": seconds,
                "method": rec.method,
                **from_model.evaluate_recovery(key, rec),
            }
            row["accuracy_with_recovered_key"] = (
                accuracy(
                    config,
                    enc,
                    np.asarray(encrypt_images(images, rec.key)),
                    labels,
                    batch_size=batch_size,
                )
                if rec.key is not None
                else None
            )
            out["attacks"][name]["keys"].append(row)
            log(
                f"model recovery, key {i + 1}/{num_keys}, {name}: "
                f"both {row['fraction_both']:.3f}, perm {row['fraction_perm']:.3f}, "
                f"flip {row['fraction_flip']:.3f}, "
                f"accuracy {row['accuracy_with_recovered_key']}"
            )
    for res in out["attacks"].values():
        rows = res["keys"]
        accs = [
            r["accuracy_with_recovered_key"]
            for r in rows
            if r["accuracy_with_recovered_key"] is not None
        ]
        for m in ("fraction_both", "fraction_perm", "fraction_flip"):
            res[f"mean_{m}"] = float(np.mean([r[m] for r in rows]))
        res["exact_keys"] = int(sum(r["exact"] for r in rows))
        res["mean_accuracy_with_recovered_key"] = float(np.mean(accs)) if accs else None
    return out


def plot_model_recovery(res: dict, path: Path, chance: float) -> None:
    """Per adversary: the fraction of the key recovered and the accuracy with the recovered
    key, against the plain model and chance; a PNG written atomically."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from convmixer_jax.files.atomic import save_figure_atomic

    names = list(res["attacks"])
    labels = [n.replace("_", "\n", 2).replace("_", " ") for n in names]
    frac = [res["attacks"][n]["mean_fraction_both"] for n in names]
    acc = [res["attacks"][n]["mean_accuracy_with_recovered_key"] or 0.0 for n in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    ax.bar(x - 0.2, frac, 0.4, label="fraction of key recovered")
    ax.bar(x + 0.2, acc, 0.4, label="accuracy with recovered key")
    ax.axhline(res["baseline_plain"], color="k", ls="--", lw=1, label="plain model")
    ax.axhline(chance, color="0.5", ls=":", lw=1, label="chance")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title("Key recovery from the encrypted model")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    save_figure_atomic(fig, path)
    plt.close(fig)


def summary_lines(mr: dict) -> list[str]:
    """The section of ``summary.md``: one table row per adversary."""
    if not mr:
        return []
    public = (
        f"; public images: {mr['public_images']} unlabeled training images"
        if mr.get("public_images")
        else ""
    )
    lines = [
        "## Key recovery from the encrypted model",
        "",
        f"{mr['test_images']:,} test images; plain model accuracy "
        f"{mr['baseline_plain']:.4f}{public}.",
        "",
        "| adversary holds | keys | exact keys | key positions right (perm and flip) | "
        "perm right | flip right | mean accuracy with the recovered key |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for res in mr["attacks"].values():
        acc = res["mean_accuracy_with_recovered_key"]
        lines.append(
            f"| {res['adversary_holds']} | {len(res['keys'])} | {res['exact_keys']} | "
            f"{res['mean_fraction_both']:.3f} | {res['mean_fraction_perm']:.3f} | "
            f"{res['mean_fraction_flip']:.3f} | {'n/a' if acc is None else f'{acc:.4f}'} |"
        )
    if mr.get("reference"):
        lines += ["", f"Independent reference: {mr['reference']}."]
    return lines + [""]


def run(context: AttackContext, config: ModelRecoveryConfig) -> dict:
    ev_x, ev_y = context.eval_data
    mr = model_recovery(
        context.model_config,
        context.variables,
        ev_x,
        ev_y,
        reference_variables=context.reference_variables,
        public_images=context.public_images,
        num_keys=config.recovery_keys,
        seed=context.key_seed(),
        baseline_accuracy=context.plain_accuracy(),
        log=context.log,
    )
    mr["reference"] = context.reference_note if context.reference_variables is not None else None
    return mr


def describe(context: AttackContext, config: ModelRecoveryConfig) -> str:
    return f"{config.recovery_keys} keys, {len(context.eval_data[0])} test images"


def plot(context: AttackContext, mr: dict, path: Path) -> None:
    plot_model_recovery(mr, path, 1.0 / context.model_config.num_classes)


ATTACK = Attack(
    name="model_recovery",
    title="key recovery from the encrypted model",
    config_type=ModelRecoveryConfig,
    run=run,
    summary=summary_lines,
    describe=describe,
    plot=plot,
    figure="model_recovery.png",
    families=("convmixer",),
    family_note=("it reads the key off the ConvMixer's stem and its BatchNorm statistics"),
    needs_reference=True,
)
