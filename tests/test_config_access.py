"""Config is read through one typed path: no default restated in code, no conf/ file read by hand.

After the command line, every config dict holds every key with its schema default (Hydra over the dataclasses of
common/config.py; saved configs upgraded by `upgrade_saved_config`; trials from `trial_config` over RunConfig). So
library code reads `cfg["key"]`: a `cfg.get("key", default)` restates (or contradicts) the schema's default, and a
`cfg.get("key")` hides a key that should be there. Scenarios are Hydra config groups, composed by Hydra, never a
conf/*.yaml loaded by hand. Nor does a function restate a default in its signature: a parameter named like a
config field with that field's default would hand a caller that forgets the config value a copy of the schema's.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import re
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import common.config
from common.config import AnalysisConfig, RunConfig, SweepConfig

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "data_prep", "trainable", "search_spaces", "sweeps", "analysis")
# A receiver that holds a config (section): its name, or a name or string key along its chain, says so.
CONFIG_NAME = re.compile(r"cfg|config|settings|sweep|spec", re.IGNORECASE)
# The functions whose job is reading a config as an earlier version saved it (keys missing or renamed):
# the one place an old config's gaps are filled, with the schema's defaults.
UPGRADERS = re.compile(r"upgrade_saved_\w+")


def schema_fields() -> dict[str, dataclasses.Field]:
    """Dotted key -> its field, for every field of the top-level configs and their nested sections, recursively
    (a section's own field too: `scheduler`, `scheduler.metric`)."""
    out: dict[str, dataclasses.Field] = {}

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out[prefix + f.name] = f
            for kind in (hints[f.name], *typing.get_args(hints[f.name])):
                if isinstance(kind, type) and dataclasses.is_dataclass(kind):
                    walk(kind, f"{prefix}{f.name}.")

    for cls in (RunConfig, SweepConfig, AnalysisConfig):
        walk(cls, "")
    return out


def config_fields() -> set[str]:
    """Every field name of the config sections: the top-level configs and their nested dataclasses, recursively."""
    return {key.rpartition(".")[2] for key in schema_fields()}


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
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get"
            and 1 <= len(node.args) <= 2
            and not node.keywords
        ):
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
        "    config.get('device', 'auto')\n"  # 2: hit
        "    sweep['scheduler'].get('metric')\n"  # 3: hit (subscript of a config)
        "    data_cfg.get('variants', 0)\n"  # 4: hit
        "    sweep.settings.get('scheduler')\n"  # 5: hit
        "    spec.get('dropout', 0.2)\n"  # 6: hit
        "    result.get('epoch')\n"  # 7: metric dict
        "    metrics.get('val_acc', 0)\n"  # 8: metric dict
        "    row.get('seed')\n"  # 9: a table row
        "    config.get('not_a_config_key', 1)\n"  # 10: no config field
        "    config['train']['epochs']\n"
    )  # 11: how it is read
    hits = config_gets(sample, config_fields())
    assert [int(hit.split(":")[1]) for hit in hits] == [2, 3, 4, 5, 6], hits


def test_config_is_read_without_restated_defaults():
    fields = config_fields()
    hits = [hit for path in python_files() for hit in config_gets(path, fields)]
    assert not hits, (
        "config keys read with .get() (every key is present with its schema default after the CLI, "
        "upgrade_saved_config and trial_config: read cfg['key']):\n" + "\n".join(hits)
    )


def scopes(tree: ast.Module) -> Iterator[list[ast.AST]]:
    """The nodes of each scope: the module's own statements, then each function's body (nested ones included)."""
    defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    yield [n for stmt in tree.body if not isinstance(stmt, defs) for n in ast.walk(stmt)]
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield [n for stmt in node.body for n in ast.walk(stmt)]


def is_yaml_load(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in ("load", "safe_load")
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id in ("OmegaConf", "yaml")
    )


def names_conf(node: ast.AST) -> bool:
    """CONF_DIR, or a string that is (or has) a conf/ path segment."""
    return (isinstance(node, ast.Name) and node.id == "CONF_DIR") or (
        isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and re.search(r"(^|/)conf(/|$)", node.value) is not None
    )


