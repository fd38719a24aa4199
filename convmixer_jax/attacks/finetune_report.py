"""The security report's fine-tuning section: the encrypted model fine-tuned on n labeled
plain images (:func:`~convmixer_jax.attacks.finetune.finetune_attack`), under several
secret keys for the patch embedding, since its outcome depends on the key.

A ConvMixer is encrypted with keys without block scrambling (the paper's); a ViT with keys
that scramble the blocks of its grid of patches (the follow-up paper's), so its encrypted
model also has its position rows permuted, and its 'stem' mode trains the patch and the
position embeddings (:mod:`convmixer_jax.attacks.finetune`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from convmixer_jax.attacks.protocol import Attack, AttackContext, option


@dataclass(frozen=True)
class FinetuneConfig:
    finetune_sizes: tuple[int, ...] = option(
        (100, 500, 1000, 5000),
        "labeled plain images of the fine-tuning adversary (default {default})",
        metavar="N",
        minimum=1,
    )
    finetune_modes: tuple[str, ...] = option(
        ("stem", "all", "scratch"),
        "what is trained (default: all three)",
        choices=("stem", "all", "scratch"),
    )
    finetune_steps: int | None = option(
        None,
        "steps per fine-tuning run (default: grows with n, see finetune_attack.default_steps)",
        metavar="S",
        minimum=1,
    )
    finetune_keys: int = option(
        3,
        "secret keys the patch-embedding fine-tuning runs under; the first also runs the "
        "other modes (default {default})",
        metavar="K",
        minimum=1,
    )


def spread(values) -> dict:
    """Mean, min and max of a list of accuracies, with the list."""
    import numpy as np

    v = [float(x) for x in values]
    return {"mean": float(np.mean(v)), "min": min(v), "max": max(v), "values": v}


def run(context: AttackContext, config: FinetuneConfig) -> dict:
    """Every mode under the first key; with ``finetune_keys`` > 1, the patch embedding
    under the others too, on the same images and seed, and the spread over all keys.
    A ViT's keys scramble the blocks of its grid of patches; a ConvMixer's do not."""
    import numpy as np

    from convmixer_jax.attacks.finetune import finetune_attack
    from convmixer_jax.attacks.wrong_keys import key_grid
    from convmixer_jax.scheme.keys import fingerprint
    from convmixer_jax.scheme.params import encrypt_params

    cfg, variables = context.model_config, context.variables
    train_x, train_y = (np.asarray(a) for a in context.train_data)
    ev_x, ev_y = context.eval_data
    keys = context.keys(config.finetune_keys, 0, grid=key_grid(cfg))
    kwargs = {} if config.finetune_steps is None else {"steps": config.finetune_steps}
    seed = context.seed()

    def attack(key, modes, **more):
        enc = encrypt_params(variables, key, mean=cfg.mean, std=cfg.std)
        return finetune_attack(
            cfg,
            enc,
            train_x,
            train_y,
            ev_x,
            ev_y,
            sizes=tuple(config.finetune_sizes),
            modes=tuple(modes),
            seed=seed,
            progress=context.progress,
            **kwargs,
            **more,
        )

    ft = attack(keys[0], config.finetune_modes, baseline_accuracy=context.plain_accuracy())
    ft["key_fingerprint"] = fingerprint(keys[0])
    if keys[0].scrambles:
        ft["key_grid"] = list(keys[0].grid)
    if config.finetune_keys > 1 and "stem" in config.finetune_modes:
        context.log(
            f"{context.section} fine-tuning the patch embedding under "
            f"{config.finetune_keys - 1} more keys"
        )
        ft["stem_keys"] = [
            {"key_fingerprint": ft["key_fingerprint"], "accuracy": ft["accuracy"]["stem"]}
        ]
        for key in keys[1:]:
            more = attack(key, ("stem",))
            ft["stem_keys"].append(
                {
                    "key_fingerprint": fingerprint(key),
                    "accuracy": more["accuracy"]["stem"],
                    "encrypted_accuracy": more["encrypted_accuracy"],
                    "runs": more["runs"],
                }
            )
        ft["stem_across_keys"] = {
            n: spread([k["accuracy"][n] for k in ft["stem_keys"]]) for n in ft["accuracy"]["stem"]
        }
    return ft


def summary_lines(ft: dict) -> list[str]:
    """The section of ``summary.md``: accuracy by mode and n, and the spread over keys."""
    if not ft:
        return []
    lines = [
        "## Fine-tuning attack",
        "",
        f"Accuracy on {ft['n_test']:,} plain test images after fine-tuning on n labeled plain "
        f"training images; the encrypted model before fine-tuning: "
        f"{ft['encrypted_accuracy']:.4f}, the plain model: {ft['baseline_accuracy']:.4f}, "
        f"chance {ft['chance']:.2f}.",
        "",
    ]
    if "key_grid" in ft:
        gh, gw = ft["key_grid"]
        lines[-1:-1] = [
            f"The ViT's keys scramble the blocks of its {gh} x {gw} grid of patches; 'stem' "
            "trains its patch embedding and its position embedding, whose patch rows the "
            "block key permutes.",
        ]
    sizes = sorted({int(n) for acc in ft["accuracy"].values() for n in acc})
    lines.append("| mode | " + " | ".join(f"n = {n:,}" for n in sizes) + " |")
    lines.append("| --- |" + " ---: |" * len(sizes))
    for mode, acc in ft["accuracy"].items():
        lines.append(
            f"| {mode} | "
            + " | ".join(f"{acc[str(n)]:.4f}" if str(n) in acc else "" for n in sizes)
            + " |"
        )
    across = ft.get("stem_across_keys")
    if across:
        lines.append(
            f"| stem, {len(ft['stem_keys'])} keys: mean (min-max) | "
            + " | ".join(
                f"{across[str(n)]['mean']:.4f} ({across[str(n)]['min']:.4f}-"
                f"{across[str(n)]['max']:.4f})"
                if str(n) in across
                else ""
                for n in sizes
            )
            + " |"
        )
    return lines + [""]


def describe(context: AttackContext, config: FinetuneConfig) -> str:
    return f"n in {list(config.finetune_sizes)}, modes {list(config.finetune_modes)}"


def plot(context: AttackContext, ft: dict, path: Path) -> None:
    from convmixer_jax.attacks.finetune import plot_finetune

    plot_finetune(ft, path, baseline_accuracy=context.plain_accuracy())


ATTACK = Attack(
    name="finetune",
    title="fine-tuning attack",
    config_type=FinetuneConfig,
    run=run,
    summary=summary_lines,
    describe=describe,
    plot=plot,
    figure="finetune.png",
    seconds_key="seconds_total",
    families=("convmixer", "vit"),
    needs_reference=False,
)
