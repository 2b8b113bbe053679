"""YAML search spaces, validated against the composed config before Ray starts.

A space is a YAML file in this package (``available_spaces()``) or any path. Schema::

    description: "one line"       # optional
    searcher: optuna              # optuna (default) | grid
    fixed:                        # optional: overrides applied to every trial (dotted config keys)
      train.epochs: 6
    params:                       # evaluated in file order
      kd.T:            {type: uniform, low: 1.0, high: 8.0}
      train.lr:        {type: loguniform, low: 1.0e-3, high: 1.0e-2}
      pruning.mode:    {type: categorical, choices: [none, single, progressive]}
      pruning.steps:   {type: int, low: 2, high: 4, when: {pruning.mode: progressive}}
      kd.enabled:      {type: fixed, value: true}
      seed:            {type: grid, values: [0, 1]}          # searcher: grid only

Parameter types and their fields:

* ``uniform`` / ``loguniform``: ``low`` < ``high`` (numbers; loguniform needs ``low`` > 0).
  Write floats with a dot (``1.0e-3``): YAML reads ``1e-3`` as a string.
* ``int``: integer ``low`` < ``high``, both inclusive.
* ``categorical``: non-empty ``choices`` of null/bool/int/float/str (Optuna's constraint).
* ``fixed``: one ``value``; a pinned dimension that later ``when`` clauses may test.
* ``grid``: non-empty ``values``; only in ``searcher: grid`` spaces, which expand to every
  combination of their grid params (repeat runs: add a ``seed`` grid param).

Any parameter may carry ``when: {key: value}`` or ``when: {key: [v1, v2]}`` (several keys:
all must hold). The tested key must be a categorical/fixed/grid param defined earlier in the
file and the values must be among its choices; an inactive parameter is simply absent
from the trial config, so the trainable's default applies.

Validation (``SpaceError``, a ValueError naming the file and the key): unknown space or
top-level field, bad ``searcher``, unknown ``type`` or field, a key not in the composed
config, bounds (low >= high, loguniform low <= 0, non-integer int bounds), empty choices,
a categorical/grid/fixed value the code does not accept, a ``when`` on an unknown or
later key, duplicate YAML keys.

Trial configs are flat dicts keyed by the dotted config keys (``{"kd.T": 3.1, ...}``);
Ray's ``unflatten_dict`` splits on "/" only, so they reach the trainable flat.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol

import yaml

SPACES_DIR = Path(__file__).resolve().parent
SEARCHERS = ("optuna", "grid")
TOP_LEVEL_FIELDS = ("description", "searcher", "fixed", "params")
PARAM_FIELDS: dict[str, tuple[str, ...]] = {
    "uniform": ("low", "high"),
    "loguniform": ("low", "high"),
    "int": ("low", "high"),
    "categorical": ("choices",),
    "fixed": ("value",),
    "grid": ("values",),
}
FINITE_TYPES = ("categorical", "fixed", "grid")  # types whose possible values are listed
SEARCHER_TYPES = {
    "optuna": ("uniform", "loguniform", "int", "categorical", "fixed"),
    "grid": ("grid", "fixed"),
}


class SpaceError(ValueError):
    """A search-space file that cannot be run; the message names the file and the key."""


class SuggestingTrial(Protocol):
    """What ``define_by_run`` needs: an Optuna trial, or Ray's wrapper around one."""

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float: ...

    def suggest_int(self, name: str, low: int, high: int) -> int: ...

    def suggest_categorical(self, name: str, choices: Any) -> Any: ...


@dataclass(frozen=True)
class Param:
    """One searched key. ``values`` lists the possible values of categorical/fixed/grid params."""

    key: str
    type: str
    low: Optional[float] = None
    high: Optional[float] = None
    values: tuple[Any, ...] = ()
    when: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)

    def is_active(self, config: Mapping[str, Any]) -> bool:
        return all(key in config and config[key] in allowed for key, allowed in self.when.items())

    def suggest(self, trial: SuggestingTrial) -> Any:
        if self.type in ("uniform", "loguniform"):
            return trial.suggest_float(self.key, self.low, self.high, log=self.type == "loguniform")
        if self.type == "int":
            return trial.suggest_int(self.key, self.low, self.high)
        if self.type == "categorical":
            return trial.suggest_categorical(self.key, list(self.values))
        if self.type == "fixed":
            return self.values[0]
        raise SpaceError(f"{self.key}: {self.type!r} params are expanded by grid(), not sampled")


