"""A package's internal import graph, its imports inside functions and its line counts, read with ``ast`` only.

    .venv/bin/python papermill_runs/import_graph.py icm_helpers [--functions] [--check-cycles]  # exit 1 on a cycle
    .venv/bin/python papermill_runs/import_graph.py --lines OLD/icm_helpers icm_helpers   # one column per tree

Nothing is imported. Internal: the modules of the root's package; relative imports resolved; a target is the deepest
module named (``from .training import fit`` -> ``icm_helpers.training``). Module level: outside functions, without
``if TYPE_CHECKING:`` blocks (they never run). ``--lines``: as ``wc -l``, one column per tree (a root's folder).
"""
import argparse
import ast
import sys
import textwrap
from pathlib import Path


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under the package directory ``root``."""
    return {".".join([root.name, *p.relative_to(root).with_suffix("").parts]).removesuffix(".__init__"): p
            for p in sorted(root.rglob("*.py"))}


def _targets(node: ast.Import | ast.ImportFrom, name: str, package: str, known: set[str]) -> set[str]:
    """The modules of ``known`` (other than ``name``, in ``package``) that one import statement names."""
    dotted = [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        base = ".".join(filter(None, [package.rsplit(".", node.level - 1)[0] if node.level else "", node.module]))
        dotted = [f"{base}.{a}" for a in dotted]  # a name that is not a module falls back to ``base`` below
    deps = set()
    for target in dotted:
        while target and target not in known:
            target = target.rpartition(".")[0]
        deps.add(target)
    return deps - {"", name}


def imports(name: str, path: Path, known: set[str]) -> tuple[set[str], dict[str, set[str]]]:
    """(internal modules imported at module level, {qualname of a function: internal modules imported in it})."""
    top, inside = set(), {}  # inside: {qualname: deps}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    functions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)

    def walk(node: ast.AST, scope: list[str], in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and ast.unparse(child.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                child = ast.Module(body=child.orelse, type_ignores=[])
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                deps = _targets(child, name, package, known)
                (inside.setdefault(".".join(scope), set()) if in_function else top).update(deps)
            named = [getattr(child, "name", "<lambda>")] if isinstance(child, (*functions, ast.ClassDef)) else []
            walk(child, scope + named, in_function or isinstance(child, functions))

    walk(ast.parse(path.read_text(), str(path)), [], False)
    return top, {q: d for q, d in inside.items() if d}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles ``[a, b, ..., a]`` closed by the back edges of a depth-first search in sorted order."""
    cycles, state = [], {}  # state: module -> "open" (on the stack) / "done"

    def visit(module: str, stack: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[module] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return cycles


def line_table(roots: list[Path]) -> list[str]:
    """Markdown table: file (relative to its tree) | lines in each tree (``-``: absent); totals per package and all."""
    counts: dict[Path, dict[str, int]] = {r.resolve().parent: {} for r in roots}
    for root in (r.resolve() for r in roots):
        counts[root.parent].update({p.relative_to(root.parent).as_posix(): p.read_bytes().count(b"\n")
                                    for p in root.rglob("*.py")})
    files, packages = sorted(set().union(*counts.values())), dict.fromkeys(r.resolve().name for r in roots)
    table = [["module", *(t.name for t in counts)], ["---"] * (len(counts) + 1)]
    table += [[f, *(c.get(f, "-") for c in counts.values())] for f in files]
    table += [[f"total {k}/", *(sum(n for f, n in c.items() if f.startswith(k + "/")) for c in counts.values())]
              for k in packages]
    table += [["total", *(sum(c.values()) for c in counts.values())]]
    return ["| " + " | ".join(map(str, row)) + " |" for row in table]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("roots", nargs="+", type=Path, help="package directories (all but --lines read the first only)")
    p.add_argument("--functions", action="store_true", help="also list imports inside functions; count them for cycles")
    p.add_argument("--lines", action="store_true", help="print only the table of line counts")
    p.add_argument("--check-cycles", action="store_true", help="print the cycles and exit 1 if there is one")
    args = p.parse_args(argv)
    if args.lines:
        print("\n".join(line_table(args.roots)))
        return 0
    mods = modules(args.roots[0].resolve())
    found = {name: imports(name, path, set(mods)) for name, path in mods.items()}
    graph = {m: top.union(*(inside.values() if args.functions else ())) for m, (top, inside) in found.items()}
    if args.check_cycles:
        cycles = find_cycles(graph)
        print("\n".join("import cycle: " + " -> ".join(c) for c in cycles) or "no import cycles")
        return 1 if cycles else 0
    lines = [f"{m} -> {', '.join(sorted(top)) or '(none)'}" for m, (top, _) in found.items()]
    if args.functions:
        lines += ["", "# imports inside functions"] + [f"{m}.{q} -> {', '.join(sorted(d))}"
                                                        for m, (_, f) in found.items() for q, d in f.items()]
    print("\n".join(textwrap.fill(line, 120, subsequent_indent="    ") for line in lines))  # long lines wrapped
    return 0


if __name__ == "__main__":
    sys.exit(main())
