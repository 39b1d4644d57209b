"""The house keeps its ladder: the project's import graph, read with ast, against the ladder that
ARCHITECTURE.md draws (its ```ladder block: one line per rung, bottom first).

* every module of robustbench_lite/, attacks/ and defenses/ stands on exactly one rung (a new module
  must be placed on the map);
* no import goes up: a module imports only modules on its own rung or below. Importing ``a.b`` from
  outside package ``a`` also runs ``a/__init__.py``, so that package counts as imported too;
* the graph has no cycle (imports within a rung included);
* imports of project modules sit at module level, except in the command line (cli.py and
  __main__.py defer theirs so that `advbench --help` stays fast).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("robustbench_lite", "attacks", "defenses")
DEFERRING = {"robustbench_lite.cli", "robustbench_lite.__main__"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> Dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def ladder() -> Dict[str, int]:
    """module -> rung, from ARCHITECTURE.md's ```ladder block (lines ``N  mod, mod, ...``)."""
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    block = re.search(r"```ladder\n(.*?)```", text, re.S)
    assert block, "ARCHITECTURE.md has no ```ladder block"
    rungs: Dict[str, int] = {}
    for line in block.group(1).splitlines():
        m = re.match(r"\s*(\d+)\s+(.*)", line)
        if not m:
            continue
        for name in re.split(r"[,\s]+", m.group(2).split("#")[0].strip()):
            if name:
                assert name not in rungs, f"{name} stands on two rungs of the ladder"
                rungs[name] = int(m.group(1))
    return rungs


def _targets(node: ast.AST, current: str, is_package: bool, modules: Dict[str, Path]) -> List[str]:
    """The project modules an import statement loads: the named modules, and the packages above
    them that lie outside ``current``'s own package (their __init__ runs on import)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            pkg = current.split(".") if is_package else current.split(".")[:-1]
            pkg = pkg[:len(pkg) - node.level + 1]
            base = ".".join(pkg + ([base] if base else []))
        subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
        names = subs if len(subs) == len(node.names) else [base] + subs
    own = current.split(".")[0]
    out = []
    for name in names:
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            prefix = ".".join(parts[:k])
            if prefix in modules and (k == len(parts) or parts[0] != own):
                out.append(prefix)
    return [t for t in out if t != current]


def import_graph() -> Tuple[Dict[str, Set[str]], List[str]]:
    """(module -> the project modules it imports, the function-level project imports)."""
    modules = project_modules()
    edges: Dict[str, Set[str]] = {m: set() for m in modules}
    local: List[str] = []
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        scopes = [(tree, False)]
        while scopes:
            node, in_function = scopes.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    targets = _targets(child, mod, path.name == "__init__.py", modules)
                    edges[mod].update(targets)
                    if targets and in_function and mod not in DEFERRING:
                        local.append(f"{path.relative_to(ROOT)}:{child.lineno} imports {', '.join(targets)}")
                scopes.append((child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))))
    return edges, local


def test_every_module_stands_on_the_ladder():
    rungs, modules = ladder(), project_modules()
    assert sorted(set(modules) - set(rungs)) == [], "modules missing from ARCHITECTURE.md's ladder"
    assert sorted(set(rungs) - set(modules)) == [], "ARCHITECTURE.md's ladder names modules that do not exist"


def test_no_import_goes_up_the_ladder():
    rungs = ladder()
    edges, _ = import_graph()
    upward = [f"{a} (rung {rungs[a]}) imports {b} (rung {rungs[b]})" for a, targets in sorted(edges.items())
              for b in sorted(targets) if a in rungs and b in rungs and rungs[b] > rungs[a]]
    assert upward == []


def test_the_import_graph_has_no_cycle():
    edges, _ = import_graph()
    state: Dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: List[str]) -> None:
        state[m] = 1
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(t):] + [m, t]))
            if t not in state:
                visit(t, path + [m])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [])


def test_project_imports_are_at_module_level():
    _, local = import_graph()
    assert local == []


def test_the_checker_sees_upward_edges_and_cycles():
    """The graph reader itself: relative imports resolve, a package's __init__ counts when imported
    from outside it, and function-level imports are found (on a tiny tree of strings)."""
    modules = {"pkg": Path("pkg/__init__.py"), "pkg.low": Path("pkg/low.py"), "pkg.high": Path("pkg/high.py"),
               "other": Path("other/__init__.py"), "other.mod": Path("other/mod.py")}
    rel = ast.parse("from .low import x").body[0]
    assert _targets(rel, "pkg.high", False, modules) == ["pkg.low"]
    outside = ast.parse("from pkg.low import x").body[0]
    assert _targets(outside, "other.mod", False, modules) == ["pkg", "pkg.low"]
    sibling = ast.parse("from pkg import high").body[0]
    assert _targets(sibling, "pkg.low", False, modules) == ["pkg.high"]
    edges, local = import_graph()
    assert edges["robustbench_lite.runs"] >= {"robustbench_lite.zoo", "robustbench_lite.evaluator"}
    assert "robustbench_lite.suite" not in edges["robustbench_lite.training"]
