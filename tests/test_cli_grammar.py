"""One grammar for every subcommand: outputs are --out, shared options mean the same
thing with the same default everywhere, usage errors point at the subcommand's help."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from convmixer_jax import cli
from convmixer_jax.cli.app import build_parser

# Subcommands that write nothing but stdout (keyspace), or whose output is optional.
NO_OUTPUT = {"keyspace"}
OPTIONAL_OUTPUT = {"evaluate", "predict"}
# Options that must read the same (default and help) wherever they appear.
SHARED = (
    "--seed",
    "--key-seed",
    "--limit",
    "--batch-size",
    "--quiet",
    "--force",
    "--recipe",
    "--epochs",
    "--train-batch-size",
    "--lr",
    "--holdout",
    "--dataset",
    "--data-dir",
    "--download-url",
    "--download-sha256",
    "--tfds-data-dir",
    "--coordinator-address",
    "--num-processes",
    "--process-id",
)
# Each group of commands that must all have the option.
MUST_HAVE = {
    "--holdout": {"train", "reproduce"},
    "--quiet": {
        "train",
        "evaluate",
        "predict",
        "attack",
        "reproduce",
        "security-report",
        "average-models",
    },
    "--data-dir": {"train", "evaluate", "attack", "reproduce", "security-report", "average-models"},
    "--limit": {"evaluate", "attack", "reproduce"},
    "--batch-size": {"evaluate", "predict", "attack", "average-models"},
    "--seed": {"train", "evaluate", "attack", "reproduce", "average-models", "init-model"},
    # several processes (cli/options.add_distributed_options): the commands that run over them
    "--coordinator-address": {"train", "evaluate", "attack", "reproduce"},
    "--num-processes": {"train", "evaluate", "attack", "reproduce"},
    "--process-id": {"train", "evaluate", "attack", "reproduce"},
}


def _subcommands():
    parser = build_parser()
    return parser, parser.subcommands


def _options(sub: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Visible options of a subcommand by their long name."""
    out = {}
    for action in sub._actions:
        if action.help == argparse.SUPPRESS:
            continue
        for name in action.option_strings:
            if name.startswith("--"):
                out[name] = action
    return out


def test_every_output_is_out_and_shown_in_help():
    _, subs = _subcommands()
    assert len(subs) >= 18
    for name, sub in subs.items():
        opts = _options(sub)
        help_text = sub.format_help()
        if name in NO_OUTPUT:
            assert "--out" not in opts, name
            continue
        assert "--out" in opts and "--out" in help_text, f"{name} has no --out"
        # no visible positional output any more
        for action in sub._actions:
            if not action.option_strings and action.help != argparse.SUPPRESS:
                assert "OUT" not in str(action.metavar or action.dest).upper(), (
                    name,
                    action.metavar,
                )
        if name not in OPTIONAL_OUTPUT and not opts["--out"].required:
            # an optional --out only where the older positional alias still supplies it
            assert any(a.dest == "output" for a in sub._actions), name


def test_shared_options_have_one_meaning_and_default():
    _, subs = _subcommands()
    seen: dict[str, tuple] = {}
    for name, sub in subs.items():
        opts = _options(sub)
        for opt in SHARED:
            if opt not in opts:
                continue
            a = opts[opt]
            sig = (a.default, a.help, a.metavar, a.type, tuple(a.choices or ()))
            if opt in seen:
                assert sig == seen[opt][1], f"{opt} differs between {seen[opt][0]} and {name}"
            else:
                seen[opt] = (name, sig)
    for opt, commands in MUST_HAVE.items():
        for name in commands:
            assert opt in _options(subs[name]), f"{name} lacks {opt}"
    # the defaults users rely on
    assert seen["--seed"][1][0] == 0 and seen["--batch-size"][1][0] == 500
    assert seen["--key-seed"][1][0] is None and seen["--recipe"][1][0] == "strong"


