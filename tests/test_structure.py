"""The shape of the code base: imports run one way, and every config key is documented."""

from __future__ import annotations

import ast
import dataclasses
import re
import sys
import typing
from pathlib import Path

import pytest

from common.config import AnalysisConfig, SweepConfig

ROOT = Path(__file__).resolve().parent.parent
# Data flows one way, and so do imports: a package may import only itself and those before it.
LAYERS = ["common", "data_prep", "trainable", "search_spaces", "sweeps", "analysis"]
# The sweep's entry point (sweeps/run.py) and the stages it runs in order (sweeps/pipeline.py), the report (analysis)
# last: they sit above every layer, and no other module imports them.
DRIVERS = ("sweeps.run", "sweeps.pipeline")


def project_imports() -> dict[str, set[str]]:
    """module -> project modules it imports (module level and inside functions alike)."""
    graph: dict[str, set[str]] = {}
    for package in LAYERS:
        for path in (ROOT / package).rglob("*.py"):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            targets = set()
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    targets |= {alias.name for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    targets |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
            graph[module] = {t for t in targets if t.split(".")[0] in LAYERS}
    modules = set(graph)
    # `from pkg.mod import name` names a module only when pkg.mod.name is one; keep real modules only.
    return {m: {t for t in targets if t in modules} for m, targets in graph.items()}


def test_packages_import_one_way():
    wrong = sorted(
        f"{module} -> {target}"
        for module, targets in project_imports().items()
        for target in targets
        if module not in DRIVERS and LAYERS.index(target.split(".")[0]) > LAYERS.index(module.split(".")[0])
    )
    assert not wrong, f"imports against the data flow {' -> '.join(LAYERS)}: {wrong}"


def test_only_the_entry_point_drives_every_stage():
    """sweeps/pipeline.py runs the stages, the report in process; nothing in the layers calls it or sweeps/run.py."""
    graph = project_imports()
    assert {t.split(".")[0] for t in graph["sweeps.pipeline"]} >= {"data_prep", "trainable", "sweeps", "analysis"}
    assert "sweeps.pipeline" in graph["sweeps.run"]
    importers = sorted(
        f"{m} -> {t}" for m, targets in graph.items() for t in targets if t in DRIVERS and m not in DRIVERS
    )
    assert not importers, f"{DRIVERS} are the entry point and its stages, not a library: {importers}"


def test_no_import_cycle_between_modules():
    graph = project_imports()
    state: dict[str, str] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if target == module or target.startswith(module + "."):
                continue  # a package importing its own submodules is no cycle
            if state.get(target) == "open":
                cycles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, f"import cycles: {cycles}"


def test_the_ray_adapter_is_the_only_trainable_module_importing_ray():
    importers = []
    for path in (ROOT / "trainable").rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
        names += [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module]
        if any(name == "ray" or name.startswith("ray.") for name in names):
            importers.append(path.name)
    assert importers == ["tune_trainable.py"]


def test_the_import_checker_sees_a_cycle(tmp_path, monkeypatch):
    """The checks above can fail: a planted back edge from common into analysis is reported."""
    for package in LAYERS:
        (tmp_path / package).mkdir()
    (tmp_path / "common" / "planted.py").write_text("from analysis import pareto\n")
    (tmp_path / "analysis" / "pareto.py").write_text("from common import planted\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    with pytest.raises(AssertionError, match="common.planted -> analysis.pareto"):
        test_packages_import_one_way()
    with pytest.raises(AssertionError, match="import cycles"):
        test_no_import_cycle_between_modules()


def config_keys(cls: type, prefix: str = "") -> set[str]:
    """Dotted keys of a config dataclass (dict-valued keys count as one key)."""
    keys = set()
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kind = hints[field.name]
        if dataclasses.is_dataclass(kind):
            keys |= config_keys(kind, f"{prefix}{field.name}.")
        else:
            keys.add(f"{prefix}{field.name}")
    return keys


def documented_keys() -> set[str]:
    """Keys named in README's "Config keys" table: `key`, `a.{b,c}`, and per-group rows (`data` | `source`, ...)."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Config keys", 1)[1].split("\n## ", 1)[0]
    keys = set()
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 2 or set(cells[0]) <= {"-", " "}:
            continue
        group = re.fullmatch(r"`(\w+)`", cells[0])
        for token in re.findall(r"`([^`]+)`", cells[1]):
            token = token.split(" ")[0]
            braces = re.fullmatch(r"([\w.]+)\.\{([\w,]+)\}", token)
            names = [f"{braces[1]}.{part}" for part in braces[2].split(",")] if braces else [token]
            keys |= {f"{group[1]}.{name}" if group else name for name in names}
    return keys


@pytest.mark.parametrize("schema", [SweepConfig, AnalysisConfig])
def test_every_config_key_is_documented_in_readme(schema):
    missing = sorted(config_keys(schema) - documented_keys())
    assert not missing, f"config keys missing from README's 'Config keys' table: {missing}"
