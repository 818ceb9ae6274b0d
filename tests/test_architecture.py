"""The library's shape: no import cycles, no unexplained function-level imports, small runner modules."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("icm_helpers", "papermill_runs")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(p.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Lines inside ``if TYPE_CHECKING:`` blocks (annotations only: never imported at run time)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            for sub in node.body:
                lines.update(range(sub.lineno, sub.end_lineno + 1))
    return lines


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports anywhere (module level and inside functions)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    deps = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
            targets = [f"{mod}.{a.name}" for a in node.names] + [mod]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:  # the deepest package module a target names
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                deps.add(t)
    return deps


def test_no_import_cycles():
    mods = _modules()
    graph = {m: _imports(m, p, set(mods)) for m, p in mods.items()}
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    # a package importing its own submodules (its API) is not a cycle unless a submodule imports the package back
    assert cycles == [], "import cycles:\n" + "\n".join(cycles)


def test_function_level_imports_say_why():
    """An import inside a function of the library or the runner needs a reason (a comment on its line or the line
    above): an optional dependency, a start-up cost the runner avoids, ... Everything else is imported at the top of
    its module. (The command-line scripts in papermill_runs/ import late so that --help stays fast.)"""
    missing = []
    for name, path in _modules().items():
        if not name.startswith(("icm_helpers", "papermill_runs.runner")):
            continue
        lines = path.read_text().splitlines()
        tree = ast.parse("\n".join(lines))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    here = " ".join(lines[node.lineno - 1: node.end_lineno])
                    above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
                    if "#" not in here and not above.startswith("#"):
                        missing.append(f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert missing == [], "function-level imports without a reason:\n" + "\n".join(missing)


def test_runner_modules_are_small():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (ROOT / "papermill_runs" / "runner").glob("*.py")}
    assert sizes and all(n <= 250 for n in sizes.values()), sizes


def test_the_import_walk_finds_a_cycle(tmp_path, monkeypatch):
    """The cycle test can fail: two modules importing each other are reported."""
    pkg = tmp_path / "icm_helpers"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("def f():\n    from .a import y  # lazy\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path, raising=False)
    mods = {m: p for m, p in {"icm_helpers": pkg / "__init__.py", "icm_helpers.a": pkg / "a.py",
                              "icm_helpers.b": pkg / "b.py"}.items()}
    graph = {m: _imports(m, p, set(mods)) for m, p in mods.items()}
    assert graph["icm_helpers.a"] == {"icm_helpers.b"} and graph["icm_helpers.b"] == {"icm_helpers.a"}