def test_no_conf_file_is_loaded_by_hand():
    """Scenarios and every other conf/ file come through Hydra's composition (common.cli.compose), not a YAML load
    next to it: a scope that loads YAML must not be one that builds a conf/ path."""
    loads = []
    for path in python_files():
        for nodes in scopes(ast.parse(path.read_text(), str(path))):
            if any(names_conf(n) for n in nodes):
                loads += [f"{shown(path)}:{n.lineno}" for n in nodes if is_yaml_load(n)]
    assert not loads, f"conf/ files loaded by hand instead of composed by Hydra (common.cli.compose): {sorted(loads)}"


def schema_default(f: dataclasses.Field) -> Any:
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return value.value if isinstance(value, enum.Enum) else value


def schema_defaults() -> dict[str, dict[str, Any]]:
    """Parameter name -> {dotted key: schema default} of the leaf fields it would stand for: a field's own name
    (`alpha`: kd.alpha; `seed`: seed, data.seed, train.seed) and its section-qualified one (`kd_alpha`,
    `search_objective`)."""
    out: dict[str, dict[str, Any]] = {}
    for key, f in schema_fields().items():
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            continue
        value = schema_default(f)
        if dataclasses.is_dataclass(value):
            continue  # a section: its fields are listed themselves
        parts = key.split(".")
        for name in {parts[-1], "_".join(parts[-2:])}:
            out.setdefault(name, {})[key] = value
    return out


def same_value(a: Any, b: Any) -> bool:
    """Equal, and both or neither a bool (an int 1 does not restate a true)."""
    return isinstance(a, bool) == isinstance(b, bool) and a == b


def module_constants(path: Path, follow_imports: bool = True) -> dict[str, Any]:
    """Module-level `NAME = <literal>` of a file, and those it imports by name from a project module."""
    tree = ast.parse(path.read_text(), str(path))
    out: dict[str, Any] = {}
    for stmt in tree.body:
        target = (
            stmt.targets[0]
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
            else stmt.target
            if isinstance(stmt, ast.AnnAssign) and stmt.value is not None
            else None
        )
        if isinstance(target, ast.Name):
            try:
                out[target.id] = ast.literal_eval(stmt.value)
            except ValueError:
                pass
        elif follow_imports and isinstance(stmt, ast.ImportFrom) and stmt.module and stmt.level == 0:
            source = ROOT / (stmt.module.replace(".", "/") + ".py")
            if source.is_file():
                theirs = module_constants(source, follow_imports=False)
                out |= {(a.asname or a.name): theirs[a.name] for a in stmt.names if a.name in theirs}
    return out


_NOT_A_VALUE = object()


def default_value(node: ast.expr, constants: dict[str, Any]) -> Any:
    """The value a default expression stands for: a literal, a module constant, or a member of a common/config.py
    enum (`Importance.l1` -> "l1"); _NOT_A_VALUE for anything computed."""
    try:
        return ast.literal_eval(node)
    except ValueError:
        pass
    if isinstance(node, ast.Name):
        return constants.get(node.id, _NOT_A_VALUE)
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        choices = getattr(common.config, node.value.id, None)
        if isinstance(choices, type) and issubclass(choices, enum.Enum) and node.attr in choices.__members__:
            return choices[node.attr].value
    return _NOT_A_VALUE


def is_dataclass_def(node: ast.AST) -> bool:
    return isinstance(node, ast.ClassDef) and any(
        (d.func if isinstance(d, ast.Call) else d) is not None
        and ast.unparse(d.func if isinstance(d, ast.Call) else d).rpartition(".")[2] == "dataclass"
        for d in node.decorator_list
    )


