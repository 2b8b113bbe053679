"""Config checks and derived settings shared by the training run, the teacher and the sweep.

Keys, types and defaults live in common/config.py; here are the checks that need more than a type
(cross-key rules, the pruning plan) and the trial config: the base run config with a trial's sampled
keys applied through OmegaConf over the typed schema, so an unknown key or a wrong type fails there.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Mapping
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from common.cli import compose
from common.config import (
    FeatureConfig,
    PruningMode,
    RunConfig,
    available_scenarios,
    upgrade_saved_point,
    values,
)
from trainable.pruning import pruning_schedule


def pick_device(name: str) -> torch.device:
    """`auto` = CUDA when present, else CPU; an explicit CUDA request on a machine without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} but no CUDA device is visible; use device=auto or device=cpu.")
    return device


@functools.cache
def _scenario(name: str) -> dict[str, Any]:
    from hydra.errors import MissingConfigException, OverrideParseException

    try:
        return compose(None, [f"+scenario={name}"])
    except (MissingConfigException, OverrideParseException):  # no such option, or no name an option could have
        raise ValueError(f"Unknown scenario {name!r}; choose one of {available_scenarios()}.") from None


def scenario_preset(name: str) -> dict[str, Any]:
    """The scenario group option `name` as Hydra composes it (conf/scenario/<name>.yaml, placed at the top level):
    what `scenario=<name>` on the command line merges in. Composed once per name and process."""
    return copy.deepcopy(_scenario(name))


def apply_scenario(config: dict[str, Any]) -> dict[str, Any]:
    """A plain config with its scenario group (config['scenario'], if any) merged over it.

    On the command line `scenario=<name>` is a Hydra group; grid trials that sweep `scenario` get the same option,
    composed by Hydra too."""
    if not config["scenario"]:
        return config
    merged = OmegaConf.merge(OmegaConf.create(config), scenario_preset(config["scenario"]))
    return OmegaConf.to_container(merged, resolve=True)


def pruning_plan(pcfg: Mapping[str, Any], epochs: int) -> dict[int, float]:
    """{epoch (1-based): the fraction of unpruned MACs (unstructured: of weights) kept after the step taken at the
    start of that epoch}."""
    mode = pcfg["mode"]
    if mode not in values(PruningMode):
        raise ValueError(f"pruning.mode={mode!r}; choose one of {list(values(PruningMode))}.")
    if mode == "none":
        return {}
    ratio = pcfg["weight_keep_ratio"] if mode == "unstructured" else pcfg["target_macs_ratio"]
    steps = pcfg["steps"] if mode == "progressive" else 1
    ratios = pruning_schedule(mode, ratio, steps, pcfg["schedule"])
    step_epochs = pcfg["step_epochs"] if mode == "progressive" else 0
    if mode == "progressive" and step_epochs < 1:
        raise ValueError(f"pruning.step_epochs={step_epochs} must be >= 1.")
    epochs_at = [pcfg["at_epoch"] + k * step_epochs for k in range(steps)]
    if pcfg["at_epoch"] < 1 or epochs_at[-1] > epochs:
        raise ValueError(
            f"pruning.{mode} needs its steps at the start of epochs {epochs_at}, but train.epochs={epochs} "
            f"(epochs 1..{epochs}): lower pruning.at_epoch/steps/step_epochs or raise train.epochs."
        )
    return dict(zip(epochs_at, ratios))


def check_features(features: Mapping[str, Any]) -> None:
    """FeatureConfig's validation, remembered per distinct feature config: a sweep validates hundreds of sampled
    trial configs before it starts, and the mel-filter check is the slow part."""
    _check_features(tuple(sorted(features.items())))


@functools.lru_cache(maxsize=1024)
def _check_features(items: tuple[tuple[str, Any], ...]) -> None:
    FeatureConfig.from_mapping(dict(items))


