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


def _tracked(folder: str) -> list[Path]:
    """The Python files of a folder that git tracks (not what a benchmark run left in bench/results)."""
    import subprocess

    root = SERVING.parent
    listed = subprocess.run(["git", "ls-files", "--", f"{folder}/*.py"], cwd=root, capture_output=True, text=True)
    if listed.returncode == 0 and listed.stdout.strip():
        return [root / line for line in listed.stdout.split()]
    return [p for p in (root / folder).rglob("*.py") if "results" not in p.parts]  # an export without .git


def test_no_function_in_bench_or_scripts_is_longer_than_50_lines():
    """bench/ and scripts/ are held to serving's bar."""
    files = _tracked("bench") + _tracked("scripts")
    assert len(files) > 15
    long = [
        f"{p.relative_to(SERVING.parent)}:{fn.name}: {fn.end_lineno - fn.lineno + 1} lines"
        for p in files
        for fn in _functions(ast.parse(p.read_text()))
        if fn.end_lineno - fn.lineno + 1 > 50
    ]
    assert not long


def test_metrics_are_read_by_one_parser():
    """/metrics text is parsed in one place (bench/metrics_text.py, prometheus_client's parser): no script, benchmark
    or test reads series by hand."""
    root = SERVING.parent
    files = _tracked("bench") + _tracked("scripts") + _tracked("tests")
    by_hand = []
    for p in files:
        text = p.read_text()
        if p.name not in ("metrics_text.py", "test_code_shape.py") and "text_string_to_metric_families" in text:
            by_hand.append(f"{p.relative_to(root)}: its own parser")
        for needle in ('startswith("mnist_serving', "startswith('mnist_serving", 'startswith(("mnist_serving'):
            if needle in text and p.name != "test_code_shape.py":
                by_hand.append(f"{p.relative_to(root)}: {needle}")
    assert not by_hand
