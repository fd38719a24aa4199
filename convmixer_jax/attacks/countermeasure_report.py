"""The security report's countermeasure section: a key per block position
(:func:`~convmixer_jax.attacks.position_keys.countermeasure_study`), its accuracy and the
ciphertext-only attacks on its queries."""

from __future__ import annotations

from dataclasses import dataclass

from convmixer_jax.attacks.ciphertext_report import block_statistics, ciphertext_images_option
from convmixer_jax.attacks.protocol import Attack, AttackContext, option


@dataclass(frozen=True)
class CountermeasureConfig:
    ciphertext_images: tuple[int, ...] = ciphertext_images_option()
    countermeasure_keys: int = option(
        3,
        "sets of position keys for the countermeasure section (0: skip it; default {default})",
        metavar="K",
    )


#: What each attack on the queries does, by the prefix of its name in the results.
QUERY_ATTACK_LABELS = {
    "raw": "one-key ciphertext-only attack as it is",
    "aligned": "aligned by the model's relative keys, then the ciphertext-only attack",
    "aligned_model": "aligned, then with the position-0 model",
}


def run(context: AttackContext, config: CountermeasureConfig) -> dict:
    import numpy as np

    from convmixer_jax.attacks.position_keys import countermeasure_study

    public, template, prior = block_statistics(context)
    cm = countermeasure_study(
        context.model_config,
        context.variables,
        context.eval_data,
        np.asarray(context.test_data[0]),
        template,
        prior,
        num_keys=config.countermeasure_keys,
        ns=tuple(config.ciphertext_images),
        public_images=context.public_images,
        seed=context.key_seed(),
        log=context.log,
    )
    cm.update(public_images=len(public))
    return cm


def summary_lines(cm: dict) -> list[str]:
    """The section of ``summary.md``: the model's accuracy and one row per query attack."""
    if not cm:
        return []
    import numpy as np

    rows, g = cm["rows"], cm["positions"]
    same = sum(r["identical_predictions"] for r in rows)
    total = sum(r["images"] for r in rows)
    lines = [
        "## Countermeasure: a key per block position",
        "",
        f"{cm['num_keys']} sets of {g} position keys ({cm['grid'][0]} x {cm['grid'][1]} grid), "
        "the model's stem made position-wise. Its accuracy on position-wise encrypted test "
        f"images: {np.mean([r['encrypted_accuracy'] for r in rows]):.4f} (plain model on plain "
        f"images {rows[0]['plain_accuracy']:.4f}; identical predictions {same:,}/{total:,}); "
        f"on plain images {np.mean([r['plain_images_accuracy'] for r in rows]):.4f}. Relative "
        f"keys read from the model's stem: {sum(r['relative_keys_exact'] for r in rows)} of "
        f"{g * len(rows)} positions exact.",
        "",
        "| attack on the queries | N | key sets with every position's key exact | claimed | "
        "mean positions exact |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name in rows[0]["attacks"]:
        kind, n = name.rsplit("_", 1)
        res = [r["attacks"][name] for r in rows]
        lines.append(
            f"| {QUERY_ATTACK_LABELS[kind]} | {int(n):,} | "
            f"{sum(a['positions_exact'] == g for a in res)} | "
            f"{sum(bool(a['claimed']) for a in res)} | "
            f"{np.mean([a['positions_exact'] for a in res]):.1f} |"
        )
    return lines + [""]


def describe(context: AttackContext, config: CountermeasureConfig) -> str:
    return f"{config.countermeasure_keys} key sets"


ATTACK = Attack(
    name="countermeasure",
    title="countermeasure, a key per block position",
    config_type=CountermeasureConfig,
    run=run,
    summary=summary_lines,
    describe=describe,
    enabled=lambda config: bool(config.countermeasure_keys),
    families=("convmixer",),
    family_note=("it makes the ConvMixer's stem position-wise"),
)
