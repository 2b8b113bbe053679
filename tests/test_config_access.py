"""Config is read through one typed path: no default restated in code, no conf/ file read by hand.

After the command line, every config dict holds every key with its schema default (Hydra over the dataclasses of
common/config.py; saved configs upgraded by `upgrade_saved_config`; trials from `trial_config` over RunConfig). So
library code reads `cfg["key"]`: a `cfg.get("key", default)` restates (or contradicts) the schema's default, and a
`cfg.get("key")` hides a key that should be there. Scenarios are Hydra config groups, composed by Hydra, never a
conf/*.yaml loaded by hand.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import typing
from collections.abc import Iterator
from pathlib import Path

from common.config import AnalysisConfig, RunConfig, SweepConfig

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "data_prep", "trainable", "search_spaces", "sweeps", "analysis")
# A receiver that holds a config (section): its name, or a name or string key along its chain, says so.
CONFIG_NAME = re.compile(r"cfg|config|settings|sweep|spec", re.IGNORECASE)
# The functions whose job is reading a config as an earlier version saved it (keys missing or renamed):
# the one place an old config's gaps are filled, with the schema's defaults.
UPGRADERS = re.compile(r"upgrade_saved_\w+")


def config_fields() -> set[str]:
    """Every field name of the config sections: the top-level configs and their nested dataclasses, recursively."""
    names: set[str] = set()
    seen: set[type] = set()

    def walk(cls: type) -> None:
        if cls in seen:
            return
        seen.add(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            names.add(f.name)
            for kind in (hints[f.name], *typing.get_args(hints[f.name])):
                if isinstance(kind, type) and dataclasses.is_dataclass(kind):
                    walk(kind)

    for cls in (RunConfig, SweepConfig, AnalysisConfig):
        walk(cls)
    return names


def receiver_names(node: ast.expr) -> list[str]:
    """The names along a receiver's chain: `sweep["scheduler"]` -> [sweep, scheduler], `a.settings` -> [a,
    settings], `self.config["x"]` -> [self, config, x]. Calls end the chain (their result is no named config)."""
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.Attribute):
        return [*receiver_names(node.value), node.attr]
    if isinstance(node, ast.Subscript):
        key = node.slice
        own = [key.value] if isinstance(key, ast.Constant) and isinstance(key.value, str) else []
        return [*receiver_names(node.value), *own]
    return []


def python_files() -> Iterator[Path]:
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))


def functions_by_line(tree: ast.AST) -> dict[int, str]:
    """line -> the innermost function defined around it (ast.walk visits outer functions first)."""
    out: dict[int, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out |= dict.fromkeys(range(node.lineno, (node.end_lineno or node.lineno) + 1), node.name)
    return out


def shown(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def config_gets(path: Path, fields: set[str]) -> list[str]:
    """`<config>.get("<field>"[, default])` calls in one file, as 'path:line: source'."""
    source = path.read_text()
    tree = ast.parse(source, str(path))
    enclosing = functions_by_line(tree)
    hits = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                and 1 <= len(node.args) <= 2 and not node.keywords):
            continue
        key = node.args[0]
        if not (isinstance(key, ast.Constant) and isinstance(key.value, str) and key.value in fields):
            continue
        if not any(CONFIG_NAME.search(name) for name in receiver_names(node.func.value)):
            continue
        if UPGRADERS.fullmatch(enclosing.get(node.lineno, "")) and path == ROOT / "common" / "config.py":
            continue
        hits.append((node.lineno, node.col_offset, ast.get_source_segment(source, node)))
    return [f"{shown(path)}:{line}: {text}" for line, _, text in sorted(hits)]


def test_config_gets_finds_what_it_should_and_nothing_else(tmp_path):
    """The scan itself: config receivers with field keys are hits; metric dicts and non-field keys are not."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "def f(config, sweep, data_cfg, result, metrics, row, spec):\n"
        "    config.get('device', 'auto')\n"                   # 2: hit
        "    sweep['scheduler'].get('metric')\n"               # 3: hit (subscript of a config)
        "    data_cfg.get('variants', 0)\n"                    # 4: hit
        "    sweep.settings.get('scheduler')\n"                # 5: hit
        "    spec.get('dropout', 0.2)\n"                       # 6: hit
        "    result.get('epoch')\n"                            # 7: metric dict
        "    metrics.get('val_acc', 0)\n"                      # 8: metric dict
        "    row.get('seed')\n"                                # 9: a table row
        "    config.get('not_a_config_key', 1)\n"              # 10: no config field
        "    config['train']['epochs']\n")                     # 11: how it is read
    hits = config_gets(sample, config_fields())
    assert [int(hit.split(":")[1]) for hit in hits] == [2, 3, 4, 5, 6], hits


def test_config_is_read_without_restated_defaults():
    fields = config_fields()
    hits = [hit for path in python_files() for hit in config_gets(path, fields)]
    assert not hits, ("config keys read with .get() (every key is present with its schema default after the CLI, "
                      "upgrade_saved_config and trial_config: read cfg['key']):\n" + "\n".join(hits))


def scopes(tree: ast.Module) -> Iterator[list[ast.AST]]:
    """The nodes of each scope: the module's own statements, then each function's body (nested ones included)."""
    defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    yield [n for stmt in tree.body if not isinstance(stmt, defs) for n in ast.walk(stmt)]
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield [n for stmt in node.body for n in ast.walk(stmt)]


def is_yaml_load(node: ast.AST) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("load", "safe_load") and isinstance(node.func.value, ast.Name)
            and node.func.value.id in ("OmegaConf", "yaml"))


def names_conf(node: ast.AST) -> bool:
    """CONF_DIR, or a string that is (or has) a conf/ path segment."""
    return (isinstance(node, ast.Name) and node.id == "CONF_DIR") or (
        isinstance(node, ast.Constant) and isinstance(node.value, str)
        and re.search(r"(^|/)conf(/|$)", node.value) is not None)


def test_no_conf_file_is_loaded_by_hand():
    """Scenarios and every other conf/ file come through Hydra's composition (common.cli.compose), not a YAML load
    next to it: a scope that loads YAML must not be one that builds a conf/ path."""
    loads = []
    for path in python_files():
        for nodes in scopes(ast.parse(path.read_text(), str(path))):
            if any(names_conf(n) for n in nodes):
                loads += [f"{shown(path)}:{n.lineno}" for n in nodes if is_yaml_load(n)]
    assert not loads, f"conf/ files loaded by hand instead of composed by Hydra (common.cli.compose): {sorted(loads)}"
