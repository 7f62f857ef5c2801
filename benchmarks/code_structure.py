"""Figures of the package's structure: import cycles and imports that go up the layers, function-local imports,
the largest module, class and function, the string comparisons of the objective and the conditioning kind, and
the start-up time of light commands. Run from the repository root: python benchmarks/code_structure.py

The import graph is tests/test_structure.py's (every `import cclddg...`, top level or local).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_structure import PACKAGE, cycles, graph, module_name, upward_imports  # noqa: E402  (one home: the test)


def largest_class() -> tuple[str, int]:
    best = ("", 0)
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                size = node.end_lineno - node.lineno + 1
                if size > best[1]:
                    best = (f"{module_name(path)}.{node.name}", size)
    return best


def largest_function() -> tuple[str, int]:
    best = ("", 0)
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = node.end_lineno - node.lineno + 1
                if size > best[1]:
                    best = (f"{module_name(path)}.{node.name}", size)
    return best


# `cfg.objective == "ddgan"`-style tests of the two axes (the objective; the conditioning kind), outside their
# registries (objectives/, conditioning/: there a part may name itself).
AXES = {"objective": re.compile(r"objective[\"'\]]* *(==|!=|in) *[\"(]|(==|!=) *[\"'](ddgan|diffusion)[\"']"),
        "conditioning kind": re.compile(r"cond[\"'\]]* *(==|!=|in) *[\"(]|(==|!=|===) *[\"'](labels|embedding|none)[\"']")}
REGISTRIES = ("objectives", "conditioning")


def string_comparisons() -> dict[str, int]:
    files = [p for p in (*PACKAGE.rglob("*.py"), *PACKAGE.rglob("*.html"))
             if p.relative_to(PACKAGE).parts[0] not in REGISTRIES]
    text = [p.read_text() for p in files]
    return {axis: sum(len(pattern.findall(t)) for t in text) for axis, pattern in AXES.items()}


def startup(args: list[str], repeats: int = 5) -> float:
    """Median wall time of `python -m cclddg ARGS` (exit code ignored: an error exit still measures start-up)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cclddg", *args], capture_output=True)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    tiny = "--tiny" in sys.argv[1:]  # one start-up each instead of five (CI runs it so it cannot rot)
    repeats = 1 if tiny else 5
    edges, local = graph()
    sizes = sorted(((len(p.read_text().splitlines()), module_name(p)) for p in PACKAGE.rglob("*.py")), reverse=True)
    found = cycles(edges)
    name, lines = largest_class()
    function, function_lines = largest_function()
    print(f"largest modules: {', '.join(f'{m} {n}' for n, m in sizes[:3])}")
    print(f"largest class: {name} {lines} lines; largest function: {function} {function_lines} lines")
    print("string comparisons: " + ", ".join(f"{axis} {n}" for axis, n in string_comparisons().items()))
    print(f"imports that go up the layers: {len(upward_imports(edges))}")
    print(f"function-local imports of package modules: {local}")
    print(f"import cycles: {len(found)}" + "".join(f"\n  {' <-> '.join(c)}" for c in found))
    print(f"start-up, median of {repeats}: cclddg --help {startup(['--help'], repeats):.2f} s, "
          f"cclddg plot (no run) {startup(['plot', '/nonexistent'], repeats):.2f} s, "
          f"python -c pass {_python_startup(repeats):.2f} s")


def _python_startup(repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"])
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


if __name__ == "__main__":
    main()