def parameter_defaults(tree: ast.AST, with_dataclasses: bool, prefix: str = "") -> Iterator[tuple[str, str, ast.expr]]:
    """(qualified function or dataclass name, parameter, default expression) of every parameter with a default:
    functions and methods (`ParetoASHA.__init__`), and (`with_dataclasses`) the fields of dataclasses, their
    __init__'s parameters."""
    for node in ast.iter_child_nodes(tree):
        inner = prefix
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inner = f"{prefix}{node.name}."
            args = node.args
            positional = args.posonlyargs + args.args
            pairs = [
                *zip(positional[len(positional) - len(args.defaults) :], args.defaults),
                *((a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None),
            ]
            yield from ((prefix + node.name, arg.arg, default) for arg, default in pairs)
        elif isinstance(node, ast.ClassDef):
            inner = f"{prefix}{node.name}."
            if with_dataclasses and is_dataclass_def(node):
                yield from (
                    (prefix + node.name, stmt.target.id, stmt.value)
                    for stmt in node.body
                    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value
                )
        yield from parameter_defaults(node, with_dataclasses, inner)


def restated_defaults(path: Path, defaults: dict[str, dict[str, Any]]) -> list[str]:
    """Parameters in one file named like a config field whose default is that field's schema default, as
    'path:function:parameter=default restates key'."""
    tree = ast.parse(path.read_text(), str(path))
    constants = module_constants(path)
    hits = []
    schema = path == ROOT / "common" / "config.py"  # its dataclasses are the schema: their defaults are the ones
    for function, name, node in parameter_defaults(tree, with_dataclasses=not schema):
        value = default_value(node, constants)
        keys = [
            key
            for key, default in defaults.get(name, {}).items()
            if value is not _NOT_A_VALUE and same_value(value, default)
        ]
        if keys:
            hits.append(
                (node.lineno, f"{shown(path)}:{function}:{name}={ast.unparse(node)} restates {', '.join(keys)}")
            )
    return [text for _, text in sorted(hits)]


# Parameters named like a config field, with its default, that are not that field. Each says what it is instead.
NOT_CONFIG_FIELDS = {
    "common/trial_table.py:trial_row:export": "a trial's entry of analysis/export.py's manifest (None: not exported), "
    "not retrain.export",
    "trainable/loop.py:train:resume_from": "the checkpoint this call continues (Ray's restored one, a teacher's own, "
    "or trainable/train.py's config['resume_from']); None: a fresh run",
    "data_prep/gm_render.py:render_note:sample_rate": "the NSynth layout's file rate (layout.NSYNTH_SAMPLE_RATE) the "
    "wavs are rendered at, not data.sample_rate (the waveform "
    "cache's, resampled from those files)",
    "data_prep/gm_render.py:render_notes:sample_rate": "the same: the NSynth layout's file rate",
    "data_prep/sources.py:write_wav:sample_rate": "the same: the NSynth layout's file rate",
}


def test_restated_defaults_finds_what_it_should_and_nothing_else(tmp_path):
    """The scan itself: a field's name (or section_field) with its schema default is a hit, through a literal, a
    module constant or a config enum, in a def or a dataclass; another default, name or a bool/int mix-up is not."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from dataclasses import dataclass\n"
        "TEMPERATURE = 3.0\n"
        "def f(x, T=3.0, alpha=0.5, *, schedule=PruningSchedule.cubic, search_objective='multi',\n"  # 3: 3 hits
        "      metric=TEMPERATURE, seed=0, enabled=1, scale=0.7, round_to=None, device=DEVICE):\n"  # 4: 2 hits
        "    def inner(importance='l1'):\n"  # 5: f.inner
        "        pass\n"
        "@dataclass\n"
        "class Limits:\n"
        "    precision: str = 'int8'\n"  # 9: hit
        "    max_kb: float = 5.0\n"
        "class Plain:\n"
        "    precision: str = 'int8'\n"
    )  # 12: no dataclass
    hits = restated_defaults(sample, schema_defaults())
    found = {hit.split(":")[2].split("=")[0] for hit in hits}
    assert found == {"T", "schedule", "search_objective", "seed", "round_to", "importance", "precision"}, hits
    assert next(h for h in hits if ":T=" in h).endswith("restates kd.T")
    assert "restates seed, data.seed, train.seed" in next(h for h in hits if ":seed=" in h)
    assert any(h.startswith(f"{sample}:f.inner:importance=") for h in hits), hits


def test_no_parameter_restates_a_config_default():
    """A caller that forgets to pass a config value must fail, not silently run on a copy of the schema's default
    (data.variants was once read as 0 where the schema says 19). Parameters whose values come from the config take
    no default; code passes cfg["key"] and tests the value of a composed or default config (run_defaults())."""
    defaults = schema_defaults()
    hits = [hit for path in python_files() for hit in restated_defaults(path, defaults)]
    unexplained = [hit for hit in hits if hit.split("=")[0] not in NOT_CONFIG_FIELDS]
    assert not unexplained, (
        "parameters restate a config default (make them required and pass the config value; "
        "or, if one is not that config field, say what it is in NOT_CONFIG_FIELDS):\n" + "\n".join(unexplained)
    )
    stale = set(NOT_CONFIG_FIELDS) - {hit.split("=")[0] for hit in hits}
    assert not stale, f"NOT_CONFIG_FIELDS entries that match no parameter any more: {sorted(stale)}"
