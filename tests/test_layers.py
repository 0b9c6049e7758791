"""The package's layers, from every import (function-level ones included): CLIs -> build -> run folders /
families -> models, schedules, samplers -> parallel/params. The graph is acyclic, only dlm/parallel touches
DeepSpeed, dlm/models imports no family, data or CLI, and no library module imports a CLI."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dlm"
CLIS = {"dlm.train", "dlm.generate", "dlm.evaluate", "dlm.consolidate", "dlm.lm_eval", "dlm.chat"}


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def imports(path: Path, package: str | None = None) -> set[str]:
    """Every module named by an import statement in the file, at any depth (relative imports resolved)."""
    found = set()
    if package is None:
        package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def internal_graph() -> dict[str, set[str]]:
    mods = modules()
    graph = {}
    for name, path in mods.items():
        edges = set()
        for target in imports(path):
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name and target != "dlm" and not name.startswith(target + "."):
                edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_is_acyclic():
    assert find_cycle(internal_graph()) is None, " -> ".join(find_cycle(internal_graph()))


def test_only_the_parallel_package_touches_deepspeed():
    offenders = {}
    for name, path in modules().items():
        if name.startswith("dlm.parallel"):
            continue
        bad = {i for i in imports(path) if i == "deepspeed" or i.startswith("deepspeed.")}
        if "ds_" in path.read_text() and any(a in path.read_text() for a in ("ds_numel", "ds_shape", "ds_id", "ds_tensor")):
            bad.add("ds_* attributes")
        if bad:
            offenders[name] = sorted(bad)
    assert not offenders, offenders


def test_models_import_no_family_data_or_cli():
    graph = internal_graph()
    forbidden = ("dlm.methods", "dlm.data", "dlm.sampling", "dlm.callbacks", "dlm.run", *CLIS)
    offenders = {m: sorted(t for t in edges if t.startswith(forbidden) and not t.startswith("dlm.run_folder"))
                 for m, edges in graph.items() if m.startswith("dlm.models")}
    assert not {m: e for m, e in offenders.items() if e}


def test_no_library_module_imports_a_cli():
    graph = internal_graph()
    offenders = {m: sorted(edges & CLIS) for m, edges in graph.items() if m not in CLIS}
    assert not {m: e for m, e in offenders.items() if e}


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    source = tmp_path / "x.py"
    source.write_text("def f():\n    from deepspeed.utils import z\n    import dlm.train\n    from .run import x\n")
    assert {"deepspeed.utils", "dlm.train", "dlm.run.x"} <= imports(source, package="dlm")
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
