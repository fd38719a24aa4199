"""The package's plan, checked: imports flow one way, no package imports itself in a circle,
no module reaches for another module's private names, and the public API imports.

The layers, lowest first (docs/design.md): a module may import from its own
subpackage and from lower layers, never from a higher one. Every import is
read from the source (also those inside functions), so a lazy import against
the flow, a lazy import that closes a cycle, or a lazy import of a private
name fails as well. Each rule has a test that plants a violation and sees the
check fail on it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "convmixer_jax"
SCRIPT_FOLDERS = (ROOT / "benchmarks", ROOT / "scripts")
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
BASE = {"_xla_flags", "_lazy"}  # import nothing from the package; anyone may import them
#: private modules whose functions are public
PUBLIC_PRIVATE_MODULES = {f"convmixer_jax.{m}" for m in BASE}
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


# --------------------------------------------------------------------------- reading imports


def package_sources(package: Path = PACKAGE) -> dict[str, str]:
    """Dotted module name -> source of every module of the package.

    A package's ``__init__.py`` is named ``<package>.__init__``, so that a relative
    import in it resolves like one in any other module of that package.
    """
    out = {}
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent).with_suffix("")
        out[".".join(rel.parts)] = path.read_text()
    return out


def absolute_name(module: str, node: ast.ImportFrom) -> str:
    """The dotted module an ``ImportFrom`` in ``module`` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")[: -node.level]
    return ".".join(base + ([node.module] if node.module else []))


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


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
            parts = absolute_name(module, node).split(".")
            if parts[0] != "convmixer_jax":
                continue
            if len(parts) > 1:
                out.append((node.lineno, parts[1]))
            else:  # from convmixer_jax import x, y
                out.extend((node.lineno, a.name) for a in node.names)
    return out


# --------------------------------------------------------------------------- rule 1: layers


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


# --------------------------------------------------------------------------- rule 2: cycles


class ImportGraph:
    """Which module of a package imports which, read from the sources.

    sources: dotted module name -> source, as :func:`package_sources` gives them.
    The nodes are the modules (not the ``__init__`` files): a package's
    ``__init__`` only gathers names, and importing a name through it is an
    import of the module the name comes from (an ``__init__`` re-exports with
    ``from .module import name`` or with a ``_PUBLIC = {"name": "module"}``
    table read by its ``__getattr__``). A name defined in the ``__init__``
    itself gives no edge. Importing a whole subpackage is an import of every
    module its ``__init__`` re-exports from.
    """

    def __init__(self, sources: dict[str, str]):
        self.sources = sources
        self.trees = {m: ast.parse(s) for m, s in sources.items()}
        self.packages = {m.removesuffix(".__init__") for m in sources if m.endswith(".__init__")}
        self._exports: dict[str, tuple[dict[str, str], dict[str, str]]] = {}

    def is_module(self, name: str) -> bool:
        return name in self.sources and not name.endswith(".__init__")

    def _init_exports(self, package: str) -> tuple[dict[str, str], dict[str, str]]:
        """What ``package``'s __init__ re-exports: (imported at once, looked up on first use).

        Each maps a name to ``origin.name``, origin being the module it comes from.
        """
        if package in self._exports:
            return self._exports[package]
        eager: dict[str, str] = {}
        lazy: dict[str, str] = {}
        self._exports[package] = eager, lazy
        init = f"{package}.__init__"
        for node in ast.walk(self.trees.get(init, ast.Module(body=[], type_ignores=[]))):
            if isinstance(node, ast.ImportFrom):
                origin = absolute_name(init, node)
                for a in node.names:
                    eager[a.asname or a.name] = f"{origin}.{a.name}"
            elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
                for k, v in zip(node.value.keys, node.value.values, strict=True):
                    if not (isinstance(k, ast.Constant) and isinstance(v, ast.Constant)):
                        continue
                    if not (isinstance(k.value, str) and isinstance(v.value, str)):
                        continue
                    for where in (f"{package}.{v.value}", f"convmixer_jax.{v.value}"):
                        if self.is_module(where) or where in self.packages:
                            lazy[k.value] = f"{where}.{k.value}"
                            break
        return eager, lazy

    def targets(self, dotted: str, seen: frozenset = frozenset()) -> set[str]:
        """The modules that ``dotted`` (a module, a package, or ``origin.name``) comes from."""
        if dotted in seen:
            return set()
        seen = seen | {dotted}
        if self.is_module(dotted):
            return {dotted}
        if dotted in self.packages:  # the whole package: what its __init__ imports at once
            out = set()
            for origin in self._init_exports(dotted)[0].values():
                out |= self.targets(origin, seen)
            return out
        owner, _, name = dotted.rpartition(".")
        if self.is_module(owner):
            return {owner}  # a name of a module
        if owner in self.packages:
            eager, lazy = self._init_exports(owner)
            if name in eager or name in lazy:
                return self.targets(eager.get(name) or lazy[name], seen)
        return set()  # defined in an __init__, or not part of the package

    def edges(self, module: str) -> dict[str, int]:
        """Module -> first line of ``module`` that imports it (every import, lazy ones too)."""
        out: dict[str, int] = {}

        def add(dotted: str, line: int) -> None:
            for t in self.targets(dotted):
                if t != module:
                    out.setdefault(t, line)

        bound: dict[str, str] = {}  # local name -> what it was bound to by an import
        tree = self.trees[module]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    add(a.name, node.lineno)
                    top = a.name.split(".")[0]
                    bound[a.asname or top] = a.name if a.asname else top
            elif isinstance(node, ast.ImportFrom):
                origin = absolute_name(module, node)
                for a in node.names:
                    add(f"{origin}.{a.name}", node.lineno)
                    bound[a.asname or a.name] = f"{origin}.{a.name}"
        # a package bound to a name, its names used as attributes (lazy re-exports too)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                chain, base = [node.attr], node.value
                while isinstance(base, ast.Attribute):
                    chain.append(base.attr)
                    base = base.value
                if isinstance(base, ast.Name) and base.id in bound:
                    dotted = ".".join([bound[base.id], *reversed(chain)])
                    if dotted.rpartition(".")[0] in self.packages:
                        add(dotted, node.lineno)
        return out

    def cycles(self) -> list[str]:
        """One description per group of modules that import each other in a circle."""
        nodes = sorted(m for m in self.sources if self.is_module(m))
        graph = {m: self.edges(m) for m in nodes}
        out = []
        for group in strongly_connected(graph):
            start = min(group)
            path = shortest_cycle(graph, start, group)
            steps = [f"{a}:{graph[a][b]} imports {b}" for a, b in zip(path, path[1:], strict=False)]
            out.append(
                f"{', '.join(sorted(group))} import each other, e.g. "
                + " -> ".join(path)
                + " ("
                + "; ".join(steps)
                + ")"
            )
        return out


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[set[str]]:
    """The groups of more than one node that reach each other (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(groups, key=min)


def shortest_cycle(graph: dict[str, dict[str, int]], start: str, group: set[str]) -> list[str]:
    """start -> ... -> start through ``group``, fewest steps first (breadth-first)."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if w in group and w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is in no cycle")


