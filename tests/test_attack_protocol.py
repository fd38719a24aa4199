"""The attack protocol: a planted attack runs through the security report with its own section
number, its options are generated on the command line, and its seed is its own."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass

import numpy as np
import pytest

from convmixer_jax.attacks import known_plaintext_report, report
from convmixer_jax.attacks.protocol import (
    Attack,
    AttackContext,
    child_stream,
    merged_options,
    option,
    seeded_keys,
)
from convmixer_jax.attacks.report import (
    ReportInputs,
    SecurityReportConfig,
    report_options,
    report_streams,
    run_security_report,
)
from convmixer_jax.cli.app import build_parser
from convmixer_jax.cli.options import positive_int
from convmixer_jax.model.convmixer import ConvMixerConfig
from convmixer_jax.scheme.keys import fingerprint, generate_key
from convmixer_jax.training.loop import init_variables

CFG = ConvMixerConfig(
    dim=8, depth=1, kernel_size=3, patch_size=2, num_classes=3, image_size=8, channels=3
)

# The options of `security-report` before they were generated from the config, and those of
# the sections on keys with block scrambling (ViT) since.
OPTIONS = {
    "--out",
    "--reference-model",
    "--reference-epochs",
    "--reference-train-images",
    "--reference-seed",
    "--pairs",
    "--trials",
    "--recovery-keys",
    "--eval-images",
    "--public-images",
    "--finetune-sizes",
    "--finetune-modes",
    "--finetune-steps",
    "--finetune-keys",
    "--ciphertext-images",
    "--ciphertext-keys",
    "--countermeasure-keys",
    "--vit-model-keys",
    "--vit-model-queries",
    "--vit-ciphertext-keys",
    "--vit-kernel-images",
    "--vit-kp-keys",
    "--vit-kp-pairs",
    "--vit-countermeasure-clients",
    "--key-seed",
    "--quiet",
    "--force",
}


# --------------------------------------------------------------------------- a planted attack


@dataclass(frozen=True)
class ToyConfig:
    toy_draws: int = option(4, "numbers the toy attack draws (default {default})", minimum=1)


def toy_run(context: AttackContext, config: ToyConfig) -> dict:
    draws = np.random.default_rng(context.seed()).integers(0, 2**31, config.toy_draws)
    return {
        "draws": draws.tolist(),
        "key": fingerprint(context.keys(1)[0]),
        "section": context.section,
    }


def toy_summary(result: dict) -> list[str]:
    return [
        "## Toy attack",
        "",
        f"{len(result['draws'])} draws in section {result['section']}.",
        "",
    ]


def toy_plot(context, result, path) -> None:
    path.write_text(json.dumps(result["draws"]))


TOY = Attack(
    name="toy",
    title="toy attack",
    config_type=ToyConfig,
    run=toy_run,
    summary=toy_summary,
    describe=lambda context, config: f"{config.toy_draws} draws",
    plot=toy_plot,
    figure="toy.json",
)
OTHER_TOY = dataclasses.replace(TOY, name="other_toy", title="another toy attack", figure="")
OTHER_TOY = dataclasses.replace(OTHER_TOY, plot=None)


def _data(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 8, 8, 3)).astype(np.uint8), rng.integers(0, 3, n)


@pytest.fixture(scope="module")
def inputs():
    return ReportInputs(CFG, init_variables(CFG, 0), _data(20, 1), _data(12, 2))


def _run(inputs, out, attacks, **options):
    lines = []
    config = SecurityReportConfig.from_options(attacks, reference_epochs=0, **options)
    rep = run_security_report(inputs, config, out, progress=False, log=lines.append)
    return rep, lines


# --------------------------------------------------------------------------- the report


def test_a_planted_attack_runs_through_the_report(inputs, tmp_path):
    attacks = (known_plaintext_report.ATTACK, TOY)
    rep, lines = _run(inputs, tmp_path / "r", attacks, pairs=(1,), trials=2, toy_draws=3)
    assert lines == [
        "1/2 known-plaintext key recovery: pairs [1], 2 trials each",
        "2/2 toy attack: 3 draws",
    ]
    data = json.loads((tmp_path / "r" / "security.json").read_text())
    assert data["toy"]["section"] == "2/2" and len(data["toy"]["draws"]) == 3
    assert data["toy"]["seconds"] >= 0 and data["toy"] == rep["toy"]
    assert data["known_plaintext"][0]["trials"] == 2 and "known_plaintext_seconds" in data
    summary = (tmp_path / "r" / "summary.md").read_text()
    assert "## Toy attack\n\n3 draws in section 2/2." in summary
    assert summary.index("## Known-plaintext") < summary.index("## Toy attack")
    assert json.loads((tmp_path / "r" / "toy.json").read_text()) == data["toy"]["draws"]


def test_a_disabled_attack_keeps_the_numbers_of_the_others(inputs, tmp_path):
    off = dataclasses.replace(OTHER_TOY, enabled=lambda config: config.toy_draws > 5)
    rep, lines = _run(inputs, tmp_path / "r", (off, TOY), toy_draws=2)
    assert lines == ["2/2 toy attack: 2 draws"]
    assert "other_toy" not in rep and rep["toy"]["section"] == "2/2"


# --------------------------------------------------------------------------- the command line


def _report_parser() -> argparse.ArgumentParser:
    return build_parser().subcommands["security-report"]


def _options(parser) -> dict[str, argparse.Action]:
    return {
        name: a
        for a in parser._actions
        if a.help != argparse.SUPPRESS
        for name in a.option_strings
        if name.startswith("--")
    }


def test_command_line_options_are_the_configs(monkeypatch):
    opts = _options(_report_parser())
    data = {
        "--help",
        "--dataset",
        "--data-dir",
        "--download-url",
        "--download-sha256",
        "--tfds-data-dir",
    }
    assert set(opts) - data == OPTIONS
    # every default is the config's: written once
    for spec in report_options():
        if spec.command_line:
            assert opts[spec.flag].default == spec.default, spec.name
            assert opts[spec.flag].help == spec.help
    assert opts["--pairs"].default == (1, 2, 4) and opts["--trials"].help.endswith("(default 200)")
    # a planted attack's option appears with the default from its config
    monkeypatch.setattr(report, "ATTACKS", report.ATTACKS + (TOY,))
    toy = _options(_report_parser())["--toy-draws"]
    assert toy.default == 4 and toy.type is positive_int
    assert toy.help == "numbers the toy attack draws (default 4)"
    args = _report_parser().parse_args(["m", "--out", "o", "--toy-draws", "7", "--pairs", "3"])
    values = {s.name: getattr(args, s.name) for s in report_options() if s.command_line}
    config = SecurityReportConfig.from_options(**values, key_seed=args.key_seed)
    got = dict((a.name, c) for a, c in config.attacks)
    assert got["toy"] == ToyConfig(toy_draws=7) and got["known_plaintext"].pairs == (3,)
    assert [a.name for a, _ in config.attacks][-1] == "toy"


def test_options_are_checked():
    with pytest.raises(TypeError, match="unknown security-report options: bogus"):
        SecurityReportConfig.from_options(bogus=1)

    @dataclass(frozen=True)
    class Clash:
        toy_draws: int = option(5, "another meaning", minimum=1)

    with pytest.raises(TypeError, match="toy_draws"):
        merged_options([ToyConfig, Clash])
    with pytest.raises(ValueError, match="must differ"):
        SecurityReportConfig(attacks=((TOY, ToyConfig()), (TOY, ToyConfig())))


# --------------------------------------------------------------------------- seeds


def test_each_attack_has_its_own_seed_repeatable_from_the_report_seed(inputs, tmp_path):
    attacks = (TOY, OTHER_TOY)
    first, _ = _run(inputs, tmp_path / "a", attacks, key_seed=5)
    again, _ = _run(inputs, tmp_path / "b", attacks, key_seed=5)
    other, _ = _run(inputs, tmp_path / "c", attacks, key_seed=6)
    for name in ("toy", "other_toy"):
        assert first[name]["draws"] == again[name]["draws"]
        assert first[name]["key"] == again[name]["key"]
        assert first[name]["draws"] != other[name]["draws"]
    assert first["toy"]["draws"] != first["other_toy"]["draws"]
    assert first["toy"]["key"] != first["other_toy"]["key"]
    # the streams are the children of numpy.random.SeedSequence(5), one per attack in order
    _, streams = report_streams(5, attacks)
    children = np.random.SeedSequence(5).spawn(3)  # the report's own, then the attacks'
    for i, name in enumerate(("toy", "other_toy"), start=1):
        assert streams[name].generate_state(4).tolist() == children[i].generate_state(4).tolist()
        context = AttackContext(CFG, None, (), (), (), streams[name], seeded=True)
        assert toy_run(context, ToyConfig(toy_draws=4))["draws"] == first[name]["draws"]
    # adding an attack at the end leaves the others' streams as they were
    _, more = report_streams(5, attacks + (dataclasses.replace(TOY, name="third"),))
    assert more["toy"].generate_state(2).tolist() == streams["toy"].generate_state(2).tolist()
    assert first["seed"] == 5 and first["key_source"] == "seed"


def test_without_a_seed_the_draws_are_fresh(inputs, tmp_path):
    first, _ = _run(inputs, tmp_path / "a", (TOY,))
    again, _ = _run(inputs, tmp_path / "b", (TOY,))
    assert first["key_source"] == "os-csprng" and first["seed"] is None
    assert first["toy"]["key"] != again["toy"]["key"]
    assert first["toy"]["draws"] != again["toy"]["draws"]


def test_child_stream_is_spawn_without_changing_the_parent():
    parent = np.random.SeedSequence(3)
    kids = [child_stream(parent, i).generate_state(2).tolist() for i in range(3)]
    assert parent.n_children_spawned == 0
    assert kids == [k.generate_state(2).tolist() for k in np.random.SeedSequence(3).spawn(3)]


# --------------------------------------------------------------------------- keys


def test_keys_scramble_blocks_on_a_grid_seeded_or_from_the_csprng():
    stream = np.random.SeedSequence(9)
    seeded = AttackContext(CFG, None, (), (), (), stream, seeded=True)
    plain, scrambling = seeded.keys(3, 2), seeded.keys(3, 2, grid=(4, 2))
    seed = seeded.key_seed(2)
    for i, (a, b) in enumerate(zip(plain, scrambling, strict=True)):
        assert a.grid is None and b.grid == (4, 2)
        assert sorted(np.asarray(b.block_perm).tolist()) == list(range(8))
        assert np.array_equal(a.perm, b.perm) and np.array_equal(a.flip, b.flip)
        want = generate_key(2, 3, seed=[seed, i], grid=(4, 2))
        assert fingerprint(b) == fingerprint(want)
    assert len({fingerprint(k) for k in scrambling}) == 3
    assert [fingerprint(k) for k in seeded_keys(3, 2, 3, seed, (4, 2))] == [
        fingerprint(k) for k in scrambling
    ]
    fresh = AttackContext(CFG, None, (), (), (), stream, seeded=False)
    assert fresh.key_seed(2) is None
    drawn = fresh.keys(2, 2, grid=(4, 2)) + fresh.keys(2, 2, grid=(4, 2))
    assert all(k.grid == (4, 2) for k in drawn) and len({fingerprint(k) for k in drawn}) == 4


# --------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("needs", [False, True])
def test_the_reference_is_trained_only_for_an_attack_that_reads_it(
    inputs, tmp_path, monkeypatch, needs
):
    calls = []

    def fake_reference(config, train_data, **kwargs):
        calls.append(kwargs["epochs"])
        return {"fake": np.zeros(1)}, "fake reference"

    monkeypatch.setattr(report, "reference_model", fake_reference)
    seen = []
    toy = dataclasses.replace(
        TOY,
        needs_reference=needs,
        run=lambda context, config: seen.append(context.reference_note) or {"draws": [1]},
        summary=lambda result: [],
        plot=None,
    )
    config = SecurityReportConfig.from_options((toy,), reference_epochs=3)
    run_security_report(inputs, config, tmp_path / "r", progress=False, log=lambda m: None)
    assert calls == ([3] if needs else [])
    assert seen == (["fake reference"] if needs else [""])
    # a disabled attack, or one that does not apply to the model, does not count
    off = dataclasses.replace(toy, enabled=lambda config: False, name="off")
    elsewhere = dataclasses.replace(TOY, name="vit_only", families=("vit",))
    config = SecurityReportConfig.from_options((TOY, off, elsewhere), reference_epochs=3)
    config = dataclasses.replace(config, attacks=config.attacks[1:])
    calls.clear()
    run_security_report(inputs, config, tmp_path / "s", progress=False, log=lambda m: None)
    assert calls == []


def test_the_sections_that_read_the_reference_say_so():
    # the model-recovery section's independent-reference adversaries read it; no other does
    assert [a.name for a in report.ATTACKS if a.needs_reference] == ["model_recovery"]
