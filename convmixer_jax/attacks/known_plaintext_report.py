"""The security report's known-plaintext section: how often n plain/encrypted test-image
pairs give back exactly the key (:func:`~convmixer_jax.attacks.known_plaintext.recover_key`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from convmixer_jax.attacks.protocol import Attack, AttackContext, option


@dataclass(frozen=True)
class KnownPlaintextConfig:
    pairs: tuple[int, ...] = option(
        (1, 2, 4), "known-plaintext pair counts (default {default})", metavar="N", minimum=1
    )
    trials: int = option(200, "trials per pair count (default {default})", metavar="T", minimum=1)


def known_plaintext_rate(
    images,
    block_size: int,
    *,
    pairs: Sequence[int] = (1, 2, 4),
    trials: int = 200,
    seed: int | None = 0,
    progress: bool = False,
) -> list[dict]:
    """Success rate of :func:`~convmixer_jax.attacks.known_plaintext.recover_key` against
    the number of known plain/encrypted pairs.

    images: (N, H, W, C) uint8 test images. For each n in ``pairs`` and each
    trial, a fresh key and n distinct random images are drawn; the images are
    encrypted with the library and the key recovered from the pairs. Keys come from
    the OS CSPRNG when ``seed`` is None. Returns one dict per n: exact-key rate,
    undetermined positions (mean, max, histogram), inconsistent trials (should be 0)
    and how many trials drew only gray images (R = G = B, whose channels cannot be
    told apart).
    """
    import numpy as np

    from convmixer_jax.attacks.known_plaintext import recover_key
    from convmixer_jax.scheme.images import encrypt_images
    from convmixer_jax.scheme.keys import generate_key

    images = np.asarray(images)
    channels = images.shape[-1]
    rng = np.random.default_rng(seed)
    rows = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(pairs) * trials, desc="known-plaintext recovery", unit="trial")
    for n in pairs:
        if n > len(images):
            raise ValueError(f"{n} pairs requested but only {len(images)} images given")
        undetermined, exact, inconsistent, gray = [], 0, 0, 0
        for t in range(trials):
            key = generate_key(block_size, channels, seed=None if seed is None else [seed, n, t])
            x = images[rng.choice(len(images), n, replace=False)]
            z = np.asarray(encrypt_images(x, key))
            r = recover_key(x, z, block_size)
            inconsistent += not r.consistent
            undetermined.append(r.undetermined)
            gray += (
                bool((x[..., 0] == x[..., 1]).all() and (x[..., 1] == x[..., 2]).all())
                if channels == 3
                else 0
            )
            exact += bool(
                r.key is not None
                and np.array_equal(r.key.perm, key.perm)
                and np.array_equal(r.key.flip, key.flip)
            )
            if bar is not None:
                bar.update(1)
        u = np.asarray(undetermined)
        rows.append(
            {
                "pairs": int(n),
                "trials": int(trials),
                "exact_key_rate": exact / trials,
                "mean_undetermined": float(u.mean()),
                "max_undetermined": int(u.max()),
                "trials_with_undetermined": int((u > 0).sum()),
                "inconsistent_trials": int(inconsistent),
                "all_gray_trials": int(gray),
                "undetermined_histogram": {str(int(v)): int((u == v).sum()) for v in np.unique(u)},
            }
        )
    if bar is not None:
        bar.close()
    return rows


def plot_known_plaintext(rows: list[dict], path: Path) -> None:
    """The exact-key rate against the number of pairs (log x), as a PNG written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from convmixer_jax.files.atomic import save_figure_atomic

    fig, ax = plt.subplots(figsize=(4.2, 3.2))
    n = [r["pairs"] for r in rows]
    ax.plot(n, [r["exact_key_rate"] for r in rows], "o-", label="exact key recovered")
    ax.set_xscale("log", base=2)
    ax.set_xticks(n, [str(v) for v in n])
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("known plain/encrypted image pairs")
    ax.set_ylabel(f"fraction of {rows[0]['trials']} trials")
    ax.set_title("Known-plaintext key recovery")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure_atomic(fig, path)
    plt.close(fig)


def summary_lines(rows: list[dict]) -> list[str]:
    """The section of ``summary.md``: one table row per number of pairs."""
    if not rows:
        return []
    lines = [
        "## Known-plaintext key recovery",
        "",
        "| pairs | trials | exact key recovered | mean undetermined positions | all-gray trials |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['pairs']} | {r['trials']} | {r['exact_key_rate']:.3f} | "
        f"{r['mean_undetermined']:.2f} | {r['all_gray_trials']} |"
        for r in rows
    ]
    return lines + [""]


def run(context: AttackContext, config: KnownPlaintextConfig) -> list[dict]:
    """The trials draw from all the test images, not only the evaluation subset."""
    import numpy as np

    return known_plaintext_rate(
        np.asarray(context.test_data[0]),
        context.model_config.patch_size,
        pairs=config.pairs,
        trials=config.trials,
        seed=context.key_seed(),
        progress=context.progress,
    )


def describe(context: AttackContext, config: KnownPlaintextConfig) -> str:
    return f"pairs {list(config.pairs)}, {config.trials} trials each"


ATTACK = Attack(
    name="known_plaintext",
    title="known-plaintext key recovery",
    config_type=KnownPlaintextConfig,
    run=run,
    summary=summary_lines,
    describe=describe,
    plot=lambda context, rows, path: plot_known_plaintext(rows, path),
    figure="known_plaintext.png",
    families=("convmixer",),
    family_note=(
        "it reads each plain block and its encryption at the same position, and a ViT's "
        "key also moves the blocks"
    ),
)
