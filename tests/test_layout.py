"""The package's plan, checked: imports flow one way, files stay small, the public API imports.

The layers, lowest first (docs/design.md): a module may import from its own
subpackage and from lower layers, never from a higher one. Every import is
read from the source (also those inside functions), so a lazy import against
the flow fails as well.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "convmixer_jax"
LAYERS = (
    "parallel",
    "scheme",
    "model",
    "files",
    "data",
    "training",
    "attacks",
    "experiment",
    "cli",
)
BASE = {"_xla_flags"}  # imports nothing from the package; anyone may import it
PUBLIC = [
    "generate_key",
    "load_key",
    "encrypt_images",
    "decrypt_images",
    "encrypt_params",
    "decrypt_params",
    "rekey_params",
    "ConvMixer",
    "ConvMixerConfig",
    "PRESETS",
]


def imported_packages(source: str, module: str) -> list[tuple[int, str]]:
    """(line, first component under convmixer_jax) of every import of the package in ``source``.

    module: the importing module's dotted name (for relative imports).
    """
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "convmixer_jax" and len(parts) > 1:
                    out.append((node.lineno, parts[1]))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: -node.level]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            parts = name.split(".")
            if parts[0] != "convmixer_jax":
                continue
            if len(parts) > 1:
                out.append((node.lineno, parts[1]))
            else:  # from convmixer_jax import x, y
                out.extend((node.lineno, a.name) for a in node.names)
    return out


def violations(source: str, module: str) -> list[str]:
    """Imports in ``source`` (of the module ``convmixer_jax.<layer>...``) against the flow."""
    parts = module.split(".")
    if len(parts) < 3 or parts[1] not in LAYERS:
        return []  # the package root and _xla_flags are not layered
    own = LAYERS.index(parts[1])
    bad = []
    for line, target in imported_packages(source, module):
        if target in BASE:
            continue
        if target not in LAYERS:
            bad.append(f"{module}:{line} imports convmixer_jax.{target}, which is in no layer")
        elif LAYERS.index(target) > own:
            bad.append(f"{module}:{line} ({parts[1]}) imports the higher layer {target}")
    return bad


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        yield path, ".".join(rel.parts)


def test_every_subpackage_is_a_layer():
    subpackages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert subpackages == set(LAYERS)
    loose = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert loose <= BASE, f"modules outside the subpackages: {sorted(loose - BASE)}"


def test_imports_flow_one_way():
    bad = [v for path, mod in _modules() for v in violations(path.read_text(), mod)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    "module, source",
    [
        ("convmixer_jax.scheme.keys", "from convmixer_jax.training.loop import train\n"),
        ("convmixer_jax.model.convmixer", "def f():\n    import convmixer_jax.files.model_dir\n"),
        ("convmixer_jax.files.atomic", "from convmixer_jax import cli\n"),
        ("convmixer_jax.training.loop", "from ..attacks import wrong_keys\n"),
        ("convmixer_jax.attacks.report", "from convmixer_jax.experiment.paper import reproduce\n"),
    ],
)
def test_the_check_catches_an_import_against_the_flow(module, source):
    assert violations(source, module)


def test_the_check_allows_the_flow():
    assert not violations(
        "from convmixer_jax.scheme.keys import Key\nfrom ..model import ConvMixer\n"
        "from convmixer_jax import _xla_flags\n",
        "convmixer_jax.training.loop",
    )


def test_file_sizes():
    too_big = [
        f"{p.relative_to(PACKAGE)}: {n}"
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > (300 if p.parent.name == "cli" else 700)
    ]
    assert not too_big, too_big


def test_public_api_imports_in_a_fresh_interpreter():
    code = f"from convmixer_jax import {', '.join(PUBLIC)}; import convmixer_jax; print(sorted(convmixer_jax.__all__))"
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=PACKAGE.parent,
    )
    assert r.returncode == 0, r.stderr
    assert all(name in r.stdout for name in PUBLIC)


def test_public_api_names_are_the_library_objects():
    import convmixer_jax
    from convmixer_jax.model.convmixer import ConvMixer
    from convmixer_jax.scheme.images import encrypt_images

    assert convmixer_jax.encrypt_images is encrypt_images and convmixer_jax.ConvMixer is ConvMixer
    with pytest.raises(AttributeError):
        convmixer_jax.no_such_name  # noqa: B018
