"""Sphinx configuration of the API reference (built from the docstrings).

Build: ``python -m sphinx -n -W --keep-going -b html docs/api build/api`` (the README says so;
CI runs it). ``-n -W`` turns every reference that does not resolve into an error.
"""

import os
import sys

sys.path.insert(0, os.path.abspath("../.."))

project = "convmixer-jax"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.autosummary", "sphinx.ext.napoleon"]
autosummary_generate = True
# a module documents what it defines; names it re-exports (in __all__) are documented where
# they are defined, once
autodoc_default_options = {"members": True, "show-inheritance": True, "ignore-module-all": True}
autodoc_typehints = "description"
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
templates_path = ["_templates"]
exclude_patterns = ["_build"]
html_theme = "alabaster"
nitpicky = True
# The package's own names must resolve. Without internet there is no intersphinx
# inventory for NumPy, JAX, Flax or the standard library, so type annotations that
# are not ours, and references into those libraries, are let through.
_EXTERNAL_MODULES = (
    "numpy np jax jnp flax nn optax orbax ocp scipy matplotlib tqdm PIL os pathlib typing "
    "collections argparse"
)
_EXTERNAL = "(" + "|".join(_EXTERNAL_MODULES.split()) + ")"
nitpick_ignore_regex = [
    (r"py:class", r"(?!convmixer_jax\b).*"),
    (r"py:.*", _EXTERNAL + r"(\..*)?"),
]
# several modules re-export a name: pick the defining one silently
suppress_warnings = ["ref.python"]
