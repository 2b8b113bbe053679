"""The thin Ray Tune trainable: merge the trial's sampled keys into the base config and call `train`.

Data and the teacher's logits (or, for kd.teacher_logits=online, the teacher itself) arrive once through Ray's object store (`tune.with_parameters`), not re-read
per trial; the trial resumes from its last Tune checkpoint when Tune restores it.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from ray import tune

from data_prep.waveform_cache import WaveformData
from common.config import FeatureConfig
from trainable.checkpoints import CHECKPOINT_NAME
from trainable.run_config import trial_config
from trainable.loop import train


def run_trial(trial_params: dict[str, Any], base_config: dict[str, Any], data: WaveformData,
              teacher_logits: torch.Tensor | None = None,
              teacher: tuple[torch.nn.Module, FeatureConfig] | None = None) -> None:
    # Ray logs one "Checkpoint successfully created at ..." line per epoch per trial into the driver's console;
    # Tune's experiment state records every checkpoint anyway.
    for name in ("ray.train._internal.storage", "ray.train.v2._internal.execution.storage"):
        logging.getLogger(name).setLevel(logging.WARNING)
    config = trial_config(base_config, trial_params)
    if not tune.get_context().get_trial_resources().required_resources.get("GPU", 0):
        # Ray leaves CUDA_VISIBLE_DEVICES alone for 0-GPU trials: without this they would all land on cuda:0.
        config["device"] = "cpu"
    # The run's working files live outside Tune's trial folder: Ray's driver syncer mirrors that folder while
    # trials write into it, and an atomic checkpoint write's temp file vanishing mid-copy made the sync fail
    # (a traceback on the console and an experiment state not synced). Tune persists each reported checkpoint.
    run_dir = Path(config["workdir"]).resolve() / "trial-scratch" / tune.get_context().get_trial_id()
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
        kd = {"teacher": teacher} if config["kd"]["teacher_logits"] == "online" else {"teacher_logits": teacher_logits}
    try:
        train(config, data, run_dir, resume_from=resume_from, report=report, **kd)
    finally:  # also when Tune stops the trial early (tune.report raises in the trial then)
        shutil.rmtree(run_dir, ignore_errors=True)
