"""The README's Python example runs and its assertion holds."""

import re
from pathlib import Path


def test_readme_python_example_runs():
    text = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no python example"
    code = blocks[0].replace('PRESETS["paper"]', 'PRESETS["paper"].__class__(dim=16, depth=1)')
    exec(compile(code, "README.md", "exec"), {})


def _console_session(text: str) -> list[tuple[str, list[str]]]:
    """The README's first console block as (command line, expected output lines)."""
    block = re.findall(r"```console\n(.*?)```", text, re.S)[0]
    steps = []
    for line in block.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            steps[-1][1].append(line)
    return steps


def _same_line(expected: str, actual: str, fingerprints: dict) -> bool:
    """Token by token: numbers to 0.002, key fingerprints through a consistent mapping."""
    e, a = expected.replace(",", " ").split(), actual.replace(",", " ").split()
    if len(e) != len(a):
        return False
    for x, y in zip(e, a, strict=True):
        if re.fullmatch(r"[0-9a-f]{64}\)?", x) and re.fullmatch(r"[0-9a-f]{64}\)?", y):
            if x[64:] != y[64:] or fingerprints.setdefault(x[:64], y[:64]) != y[:64]:
                return False
        elif re.fullmatch(r"\d+\.\d+", x) and re.fullmatch(r"\d+\.\d+", y):
            if abs(float(x) - float(y)) > 0.002:
                return False
        elif x != y:
            return False
    return True


def test_readme_cli_session_runs_as_written(tmp_path, monkeypatch, capsys):
    """Each `$ convmixer-jax ...` line of the README runs in a fresh folder that holds
    the committed model and example photos at their repository paths, and prints
    what the README shows (fingerprints of fresh keys aside, consistently)."""
    import shlex

    from convmixer_jax import cli

    root = Path(__file__).parents[1]
    (tmp_path / "results" / "cifar10").mkdir(parents=True)
    (tmp_path / "results" / "cifar10" / "plain-model").symlink_to(
        root / "results" / "cifar10" / "plain-model"
    )
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "example-photos").symlink_to(root / "docs" / "example-photos")
    monkeypatch.chdir(tmp_path)
    steps = _console_session((root / "README.md").read_text())
    assert len(steps) >= 8
    fingerprints: dict = {}
    for line, expected in steps:
        command, _, comment = line.partition("    #")
        argv = shlex.split(command)
        assert argv[0] == "convmixer-jax", line
        capsys.readouterr()
        assert cli.main(argv[1:]) == 0, line
        actual = capsys.readouterr().out.strip().splitlines()
        assert len(actual) == len(expected), (line, actual)
        for e, a in zip(expected, actual, strict=True):
            if "varies with the key" in comment:  # only the layout: the image names
                assert a.split(":")[0] == e.split(":")[0], (line, a)
            else:
                assert _same_line(e, a, fingerprints), (line, e, a)
    assert (
        len(set(fingerprints.values())) == 2
    )  # key.json and key2.json, each reported consistently
