"""The shape the serving package keeps, checked from its source: independent of training, no import cycle, short
functions and RPC handlers, one writer of metrics."""

from __future__ import annotations

import ast
from pathlib import Path

SERVING = Path(__file__).resolve().parents[2] / "serving"
MODULES = {p.stem: p for p in sorted(SERVING.glob("*.py"))}


def _tree(name: str) -> ast.Module:
    return ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))


def _type_checking_blocks(tree: ast.Module) -> set[int]:
    """Line numbers inside `if TYPE_CHECKING:` blocks (imports for annotations only, never executed)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            for child in node.body:
                lines.update(range(child.lineno, child.end_lineno + 1))
    return lines


def _imports(name: str) -> set[str]:
    """Every module this one imports at run time, at the top or inside functions (lazy imports included)."""
    tree = _tree(name)
    skip = _type_checking_blocks(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", 0) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _serving_imports(name: str) -> set[str]:
    return {m.split(".")[1] for m in _imports(name) if m.startswith("serving.") and m.split(".")[1] in MODULES}


def test_serving_imports_nothing_from_training():
    offenders = {name: sorted(m for m in _imports(name) if m.split(".")[0] == "training") for name in MODULES}
    assert not {name: found for name, found in offenders.items() if found}


def test_no_import_cycle_in_serving():
    graph = {name: _serving_imports(name) - {name} for name in MODULES}
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        for nxt in graph[name]:
            if nxt in path:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif len(path) < len(graph):
                visit(nxt, path + [nxt])

    for start in graph:
        visit(start, [start])
    assert not cycles, cycles[:5]


def _functions(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def test_no_function_in_serving_is_longer_than_50_lines():
    long = [
        f"{name}.{fn.name}: {fn.end_lineno - fn.lineno + 1} lines"
        for name in MODULES
        for fn in _functions(_tree(name))
        if fn.end_lineno - fn.lineno + 1 > 50
    ]
    assert not long


def test_rpc_handlers_are_short():
    """The servicer converts messages and calls the data plane: every RPC handler fits in 25 lines."""
    tree = _tree("servicer")
    handlers = [fn for fn in _functions(tree) if fn.name[:1].isupper()]
    assert len(handlers) >= 13
    long = [f"{fn.name}: {fn.end_lineno - fn.lineno + 1}" for fn in handlers if fn.end_lineno - fn.lineno + 1 > 25]
    assert not long


def test_only_the_telemetry_module_writes_metrics():
    """serving.metrics defines the series; serving.telemetry is the only module that writes them (the process entry
    starts the /metrics endpoint, nothing more)."""
    importers = {name for name in MODULES if "serving.metrics" in _imports(name) or "metrics" in _serving_imports(name)}
    assert importers == {"telemetry", "lifecycle"}
    lifecycle = {m for m in _imports("lifecycle") if m.startswith("serving.metrics")}
    assert lifecycle == {"serving.metrics", "serving.metrics.start_metrics_server"}
