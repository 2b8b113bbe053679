"""The thin Ray Tune trainable: merge the trial's sampled keys into the base config and call `train`.

Data and teacher logits arrive once through Ray's object store (`tune.with_parameters`), not re-read
per trial; the trial resumes from its last Tune checkpoint when Tune restores it.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import torch
from ray import tune

from data_prep.waveform_cache import WaveformData
from trainable.run_config import apply_scenario
from trainable.train import CHECKPOINT_NAME, train


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
    return apply_scenario(merge_dotted(base_config, params))


def run_trial(trial_params: dict[str, Any], base_config: dict[str, Any], data: WaveformData,
              teacher_logits: torch.Tensor | None = None) -> None:
    config = trial_config(base_config, trial_params)
    run_dir = Path(tune.get_context().get_trial_dir())
    resume_from = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            resume_dir = run_dir / "resume"
            shutil.rmtree(resume_dir, ignore_errors=True)
            shutil.copytree(ckpt_dir, resume_dir)
        resume_from = resume_dir / CHECKPOINT_NAME

    def report(metrics: dict[str, Any], ckpt_dir: Path) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(ckpt_dir)))

    kd = {}
    if config["kd"]["enabled"]:
        if config["kd"]["teacher_logits"] == "online":
            from trainable.teacher import kd_inputs

            kd = kd_inputs(config, data)
        else:
            kd = {"teacher_logits": teacher_logits}
    train(config, data, run_dir, resume_from=resume_from, report=report, **kd)
