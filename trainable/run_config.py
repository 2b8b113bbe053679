"""Config checks and derived settings shared by the training run, the teacher and the sweep."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from trainable.features import FeatureConfig
from trainable.pruning import PRUNING_MODES, pruning_schedule

CHECKPOINT_NAME = "checkpoint.pt"  # one per run folder: <run_dir>/checkpoint/checkpoint.pt
SCENARIO_DIR = Path(__file__).resolve().parent.parent / "conf" / "scenarios"


def pick_device(name: str = "auto") -> torch.device:
    """`auto` = CUDA when present, else CPU; an explicit CUDA request on a machine without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} but no CUDA device is visible; use device=auto or device=cpu.")
    return device


def available_scenarios() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml"))


def apply_scenario(config: dict[str, Any]) -> dict[str, Any]:
    """Merge conf/scenarios/<config['scenario']>.yaml over the config (no-op when scenario is null)."""
    name = config.get("scenario")
    if not name:
        return config
    path = SCENARIO_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"Unknown scenario {name!r}; choose one of {available_scenarios()}.")
    merged = OmegaConf.merge(OmegaConf.create(config), OmegaConf.load(path))
    return OmegaConf.to_container(merged, resolve=True)


def pruning_plan(pcfg: Mapping[str, Any], epochs: int) -> dict[int, float]:
    """{epoch index: fraction of unpruned MACs to keep after the step taken at the start of that epoch}."""
    mode = pcfg["mode"]
    if mode not in PRUNING_MODES:
        raise ValueError(f"pruning.mode={mode!r}; choose one of {list(PRUNING_MODES)}.")
    if mode == "none":
        return {}
    steps = pcfg["steps"] if mode == "progressive" else 1
    ratios = pruning_schedule(mode, pcfg["target_macs_ratio"], steps, pcfg.get("schedule", "cubic"))
    step_epochs = pcfg.get("step_epochs", 1) if mode == "progressive" else 0
    if mode == "progressive" and step_epochs < 1:
        raise ValueError(f"pruning.step_epochs={step_epochs} must be >= 1.")
    epochs_at = [pcfg["at_epoch"] + k * step_epochs for k in range(steps)]
    if pcfg["at_epoch"] < 0 or epochs_at[-1] >= epochs:
        raise ValueError(
            f"pruning.{mode} needs its steps at epochs {epochs_at}, but train.epochs={epochs} (epochs 0..{epochs - 1}): "
            "lower pruning.at_epoch/steps/step_epochs or raise train.epochs.")
    return dict(zip(epochs_at, ratios))


def teacher_features(config: Mapping[str, Any]) -> dict[str, Any]:
    """The teacher's own features: teacher.features merged over the run's features."""
    return {**config["features"], **(config["teacher"].get("features") or {})}


def validate_config(config: Mapping[str, Any]) -> None:
    """Fail before any work for settings the run cannot honour; messages name the key and the fix."""
    FeatureConfig.from_mapping(config["features"])  # validates on construction
    if config["kd"]["enabled"] and config.get("teacher"):
        FeatureConfig.from_mapping(teacher_features(config))
    tcfg, kcfg = config["train"], config["kd"]
    for key in ("epochs", "batch_size"):
        if int(tcfg[key]) < 1:
            raise ValueError(f"train.{key}={tcfg[key]} must be >= 1.")
    if tcfg["lr"] <= 0:
        raise ValueError(f"train.lr={tcfg['lr']} must be > 0.")
    if not 0 <= tcfg["warmup_epochs"] < tcfg["epochs"]:
        raise ValueError(f"train.warmup_epochs={tcfg['warmup_epochs']} must be in [0, train.epochs).")
    if kcfg["enabled"]:
        if kcfg["T"] <= 0 or not 0 <= kcfg["alpha"] <= 1:
            raise ValueError(f"kd.T={kcfg['T']} must be > 0 and kd.alpha={kcfg['alpha']} in [0, 1].")
        if kcfg["teacher_logits"] not in ("cached", "online"):
            raise ValueError(f"kd.teacher_logits={kcfg['teacher_logits']!r}; use cached or online.")
    pruning_plan(config["pruning"], tcfg["epochs"])


def merge_dotted(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """{'kd.T': 3} over a nested config -> nested config with kd.T = 3 (unknown sections are an error)."""
    config = copy.deepcopy(base)
    for key, value in overrides.items():
        node, *path = key.split(".")
        target = config
        for part in [node, *path][:-1]:
            if not isinstance(target.get(part), dict):
                raise KeyError(f"trial key {key!r} is not a config key")
            target = target[part]
        target[[node, *path][-1]] = value
    return config


def trial_config(base_config: dict[str, Any], trial_params: dict[str, Any]) -> dict[str, Any]:
    """The effective run config of one trial (scenario presets applied).

    Grid spaces hand each trial its whole grid point under "grid_point" (see sweeps/tuning.py).
    """
    params = {k: v for k, v in trial_params.items() if k != "grid_point"} | trial_params.get("grid_point", {})
    # The scenario preset goes first so that sampled keys override it, never the other way round.
    config = apply_scenario(merge_dotted(base_config, {"scenario": params.pop("scenario")} if "scenario" in params else {}))
    return merge_dotted(config, params)
