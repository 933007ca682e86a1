"""The dependency rules of the three packages, enforced.

``storage`` imports neither ``pipelines`` nor ``pacs_node``; ``pipelines`` imports neither ``storage``,
``pacs_node`` nor pynetdicom (the import-linter contracts in pyproject.toml, run as ``lint-imports``
would). And inside each package no module imports itself back through others: a cycle makes the
order of imports matter, which is how behaviour at import time creeps back in.
"""

from __future__ import annotations

import subprocess
import sys

import grimp
import pytest

from tests.support import REPO


def test_import_linter_contracts_are_kept() -> None:
    run = subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
                               "sys.exit(lint_imports(no_cache=True, no_logo=True))"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def import_cycles(package: str) -> list[list[str]]:
    """The cycles of direct imports among ``package``'s modules: each strongly connected component of
    more than one module, sorted (Tarjan's algorithm, iterative)."""
    graph = grimp.build_graph(package, cache_dir=None)
    modules = sorted(graph.find_descendants(package) | {package})
    inside = set(modules)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m) & inside) for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []
    for root in modules:
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(edges[succ])))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        cycles.append(sorted(component))
    return sorted(cycles)


@pytest.mark.parametrize("package", [
    "pacs_node",
    "storage",
    "pipelines",
])
def test_no_import_cycles_inside_a_package(package: str) -> None:
    assert import_cycles(package) == []