@dataclass(frozen=True)
class SearchSpace:
    name: str
    path: Path
    searcher: str
    description: str
    fixed: Mapping[str, Any]
    params: Mapping[str, Param]

    def keys(self) -> list[str]:
        """Every config key a trial of this space may set (fixed first, then params in file order)."""
        return [*self.fixed, *self.params]

    def define_by_run(self, trial: SuggestingTrial) -> dict[str, Any]:
        """Sample one trial config; pass as ``OptunaSearch(space=space.define_by_run)``.

        Sampled values go through ``trial.suggest_*`` (so Optuna learns from them) in file
        order, skipping params whose ``when`` does not hold. The full config (sampled +
        fixed) is returned; Ray merges it over the captured suggestions, which agree.
        """
        self._require_searcher("optuna", "define_by_run()")
        config = dict(self.fixed)
        for param in self.params.values():
            if param.is_active(config):
                config[param.key] = param.suggest(trial)
        return config

    def grid(self) -> list[dict[str, Any]]:
        """Every combination of the grid params (honouring ``when``), each merged with ``fixed``."""
        self._require_searcher("grid", "grid()")
        configs: list[dict[str, Any]] = [dict(self.fixed)]
        for param in self.params.values():
            expanded: list[dict[str, Any]] = []
            for config in configs:
                if param.is_active(config):
                    expanded.extend({**config, param.key: value} for value in param.values)
                else:
                    expanded.append(config)
            configs = expanded
        return configs

    def _require_searcher(self, searcher: str, method: str) -> None:
        if self.searcher != searcher:
            raise SpaceError(f"{self.path}: {method} needs a 'searcher: {searcher}' space, this one is '{self.searcher}'")


def available_spaces() -> list[str]:
    """Names of the spaces shipped in this package."""
    return sorted(path.stem for path in SPACES_DIR.glob("*.yaml"))


def load_space(
    name_or_path: str,
    valid_keys: Mapping[str, Any],
    accepted_values: Optional[Mapping[str, Collection[Any]]] = None,
) -> SearchSpace:
    """Load and validate a space.

    ``valid_keys`` is the flattened composed config (dotted key -> default); ``accepted_values``
    maps keys to the categorical values the code accepts (e.g. ``pruning.mode``).
    """
    path = _resolve(name_or_path)
    document = _read_yaml(path)
    checker = _Checker(path, valid_keys, accepted_values or {})
    return checker.space(document)