def import_cycles(sources: dict[str, str]) -> list[str]:
    """Every circle of imports among the modules of ``sources`` (lazy imports included)."""
    return ImportGraph(sources).cycles()


# --------------------------------------------------------------------------- rule 3: privates


def private_imports(
    source: str, module: str, known_modules: set[str], siblings: frozenset[str] = frozenset()
) -> list[str]:
    """Imports in ``source`` (the module ``module``) of another module's private name.

    Flagged: ``from convmixer_jax.x.y import _z`` (a relative import too), the
    attribute ``_z`` of a module of the package bound by ``import convmixer_jax.x.y``
    (as ``convmixer_jax.x.y._z``, or ``m._z`` after ``import ... as m`` or
    ``from convmixer_jax.x import y``), and a private module such as
    ``convmixer_jax.x._y`` imported from outside its package ``convmixer_jax.x``.
    ``convmixer_jax._xla_flags`` is a private module whose functions are public:
    anyone may import it. ``siblings``: module names importable as top-level
    modules beside the importing script (benchmarks/bench.py for the other
    benchmark scripts); their private names are checked as well.
    known_modules: the dotted names of the package's modules and packages
    (to tell a module from a name in ``from x import name``).
    """
    bad = []
    if module.endswith(".__init__"):
        own_package = module.removesuffix(".__init__")
    else:
        own_package = module.rpartition(".")[0]

    def ours(dotted: str) -> bool:
        return dotted.split(".")[0] == "convmixer_jax" or dotted.split(".")[0] in siblings

    def check_path(dotted: str, line: int) -> None:
        parts = dotted.split(".")
        for i, part in enumerate(parts):
            if not is_private(part) or ".".join(parts[: i + 1]) in PUBLIC_PRIVATE_MODULES:
                continue
            parent = ".".join(parts[:i])
            if i == 0 or not (own_package == parent or own_package.startswith(parent + ".")):
                bad.append(f"{module}:{line} imports the private module {'.'.join(parts[: i + 1])}")
            return

    tree = ast.parse(source)
    bound: dict[str, str] = {}  # local name -> module of the package it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if not ours(a.name):
                    continue
                check_path(a.name, node.lineno)
                if a.asname:
                    bound[a.asname] = a.name
                else:
                    top = a.name.split(".")[0]
                    bound[top] = top
        elif isinstance(node, ast.ImportFrom):
            origin = absolute_name(module, node)
            if not ours(origin):
                continue
            check_path(origin, node.lineno)
            for a in node.names:
                full = f"{origin}.{a.name}"
                if full in known_modules:
                    check_path(full, node.lineno)
                    bound[a.asname or a.name] = full
                elif is_private(a.name):
                    bad.append(f"{module}:{node.lineno} imports the private name {full}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            chain, base = [], node.value
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id in bound:
                owner = ".".join([bound[base.id], *reversed(chain)])
                if owner in known_modules or owner.split(".")[0] in siblings:
                    if f"{owner}.{node.attr}" not in PUBLIC_PRIVATE_MODULES:
                        bad.append(
                            f"{module}:{node.lineno} uses the private name {owner}.{node.attr}"
                        )
    return bad


def known_modules(sources: dict[str, str]) -> set[str]:
    return {m.removesuffix(".__init__") for m in sources}


def package_private_imports(sources: dict[str, str]) -> list[str]:
    known = known_modules(sources)
    return [v for m, s in sorted(sources.items()) for v in private_imports(s, m, known)]


def script_private_imports() -> list[str]:
    """Private names of the package, or of a script beside them, imported by benchmarks/scripts."""
    known = known_modules(package_sources())
    bad = []
    for folder in SCRIPT_FOLDERS:
        scripts = sorted(folder.glob("*.py"))
        siblings = frozenset(p.stem for p in scripts)
        for path in scripts:
            name = f"{folder.name}.{path.stem}"
            bad += private_imports(path.read_text(), name, known, siblings)
    return bad


# --------------------------------------------------------------------------- the package


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        yield path, ".".join(rel.parts)


def test_every_subpackage_is_a_layer():
    subpackages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert subpackages == set(LAYERS)
    loose = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert loose <= BASE, f"modules outside the subpackages: {sorted(loose - BASE)}"
    # a folder of modules inside a layer (attacks/image_prior/, say) is a package of that
    # layer: it has an __init__.py, so that its modules are read as part of the layer
    folders = {p.parent for p in PACKAGE.rglob("*.py")} - {PACKAGE}
    not_packages = sorted(
        str(f.relative_to(PACKAGE)) for f in folders if not (f / "__init__.py").exists()
    )
    assert not not_packages, f"folders of modules without __init__.py: {not_packages}"


def test_imports_flow_one_way():
    bad = [v for path, mod in _modules() for v in violations(path.read_text(), mod)]
    assert not bad, "\n".join(bad)


def test_no_import_cycle_inside_a_package():
    cycles = import_cycles(package_sources())
    assert not cycles, "\n".join(cycles)


def test_no_module_imports_another_modules_private_name():
    bad = package_private_imports(package_sources())
    assert not bad, "\n".join(bad)


def test_benchmarks_and_scripts_import_no_private_name():
    bad = script_private_imports()
    assert not bad, "\n".join(bad)


# --------------------------------------------------------------------------- the checks themselves


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


PKG = "convmixer_jax.attacks"


@pytest.mark.parametrize(
    "planted",
    [
        pytest.param(
            {
                f"{PKG}.a": "from convmixer_jax.attacks.b import g\n",
                f"{PKG}.b": "from .a import f\n",
            },
            id="two-modules",
        ),
        pytest.param(
            {
                f"{PKG}.a": "from convmixer_jax.attacks.b import g\n",
                f"{PKG}.b": "def g():\n    from convmixer_jax.attacks import a  # (lazy)\n",
            },
            id="lazy-import",
        ),
        pytest.param(
            {
                f"{PKG}.a": "from . import b\n",
                f"{PKG}.b": "from convmixer_jax.attacks.c import h\n",
                f"{PKG}.c": "def h():\n    import convmixer_jax.attacks.a as a\n    return a\n",
            },
            id="three-modules",
        ),
        pytest.param(
            {
                f"{PKG}.__init__": "from convmixer_jax.attacks.a import f\n",
                f"{PKG}.a": "from convmixer_jax.attacks.b import g\n",
                f"{PKG}.b": "from convmixer_jax.attacks import f  # through the __init__\n",
            },
            id="through-the-package",
        ),
        pytest.param(
            {
                f"{PKG}.__init__": '_PUBLIC = {"f": "a"}\n',
                f"{PKG}.a": "from convmixer_jax.attacks.prior.net import g\n",
                f"{PKG}.prior.__init__": "from .net import g\n",
                f"{PKG}.prior.net": "def g():\n    from convmixer_jax.attacks import f\n",
            },
            id="lazy-table-and-subpackage",
        ),
        pytest.param(
            {
                f"{PKG}.prior.__init__": '_PUBLIC = {"train": "fit"}\n',
                f"{PKG}.prior.fit": "from convmixer_jax.attacks.a import f\n",
                f"{PKG}.a": "def f():\n    from convmixer_jax.attacks import prior\n"
                "    return prior.train()\n",
            },
            id="attribute-of-a-lazy-package",
        ),
    ],
)
def test_the_check_catches_a_planted_cycle(planted):
    cycles = import_cycles(planted)
    assert len(cycles) == 1 and "convmixer_jax.attacks.a" in cycles[0], cycles
    # the same modules planted beside the real package are caught there too
    beside = import_cycles({**package_sources(), **planted})
    assert any("convmixer_jax.attacks.a:" in c for c in beside), beside


def test_the_cycle_check_allows_a_package_that_gathers_its_modules():
    assert not import_cycles(
        {
            f"{PKG}.__init__": "from .a import f\nfrom .b import g\n",
            f"{PKG}.a": "from convmixer_jax.attacks.b import g\nimport numpy as np\n",
            f"{PKG}.b": "from convmixer_jax.scheme.keys import Key\nfrom . import c\n",
            f"{PKG}.c": "from convmixer_jax.attacks import VERSION\n",  # defined in the __init__
        }
    )


@pytest.mark.parametrize(
    "module, source",
    [
        ("convmixer_jax.attacks.a", "from convmixer_jax.attacks.b import _helper\n"),
        ("convmixer_jax.attacks.a", "def f():\n    from .b import g, _helper\n"),
        ("convmixer_jax.scheme.a", "from ..model.convmixer import _private\n"),
        (
            "convmixer_jax.attacks.a",
            "import convmixer_jax.attacks.b\nconvmixer_jax.attacks.b._h()\n",
        ),
        ("convmixer_jax.attacks.a", "import convmixer_jax.attacks.b as b\nx = b._h\n"),
        ("convmixer_jax.attacks.a", "from convmixer_jax.attacks import b\nb._h(1)\n"),
        ("convmixer_jax.attacks.a", "from convmixer_jax.files._hidden import f\n"),
        ("convmixer_jax.attacks.a", "from convmixer_jax._xla_flags import _FLAG\n"),
        ("benchmarks.bench", "from convmixer_jax.training.loop import RECIPES, _make_step\n"),
    ],
)
def test_the_check_catches_a_planted_private_import(module, source):
    known = {"convmixer_jax", "convmixer_jax.attacks", "convmixer_jax.attacks.b"}
    assert private_imports(source, module, known)


def test_the_check_catches_a_script_importing_a_private_name_of_its_neighbour():
    source = "from bench import _cores, cpu_model\n"
    assert private_imports(source, "benchmarks.step_parts", set(), frozenset({"bench"}))
    assert not private_imports(
        "from bench import cpu_model\n", "benchmarks.x", set(), frozenset({"bench"})
    )


def test_the_private_check_allows_public_names_and_the_xla_flags_module():
    known = {"convmixer_jax", "convmixer_jax._xla_flags", "convmixer_jax.attacks.b"}
    for module, source in [
        ("convmixer_jax.attacks.a", "from convmixer_jax.attacks.b import helper as _helper\n"),
        ("convmixer_jax.attacks.a", "from convmixer_jax import _xla_flags\n_xla_flags.apply()\n"),
        ("benchmarks.bench", "from convmixer_jax._xla_flags import apply_cpu_flags\n"),
        ("convmixer_jax.attacks.a", "from convmixer_jax.attacks._kernels import rows\n"),
        ("convmixer_jax.attacks.a", "import numpy as np\nnp._NoValue\nself._x = 1\n"),
        ("convmixer_jax.__init__", "from convmixer_jax.version import __version__\n"),
    ]:
        assert not private_imports(source, module, known), source


# --------------------------------------------------------------------------- the public API


def test_public_api_imports_in_a_fresh_interpreter():
    code = (
        f"from convmixer_jax import {', '.join(PUBLIC)}; import convmixer_jax; "
        "print(sorted(convmixer_jax.__all__))"
    )
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


def imported_test_modules(source: str) -> list[tuple[int, str]]:
    """(line, name) of every import of a module named ``test_*`` in ``source``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("test_")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("test_"):
            out.append((node.lineno, node.module))
    return out


def test_no_test_module_imports_another():
    bad = [
        f"{p.name}:{line} imports {name}"
        for p in sorted((ROOT / "tests").glob("*.py"))
        for line, name in imported_test_modules(p.read_text())
    ]
    assert not bad, "shared test code belongs in conftest.py or a helper module:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "source",
    ["from test_cli import run\n", "def f():\n    import test_model\n", "import test_x as t\n"],
)
def test_the_check_catches_a_test_module_importing_another(source):
    assert imported_test_modules(source)
    assert not imported_test_modules("from cli_helpers import run\nimport testing\n")
