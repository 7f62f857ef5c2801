"""The package's structure: data and imports flow one way (docs/ARCHITECTURE.md).

The import graph holds every `import cclddg...` in the package, at the top of a file or inside a function alike
(a local import hides a dependency; it does not remove it). benchmarks/code_structure.py reports from it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "cclddg"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> tuple[set[str], int]:
    """The package modules a file imports (top level and local), and how many of those imports are local."""
    tree = ast.parse(path.read_text())
    found, local = set(), 0
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        names = [n for n in names if n.startswith("cclddg")]
        if not names:
            continue
        found.update(names)
        if id(node) not in top and not _under_type_checking(tree, node):
            local += 1
    return found, local


def _under_type_checking(tree: ast.Module, node: ast.AST) -> bool:
    for stmt in tree.body:
        if isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test):
            if any(child is node for child in ast.walk(stmt)):
                return True
    return False


def graph() -> tuple[dict[str, set[str]], int]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges, local_total = {}, 0
    for name, path in modules.items():
        found, local = imports(path)
        local_total += local
        edges[name] = {m for m in found if m in modules and m != name}
    return edges, local_total


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in edges:
        if v not in index:
            visit(v)
    return out


# The layers of docs/ARCHITECTURE.md, top first. A module may import its own layer and the layers below it, never
# one above (the package's __init__ only names lazy imports, so it stands above everything).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("cclddg", "cclddg.__main__", "cclddg.cli", "cclddg.demo", "cclddg.serve", "cclddg.sample_writer"),
    ("cclddg.model_folder", "cclddg.scheduler"),
    ("cclddg.training", "cclddg.evaluation"),
    ("cclddg.run_config",),
    ("cclddg.pipeline", "cclddg.samplers"),
    ("cclddg.conditioning", "cclddg.folder_check"),
    ("cclddg.priors",),
    ("cclddg.data", "cclddg.encoders", "cclddg.latents"),
    ("cclddg.models", "cclddg.diffusion", "cclddg.objectives"),
    ("cclddg.config", "cclddg.paths", "cclddg.run_folder"),
    ("cclddg.storage", "cclddg.options"),
    ("cclddg.errors", "cclddg.atomic", "cclddg.cpu", "cclddg.preemption", "cclddg.registry"),
)


def layer_of(module: str) -> int:
    """The index in LAYERS of the longest prefix naming `module` (its package, or itself)."""
    best = None
    for i, layer in enumerate(LAYERS):
        for name in layer:
            if module == name or module.startswith(name + "."):
                if best is None or len(name) > len(best[1]):
                    best = (i, name)
    assert best is not None, f"{module} is in no layer: add it to LAYERS and to docs/ARCHITECTURE.md's drawing"
    return best[0]


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    return sorted(f"{module} (layer {layer_of(module)}) imports {dep} (layer {layer_of(dep)})"
                  for module, deps in edges.items() for dep in deps
                  if dep != "cclddg" and layer_of(dep) < layer_of(module))


def test_there_is_no_import_cycle():
    edges, _ = graph()
    assert cycles(edges) == []


def test_imports_only_go_down_the_layers():
    edges, _ = graph()
    assert upward_imports(edges) == []


def test_an_upward_import_is_found():
    """The check itself: the storage layer importing the pipeline is named."""
    edges, _ = graph()
    edges = {**edges, "cclddg.storage": edges["cclddg.storage"] | {"cclddg.pipeline"}}
    assert upward_imports(edges) == ["cclddg.storage (layer 10) imports cclddg.pipeline (layer 4)"]


def test_the_command_line_starts_without_torch():
    """`cclddg --help` (and every usage error) answers before torch, accelerate or diffusers load."""
    code = "import sys, cclddg.cli; print(sorted(m for m in ('torch', 'accelerate', 'diffusers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_citation_of_the_design_points_into_the_repository():
    """Code, tests and docs cite docs/DESIGN.md (never a file outside the repository), and a section they name
    in quotes after it is one of its headings."""
    import re

    root = PACKAGE.parents[1]
    headings = {line.lstrip("#").strip() for line in (root / "docs" / "DESIGN.md").read_text().splitlines()
                if line.startswith("#")}
    files = [*PACKAGE.rglob("*.py"), *(root / "tests").glob("*.py"), *(root / "benchmarks").glob("*.py"),
             root / "README.md", root / "docs" / "ARCHITECTURE.md"]
    cited = 0
    for path in files:
        text = path.read_text()
        for match in re.finditer(r"(\S*)DESIGN\.md(?:'s)?(?:,? \(?\"([^\"]+)\")?", text):
            if path.name == "test_structure.py":
                continue
            assert match.group(1).endswith("docs/"), f"{path.name} cites {match.group(0)!r}, not docs/DESIGN.md"
            if match.group(2):
                assert match.group(2) in headings, f"{path.name} cites a section {match.group(2)!r} that DESIGN has not"
            cited += 1
    assert cited >= 8