def test_old_positional_outputs_still_work(tmp_path, capsys):
    key = tmp_path / "k.json"
    assert (
        cli.main(
            ["keygen", "--block-size", "2", "--channels", "3", "--key-seed", "5", "--out", str(key)]
        )
        == 0
    )
    assert (
        cli.main(
            [
                "init-model",
                "--dim",
                "8",
                "--depth",
                "1",
                "--kernel-size",
                "3",
                "--patch-size",
                "2",
                "--image-size",
                "4",
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    assert (
        cli.main(["encrypt-model", "--key", str(key), str(tmp_path / "m"), str(tmp_path / "e1")])
        == 0
    )
    assert (
        cli.main(
            ["encrypt-model", "--key", str(key), str(tmp_path / "m"), "--out", str(tmp_path / "e2")]
        )
        == 0
    )
    assert (tmp_path / "e1" / "config.json").read_text().count("key_fingerprint") == 1
    capsys.readouterr()
    # both forms at once, or neither, is a usage error that names --out
    assert (
        cli.main(
            [
                "encrypt-model",
                "--key",
                str(key),
                str(tmp_path / "m"),
                str(tmp_path / "e3"),
                "--out",
                str(tmp_path / "e4"),
            ]
        )
        == 2
    )
    assert "--out" in capsys.readouterr().err
    assert cli.main(["decrypt-model", "--key", str(key), str(tmp_path / "e1")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "decrypt-model --help" in err
    assert not any((tmp_path / n).exists() for n in ("e3", "e4"))
    # the former keygen --seed still makes the same key as --key-seed
    assert (
        cli.main(
            [
                "keygen",
                "--block-size",
                "2",
                "--channels",
                "3",
                "--seed",
                "5",
                "--out",
                str(tmp_path / "k2.json"),
            ]
        )
        == 0
    )
    assert (tmp_path / "k2.json").read_text() == key.read_text()


def test_usage_errors_point_at_the_subcommand_help(capsys):
    assert cli.main(["encrypt-model", "--key", "k.json", "a", "--out", "b", "--bogus", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert (
        "unrecognized arguments: --bogus 1" in err and "'convmixer-jax encrypt-model --help'" in err
    )
    assert cli.main(["evaluate"]) == 2
    assert "'convmixer-jax evaluate --help'" in capsys.readouterr().err


def test_version():
    from importlib.metadata import version

    r = subprocess.run(
        [sys.executable, "-m", "convmixer_jax.cli", "--version"], capture_output=True, text=True
    )
    assert r.returncode == 0
    assert r.stdout.strip() == f"convmixer-jax {version('convmixer-jax')}"


@pytest.mark.parametrize("name", ["evaluate", "predict", "attack", "train", "reproduce"])
def test_help_lists_shared_options(name, capsys):
    assert cli.main([name, "--help"]) == 0
    text = capsys.readouterr().out
    assert "--out" in text and "--quiet" in text


def test_help_needs_no_jax():
    """``--help`` answers without importing JAX: the parser and the registries it reads
    (model presets, training recipes) are JAX-free."""
    code = (
        "import sys\n"
        "from convmixer_jax.cli.app import build_parser\n"
        "parser = build_parser()\n"
        "for name in ('train', 'init-model', 'import-torch'):\n"
        "    parser.subcommands[name].format_help()\n"
        "import convmixer_jax.model.config, convmixer_jax.training.recipes\n"
        "assert 'jax' not in sys.modules, sorted(m for m in sys.modules if 'jax' in m)\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_choices_are_the_registries():
    """--preset, --timm-name, --recipe and --activation list what the registries hold,
    in every command that has them."""
    from convmixer_jax.model.config import ACTIVATIONS, PRESETS, TIMM_NAMES
    from convmixer_jax.training.recipes import RECIPES

    want = {
        "--preset": list(PRESETS),
        "--timm-name": list(TIMM_NAMES),
        "--recipe": list(RECIPES),
        "--activation": list(ACTIVATIONS),
    }
    _, subs = _subcommands()
    found = {opt: [] for opt in want}
    for name, sub in subs.items():
        opts = _options(sub)
        for opt, choices in want.items():
            if opt in opts:
                assert list(opts[opt].choices) == choices, (name, opt)
                found[opt].append(name)
    assert all(found.values()), found
    assert {"train", "reproduce"} <= set(found["--recipe"])
    assert {"init-model", "train"} <= set(found["--preset"])
    for name in RECIPES:  # every recipe is described in the help
        assert f"{name}: " in subs["train"].format_help().replace("\n", " ")


def test_no_command_is_one_plain_usage_error(capsys):
    """`convmixer-jax` alone: one line, the program named once."""
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.count("convmixer-jax:") == 1, err
    assert err.startswith("convmixer-jax: error: the following arguments are required: COMMAND")


def test_every_option_with_a_default_names_it():
    """An option that has a default says what it is in its help (--strategy did not)."""
    _, subs = _subcommands()
    silent = []
    for name, sub in subs.items():
        for action in sub._actions:
            if action.help == argparse.SUPPRESS or not action.option_strings:
                continue
            if action.default in (None, False) or action.nargs == 0:
                continue
            if "default" not in (action.help or ""):
                silent.append(f"{name} {action.option_strings[0]}")
    assert not silent, silent
    help_text = " ".join(subs["reproduce"].format_help().split())
    assert "default weights" in help_text


def test_out_is_described_as_the_output_not_as_an_alias():
    """--out's help describes the output; the older positional form is mentioned after it,
    as still accepted, never as a deprecated alias of --out."""
    _, subs = _subcommands()
    for name, sub in subs.items():
        opts = _options(sub)
        if "--out" not in opts:
            continue
        text = " ".join(opts["--out"].help.split())
        assert "deprecated" not in text.lower(), (name, text)
        if any(a.dest == "output" for a in sub._actions):  # the older positional form
            assert "as the last positional argument, is still accepted" in text, (name, text)
    text = " ".join(_options(subs["encrypt-images"])["--out"].help.split())
    assert text.startswith("OUT.npy (one array)") and text.endswith("after a single IN.npy")
