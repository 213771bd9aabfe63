"""Code rules of tasks/ that a reviewer would otherwise check by eye."""
from __future__ import annotations

import ast
import re
from pathlib import Path

TASKS = Path(__file__).resolve().parents[2] / "tasks"
MAX_FUNCTION_LINES = 80


def _functions():
    for path in sorted(TASKS.rglob("*.py")) + sorted((TASKS.parent / "flows").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path.relative_to(TASKS.parent), node


def test_no_function_in_tasks_or_flows_is_over_80_lines():
    long = [f"{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path, node in _functions() if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, "split these functions: " + "; ".join(long)


def test_prefect_is_imported_in_flows_only():
    offenders = [str(p.relative_to(TASKS.parent)) for p in TASKS.rglob("*.py")
                 if re.search(r"^\s*(from|import) prefect\b", p.read_text(), re.MULTILINE)]
    assert not offenders, f"Prefect belongs in flows/: {offenders}"


def test_only_compat_parses_a_tensorrt_version():
    # the spellings a version parser takes: a digits regex over the version, or splitting it on "."
    pattern = re.compile(r"parse_version\(|re\.findall\(r\"\\d\+\"|_version_tuple|_trt_major")
    offenders = [str(p.relative_to(TASKS.parent)) for p in TASKS.rglob("*.py")
                 if p.name != "compat.py" and pattern.search(p.read_text())]
    assert not offenders, f"parse TensorRT versions in tasks/gpu/compat.py only (caps_for_version): {offenders}"
