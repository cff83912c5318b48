"""The import graph of the package is the DAG that ARCHITECTURE.md draws:

    kernels <- graph <- runtime <- API / CLI (__init__.py, __main__.py)
    loaders -> graph only;  train/ -> runtime, graph, loaders, kernels;  nothing imports perf/

Every .py file of the package is parsed (imports inside functions count too), relative imports are
resolved against the file's package, and each import is reduced to the top-level part of treadle it
reaches: a subpackage name, "api" for the package root (`import treadle`, `from .. import x`), or,
for anything outside treadle, its top-level module name.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the package `treadle`
SUBPACKAGES = {"kernels", "graph", "loaders", "runtime", "train", "perf"}
STDLIB = set(sys.stdlib_module_names) | {"__future__"}

# part -> the treadle parts it may import (besides itself)
ALLOWED = {
    "kernels": set(),
    "graph": {"kernels"},
    "loaders": {"graph"},
    "runtime": {"graph", "kernels", "loaders"},
    "train": {"runtime", "graph", "loaders", "kernels"},
    "api": {"runtime", "graph", "loaders", "kernels", "train", "api"},  # __init__ / __main__
}
# numba: the CPU kernels compiled from Python (kernels/cpu_quant_linear.py), as Triton is for GPUs.
KERNEL_THIRD_PARTY = {"torch", "triton", "numpy", "numba"}
# Known violations, each named by file, until the owner fixes them: {(file, imported part)}.
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()


def part_of(rel: Path) -> str:
    """The top-level part a file of the package belongs to."""
    return rel.parts[0] if len(rel.parts) > 1 and rel.parts[0] in SUBPACKAGES else "api"


def imported_parts(source: str, rel: Path) -> set[str]:
    """What a file at `rel` (relative to the package root) imports, as top-level parts."""
    package = ["treadle", *rel.parts[:-1]]  # the file's __package__ (an __init__.py's too)
    out: set[str] = set()

    def add(absolute: list[str]) -> None:
        if absolute[0] != "treadle":
            out.add(absolute[0])
        elif len(absolute) == 1 or absolute[1] not in SUBPACKAGES:
            out.add("api")
        else:
            out.add(absolute[1])

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name.split("."))
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                add(node.module.split("."))
                continue
            base = package[: len(package) - (node.level - 1)]
            if node.module:
                add(base + node.module.split("."))
            else:  # `from . import x`: x is a submodule or a name of the package itself
                for alias in node.names:
                    add(base + [alias.name])
    return out


def package_files() -> list[Path]:
    skip = {"tests", ".venv", "perf"}  # perf/ may import anything; nothing may import it
    return sorted(
        p.relative_to(ROOT)
        for p in ROOT.rglob("*.py")
        if not skip & set(p.relative_to(ROOT).parts) and p.name != "dev.py"
    )


def edges() -> dict[Path, set[str]]:
    return {rel: imported_parts((ROOT / rel).read_text(), rel) for rel in package_files()}


def test_the_resolver_reads_relative_and_absolute_imports():
    src = (
        "import os\nimport treadle\nfrom treadle.runtime.llm import load\n"
        "from ..kernels.rope import x\nfrom . import weights\nfrom .. import SamplingParams\n"
        "def f():\n    from ..perf import bench\n    import numpy as np\n"
    )
    assert imported_parts(src, Path("graph/model.py")) == {
        "os",
        "api",
        "runtime",
        "kernels",
        "graph",
        "perf",
        "numpy",
    }
    assert imported_parts("from . import load\nfrom .train import x", Path("__main__.py")) == {
        "api",
        "train",
    }


def test_the_graph_is_seen():
    """The checks below are not vacuous: the edges the architecture expects are found."""
    found = {(part_of(rel), p) for rel, parts in edges().items() for p in parts}
    for edge in [
        ("graph", "kernels"),
        ("loaders", "graph"),
        ("runtime", "graph"),
        ("runtime", "loaders"),
        ("train", "runtime"),
        ("train", "graph"),
        ("api", "runtime"),
        ("kernels", "torch"),
    ]:
        assert edge in found, edge


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_each_part_imports_only_what_lies_below_it(part):
    bad = []
    for rel, parts in edges().items():
        if part_of(rel) != part:
            continue
        for p in parts & (SUBPACKAGES | {"api"}):
            if p != part and p not in ALLOWED[part] and (str(rel), p) not in KNOWN_VIOLATIONS:
                bad.append(f"{rel} imports {p}")
    assert not bad, f"{part} may import only {sorted(ALLOWED[part])}: " + "; ".join(bad)


def test_kernels_import_only_torch_triton_numpy_numba_and_the_stdlib():
    bad = [
        f"{rel} imports {p}"
        for rel, parts in edges().items()
        if part_of(rel) == "kernels"
        for p in parts - STDLIB - KERNEL_THIRD_PARTY - {"kernels"}
    ]
    assert not bad, "; ".join(bad)


def test_nothing_imports_perf():
    bad = [f"{rel}" for rel, parts in edges().items() if "perf" in parts]
    assert not bad, "perf/ is imported by " + ", ".join(bad)


def test_no_known_violation_is_stale():
    """A fixed violation must leave KNOWN_VIOLATIONS, so the test guards it from then on."""
    now = {(str(rel), p) for rel, parts in edges().items() for p in parts}
    assert KNOWN_VIOLATIONS <= now, KNOWN_VIOLATIONS - now
