"""The package's layout rules, checked on its import graph (read with `ast`, nothing imported).

- The product core (services, engines, estimators, wire, config, metrics) imports nothing
  from the lab (`asyncopd.lab`: launcher, chaos, study, fleet simulation, toy training,
  benchmarks). The one exception is the CLI (`asyncopd.cli`), the composition root that names
  every command, lab ones included, by module path.
- `asyncopd.opd` (the estimator math) imports nothing else of the project.
- No service package imports another service's package.
- The package root holds packages, not loose modules.

Imports inside functions count (a lazy import is still a dependency), and so does a string
literal naming a project module (`importlib.import_module("asyncopd.lab...")`).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "services" / "asyncopd"
SERVICES = ("cache", "rollout", "teacher", "learner", "autoscaler")
COMPOSITION_ROOTS = ("asyncopd.cli",)
_MODULE_STRING = re.compile(r"^asyncopd(\.[a-z_0-9]+)+$")


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(module: str, source: str, is_package: bool) -> set[str]:
    """Every project module `source` imports, at any depth, plus string literals naming one."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_STRING.match(node.value):
            found.add(node.value)
    return {name for name in found if name == "asyncopd" or name.startswith("asyncopd.")}


def import_graph(root: Path) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        name = module_name(root, path)
        if name.startswith("asyncopd.v1"):
            continue  # generated protobuf stubs
        graph[name] = imports_of(name, path.read_text(), path.name == "__init__.py")
    return graph


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def lab_imports_from_core(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(core module, lab module) for every import that runs from the product into the lab."""
    return sorted(
        (module, target)
        for module, targets in graph.items()
        if not _within(module, "asyncopd.lab") and module not in COMPOSITION_ROOTS
        for target in targets
        if _within(target, "asyncopd.lab")
    )


def opd_imports_outside(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted(
        (module, target)
        for module, targets in graph.items()
        if _within(module, "asyncopd.opd")
        for target in targets
        if not _within(target, "asyncopd.opd")
    )


def cross_service_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    out = []
    for module, targets in graph.items():
        own = [s for s in SERVICES if _within(module, f"asyncopd.{s}")]
        if not own:
            continue
        for target in targets:
            for other in SERVICES:
                if other != own[0] and _within(target, f"asyncopd.{other}"):
                    out.append((module, target))
    return sorted(out)


def _write_tree(root: Path, files: Iterable[tuple[str, str]]) -> None:
    for relative, text in files:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


GRAPH = import_graph(PACKAGE_ROOT)


def test_the_graph_sees_the_package() -> None:
    # A checker that read nothing would pass every rule below.
    assert "asyncopd.cache.servicer" in GRAPH and "asyncopd.lab.launch.runner" in GRAPH
    assert "asyncopd.cache.store" in GRAPH["asyncopd.cache.servicer"]


def test_core_imports_nothing_from_the_lab() -> None:
    assert lab_imports_from_core(GRAPH) == []


def test_opd_imports_nothing_else_of_the_project() -> None:
    assert opd_imports_outside(GRAPH) == []


def test_no_service_imports_another_service() -> None:
    assert cross_service_imports(GRAPH) == []


def test_the_root_holds_packages_not_loose_modules() -> None:
    loose = sorted(p.stem for p in PACKAGE_ROOT.glob("*.py") if p.name != "__init__.py")
    assert loose == ["records"], f"loose modules at the package root: {loose}; put them in a package"


@pytest.mark.parametrize(
    ("where", "planted"),
    [
        ("asyncopd/cache/servicer.py", "from asyncopd.lab.bench import cache\n"),
        ("asyncopd/cache/servicer.py", "def f():\n    import asyncopd.lab.chaos.faults\n"),
        ("asyncopd/wire/rpc.py", "from asyncopd.lab import launch\n"),
        ("asyncopd/learner/loop.py", "import importlib\nimportlib.import_module('asyncopd.lab.study.plan')\n"),
        ("asyncopd/learner/loop.py", "from ..lab.study import plan\n"),
    ],
)
def test_a_planted_lab_import_in_core_is_caught(tmp_path: Path, where: str, planted: str) -> None:
    _write_tree(tmp_path, [("asyncopd/__init__.py", ""), ("asyncopd/lab/__init__.py", ""), (where, planted)])
    found = lab_imports_from_core(import_graph(tmp_path / "asyncopd"))
    assert found and found[0][0] == module_name(tmp_path / "asyncopd", tmp_path / where)


def test_the_lab_and_the_cli_may_import_the_lab(tmp_path: Path) -> None:
    _write_tree(
        tmp_path,
        [
            ("asyncopd/cli/__init__.py", "COMMANDS = {'run': 'asyncopd.lab.launch.cli'}\n"),
            ("asyncopd/lab/chaos/harness.py", "from asyncopd.lab.launch import runner\n"),
        ],
    )
    assert lab_imports_from_core(import_graph(tmp_path / "asyncopd")) == []


def test_a_planted_import_out_of_opd_and_across_services_is_caught(tmp_path: Path) -> None:
    _write_tree(
        tmp_path,
        [
            ("asyncopd/opd/loss.py", "from asyncopd.config import RunConfig\n"),
            ("asyncopd/rollout/main.py", "from asyncopd.teacher.scorer import TeacherScorer\n"),
        ],
    )
    graph = import_graph(tmp_path / "asyncopd")
    assert {module for module, _ in opd_imports_outside(graph)} == {"asyncopd.opd.loss"}
    assert {module for module, _ in cross_service_imports(graph)} == {"asyncopd.rollout.main"}


def test_the_architecture_doc_lists_every_package_and_no_other() -> None:
    doc = (PACKAGE_ROOT.parents[1] / "docs" / "architecture.md").read_text()
    table = doc.split("<!-- layout:begin -->", 1)[1].split("<!-- layout:end -->", 1)[0]
    listed = set(re.findall(r"^\| `(asyncopd(?:\.[a-z_]+)*)`", table, flags=re.M))
    packages = {
        module_name(PACKAGE_ROOT, init.parent / "__init__.py")
        for init in PACKAGE_ROOT.rglob("__init__.py")
        if "v1" not in init.relative_to(PACKAGE_ROOT).parts and init.parent != PACKAGE_ROOT
    }
    # one level below the root, plus the lab's and tasks' own packages, one line each
    expected = {p for p in packages if p.count(".") == 1 or p.startswith(("asyncopd.lab.", "asyncopd.tasks."))}
    expected |= {f"asyncopd.{p.stem}" for p in PACKAGE_ROOT.glob("*.py") if p.name != "__init__.py"}
    assert listed == expected, f"docs/architecture.md Layout: missing {expected - listed}, stale {listed - expected}"
