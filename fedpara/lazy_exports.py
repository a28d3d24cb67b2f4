"""PEP 562 lazy exports for a package ``__init__``: a name is imported on first use, not before.

So ``import fedpara`` (or ``fedpara.data``, ``export``) loads no torch: the torch-free parts (the
IDX reader, the data-spec parser, ``fedpara infer``) stay torch-free (docs/architecture.md, rule 6).
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_exports(package: str, namespace: dict, names: Mapping[str, str], submodules=()
                 ) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """(``__getattr__``, ``__dir__``) for ``package``: ``names`` maps an exported name to the
    submodule that defines it; ``submodules`` are reachable as attributes. A loaded value is kept
    in ``namespace`` (the package's globals), so each is looked up once."""
    submodules = tuple(submodules)

    def __getattr__(name: str):
        if name in names:
            value = getattr(importlib.import_module(f".{names[name]}", package), name)
        elif name in submodules:
            value = importlib.import_module(f".{name}", package)
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(names) | set(submodules))

    return __getattr__, __dir__
