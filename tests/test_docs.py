"""The documentation: the API reference builds from the docstrings with the README's command
(and a broken reference fails it), the README stays a short front door, links between the
documents resolve, and no document, docstring or help text speaks of the project's own
process (issue numbers, machines lent, work sessions)."""

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
BUILD = [sys.executable, "-m", "sphinx", "-n", "-W", "--keep-going", "-q", "-b", "html"]
README_MAX_LINES = 250

#: Words about how the project was made rather than what it does. A "console session" or
#: "shell session" is an ordinary word; a work session ("this session", "the session's
#: machine", "several sessions") is not.
PROCESS_WORDS = [
    r"\bissue \d+",
    r"\bissues? #?\d+",
    r"\bdevelopment (machine|cpus?)\b",
    r"\bno accelerator was lent\b",
    r"\blent\b",
    r"\bloans?\b",
    r"\bleases?\b",
    r"(?<!console )(?<!shell )(?<!terminal )(?<!interactive )\bsessions?\b",
    r"\bstop \d+",
]
_PROCESS = re.compile("|".join(f"(?:{p})" for p in PROCESS_WORDS), re.IGNORECASE)


def _documents() -> list[Path]:
    """README.md, every text document under docs/ (except the generated API pages),
    the benchmark, notebook and results pages."""
    docs = [
        p
        for p in (REPO / "docs").rglob("*")
        if p.is_file()
        and p.suffix in {".md", ".rst", ".txt", ".py"}
        and "generated" not in p.relative_to(REPO / "docs").parts
    ]
    return sorted(
        [REPO / "README.md", *docs, *(REPO / "benchmarks").glob("*.md")]
        + [REPO / "notebooks" / "README.md", *(REPO / "results").rglob("*.md")]
    )


def _violations(text: str, where: str, first_line: int = 1) -> list[str]:
    out = []
    for i, line in enumerate(text.splitlines()):
        for m in _PROCESS.finditer(line):
            out.append(f"{where}:{first_line + i}: {m.group(0)!r} in {line.strip()[:100]!r}")
    return out


# --- the README -----------------------------------------------------------------------


def test_readme_states_the_build_command():
    assert (
        "python -m sphinx -n -W --keep-going -b html docs/api build/api"
        in (REPO / "README.md").read_text()
    )


def test_readme_is_a_front_door_of_at_most_250_lines():
    n = len((REPO / "README.md").read_text().splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; move detail to docs/usage.md"


def test_readme_repository_paths_exist():
    """Every backticked path into the repository that the README names exists."""
    text = (REPO / "README.md").read_text()
    tops = ("docs/", "benchmarks/", "results/", "scripts/", "tests/", "notebooks/", ".ci/")
    missing = []
    for path in re.findall(r"`([^`\s]+)`", text):
        if path.startswith(tops) and not any(c in path for c in "*{}<>"):
            if not (REPO / path.rstrip("/")).exists():
                missing.append(path)
    assert not missing, missing


# --- links ----------------------------------------------------------------------------


def test_relative_links_between_documents_resolve():
    """Every Markdown link or image with a relative target points at a file or folder that
    exists (anchors and web addresses aside)."""
    broken = []
    for doc in _documents():
        if doc.suffix != ".md":
            continue
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
        for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = target.split("#", 1)[0]
            if not (doc.parent / path).exists():
                broken.append(f"{doc.relative_to(REPO)}: {target}")
    assert not broken, broken


def test_the_link_check_sees_a_broken_link(tmp_path):
    doc = tmp_path / "page.md"
    doc.write_text("[ok](page.md) [web](https://example.org) [gone](no/such/file.md)\n")
    text = doc.read_text()
    targets = re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text)
    missing = [t for t in targets if not re.match(r"[a-z]+:", t) and not (tmp_path / t).exists()]
    assert missing == ["no/such/file.md"]


# --- process words --------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, caught",
    [
        ("as asked in issue 17", True),
        ("see Issue #5", True),
        ("on the 2-core development CPU", True),
        ("measured on the development machine", True),
        ("no accelerator was lent", True),
        ("one 15-minute lease of an H200", True),
        ("the session's machine was new", True),
        ("the run spanned several sessions", True),
        ("stop 3 of the plan", True),
        ("A console session, pasted from a run", False),
        ("the official release", False),
        ("a silent failure, an excellent fit", False),
        ("please note", False),
        ("the key stops the attack", False),
    ],
)
def test_the_process_word_check(line, caught):
    assert bool(_violations(line, "x")) is caught


def test_documents_do_not_speak_of_the_projects_process():
    found = []
    for doc in _documents():
        found += _violations(doc.read_text(), str(doc.relative_to(REPO)))
    assert not found, "\n".join(found)


def _docstrings_and_help_texts(path: Path):
    """(line, text) of the module, class and function docstrings of one file, and of the
    string literals given as help=, description= or epilog= to a call, or under a "help"
    key of a dict literal (dataclass field metadata)."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and (
            doc := ast.get_docstring(node, clean=False)
        ):
            yield node.body[0].lineno, doc
        texts = []
        if isinstance(node, ast.Call):
            texts = [k.value for k in node.keywords if k.arg in {"help", "description", "epilog"}]
        elif isinstance(node, ast.Dict):
            texts = [
                v
                for k, v in zip(node.keys, node.values, strict=True)
                if isinstance(k, ast.Constant) and k.value == "help"
            ]
        for value in texts:
            for sub in ast.walk(value):
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    yield sub.lineno, sub.value


def test_the_docstring_scan_sees_docstrings_and_help_texts(tmp_path):
    src = tmp_path / "m.py"
    src.write_text(
        '"""Module, issue 5."""\n'
        "import argparse\n"
        "def f():\n"
        '    """Timed on the development CPU."""\n'
        "p = argparse.ArgumentParser(description='fine')\n"
        "p.add_argument('--x', help='since ' 'issue 7')\n"
        "meta = {'help': 'measured in one lease'}\n"
    )
    found = [
        v for line, text in _docstrings_and_help_texts(src) for v in _violations(text, "m", line)
    ]
    assert [v.split(":")[1] for v in found] == ["1", "4", "6", "7"]


def test_docstrings_and_help_texts_do_not_speak_of_the_projects_process():
    found = []
    for path in sorted((REPO / "convmixer_jax").rglob("*.py")):
        where = str(path.relative_to(REPO))
        for line, text in _docstrings_and_help_texts(path):
            found += _violations(text, where, line)
    assert not found, "\n".join(sorted(set(found)))


# --- the API reference ------------------------------------------------------------------


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
