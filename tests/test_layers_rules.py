"""The layer rules of docs/architecture.md, checked on every product module's imports.

Packages: the method is ``fedpara`` with its subpackages except ``fedpara.runtime`` and
``fedpara.wire`` (``fedpara.data`` is part of the method); the runtime is ``fedpara.runtime`` and
``fedpara.wire``; the apps are ``coordinator``, ``edge_client`` and ``export``.

Rules:

1. The method never imports ``fedpara.runtime``, ``fedpara.wire`` or an app.
2. ``fedpara.wire`` imports the method only: never ``fedpara.runtime`` or an app.
3. ``fedpara.runtime`` imports the method and ``fedpara.wire``, never an app.
4. An app imports the method and the runtime, never another app, except where ALLOWED below
   says why: ``coordinator.cli_demo`` imports ``edge_client.devprofile`` (the demo checks its
   ``--device-profiles`` names before it starts any client process) and ``edge_client.trainer``
   imports ``export`` (a client exports its final model with ``--export-on-finish``).
5. paho is imported only by ``fedpara/runtime/mqtt.py``; amqtt only by ``coordinator/broker.py``.
6. The inference path is torch-free: ``fedpara``, ``fedpara.schemes``, ``fedpara.data``,
   ``fedpara.data.spec``, ``fedpara.data.partition``, ``fedpara.data.rows``, ``fedpara.data.idx``,
   ``fedpara.data.fashion_mnist``, ``fedpara.runtime.cli``, ``export``, ``export.cli``,
   ``export.infer`` and ``export.onnx_model``, and every project module they import when they are
   imported, import neither torch nor onnx except inside a function.

Every import counts, at module level or inside a function (a lazy import is still a dependency),
``from . import x`` and ``importlib.import_module("literal")`` included; only imports under
``if TYPE_CHECKING:`` are skipped. A failure names the file, the line and the rule broken.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fedpara", "coordinator", "edge_client", "export")
APPS = ("coordinator", "edge_client", "export")

# (importing module, imported module or package): why this app may import another app
ALLOWED = {
    ("coordinator.cli_demo", "edge_client.devprofile"):
        "the demo checks its --device-profiles names before it starts any client process",
    ("edge_client.trainer", "export"):
        "a client exports its final model (--export-on-finish)",
}
TORCH_FREE = ("fedpara", "fedpara.schemes", "fedpara.data", "fedpara.data.spec", "fedpara.data.partition",
              "fedpara.data.rows", "fedpara.data.idx", "fedpara.data.fashion_mnist", "fedpara.runtime.cli",
              "export", "export.cli", "export.infer", "export.onnx_model")
HEAVY = ("torch", "onnx", "onnxscript")
ONLY_IMPORTED_BY = {"paho": "fedpara.runtime.mqtt", "amqtt": "coordinator.broker"}


@dataclass(frozen=True)
class Imp:
    module: str   # the importing module, e.g. export.infer
    path: Path    # its file, relative to the root
    line: int
    target: str   # the imported module, absolute, e.g. fedpara.data.fashion_mnist
    lazy: bool    # inside a function


def layer(name: str) -> str | None:
    """method | wire | runtime | the app's name | None (not ours)."""
    top = name.split(".")[0]
    if top == "fedpara":
        if name == "fedpara.runtime" or name.startswith("fedpara.runtime."):
            return "runtime"
        if name == "fedpara.wire" or name.startswith("fedpara.wire."):
            return "wire"
        return "method"
    return top if top in APPS else None


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _resolve(root: Path, module: str, is_pkg: bool, node: ast.ImportFrom) -> list[str]:
    if node.level:
        base = module.split(".") if is_pkg else module.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module
    out = [prefix]
    for alias in node.names:  # ``from pkg import sub``: the submodule is imported too
        sub = f"{prefix}.{alias.name}"
        rel = Path(*sub.split("."))
        if (root / rel).with_suffix(".py").is_file() or (root / rel / "__init__.py").is_file():
            out.append(sub)
    return out


def imports_of(root: Path, path: Path) -> list[Imp]:
    module = module_name(root, path)
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[Imp] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child, lazy)
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            lazy = True
        rel = path.relative_to(root)
        if isinstance(node, ast.Import):
            found.extend(Imp(module, rel, node.lineno, a.name, lazy) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.extend(Imp(module, rel, node.lineno, t, lazy) for t in _resolve(root, module, is_pkg, node))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and not node.args[0].value.startswith(".")):
            found.append(Imp(module, rel, node.lineno, node.args[0].value, lazy))
        for child in ast.iter_child_nodes(node):
            visit(child, lazy)

    visit(tree, False)
    return found


def product_files(root: Path) -> list[Path]:
    return sorted(p for pkg in PACKAGES if (root / pkg).is_dir() for p in (root / pkg).rglob("*.py"))


def _allowed(imp: Imp) -> bool:
    return any(imp.module == src and (imp.target == dst or imp.target.startswith(dst + "."))
               for src, dst in ALLOWED)


