"""The security evaluation beyond the paper, as one report (issue 5).

:func:`run_security_report` measures, on one plain trained model and its data:

1. **Known-plaintext key recovery** (:func:`known_plaintext_rate`): how often
   n plain/encrypted test-image pairs give back exactly the key.
2. **Key recovery from the encrypted model** (:func:`model_recovery`):
   with the original weights, with an independently trained reference model,
   and from the encrypted model alone; for each, the fraction of the key
   recovered and the accuracy of the encrypted model on test images
   encrypted with the recovered key.
3. **The fine-tuning attack** (:mod:`convmixer_jax.attacks.finetune`): test
   accuracy after fine-tuning the encrypted model on n labeled plain images,
   against training from scratch on the same images.

The secret keys of the experiments come from the OS CSPRNG unless a seed is
given; only their fingerprints are written. Outputs (``security.json``,
``summary.md`` and PNG plots) are written into a temporary directory beside
``out`` and moved into place only when everything has finished.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from convmixer_jax.files.atomic import save_figure_atomic
from convmixer_jax.model.convmixer import ConvMixerConfig
from convmixer_jax.model.inference import accuracy
from convmixer_jax.scheme.images import encrypt_images
from convmixer_jax.scheme.keys import Key, fingerprint, generate_key
from convmixer_jax.scheme.params import encrypt_params


def _keys(n: int, block_size: int, channels: int, seed: int | None) -> list[Key]:
    """n keys: OS CSPRNG, or derived from ``seed`` when one is given."""
    if seed is None:
        return [generate_key(block_size, channels) for _ in range(n)]
    return [generate_key(block_size, channels, seed=[seed, i]) for i in range(n)]


def _spread(values) -> dict:
    """Mean, min and max of a list of accuracies, with the list."""
    v = [float(x) for x in values]
    return {"mean": float(np.mean(v)), "min": min(v), "max": max(v), "values": v}


# ----------------------------------------------------------------------------- 1. known plaintext


def known_plaintext_rate(
    images: np.ndarray,
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
    encrypted with the library and the key recovered from the pairs. Returns
    one dict per n: exact-key rate, undetermined positions (mean, max,
    histogram), inconsistent trials (should be 0) and how many trials drew
    only gray images (R = G = B, whose channels cannot be told apart).
    """
    from convmixer_jax.attacks.known_plaintext import recover_key

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


# ----------------------------------------------------------------------------- 2. model key recovery


