"""The API reference builds from the docstrings with the README's command, and a broken reference fails it."""

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parents[1]
BUILD = [sys.executable, "-m", "sphinx", "-n", "-W", "--keep-going", "-q", "-b", "html"]


def test_readme_states_the_build_command():
    assert (
        "python -m sphinx -n -W --keep-going -b html docs/api build/api"
        in (REPO / "README.md").read_text()
    )


def _build(src: Path, out: Path):
    return subprocess.run(
        BUILD + [str(src), str(out)], cwd=REPO, capture_output=True, text=True, timeout=600
    )


def test_api_reference_builds_without_warnings(tmp_path):
    src = tmp_path / "api"
    shutil.copytree(REPO / "docs" / "api", src, ignore=shutil.ignore_patterns("generated"))
    (src / "conf.py").write_text(
        (src / "conf.py").read_text().replace('os.path.abspath("../..")', repr(str(REPO)))
    )
    r = _build(src, tmp_path / "html")
    assert r.returncode == 0, r.stderr[-3000:]
    page = (tmp_path / "html" / "generated" / "convmixer_jax.scheme.images.html").read_text()
    assert "encrypt_images" in page and "decrypt_images" in page


def test_a_broken_reference_fails_the_build(tmp_path):
    src = tmp_path / "api"
    shutil.copytree(REPO / "docs" / "api", src, ignore=shutil.ignore_patterns("generated"))
    (src / "conf.py").write_text(
        (src / "conf.py").read_text().replace('os.path.abspath("../..")', repr(str(REPO)))
    )
    (src / "index.rst").write_text(
        "Broken\n======\n\nSee :func:`convmixer_jax.scheme.keys.no_such_function`.\n"
    )
    r = _build(src, tmp_path / "html")
    assert r.returncode != 0
    assert "no_such_function" in r.stderr
