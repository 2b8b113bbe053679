"""The sweep: `python sweeps/run.py space=kd_prune num_samples=50 [key=value ...]`.

Ray Tune runs the trials (local Ray or a cluster), Optuna samples the space, ParetoASHA stops dominated trials
early, MLflow records everything; `resume=true name=<sweep>` continues a killed sweep. This is the command line:
it reads and checks it, then runs the stages (sweeps/pipeline.py).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from common.cli import entry_point, plain, string_overrides, value_as_typed
from common.config import run_section, upgrade_saved_config, upgrade_saved_settings
from common.io import check_workdir
from common.sweep_layout import check_storage, list_sweeps, read_state, sweep_exists


def configure_environment() -> None:
    """Ray Tune's settings that only environment variables reach; Ray reads them when the tuner runs. Called by the
    entry point (and by code that runs a sweep without it), never at import."""
    # Tune writes its experiment state at most every TUNE_GLOBAL_CHECKPOINT_S seconds (default >= 10 s); after a
    # kill, trials restart from the checkpoint recorded there, so record it after every result.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    # Ray's documented switch for its "snapshotting has been triggered multiple times" warning: the snapshot forced
    # after every checkpoint (num_to_keep=1, sweeps.pipeline.tune_run_config) is what makes a SIGKILL lose nothing.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # The classic table reporter, whose columns we choose (sweeps.pipeline.progress_reporter).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def sweep_settings(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(base run config, sweep settings): the RunConfig fields are what every trial starts from; the rest
    (SweepConfig's own fields) stays with the driver and never reaches trials or MLflow params."""
    base = run_section(config)
    return base, {k: v for k, v in config.items() if k not in base}


@hydra.main(config_path="../conf", config_name="sweep", version_base="1.3")
@entry_point
def main(cfg: DictConfig) -> None:
    configure_environment()
    config = string_overrides(plain(cfg), ("name",))  # name=1e5 stays the string the user typed
    workdir = Path(config["workdir"]).resolve()
    check_workdir(workdir)
    storage = check_storage(config["storage_path"])  # a URI pyarrow cannot open is refused here
    name = config["name"] or f"{config['space']}-{time.strftime('%Y%m%d-%H%M%S')}"

    if config["resume"] or config["stage"] == "retrain":
        if not config["name"]:
            raise ValueError(
                f"{'resume=true' if config['resume'] else 'stage=retrain'} needs name=<sweep>; "
                "sweeps here: " + (", ".join(list_sweeps(storage)) or "none")
            )
        if name not in list_sweeps(storage):
            raise FileNotFoundError(
                f"No sweep named {name!r} under {storage}; sweeps here: " + (", ".join(list_sweeps(storage)) or "none")
            )
        saved = read_state(storage, name)
        base_config = upgrade_saved_config(saved["base_config"])
        sweep = runtime_settings(config, upgrade_saved_settings(saved["sweep"]))
        if config["stage"] == "retrain" and not config["resume"]:  # a new retrain stage takes retrain.* as given now
            sweep = sweep | {"retrain": config["retrain"]}
    else:
        if sweep_exists(storage, name):
            raise FileExistsError(
                f"A sweep named {name!r} already exists in {storage}. Resume it with "
                f"`python sweeps/run.py resume=true name={name}` or choose another name=."
            )
        base_config, sweep = sweep_settings(config)
    # The stages load torch, Ray and the analysis (seconds): only once the command line is known to be valid, so
    # that --help and a refused setting answer at once.
    from sweeps.pipeline import run_sweep

    run_sweep(name, base_config, sweep, storage, resume=config["resume"], stage=config["stage"])


# Where a sweep runs, not what it searches: a resume takes the keys of these sections given on its command line (to
# continue on another cluster) over the saved ones.
RUNTIME_SECTIONS = ("ray", "resources")


def runtime_settings(config: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
    """A saved sweep's settings (upgraded: every key present, see upgrade_saved_settings) with the ray.* and
    resources.* keys given on this command line (RUNTIME_SECTIONS)."""
    given = {value_as_typed(o)[0] for o in HydraConfig.get().overrides.task} if HydraConfig.initialized() else set()
    return saved | {
        section: saved[section] | {k: v for k, v in config[section].items() if f"{section}.{k}" in given}
        for section in RUNTIME_SECTIONS
    }


if __name__ == "__main__":
    sys.exit(main())