def validate_teacher(config: Mapping[str, Any]) -> None:
    """Every teacher setting, reported under the keys a user sets (teacher.*, teacher.members[i].*), before any data
    or teacher work: names that do not exist, hub ids while offline, folders that are not saved models, sample rates
    the source wavs cannot give (trainable/teacher_spec.py)."""
    from trainable.teacher_spec import check_members, member_label

    for index, spec in enumerate(check_members(config)):
        try:
            check_features(spec["features"])
        except ValueError as err:
            raise ValueError(f"{member_label(config, index, 'features')}: {err}") from None


# Published KD recipes for small audio CNNs put 0.9-0.98 of the loss on the teacher; 1 would ignore the labels.
MAX_KD_ALPHA = 0.99


def validate_config(config: Mapping[str, Any]) -> None:
    """Fail before any work for settings the run cannot honour; messages name the key and the fix."""
    check_features(config["features"])  # the teacher is checked once, where it is prepared: validate_teacher
    tcfg, kcfg = config["train"], config["kd"]
    for key in ("epochs", "batch_size"):
        if int(tcfg[key]) < 1:
            raise ValueError(f"train.{key}={tcfg[key]} must be >= 1.")
    if tcfg["steps_per_epoch"] is not None and tcfg["steps_per_epoch"] < 1:
        raise ValueError(f"train.steps_per_epoch={tcfg['steps_per_epoch']} must be >= 1, or null for full epochs.")
    if not 0 < tcfg["device_data_share"] <= 1:
        raise ValueError(f"train.device_data_share={tcfg['device_data_share']} must be in (0, 1].")
    if tcfg["lr"] <= 0:
        raise ValueError(f"train.lr={tcfg['lr']} must be > 0.")
    if not 0 <= tcfg["warmup_epochs"] < tcfg["epochs"]:
        raise ValueError(f"train.warmup_epochs={tcfg['warmup_epochs']} must be in [0, train.epochs).")
    if kcfg["enabled"] and (kcfg["T"] <= 0 or not 0 <= kcfg["alpha"] <= MAX_KD_ALPHA):
        raise ValueError(
            f"kd.T={kcfg['T']} must be > 0 and kd.alpha={kcfg['alpha']} in [0, {MAX_KD_ALPHA}] (some "
            "weight stays on the labels)."
        )
    if tcfg["mixup_alpha"] < 0:  # with KD the teacher's targets are mixed like the labels (trainable/kd.py)
        raise ValueError(f"train.mixup_alpha={tcfg['mixup_alpha']} must be >= 0 (0 disables mixup).")
    pruning_plan(config["pruning"], tcfg["epochs"])


@functools.lru_cache(maxsize=16)
def _typed(base_json: str) -> DictConfig:
    """A base config over the typed RunConfig, built once per distinct base (merging costs ~10x a copy)."""
    return OmegaConf.merge(OmegaConf.structured(RunConfig), json.loads(base_json))


def trial_config(base_config: Mapping[str, Any], trial_params: Mapping[str, Any]) -> dict[str, Any]:
    """The effective run config of one trial: base config, then its scenario preset, then its sampled keys.

    Grid spaces hand each trial its whole grid point under "grid_point" (see sweeps/tuning.py). Keys are set
    with OmegaConf over the typed RunConfig, so an unknown key or a value of the wrong type is an error.
    """
    params = upgrade_saved_point(
        {k: v for k, v in trial_params.items() if k != "grid_point"} | dict(trial_params.get("grid_point", {}))
    )
    base = dict(base_config)
    if "scenario" in params:  # the preset goes first so that sampled keys override it, never the other way round
        base["scenario"] = params.pop("scenario")
    config = copy.deepcopy(_typed(json.dumps(apply_scenario(base), sort_keys=True)))
    for key, value in params.items():
        try:
            OmegaConf.update(config, key, value, merge=False)
        except (ConfigAttributeError, ConfigKeyError):
            raise KeyError(f"trial key {key!r} is not a config key") from None
        except OmegaConfBaseException as err:
            raise KeyError(f"trial key {key}={value!r}: {err.msg.splitlines()[0]}") from None
    return OmegaConf.to_container(config, resolve=True, enum_to_str=True)
