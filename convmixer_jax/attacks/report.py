"""The security evaluation beyond the paper, as one report: the attacks of
:data:`~convmixer_jax.attacks.report.ATTACKS`, run in order on one plain trained model (a
ConvMixer or a ViT) and its data.

Each attack follows :mod:`convmixer_jax.attacks.protocol`: it has a frozen config, runs in
its own context and writes its section of ``security.json`` and ``summary.md`` (and a
figure, if it draws one). The report's options are one :class:`SecurityReportConfig`:
its own (:class:`ReportOptions`) and each attack's; the command line's options are
generated from them. A new attack is one module defining an
:class:`~convmixer_jax.attacks.protocol.Attack` plus one line in :data:`ATTACKS`.

Each attack names the model families it applies to: the sections on the ConvMixer paper's
key read a ConvMixer, those on keys with block scrambling a ViT. An attack that does not
apply to the model's family is skipped, and its section of ``security.json`` and
``summary.md`` says why in one line; a model to which none of the attacks of a report
applies is refused (:func:`applicable_attacks`).

Randomness: one :class:`numpy.random.SeedSequence` of the report's ``key_seed`` is
spawned once for the report's own draws (the test subset of the accuracies, the public
images) and once per attack, in the list's order. Without a seed the secret keys come
from the OS CSPRNG (and the other draws from OS entropy); only their fingerprints are
written. Outputs (``security.json``, ``summary.md`` and PNG plots) are written into a
temporary directory beside ``out`` and moved into place only when everything has
finished.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convmixer_jax.attacks import (
    ciphertext_report,
    countermeasure_report,
    finetune_report,
    known_plaintext_report,
    model_recovery_report,
    vit_ciphertext_report,
    vit_countermeasure_report,
    vit_known_plaintext_report,
    vit_model_report,
)
from convmixer_jax.attacks.protocol import (
    FAMILY_NAMES,
    Attack,
    AttackContext,
    OptionSpec,
    child_stream,
    config_from_options,
    merged_options,
    option,
    stream_seed,
)

if TYPE_CHECKING:
    from convmixer_jax.model.config import ModelConfig


#: The attacks of the report, in the order they run and appear in ``summary.md``; each
#: names the model families it applies to.
ATTACKS: tuple[Attack, ...] = (
    known_plaintext_report.ATTACK,
    model_recovery_report.ATTACK,
    finetune_report.ATTACK,
    ciphertext_report.ATTACK,
    vit_model_report.ATTACK,
    vit_ciphertext_report.ATTACK,
    vit_known_plaintext_report.ATTACK,
    vit_countermeasure_report.ATTACK,
    countermeasure_report.ATTACK,
)


@dataclass(frozen=True)
class ReportOptions:
    """The report's own options: the side information it prepares for every attack, and
    the seed."""

    reference_model: str | None = option(
        None,
        "an independently trained plain model of the same architecture (default: train one)",
        metavar="DIR",
    )
    reference_epochs: int = option(
        2,
        "epochs of the reference trained when --reference-model is not given and a section "
        "that runs reads it (0: skip; default {default})",
        metavar="E",
    )
    reference_train_images: int = option(
        10000, "training images of that reference (default {default})", metavar="N", minimum=1
    )
    reference_seed: int = option(1, "its seed (default {default})", metavar="N", minimum=0)
    eval_images: int = option(
        2000, "test images for the accuracies (default {default})", metavar="N", minimum=1
    )
    public_images: int = option(
        256,
        "unlabeled training images the model-recovery adversary may use "
        "(0: none; default {default})",
        metavar="N",
    )
    key_seed: int | None = option(
        None,
        "seed of every key and random draw of the report (default: the OS CSPRNG)",
        minimum=0,
        command_line=False,  # the command line's shared --key-seed
    )


def _default_attack_configs() -> tuple:
    return tuple((attack, attack.config_type()) for attack in ATTACKS)


@dataclass(frozen=True)
class SecurityReportConfig:
    """Everything the report is asked to do: its own options and, in the order they run,
    each attack with its config. :meth:`from_options` builds one from flat option values
    (the command line's)."""

    options: ReportOptions = ReportOptions()
    attacks: tuple[tuple[Attack, Any], ...] = field(default_factory=_default_attack_configs)

    def __post_init__(self):
        names = [attack.name for attack, _ in self.attacks]
        if len(set(names)) != len(names):
            raise ValueError(f"attack names must differ, got {names}")
        for attack, attack_config in self.attacks:
            if not isinstance(attack_config, attack.config_type):
                raise TypeError(
                    f"the config of {attack.name!r} must be a {attack.config_type.__name__}, "
                    f"not a {type(attack_config).__name__}"
                )

    @classmethod
    def from_options(
        cls, attacks: Sequence[Attack] | None = None, **values: Any
    ) -> SecurityReportConfig:
        """The config of ``attacks`` (default :data:`ATTACKS`) with the options named in
        ``values`` (a field name of the report's or an attack's config: ``pairs=(1, 2)``,
        ``key_seed=0``); the others keep their defaults."""
        attacks = ATTACKS if attacks is None else tuple(attacks)
        known = {spec.name for spec in report_options(attacks)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TypeError(f"unknown security-report options: {', '.join(unknown)}")
        return cls(
            options=config_from_options(ReportOptions, values),
            attacks=tuple((a, config_from_options(a.config_type, values)) for a in attacks),
        )


def applicable_attacks(model_config, attacks: Sequence[Attack] | None = None) -> list[Attack]:
    """The attacks of ``attacks`` (default :data:`ATTACKS`) that apply to a model of
    ``model_config``'s family; raises ValueError (one line) when none does."""
    attacks = ATTACKS if attacks is None else tuple(attacks)
    found = [a for a in attacks if a.skip_reason(model_config) is None]
    if not found:
        family = FAMILY_NAMES.get(model_config.family, model_config.family)
        reasons = "; ".join(f"{a.title}: {a.skip_reason(model_config)}" for a in attacks)
        raise ValueError(
            f"no section of the security report applies to a {family} model ({reasons}); "
            "measure it with attack or scrambling-effect instead"
        )
    return found


def report_options(attacks: Sequence[Attack] | None = None) -> list[OptionSpec]:
    """Every option of the report with ``attacks`` (default :data:`ATTACKS`): the report's
    own, then each attack's, those several attacks share once."""
    attacks = ATTACKS if attacks is None else attacks
    return merged_options([ReportOptions] + [a.config_type for a in attacks])


def report_streams(seed: int | None, attacks: Sequence[Attack]) -> tuple[Any, dict[str, Any]]:
    """``(the report's own stream, {attack name: its stream})``: the children of
    ``numpy.random.SeedSequence(seed)``, the first for the report, then one per attack in
    the list's order. ``seed`` None: fresh OS entropy."""
    import numpy as np

    root = np.random.SeedSequence(seed)
    return child_stream(root, 0), {a.name: child_stream(root, i + 1) for i, a in enumerate(attacks)}


@dataclass(frozen=True)
class ReportInputs:
    """The model and data the report attacks, and how the summary names them.

    model_config, variables: the plain trained model (a ConvMixer or a ViT config and
    its variables). train_data / test_data: (images (N, H, W, C) uint8, labels (N,) int).
    reference_variables: an independently trained plain model of the same architecture
    with a note on its origin; when None the report loads or trains one as its options
    say.
    """

    model_config: ModelConfig
    variables: Any
    train_data: tuple
    test_data: tuple
    model_dir: str = ""
    model_note: str = ""
    data_label: str = ""
    reference_variables: Any = None
    reference_note: str = ""


# ----------------------------------------------------------------------------- the reference


def reference_model(
    config: ModelConfig,
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
        return reference, (
            f"{model_dir} (epochs {ref_meta.get('epochs')}, "
            f"test accuracy {ref_meta.get('test_accuracy')})"
        )
    if epochs <= 0:
        return None, ""
    recipe = dataclasses.replace(RECIPES["fast"], epochs=epochs, seed=seed)
    rx, ry = subset(train_data[0], train_data[1], train_images, seed)
    log(
        f"training an independent reference: seed {seed}, {len(rx)} images, "
        f"{epochs} epochs of the fast recipe"
    )
    with tempfile.TemporaryDirectory(prefix="convmixer-reference-") as work:
        reference, _ = train(config, recipe, (rx, ry), None, work, progress=progress, log=log)
    return reference, (
        f"trained by the report: seed {seed}, {len(rx)} training images, "
        f"{epochs} epochs of the fast recipe"
    )


# ----------------------------------------------------------------------------- the report


def summary_markdown(report: dict, attacks: Sequence[Attack] | None = None) -> str:
    """``summary.md``: a header, then the section of each attack of ``attacks`` (default
    :data:`ATTACKS`) that ``report`` holds."""
    lines = [
        "# Security report",
        "",
        f"Model: `{report['model_dir']}` ({report['model_note']}); data: {report['data']}; "
        f"device: {report['device']}; {report['seconds']:.0f} s in all.",
        "",
    ]
    for attack in ATTACKS if attacks is None else attacks:
        section = report.get(attack.name)
        if isinstance(section, dict) and set(section) == {"skipped"}:
            title = attack.title[:1].upper() + attack.title[1:]
            lines += [f"## {title}", "", f"Skipped: {section['skipped']}.", ""]
        elif section:
            lines += attack.summary(section)
    return "\n".join(lines) + "\n"


def _record(report: dict, attack: Attack, result: Any, seconds: float) -> None:
    report[attack.name] = result
    if isinstance(result, dict):
        result[attack.seconds_key] = seconds
    else:
        report[f"{attack.name}_{attack.seconds_key}"] = seconds


def _side_information(
    inputs: ReportInputs, opts: ReportOptions, stream, progress, log, *, train_reference=True
):
    """The evaluation subset, the public images and the reference model every attack may use
    (a reference is trained only when ``train_reference``; a given one is always checked)."""
    import numpy as np

    from convmixer_jax.data import subset

    test_x, test_y = (np.asarray(a) for a in inputs.test_data)
    train_x, train_y = (np.asarray(a) for a in inputs.train_data)
    eval_data = subset(test_x, test_y, min(opts.eval_images, len(test_x)), stream_seed(stream, 0))
    public = None
    if opts.public_images:
        public, _ = subset(
            train_x, train_y, min(opts.public_images, len(train_x)), stream_seed(stream, 1)
        )
    reference, note = inputs.reference_variables, inputs.reference_note
    if reference is None and (train_reference or opts.reference_model is not None):
        reference, note = reference_model(
            inputs.model_config,
            inputs.train_data,
            model_dir=opts.reference_model,
            epochs=opts.reference_epochs,
            train_images=opts.reference_train_images,
            seed=opts.reference_seed,
            progress=progress,
            log=log,
        )
    return eval_data, public, reference, note


def run_security_report(
    inputs: ReportInputs,
    config: SecurityReportConfig,
    out,
    *,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Run every attack of ``config`` and write ``out/{security.json, summary.md, *.png}``.

    The accuracies use ``eval_images`` random test images; the known-plaintext and
    ciphertext-only trials draw from all test images. ``force``: replace an existing
    ``out``. An attack that does not apply to the model's family is skipped: its section
    is ``{"skipped": reason}``; when none applies, ValueError, before anything is computed
    or written. The reference model is trained only when an attack that runs reads it
    (its :class:`~convmixer_jax.attacks.protocol.Attack` says ``needs_reference``).
    Returns what ``security.json`` holds.
    """
    from convmixer_jax.files.atomic import staged_output_dir
    from convmixer_jax.files.output_paths import check_output_path
    from convmixer_jax.files.provenance import device_description

    opts = config.options
    out = Path(out)
    check_output_path(out, force, kind="results_dir")
    applicable_attacks(inputs.model_config, [a for a, _ in config.attacks])
    t_start = time.perf_counter()
    own_stream, streams = report_streams(opts.key_seed, [a for a, _ in config.attacks])
    reference_needed = any(
        a.needs_reference and a.enabled(c) and a.skip_reason(inputs.model_config) is None
        for a, c in config.attacks
    )
    eval_data, public, reference, note = _side_information(
        inputs, opts, own_stream, progress, log, train_reference=reference_needed
    )
    cfg = inputs.model_config
    report: dict[str, Any] = {
        "model_dir": str(inputs.model_dir),
        "model_note": inputs.model_note,
        "data": inputs.data_label,
        "device": device_description(),
        "seed": opts.key_seed,
        "key_source": "os-csprng" if opts.key_seed is None else "seed",
        "model": cfg.to_dict(),
    }
    with staged_output_dir(out) as tmp:
        base = AttackContext(
            model_config=cfg,
            variables=inputs.variables,
            train_data=inputs.train_data,
            test_data=inputs.test_data,
            eval_data=eval_data,
            stream=own_stream,
            seeded=opts.key_seed is not None,
            public_images=public,
            reference_variables=reference,
            reference_note=note,
            out_dir=tmp,
            progress=progress,
            log=log,
        )
        count = len(config.attacks)
        for i, (attack, attack_config) in enumerate(config.attacks, start=1):
            if not attack.enabled(attack_config):
                continue
            context = replace(base, stream=streams[attack.name], section=f"{i}/{count}")
            skipped = attack.skip_reason(cfg)
            if skipped is not None:
                log(f"{context.section} {attack.title}: skipped, {skipped}")
                report[attack.name] = {"skipped": skipped}
                continue
            detail = attack.describe(context, attack_config)
            log(f"{context.section} {attack.title}" + (f": {detail}" if detail else ""))
            t0 = time.perf_counter()
            result = attack.run(context, attack_config)
            _record(report, attack, result, time.perf_counter() - t0)
            if attack.plot is not None:
                attack.plot(context, result, tmp / attack.figure)
        report["seconds"] = time.perf_counter() - t_start
        (tmp / "security.json").write_text(
            json.dumps(report, indent=1, default=_json_default) + "\n"
        )
        attacks = [a for a, _ in config.attacks]
        (tmp / "summary.md").write_text(summary_markdown(report, attacks))
    return report


def _json_default(o):
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
