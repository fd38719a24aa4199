"""Names of a package resolved on first use, so that importing the package imports nothing
heavy (JAX in particular). Imports nothing from the package; any package may use it."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_exports(
    package: str, table: Mapping[str, str], namespace: dict
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: name ``n`` of ``table`` is
    ``package.<table[n]>.n``, imported on first use and then kept in ``namespace`` (the
    package's ``globals()``)."""

    def __getattr__(name: str):
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return list(namespace.get("__all__", sorted(table)))

    return __getattr__, __dir__
