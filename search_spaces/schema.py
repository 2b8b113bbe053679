"""YAML search spaces, validated against the composed config before Ray starts.

A space is a YAML file in this package (``available_spaces()``) or any path::

    description: "one line"   # optional
    searcher: optuna          # optuna (default) | grid
    params:                   # dotted config keys, in file order
      train.epochs: 10                                   # a plain value pins the key in every trial
      kd.T:          {type: float, low: 1.0, high: 8.0}  # optional: log: true, or step: 0.5
      train.lr:      {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
      pruning.mode:  {type: categorical, choices: [none, single, progressive]}
      pruning.steps: {type: int, low: 2, high: 4, when: {pruning.mode: progressive}}
      train.seed:    {type: grid, values: [0, 1]}        # searcher: grid spaces only (pins + grid params)

float/int/categorical are Optuna's Float/Int/CategoricalDistribution (built at load time, so
Optuna's checks apply) and are sampled with ``trial.suggest_*``; grid spaces expand to every
combination. ``when: {key: value or [values]}`` (several keys: all must hold) tests a pin or a
categorical/grid param earlier in the file; an inactive param is left out of the trial config.
Problems are ``SpaceError``s naming the file and the key. Trial configs are flat dicts keyed by
the dotted config keys (``{"kd.T": 3.1, ...}``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf, errors
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

SPACES_DIR = Path(__file__).resolve().parent
TOP_LEVEL_FIELDS = ("description", "searcher", "params")
DISTRIBUTIONS = {"float": FloatDistribution, "int": IntDistribution, "categorical": CategoricalDistribution}
FIELDS = {
    "float": ("low", "high", "log", "step"),
    "int": ("low", "high", "log", "step"),
    "categorical": ("choices",),
    "grid": ("values",),
}
SEARCHER_TYPES = {"optuna": ("float", "int", "categorical"), "grid": ("grid",)}


class SpaceError(ValueError):
    """A search-space file that cannot be run; the message names the file and the key."""


@dataclass(frozen=True)
class Param:
    """A searched key: ``type``, its Optuna ``distribution`` (None for grid), ``values`` (choices or grid values)."""

    key: str
    type: str
    distribution: BaseDistribution | None
    values: tuple[Any, ...] = ()
    when: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)

    def is_active(self, config: Mapping[str, Any]) -> bool:
        return all(key in config and config[key] in allowed for key, allowed in self.when.items())

    def suggest(self, trial: Any) -> Any:
        """``trial.suggest_<type>`` with the distribution's fields (low, high, log, step or choices)."""
        fields = {name: getattr(self.distribution, name) for name in FIELDS[self.type]}
        return getattr(trial, f"suggest_{self.type}")(self.key, **fields)


@dataclass(frozen=True)
class SearchSpace:
    name: str
    path: Path
    searcher: str
    description: str
    pinned: Mapping[str, Any]
    params: Mapping[str, Param]

    def keys(self) -> list[str]:
        """Every config key a trial of this space may set (pins first, then params in file order)."""
        return [*self.pinned, *self.params]

    def possible_values(self, key: str) -> tuple[Any, ...] | None:
        """The finite values ``key`` takes when set (pin, choices, grid values); None if not finite or absent."""
        return (self.pinned[key],) if key in self.pinned else (getattr(self.params.get(key), "values", ()) or None)

    def define_by_run(self, trial: Any) -> dict[str, Any]:
        """Pins + one sample through ``trial.suggest_*``: ``OptunaSearch(space=space.define_by_run)``."""
        self._require_searcher("optuna", "define_by_run()")
        config = dict(self.pinned)
        for param in self.params.values():
            if param.is_active(config):
                config[param.key] = param.suggest(trial)
        return config

    def grid(self) -> list[dict[str, Any]]:
        """Every combination of the grid params (honouring ``when``), each merged with the pins."""
        self._require_searcher("grid", "grid()")
        configs: list[dict[str, Any]] = [dict(self.pinned)]
        for param in self.params.values():
            configs = [
                grown
                for config in configs
                for grown in ([{**config, param.key: v} for v in param.values] if param.is_active(config) else [config])
            ]
        return configs

    def _require_searcher(self, searcher: str, method: str) -> None:
        if self.searcher != searcher:
            raise SpaceError(f"{self.path}: {method} needs a 'searcher: {searcher}' space, not '{self.searcher}'")


def available_spaces() -> list[str]:
    """Names of the spaces shipped in this package."""
    return sorted(path.stem for path in SPACES_DIR.glob("*.yaml"))


