"""What every Hydra entry point shares: the typed config registered, plain-dict config, logging, one-line user
errors."""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

import common.config  # noqa: F401  (registers the structured configs before Hydra composes)

log = logging.getLogger(__name__)

# Mistakes a user can fix from the message alone: no traceback, exit code 2.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, KeyError)


def compose(config_name: str | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """A config of conf/ as the command line would give it (`plain`), for code that starts a stage without a command
    line of its own: the sweep's report stage, scenario groups of grid trials, benchmarks and tests. Works inside a
    running Hydra app (its config dir is this one) and outside one. `config_name=None` composes only what the
    overrides add: `compose(None, ["+scenario=kd_single"])` is that group option as Hydra places it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return plain(hydra_compose(config_name, overrides=list(overrides)))
    with initialize_config_dir(config_dir=str(common.config.CONF_DIR), version_base="1.3"):
        return plain(hydra_compose(config_name, overrides=list(overrides)))


def plain(cfg: DictConfig) -> dict[str, Any]:
    """Resolved plain-dict config with every local path absolute (common.config.absolute_paths): picklable for
    Ray, loggable to MLflow, valid in any process's working directory, no OmegaConf in library code."""
    return common.config.absolute_paths(
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True, enum_to_str=True)
    )


# A plain token of the override grammar: what Hydra reads as an int, float or bool when it looks like one.
_PLAIN_TOKEN = re.compile(r"[\w.+\-]+")


def _split_list(text: str) -> list[str] | None:
    """The element texts of a `[a, 'b', c]` override value (commas inside quotes kept), or None if not a list."""
    text = text.strip()
    if not (text.startswith("[") and text.endswith("]")):
        return None
    pieces, current, quote = [], "", None
    for char in text[1:-1]:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == ",":
            pieces.append(current)
            current = ""
            continue
        current += char
    return pieces + [current] if pieces or current.strip() else []


def _as_typed(text: str, parsed: Any) -> Any:
    """One override value with every number or bool Hydra read replaced by the characters the user typed."""
    if isinstance(parsed, list):
        pieces = _split_list(text)
        if pieces is None or len(pieces) != len(parsed):
            return [str(p) if isinstance(p, (int, float)) else p for p in parsed]
        return [_as_typed(piece, element) for piece, element in zip(pieces, parsed)]
    if isinstance(parsed, (int, float)) and _PLAIN_TOKEN.fullmatch(text.strip()):  # bool is an int
        return text.strip()
    return parsed  # strings (quotes removed, casts applied), null, dicts: as Hydra read them


def string_overrides(config: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """The config with the top-level `keys` given on the command line as the strings the user typed.

    Hydra's override grammar types a value before any schema sees it: `trial=641040e5` is the float 6.4104e10,
    `name=20261123` the int 20261123, and a `str` field would only get `str()` of that number. For keys that
    name things (sweep names, trial ids) this puts back the characters typed, in a scalar or a list
    (`trial=[641040e5,abc]`); quoted values, `null` and cast functions keep Hydra's reading. Outside a
    `@hydra.main` run (the compose API, tests) the config is returned unchanged.
    """
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return config
    given = {}
    for line in HydraConfig.get().overrides.task:  # in order: a key given twice takes its last value
        key, value = value_as_typed(line)
        if key in keys and value is not _NO_VALUE:
            given[key] = value
    return config | given


_NO_VALUE = object()


def value_as_typed(override: str) -> tuple[str, Any]:
    """(key, value) of one command-line override, numbers and bools as typed: `trial=641040e5` ->
    ("trial", "641040e5"), `trial=[1e5,abc]` -> ("trial", ["1e5", "abc"]), `name=null` -> ("name", None).
    A deletion (`~key`) or a multirun sweep (`key=a,b`) has no single value: (key, _NO_VALUE)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    (parsed,) = OverridesParser.create().parse_overrides([override])
    if parsed.is_delete() or parsed.is_sweep_override():
        return parsed.key_or_group, _NO_VALUE
    return parsed.key_or_group, _as_typed(parsed.get_value_string(), parsed.value())


def entry_point(fn: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Wrap a Hydra main: set the log level and turn user errors into one clear line."""

    @functools.wraps(fn)
    def wrapper(cfg: DictConfig) -> Any:
        logging.getLogger().setLevel(cfg.log_level)  # every entry point's schema extends RunConfig
        try:
            return fn(cfg)
        except USER_ERRORS as err:
            log.debug("user error", exc_info=True)
            msg = err.args[0] if isinstance(err, KeyError) and err.args else err
            print(f"error: {msg}", file=sys.stderr)
            sys.exit(2)

    return wrapper