ATTACK_LABELS = {
    "original_weights": "the original plain weights",
    "independent_reference": "an independently trained model",
    "independent_reference_public_images": "an independently trained model + unlabeled public images",
    "encrypted_model_only": "the encrypted model only",
    "encrypted_model_public_images": "the encrypted model + unlabeled public images",
}


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
    batch_size: int = 500,
    log: Callable[[str], None] = lambda m: None,
) -> dict:
    """Key recovery from the encrypted model by several adversaries, ``num_keys`` secret keys each.

    variables: the plain model; images/labels: test data for the accuracy
    with a recovered key. ``reference_variables``: an independently trained
    model of the same architecture; ``public_images``: (N, H, W, C) unlabeled
    images of the task's kind (not the test images). Attacks needing what is
    not given are skipped. Returns, per attack and key, the measures of
    :func:`~convmixer_jax.attacks.from_model.evaluate_recovery` and the
    accuracy of the encrypted model on test images encrypted with the
    recovered key; and per attack their means.
    """
    from convmixer_jax.attacks import from_model
    from convmixer_jax.attacks import from_weights as mkr

    p, c = config.patch_size, config.channels
    baseline = accuracy(config, variables, images, labels, batch_size=batch_size)
    attacks: dict[str, Callable] = {
        "original_weights": lambda enc: mkr.recover_key_with_reference(
            enc["params"]["stem"]["kernel"], variables["params"]["stem"]["kernel"]
        ),
    }
    if reference_variables is not None:
        ref_kernel = np.asarray(reference_variables["params"]["stem"]["kernel"])
        attacks["independent_reference"] = lambda enc: mkr.recover_key_with_independent_reference(
            enc["params"]["stem"]["kernel"], ref_kernel
        )
        if public_images is not None:
            attacks["independent_reference_public_images"] = lambda enc: (
                from_model.rerank_by_confidence(
                    mkr.recover_key_with_independent_reference(
                        enc["params"]["stem"]["kernel"], ref_kernel
                    ),
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
    out: dict[str, Any] = {
        "baseline_plain": baseline,
        "test_images": int(len(images)),
        "public_images": None if public_images is None else int(len(public_images)),
        "attacks": {name: {"adversary_holds": ATTACK_LABELS[name], "keys": []} for name in attacks},
    }
    for i, key in enumerate(_keys(num_keys, p, c, seed)):
        enc = encrypt_params(variables, key, mean=config.mean, std=config.std)
        enc = {k: v for k, v in enc.items()}
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
                f"model recovery, key {i + 1}/{num_keys}, {name}: both {row['fraction_both']:.3f}, "
                f"perm {row['fraction_perm']:.3f}, flip {row['fraction_flip']:.3f}, "
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


# ----------------------------------------------------------------------------- plots and summary


def plot_known_plaintext(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def plot_model_recovery(res: dict, path: Path, chance: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def summary_markdown(report: dict) -> str:
    L = [
        "# Security report",
        "",
        f"Model: `{report['model_dir']}` ({report['model_note']}); data: {report['data']}; "
        f"device: {report['device']}; {report['seconds']:.0f} s in all.",
        "",
    ]
    kp = report.get("known_plaintext")
    if kp:
        L += [
            "## Known-plaintext key recovery",
            "",
            "| pairs | trials | exact key recovered | mean undetermined positions | all-gray trials |",
            "| ---: | ---: | ---: | ---: | ---: |",
        ]
        L += [
            f"| {r['pairs']} | {r['trials']} | {r['exact_key_rate']:.3f} | {r['mean_undetermined']:.2f} | "
            f"{r['all_gray_trials']} |"
            for r in kp
        ]
        L.append("")
    mr = report.get("model_recovery")
    if mr:
        L += [
            "## Key recovery from the encrypted model",
            "",
            f"{mr['test_images']:,} test images; plain model accuracy {mr['baseline_plain']:.4f}"
            + (
                f"; public images: {mr['public_images']} unlabeled training images"
                if mr.get("public_images")
                else ""
            )
            + ".",
            "",
            "| adversary holds | keys | exact keys | key positions right (perm and flip) | perm right | "
            "flip right | mean accuracy with the recovered key |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, res in mr["attacks"].items():
            acc = res["mean_accuracy_with_recovered_key"]
            L.append(
                f"| {res['adversary_holds']} | {len(res['keys'])} | {res['exact_keys']} | "
                f"{res['mean_fraction_both']:.3f} | {res['mean_fraction_perm']:.3f} | "
                f"{res['mean_fraction_flip']:.3f} | {'n/a' if acc is None else f'{acc:.4f}'} |"
            )
        if mr.get("reference"):
            L += ["", f"Independent reference: {mr['reference']}."]
        L.append("")
    co = report.get("ciphertext_only")
    if co:
        L += [
            "## Ciphertext-only key recovery",
            "",
            f"N encrypted test images, {co['rows'][0]['keys']} secret keys per row; template from "
            f'{co["public_images"]:,} public training images; colour prior: {co["prior"]}. "exact": the most '
            'likely key is the key; "claimed": the attack says it is determined (and writes it); '
            '"colour prior alone": exact keys had the channel order and sign been chosen without the '
            'JPEG trace (same layouts); "JPEG trace": attacks whose decrypted images showed one.',
            "",
            "| encrypted images | adversary also holds | keys | exact keys | colour prior alone | JPEG trace | "
            "claimed | claimed but wrong | positions right | PSNR (dB) | SSIM | seconds per attack |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in co["rows"]:
            L.append(
                f"| {r['images']:,} | {'the encrypted model + public images' if r['with_model'] else '-'} | "
                f"{r['keys']} | {r['exact']} | {'-' if r['with_model'] else r.get('exact_prior_only', '')} | {r.get('jpeg_trace', '')} | "
                f"{r['claimed']} | {r['claimed_wrong']} | "
                f"{r['positions_right']:.3f} | {r['psnr']:.1f} | {r['ssim']:.3f} | {r['seconds']:.1f} |"
            )
        L += [
            "",
            "Images decrypted with the key recovered from N encrypted images (one key; "
            "`ciphertext_only.png`):",
            "",
            "| N | exact key | PSNR (dB) | SSIM |",
            "| ---: | --- | ---: | ---: |",
        ]
        L += [
            f"| {r['images']:,} | {'yes' if r['exact'] else 'no'} | {r['psnr']:.1f} | {r['ssim']:.3f} |"
            for r in co["image_recovery"]
        ]
        L.append("")
    cm = report.get("countermeasure")
    if cm:
        L += _countermeasure_markdown(cm)
    ft = report.get("finetune")
    if ft:
        L += [
            "## Fine-tuning attack",
            "",
            f"Accuracy on {ft['n_test']:,} plain test images after fine-tuning on n labeled plain "
            f"training images; the encrypted model before fine-tuning: {ft['encrypted_accuracy']:.4f}, the "
            f"plain model: {ft['baseline_accuracy']:.4f}, chance {ft['chance']:.2f}.",
            "",
        ]
        sizes = sorted({int(n) for acc in ft["accuracy"].values() for n in acc})
        L.append("| mode | " + " | ".join(f"n = {n:,}" for n in sizes) + " |")
        L.append("| --- |" + " ---: |" * len(sizes))
        for mode, acc in ft["accuracy"].items():
            L.append(
                f"| {mode} | "
                + " | ".join(f"{acc[str(n)]:.4f}" if str(n) in acc else "" for n in sizes)
                + " |"
            )
        spread = ft.get("stem_across_keys")
        if spread:
            L.append(
                f"| stem, {len(ft['stem_keys'])} keys: mean (min-max) | "
                + " | ".join(
                    f"{spread[str(n)]['mean']:.4f} ({spread[str(n)]['min']:.4f}-"
                    f"{spread[str(n)]['max']:.4f})"
                    if str(n) in spread
                    else ""
                    for n in sizes
                )
                + " |"
            )
        L.append("")
    return "\n".join(L) + "\n"


def _countermeasure_markdown(cm: dict) -> list[str]:
    rows, g = cm["rows"], cm["positions"]
    same = sum(r["identical_predictions"] for r in rows)
    total = sum(r["images"] for r in rows)
    L = [
        "## Countermeasure: a key per block position",
        "",
        f"{cm['num_keys']} sets of {g} position keys ({cm['grid'][0]} x {cm['grid'][1]} grid), the model's stem "
        f"made position-wise. Its accuracy on position-wise encrypted test images: "
        f"{np.mean([r['encrypted_accuracy'] for r in rows]):.4f} (plain model on plain images "
        f"{rows[0]['plain_accuracy']:.4f}; identical predictions {same:,}/{total:,}); on plain images "
        f"{np.mean([r['plain_images_accuracy'] for r in rows]):.4f}. Relative keys read from the model's stem: "
        f"{sum(r['relative_keys_exact'] for r in rows)} of {g * len(rows)} positions exact.",
        "",
        "| attack on the queries | N | key sets with every position's key exact | claimed | "
        "mean positions exact |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    labels = {
        "raw": "one-key ciphertext-only attack as it is",
        "aligned": "aligned by the model's relative keys, then the ciphertext-only attack",
        "aligned_model": "aligned, then with the position-0 model",
    }
    for name in rows[0]["attacks"]:
        kind, n = name.rsplit("_", 1)
        res = [r["attacks"][name] for r in rows]
        L.append(
            f"| {labels[kind]} | {int(n):,} | {sum(a['positions_exact'] == g for a in res)} | "
            f"{sum(bool(a['claimed']) for a in res)} | {np.mean([a['positions_exact'] for a in res]):.1f} |"
        )
    return L + [""]


# ----------------------------------------------------------------------------- the report


def reference_model(
    config: ConvMixerConfig,
    train_data,
    *,
    model_dir=None,
    epochs: int = 2,
    train_images: int = 10000,
    seed: int = 1,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[dict | None, str]:
    """The independently trained plain model of the reference attack: ``(variables, note)``.

    Loaded from ``model_dir`` (it must be a plain model of ``config``'s
    architecture), or trained here for ``epochs`` of the fast recipe on
    ``train_images`` random training images (seed ``seed``); ``(None, '')`` when
    ``epochs`` is 0. train_data: (images (N, H, W, C) uint8, labels (N,)).
    """
    import dataclasses
    import tempfile

    from convmixer_jax.data import subset
    from convmixer_jax.files.model_dir import ModelDirError, is_encrypted, load_model
    from convmixer_jax.training.loop import RECIPES, train

    if model_dir is not None:
        ref_config, reference, ref_meta = load_model(model_dir)
        if ref_config.to_dict() != config.to_dict() or is_encrypted(ref_meta):
            raise ModelDirError(
                f"{model_dir} must be a plain model of the same architecture as the attacked one"
            )
        return (
            reference,
            f"{model_dir} (epochs {ref_meta.get('epochs')}, test accuracy {ref_meta.get('test_accuracy')})",
        )
    if epochs <= 0:
        return None, ""
    recipe = dataclasses.replace(RECIPES["fast"], epochs=epochs, seed=seed)
    rx, ry = subset(train_data[0], train_data[1], train_images, seed)
    log(
        f"training an independent reference: seed {seed}, {len(rx)} images, {epochs} epochs of the fast recipe"
    )
    with tempfile.TemporaryDirectory(prefix="convmixer-reference-") as work:
        reference, _ = train(config, recipe, (rx, ry), None, work, progress=progress, log=log)
    return reference, (
        f"trained by the report: seed {seed}, {len(rx)} training images, "
        f"{epochs} epochs of the fast recipe"
    )


def run_security_report(
    config: ConvMixerConfig,
    variables,
    train_data,
    test_data,
    out,
    *,
    model_dir: str = "",
    model_note: str = "",
    data_label: str = "",
    reference_variables=None,
    reference_note: str = "",
    kp_pairs: Sequence[int] = (1, 2, 4),
    kp_trials: int = 200,
    recovery_keys: int = 3,
    eval_images: int = 2000,
    public_images: int = 256,
    finetune_sizes: Sequence[int] = (100, 500, 1000, 5000),
    finetune_modes: Sequence[str] = ("stem", "all", "scratch"),
    finetune_steps=None,
    finetune_keys: int = 3,
    ciphertext_ns: Sequence[int] = (1, 2, 5, 10, 100),
    ciphertext_keys: int = 10,
    recovery_ns: Sequence[int] = (1, 10, 100, 1000),
    countermeasure_keys: int = 3,
    seed: int | None = None,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Run every attack and write ``out/{security.json, summary.md, *.png}``.

    train_data / test_data: (images (N, H, W, C) uint8, labels (N,)).
    ``eval_images`` test images (a seeded random subset) are used for the
    accuracies; the known-plaintext trials draw from all test images.
    ``seed``: None draws every secret key from the OS CSPRNG (only
    fingerprints are written); an int makes the run repeatable.
    ``finetune_keys``: secret keys the patch-embedding fine-tuning runs under (the first
    also runs the other modes); its outcome depends on the key, so the report gives the
    spread over them.
    """
    from convmixer_jax.attacks.finetune import finetune_attack, plot_finetune
    from convmixer_jax.data import subset
    from convmixer_jax.files.atomic import check_output_path, staged_output_dir
    from convmixer_jax.files.provenance import device_description

    out = Path(out)
    check_output_path(out, force, kind="results_dir")
    t_start = time.perf_counter()
    test_x, test_y = test_data
    ev_x, ev_y = subset(
        np.asarray(test_x),
        np.asarray(test_y),
        min(eval_images, len(test_x)),
        0 if seed is None else seed,
    )
    report: dict[str, Any] = {
        "model_dir": str(model_dir),
        "model_note": model_note,
        "data": data_label,
        "device": device_description(),
        "seed": seed,
        "key_source": "os-csprng" if seed is None else "seed",
        "model": config.to_dict(),
    }
    with staged_output_dir(out) as tmp:
        log(f"1/5 known-plaintext key recovery: pairs {list(kp_pairs)}, {kp_trials} trials each")
        t0 = time.perf_counter()
        report["known_plaintext"] = known_plaintext_rate(
            np.asarray(test_x),
            config.patch_size,
            pairs=kp_pairs,
            trials=kp_trials,
            seed=seed,
            progress=progress,
        )
        report["known_plaintext_seconds"] = time.perf_counter() - t0
        plot_known_plaintext(report["known_plaintext"], tmp / "known_plaintext.png")

        log(
            f"2/5 key recovery from the encrypted model: {recovery_keys} keys, {len(ev_x)} test images"
        )
        t0 = time.perf_counter()
        pub = None
        if public_images:
            pub, _ = subset(
                np.asarray(train_data[0]),
                np.asarray(train_data[1]),
                min(public_images, len(train_data[0])),
                1 if seed is None else seed + 1,
            )
        mr = model_recovery(
            config,
            variables,
            ev_x,
            ev_y,
            reference_variables=reference_variables,
            public_images=pub,
            num_keys=recovery_keys,
            seed=seed,
            log=log,
        )
        mr["reference"] = reference_note if reference_variables is not None else None
        mr["seconds"] = time.perf_counter() - t0
        report["model_recovery"] = mr
        plot_model_recovery(mr, tmp / "model_recovery.png", 1.0 / config.num_classes)

        log(f"3/5 fine-tuning attack: n in {list(finetune_sizes)}, modes {list(finetune_modes)}")
        t0 = time.perf_counter()
        ft_key = _keys(1, config.patch_size, config.channels, seed)[0]
        enc = encrypt_params(variables, ft_key, mean=config.mean, std=config.std)
        kwargs = {} if finetune_steps is None else {"steps": finetune_steps}
        ft = finetune_attack(
            config,
            enc,
            np.asarray(train_data[0]),
            np.asarray(train_data[1]),
            ev_x,
            ev_y,
            sizes=tuple(finetune_sizes),
            modes=tuple(finetune_modes),
            seed=0 if seed is None else seed,
            baseline_accuracy=mr["baseline_plain"],
            progress=progress,
            **kwargs,
        )
        ft["key_fingerprint"] = fingerprint(ft_key)
        if finetune_keys > 1 and "stem" in finetune_modes:
            log(f"3/5 fine-tuning the patch embedding under {finetune_keys - 1} more keys")
            ft["stem_keys"] = [
                {"key_fingerprint": ft["key_fingerprint"], "accuracy": ft["accuracy"]["stem"]}
            ]
            for key in _keys(finetune_keys, config.patch_size, config.channels, seed)[1:]:
                more = finetune_attack(
                    config,
                    encrypt_params(variables, key, mean=config.mean, std=config.std),
                    np.asarray(train_data[0]),
                    np.asarray(train_data[1]),
                    ev_x,
                    ev_y,
                    sizes=tuple(finetune_sizes),
                    modes=("stem",),
                    seed=0 if seed is None else seed,
                    progress=progress,
                    **kwargs,
                )
                ft["stem_keys"].append(
                    {
                        "key_fingerprint": fingerprint(key),
                        "accuracy": more["accuracy"]["stem"],
                        "encrypted_accuracy": more["encrypted_accuracy"],
                        "runs": more["runs"],
                    }
                )
            ft["stem_across_keys"] = {
                n: _spread([k["accuracy"][n] for k in ft["stem_keys"]])
                for n in ft["accuracy"]["stem"]
            }
        ft["seconds_total"] = time.perf_counter() - t0
        report["finetune"] = ft
        plot_finetune(ft, tmp / "finetune.png", baseline_accuracy=mr["baseline_plain"])

        if ciphertext_keys or countermeasure_keys:
            from convmixer_jax.attacks.ciphertext_only import (
                block_template,
                default_prior,
                match_scale,
            )

            h, w = np.shape(test_x)[1:3]
            public = match_scale(np.asarray(train_data[0])[-2000:], h, w)
            template = block_template(public, config.patch_size)
            prior = default_prior(config.channels)
        if ciphertext_keys:
            log(
                f"4/5 ciphertext-only key recovery: N in {list(ciphertext_ns)}, {ciphertext_keys} keys each"
            )
            t0 = time.perf_counter()
            report["ciphertext_only"] = _ciphertext_only(
                config,
                variables,
                np.asarray(test_x),
                pub,
                template,
                prior,
                ciphertext_ns,
                ciphertext_keys,
                recovery_ns,
                seed,
                progress,
                log,
                tmp,
            )
            report["ciphertext_only"].update(
                public_images=len(public), seconds=time.perf_counter() - t0
            )
        if countermeasure_keys:
            from convmixer_jax.attacks.position_keys import countermeasure_study

            log(f"5/5 countermeasure, a key per block position: {countermeasure_keys} key sets")
            t0 = time.perf_counter()
            report["countermeasure"] = countermeasure_study(
                config,
                variables,
                (ev_x, ev_y),
                np.asarray(test_x),
                template,
                prior,
                num_keys=countermeasure_keys,
                ns=tuple(ciphertext_ns),
                public_images=pub,
                seed=seed,
                log=log,
            )
            report["countermeasure"].update(
                public_images=len(public), seconds=time.perf_counter() - t0
            )
        report["seconds"] = time.perf_counter() - t_start
        (tmp / "security.json").write_text(
            json.dumps(report, indent=1, default=_json_default) + "\n"
        )
        (tmp / "summary.md").write_text(summary_markdown(report))
    return report


def _ciphertext_only(
    config,
    variables,
    test_x,
    pub,
    template,
    prior,
    ns,
    num_keys,
    recovery_ns,
    seed,
    progress,
    log,
    tmp: Path,
) -> dict:
    """The ciphertext-only section: rates by N, the row with the model, the image-recovery figure."""
    from convmixer_jax.attacks.ciphertext_report import (
        ciphertext_only_rate,
        image_recovery,
        plot_image_recovery,
    )

    keys = _keys(num_keys, config.patch_size, config.channels, None if seed is None else seed + 18)

    def model_fn(key):
        return config, encrypt_params(variables, key, mean=config.mean, std=config.std)

    res = ciphertext_only_rate(
        test_x,
        keys,
        template,
        prior,
        ns=ns,
        seed=0 if seed is None else seed,
        model_fn=model_fn if pub is not None else None,
        public_images=pub,
        progress=progress,
        log=log,
    )
    rows, examples = image_recovery(
        test_x, keys[0], template, prior, ns=recovery_ns, seed=1 if seed is None else seed + 1
    )
    plot_image_recovery(examples, tmp / "ciphertext_only.png")
    res.update(
        image_recovery=rows,
        prior="shipped CIFAR-10 prior (convmixer_jax/attacks/priors/cifar10-rgb)"
        if prior is not None
        else "none",
    )
    return res


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