def load_space(
    name_or_path: str, valid_keys: Mapping[str, Any], accepted_values: Mapping[str, Collection[Any]] | None = None
) -> SearchSpace:
    """Load and validate a space against the flattened composed config (dotted key -> default) and
    the values the code accepts for some keys (e.g. ``pruning.mode``)."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml") and len(path.parts) == 1:
        path = SPACES_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise SpaceError(
                f"unknown search space {name_or_path!r}; available: {', '.join(available_spaces())} "
                "(or pass a path to a .yaml file)"
            )
    elif not path.is_file():
        raise SpaceError(f"{path}: no such search-space file")
    try:  # OmegaConf's loader rejects duplicate keys and reads 1e-3 as a float (plain YAML 1.1: a string)
        document = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except (yaml.YAMLError, errors.OmegaConfBaseException) as error:
        raise SpaceError(f"{path}: invalid YAML: {' '.join(str(error).split())}") from error  # one line

    def fail(key: Any, problem: str) -> SpaceError:
        return SpaceError(f"{path}: {key}: {problem}")

    def check_accepted(key: str, values: list[Any]) -> None:
        accepted = (accepted_values or {}).get(key)
        for value in values if accepted is not None else ():
            if not any(value == option for option in accepted):
                raise fail(key, f"value {value!r} is not accepted; accepted: {sorted(accepted, key=str)}")

    if not isinstance(document, dict) or not isinstance(document.get("params"), dict):
        raise fail("params", "missing or not a mapping; list the dotted config keys under params:")
    unknown = [name for name in document if name not in TOP_LEVEL_FIELDS]
    if unknown:
        raise fail(unknown[0], f"unknown top-level field; allowed: {', '.join(TOP_LEVEL_FIELDS)}")
    searcher = document.get("searcher", "optuna")
    if searcher not in list(SEARCHER_TYPES):
        raise fail("searcher", f"{searcher!r} is not one of {', '.join(SEARCHER_TYPES)}")
    pinned: dict[str, Any] = {}
    params: dict[str, Param] = {}
    for key, spec in document["params"].items():
        if key not in valid_keys:
            close = [valid for valid in valid_keys if valid.split(".")[-1] == str(key).split(".")[-1]]
            raise fail(key, "not a key of the composed config" + (f"; did you mean {', '.join(close)}?" * bool(close)))
        if not isinstance(spec, dict):
            check_accepted(key, [spec])
            pinned[key] = spec
            continue
        kind = spec.get("type")
        if kind not in SEARCHER_TYPES[searcher]:
            raise fail(
                key,
                f"{'type' if str(kind) in FIELDS else 'unknown type'} {kind!r} cannot be used with "
                f"searcher {searcher!r}; use {', '.join(SEARCHER_TYPES[searcher])}, or a plain value "
                "to pin the key",
            )
        unknown = [name for name in spec if name not in (*FIELDS[kind], "type", "when")]
        missing = [name for name in FIELDS[kind] if name not in (*spec, "log", "step")]
        if unknown or missing:
            raise fail(
                key,
                f"unknown field {unknown[0]!r} for type {kind}; fields: {', '.join(FIELDS[kind])}"
                if unknown
                else f"type {kind} needs {', '.join(missing)}",
            )
        kwargs = {name: spec[name] for name in FIELDS[kind] if name in spec}
        number = int if kind == "int" else (int, float)
        for name in ("low", "high", "step"):
            bound = kwargs.get(name, 1)
            if isinstance(bound, bool) or not isinstance(bound, number) or not math.isfinite(bound):
                raise fail(key, f"{name} must be a finite {'integer' if kind == 'int' else 'number'}, got {bound!r}")
        values = kwargs.get("choices", kwargs.get("values", []))
        if kind in ("categorical", "grid") and (not isinstance(values, list) or not values):
            raise fail(key, f"{kind} needs a non-empty list of values")
        check_accepted(key, values)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # Optuna only warns about choices it cannot store
                distribution = DISTRIBUTIONS[kind](**kwargs) if kind in DISTRIBUTIONS else None
        except (ValueError, TypeError, Warning) as error:
            raise fail(key, f"{error}") from error
        if not isinstance(spec.get("when") or {}, dict):
            raise fail(key, "when must be a mapping {earlier_key: value or [values]}")
        when = {
            tested: tuple(allowed) if isinstance(allowed, list) else (allowed,)
            for tested, allowed in (spec.get("when") or {}).items()
        }
        for tested, allowed in when.items():
            possible = (pinned[tested],) if tested in pinned else params[tested].values if tested in params else ()
            if not possible:
                raise fail(key, f"when tests {tested!r}, not a pin or categorical/grid param earlier in the file")
            if not allowed or any(value not in possible for value in allowed):
                raise fail(key, f"when {tested} in {list(allowed)}: {tested} only takes {list(possible)}")
        params[key] = Param(key, kind, distribution, tuple(values), when)
    return SearchSpace(path.stem, path, searcher, str(document.get("description", "")), pinned, params)
