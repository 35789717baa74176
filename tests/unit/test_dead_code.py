"""No dead code: what ruff cannot see, checked over the whole repository.

ruff (pyproject.toml) flags unused imports and variables (F401, F841), commented-out code (ERA)
and needless statements (PIE, B018), one file at a time. It has no whole-program rule, and
vulture is not among our dependencies, so this test does the two checks we need:

- every module-level function, class and constant of the product (operator/) and the harness
  (e2e/) is named somewhere else: in code, a config, a script or a manifest (serveConfigV2 names
  `build_app` in a string). Decorated functions are left out (kopf's decorators register
  them), and methods (frameworks call them by protocol);
- no statement is an expression without effect that B018 lets through: a bare f-string, name,
  attribute, comparison or arithmetic (string literals are docstrings and stay allowed).
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CODE = ("operator", "e2e", "tests")
CHECKED = ("operator", "e2e")  # module-level names; tests/ define fixtures pytest finds by name
# Where a name may be used: code, configs, scripts, manifests (not prose).
USE_SUFFIXES = {".py", ".sh", ".yaml", ".yml", ".toml", ".json", ".tpl", ".cfg"}
USE_NAMES = {"Makefile", "Dockerfile"}
NO_EFFECT = (ast.JoinedStr, ast.Name, ast.Attribute, ast.Compare, ast.BinOp, ast.UnaryOp)
WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _files(folders: tuple[str, ...], suffixes: set[str], names: set[str]) -> list[Path]:
    return sorted(
        path
        for folder in folders
        for path in (ROOT / folder).rglob("*")
        if path.is_file()
        and "__pycache__" not in path.parts
        and (path.suffix in suffixes or path.name in names)
    )


def _word_counts() -> Counter[str]:
    folders = tuple(p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith("."))
    counts: Counter[str] = Counter()
    for path in _files(folders, USE_SUFFIXES, USE_NAMES):
        counts.update(WORD.findall(path.read_text(errors="replace")))
    for path in ROOT.iterdir():  # the Makefile and pyproject.toml
        if path.is_file() and (path.suffix in USE_SUFFIXES or path.name in USE_NAMES):
            counts.update(WORD.findall(path.read_text(errors="replace")))
    return counts


def _defined(tree: ast.Module) -> list[tuple[int, str]]:
    names: list[tuple[int, str]] = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            if not node.decorator_list:
                names.append((node.lineno, node.name))
        elif isinstance(node, ast.Assign):
            names += [(node.lineno, t.id) for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.append((node.lineno, node.target.id))
    return [(line, name) for line, name in names if not name.startswith("__")]


def test_every_module_level_name_is_used_somewhere() -> None:
    counts = _word_counts()
    unused = [
        f"{path.relative_to(ROOT)}:{line} {name}"
        for path in _files(CHECKED, {".py"}, set())
        for line, name in _defined(ast.parse(path.read_text(), str(path)))
        if counts[name] <= 1  # its definition alone
    ]
    assert not unused, f"defined but never used (delete them): {unused}"


def test_no_statement_is_an_expression_without_effect() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)[:60]}"
        for path in _files(CODE, {".py"}, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Expr) and isinstance(node.value, NO_EFFECT)
    ]
    assert not found, f"statements that do nothing: {found}"