def _resolve(name_or_path: str) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or len(candidate.parts) > 1:
        if not candidate.is_file():
            raise SpaceError(f"{candidate}: no such search-space file")
        return candidate
    path = SPACES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise SpaceError(
            f"unknown search space {name_or_path!r}; available: {', '.join(available_spaces())} "
            "(or pass a path to a .yaml file)"
        )
    return path


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe loader that rejects duplicate keys, which plain YAML silently overwrites."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _read_yaml(path: Path) -> Mapping[str, Any]:
    try:
        document = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as error:
        raise SpaceError(f"{path}: invalid YAML: {error}") from error
    if not isinstance(document, Mapping):
        raise SpaceError(f"{path}: expected a mapping with {', '.join(TOP_LEVEL_FIELDS)}")
    return document


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class _Checker:
    """Turns a parsed YAML document into a SearchSpace, failing on the first problem."""

    def __init__(self, path: Path, valid_keys: Mapping[str, Any], accepted_values: Mapping[str, Collection[Any]]):
        self.path = path
        self.valid_keys = valid_keys
        self.accepted_values = accepted_values

    def fail(self, key: str, problem: str) -> SpaceError:
        return SpaceError(f"{self.path}: {key}: {problem}")

    def space(self, document: Mapping[str, Any]) -> SearchSpace:
        unknown = [name for name in document if name not in TOP_LEVEL_FIELDS]
        if unknown:
            raise self.fail(str(unknown[0]), f"unknown top-level field; allowed: {', '.join(TOP_LEVEL_FIELDS)}")
        searcher = document.get("searcher", "optuna")
        if searcher not in SEARCHERS:
            raise self.fail("searcher", f"{searcher!r} is not one of {', '.join(SEARCHERS)}")
        description = document.get("description", "")
        if not isinstance(description, str):
            raise self.fail("description", "must be a string")
        fixed = self.fixed(self.mapping(document.get("fixed") or {}, "fixed"))
        if "params" not in document:
            raise self.fail("params", "missing; list the searched keys under params:")
        params: dict[str, Param] = {}
        for key, spec in self.mapping(document["params"] or {}, "params").items():
            if key in fixed:
                raise self.fail(key, "set both under fixed: and params:; keep one")
            param = self.param(key, spec, params)
            if param.type not in SEARCHER_TYPES[searcher]:
                raise self.fail(
                    key, f"type {param.type!r} cannot be used with searcher {searcher!r} "
                    f"(allowed: {', '.join(SEARCHER_TYPES[searcher])})"
                )
            params[key] = param
        return SearchSpace(self.path.stem, self.path, searcher, description, fixed, params)

    def mapping(self, value: Any, name: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(name, f"must be a mapping of dotted config keys, got {type(value).__name__}")
        for key in value:
            if not isinstance(key, str):
                raise self.fail(str(key), f"keys under {name}: must be dotted config keys (strings)")
        return value

    def known_key(self, key: str) -> None:
        if key not in self.valid_keys:
            close = [valid for valid in self.valid_keys if valid.split(".")[-1] == key.split(".")[-1]]
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise self.fail(key, f"not a key of the composed config{hint}")

    def accepted(self, key: str, value: Any) -> None:
        accepted = self.accepted_values.get(key)
        if accepted is not None and not any(value == option for option in accepted):
            raise self.fail(key, f"value {value!r} is not accepted; accepted: {sorted(accepted, key=str)}")

    def fixed(self, section: Mapping[str, Any]) -> dict[str, Any]:
        for key, value in section.items():
            self.known_key(key)
            self.accepted(key, value)
        return dict(section)

    def param(self, key: str, spec: Any, earlier: Mapping[str, Param]) -> Param:
        if not isinstance(spec, Mapping) or "type" not in spec:
            raise self.fail(key, "expected a mapping with a 'type', e.g. {type: uniform, low: 0.1, high: 1.0}")
        param_type = spec["type"]
        if param_type not in PARAM_FIELDS:
            raise self.fail(key, f"unknown type {param_type!r}; use one of {', '.join(PARAM_FIELDS)}")
        self.known_key(key)
        expected = PARAM_FIELDS[param_type]
        unknown = [name for name in spec if name not in (*expected, "type", "when")]
        if unknown:
            raise self.fail(key, f"unknown field {unknown[0]!r} for type {param_type}; fields: {', '.join(expected)}")
        missing = [name for name in expected if name not in spec]
        if missing:
            raise self.fail(key, f"type {param_type} needs {', '.join(missing)}")
        when = self.when(key, spec.get("when") or {}, earlier)
        if param_type in FINITE_TYPES:
            return Param(key, param_type, values=self.values(key, param_type, spec), when=when)
        low, high = self.bounds(key, param_type, spec["low"], spec["high"])
        return Param(key, param_type, low=low, high=high, when=when)

    def bounds(self, key: str, param_type: str, low: Any, high: Any) -> tuple[float, float]:
        for name, bound in (("low", low), ("high", high)):
            if param_type == "int" and not (isinstance(bound, int) and not isinstance(bound, bool)):
                raise self.fail(key, f"int {name} must be an integer, got {bound!r}")
            if not _is_number(bound):
                raise self.fail(key, f"{name} must be a finite number, got {bound!r} (YAML floats need a dot: 1.0e-3)")
        if low >= high:
            raise self.fail(key, f"low ({low}) must be < high ({high}); use type: fixed for a constant")
        if param_type == "loguniform" and low <= 0:
            raise self.fail(key, f"loguniform low must be > 0, got {low}")
        return low, high

    def values(self, key: str, param_type: str, spec: Mapping[str, Any]) -> tuple[Any, ...]:
        if param_type == "fixed":
            values = (spec["value"],)
        else:
            listed = spec["choices" if param_type == "categorical" else "values"]
            if not isinstance(listed, list) or not listed:
                raise self.fail(key, f"{param_type} needs a non-empty list of values")
            values = tuple(listed)
        if param_type == "categorical":
            for value in values:
                if not (value is None or isinstance(value, (bool, int, float, str))):
                    raise self.fail(key, f"categorical choices must be null/bool/int/float/str, got {value!r}")
        for value in values:
            self.accepted(key, value)
        return values

    def when(self, key: str, condition: Any, earlier: Mapping[str, Param]) -> dict[str, tuple[Any, ...]]:
        if not isinstance(condition, Mapping):
            raise self.fail(key, "when must be a mapping {earlier_key: value or [values]}")
        parsed: dict[str, tuple[Any, ...]] = {}
        for tested_key, allowed in condition.items():
            tested = earlier.get(tested_key)
            if tested is None:
                raise self.fail(
                    key, f"when tests {tested_key!r}, which is not a param defined earlier in the file"
                )
            if tested.type not in FINITE_TYPES:
                raise self.fail(key, f"when can only test categorical/fixed/grid params; {tested_key} is {tested.type}")
            allowed = tuple(allowed) if isinstance(allowed, list) else (allowed,)
            impossible = [value for value in allowed if value not in tested.values]
            if not allowed or impossible:
                raise self.fail(
                    key, f"when {tested_key} in {list(allowed)}: {tested_key} only takes {list(tested.values)}"
                )
            parsed[tested_key] = allowed
        return parsed
