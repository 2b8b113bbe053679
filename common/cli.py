"""What every Hydra entry point shares: the typed config registered, plain-dict config, logging, one-line user errors."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

import common.config  # noqa: F401  (registers the structured configs before Hydra composes)

log = logging.getLogger(__name__)

# Mistakes a user can fix from the message alone: no traceback, exit code 2.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, KeyError)


def plain(cfg: DictConfig) -> dict[str, Any]:
    """Resolved plain-dict config: picklable for Ray, loggable to MLflow, no OmegaConf in library code."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True, enum_to_str=True)


def entry_point(fn: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Wrap a Hydra main: set the log level and turn user errors into one clear line."""

    @functools.wraps(fn)
    def wrapper(cfg: DictConfig) -> Any:
        logging.getLogger().setLevel(cfg.get("log_level", "INFO"))
        try:
            return fn(cfg)
        except USER_ERRORS as err:
            log.debug("user error", exc_info=True)
            msg = err.args[0] if isinstance(err, KeyError) and err.args else err
            print(f"error: {msg}", file=sys.stderr)
            sys.exit(2)

    return wrapper
