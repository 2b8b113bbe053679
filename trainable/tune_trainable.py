"""The thin Ray Tune trainable: merge the trial's sampled keys into the base config and call `train`.

Only paths reach a trial: the waveform cache's folder (memory-mapped read-only here, so every trial on a node
shares one copy through the page cache) and the teacher's cached logits or checkpoint. The trial resumes from
its last Tune checkpoint when Tune restores it.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from ray import tune

from data_prep.waveform_cache import load_waveform_cache
from trainable.checkpoints import CHECKPOINT_NAME
from trainable.loop import train
from trainable.run_config import pick_device, trial_config


def run_trial(
    trial_params: dict[str, Any], base_config: dict[str, Any], data_dir: str, kd_inputs: dict[str, Any] | None = None
) -> None:
    # Ray logs one "Checkpoint successfully created at ..." line per epoch per trial into the driver's console;
    # Tune's experiment state records every checkpoint anyway.
    for name in ("ray.train._internal.storage", "ray.train.v2._internal.execution.storage"):
        logging.getLogger(name).setLevel(logging.WARNING)
    config = trial_config(base_config, trial_params)
    gpus = tune.get_context().get_trial_resources().required_resources.get("GPU", 0)
    if not gpus:
        # Ray leaves CUDA_VISIBLE_DEVICES alone for 0-GPU trials: without this they would all land on cuda:0.
        config["device"] = "cpu"
    else:  # trials packed on one card each keep their data within their share of it
        config["train"]["device_data_share"] *= min(1.0, gpus)
    data = load_waveform_cache(data_dir)
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
        from trainable.teacher import kd_arguments

        kd = kd_arguments(kd_inputs or {}, data, pick_device(config["device"]))
    try:
        train(config, data, run_dir, resume_from=resume_from, report=report, **kd)
    finally:  # also when Tune stops the trial early (tune.report raises in the trial then)
        shutil.rmtree(run_dir, ignore_errors=True)