def layer_violations(root: Path) -> list[str]:
    """'file:line: rule N (...): imports X' for every import that breaks rules 1-5 (one line per
    import statement and rule: ``from pkg import sub`` is named by its submodule)."""
    out: dict[tuple[str, str], str] = {}
    for path in product_files(root):
        for imp in imports_of(root, path):
            src, dst = layer(imp.module), layer(imp.target)
            where = f"{imp.path}:{imp.line}"
            top = imp.target.split(".")[0]
            if top in ONLY_IMPORTED_BY and imp.module != ONLY_IMPORTED_BY[top]:
                out[where, "5"] = f"{where}: rule 5 ({top} only in {ONLY_IMPORTED_BY[top]}): imports {imp.target}"
            if dst is None or src == dst:
                continue
            if src == "method" and dst in ("runtime", "wire", *APPS):
                out[where, "1"] = f"{where}: rule 1 (the method imports no runtime, wire or app): imports {imp.target}"
            elif src == "wire" and dst in ("runtime", *APPS):
                out[where, "2"] = f"{where}: rule 2 (fedpara.wire imports the method only): imports {imp.target}"
            elif src == "runtime" and dst in APPS:
                out[where, "3"] = f"{where}: rule 3 (fedpara.runtime imports no app): imports {imp.target}"
            elif src in APPS and dst in APPS and not _allowed(imp):
                out[where, "4"] = f"{where}: rule 4 (an app imports no other app): imports {imp.target}"
    return list(out.values())


def _file_of(root: Path, name: str) -> Path | None:
    rel = Path(*name.split("."))
    for p in ((root / rel).with_suffix(".py"), root / rel / "__init__.py"):
        if p.is_file():
            return p
    return None


def torch_free_violations(root: Path, roots=TORCH_FREE) -> list[str]:
    """Rule 6: what importing ``roots`` runs at module level reaches no torch or onnx import."""
    out, seen, todo = [], set(), [(r, r) for r in roots]  # (module, the root whose import reaches it)
    while todo:
        name, origin = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo.extend((".".join(parts[:i]), origin) for i in range(1, len(parts)))  # parent packages run first
        path = _file_of(root, name)
        if path is None:
            continue
        for imp in imports_of(root, path):
            if imp.lazy:
                continue
            if imp.target.split(".")[0] in HEAVY:
                out.append(f"{imp.path}:{imp.line}: rule 6 (the inference path is torch-free; importing {origin} "
                           f"runs this): imports {imp.target} at module level")
            elif layer(imp.target) is not None:
                todo.append((imp.target, origin))
    return out


def test_product_modules_keep_the_layer_rules():
    bad = layer_violations(ROOT)
    assert not bad, "layer rules broken (docs/architecture.md):\n" + "\n".join(bad)


def test_the_inference_path_imports_no_torch():
    bad = torch_free_violations(ROOT)
    assert not bad, "\n".join(bad)


def test_every_allowed_app_import_is_still_there():
    """An allow-list entry nobody needs any more is removed, not kept as a standing exception."""
    used = {(i.module, d) for p in product_files(ROOT) for i in imports_of(ROOT, p)
            for (s, d) in ALLOWED if i.module == s and (i.target == d or i.target.startswith(d + "."))}
    assert used == set(ALLOWED)


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


@pytest.mark.parametrize(("files", "expected"), [
    ({"fedpara/__init__.py": "", "fedpara/lr.py": "def f():\n    from coordinator import server\n"},
     "fedpara/lr.py:2: rule 1"),
    ({"fedpara/__init__.py": "", "fedpara/data/__init__.py": "", "fedpara/data/x.py": "from ..runtime import rundir\n",
      "fedpara/runtime/__init__.py": "", "fedpara/runtime/rundir.py": ""},
     "fedpara/data/x.py:1: rule 1"),
    ({"fedpara/__init__.py": "", "fedpara/wire/__init__.py": "", "fedpara/wire/a.py": "import fedpara.runtime.mqtt\n"},
     "fedpara/wire/a.py:1: rule 2"),
    ({"fedpara/__init__.py": "", "fedpara/runtime/__init__.py": "",
      "fedpara/runtime/a.py": "import importlib\nimportlib.import_module('export.pipeline')\n"},
     "fedpara/runtime/a.py:2: rule 3"),
    ({"export/__init__.py": "", "export/a.py": "from edge_client import trainer\n"}, "export/a.py:1: rule 4"),
    ({"edge_client/__init__.py": "", "edge_client/a.py": "import paho.mqtt.client\n"}, "edge_client/a.py:1: rule 5"),
])
def test_a_broken_rule_is_named_with_file_and_line(tmp_path, files, expected):
    _write(tmp_path, files)
    bad = layer_violations(tmp_path)
    assert len(bad) == 1 and bad[0].startswith(expected), bad


def test_torch_reached_from_the_inference_path_is_named(tmp_path):
    _write(tmp_path, {"export/__init__.py": "", "export/infer.py": "from fedpara.data import idx\n",
                      "fedpara/__init__.py": "", "fedpara/data/__init__.py": "",
                      "fedpara/data/idx.py": "import numpy\nimport torch\ndef f():\n    import onnx\n"})
    bad = torch_free_violations(tmp_path, roots=("export.infer",))
    assert len(bad) == 1 and bad[0].startswith("fedpara/data/idx.py:2: rule 6"), bad
    _write(tmp_path, {"fedpara/data/idx.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n"})
    assert torch_free_violations(tmp_path, roots=("export.infer",)) == []
