"""The sweep: `python sweeps/run.py space=kd_prune num_samples=50 [key=value ...]`.

Ray Tune runs the trials (local Ray or a cluster), Optuna samples the space, ParetoASHA stops
dominated trials early, MLflow records everything; `resume=true name=<sweep>` continues a killed sweep.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Tune writes its experiment state at most every TUNE_GLOBAL_CHECKPOINT_S seconds (default >= 10 s);
# after a kill, trials restart from the checkpoint recorded there, so record it after every result.
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from common.cli import entry_point, plain  # noqa: E402
from common.config import accepted_values, run_section  # noqa: E402
from common.sweep_layout import list_sweeps, normalize_storage, read_state, sweep_exists, sweep_uri, write_state  # noqa: E402

if TYPE_CHECKING:
    from search_spaces.schema import SearchSpace

log = logging.getLogger("sweeps.run")

def check_workdir(workdir: Path) -> None:
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / ".write_probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"workdir={workdir} is not writable ({err.strerror}); pass workdir=<a writable dir>.")


def may_use_kd(space: SearchSpace, base_config: dict[str, Any]) -> bool:
    """Whether any trial of the space can run with KD (then the teacher is prepared up front)."""
    from trainable.run_config import trial_config

    if space.searcher == "grid":
        return any(trial_config(base_config, {"grid_point": point})["kd"]["enabled"] for point in space.grid())
    possible = space.possible_values("kd.enabled")
    return any(possible) if possible is not None else bool(base_config["kd"]["enabled"])


def check_space_configs(space: SearchSpace, base_config: dict[str, Any], samples: int = 200) -> None:
    """Validate the run configs the space can produce (grid points, or random draws) before Ray starts,
    so impossible combinations (e.g. pruning steps beyond train.epochs) fail now, not in every trial."""
    import optuna

    from trainable.run_config import trial_config, validate_config

    if space.searcher == "grid":
        points = [{"grid_point": p} for p in space.grid()]
    else:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        points = [space.define_by_run(study.ask()) for _ in range(samples)]
    for point in points:
        try:
            validate_config(trial_config(base_config, point))
        except ValueError as err:
            raise ValueError(f"search space {space.path} can produce an invalid trial {point}: {err}") from err


def resolve_gpus(requested: Any, address: str | None) -> float:
    import torch

    if requested in (None, "auto"):
        return 0.25 if torch.cuda.is_available() else 0.0
    gpus = float(requested)
    if gpus > 0 and address is None and not torch.cuda.is_available():
        raise ValueError(f"resources.gpus_per_trial={gpus} but this machine has no CUDA GPU (trials would wait "
                         "forever); use resources.gpus_per_trial=0 or join a GPU cluster with ray.address.")
    return gpus


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Ray retries an unreachable GCS for minutes; a plain TCP connect answers in seconds."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"ray.address={address!r} is not host:port, ray://host:port, auto or null.")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ValueError(f"ray.address={address} is unreachable ({err}). Start the cluster (`ray start --head`) "
                         "or use ray.address=null for a local Ray.") from err


def start_ray(address: str | None, num_cpus: int | None, gpus: float) -> None:
    import ray

    if address not in (None, "auto"):
        check_reachable(address)
    try:
        if address is None:
            ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
        else:
            ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ValueError(f"Could not connect to Ray at ray.address={address}: {err}. Start the cluster "
                         "(`ray start --head`) or use ray.address=null for a local Ray.") from err
    if gpus > 0 and ray.cluster_resources().get("GPU", 0) < gpus:
        raise ValueError(f"resources.gpus_per_trial={gpus} but the Ray cluster has no GPUs; "
                         "use resources.gpus_per_trial=0 or add GPU nodes.")


def sweep_settings(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(base run config, sweep settings): the RunConfig fields are what every trial starts from; the rest
    (SweepConfig's own fields) stays with the driver and never reaches trials or MLflow params."""
    base = run_section(config)
    return base, {k: v for k, v in config.items() if k not in base}


def summarize(results: Any, name: str, base_config: dict[str, Any]) -> str:
    """Best trial by val_acc and the Pareto set (val_acc up, MACs down), in the analysis scripts' table format."""
    from analysis.pareto import format_table, front_mask, table_columns, trial_row
    from analysis.results import Trial
    from trainable.run_config import trial_config

    trials = []
    for result in results:
        metrics = result.metrics or {}
        if "val_acc" not in metrics:
            continue
        config = trial_config(base_config, result.config)
        status = "errored" if result.error else (
            "completed" if metrics["epoch"] >= config["train"]["epochs"] else "stopped")
        trials.append(Trial(sweep=name, trial_id=str(metrics.get("trial_id", "?")), trial_dir=Path(result.path),
                            config=config, metrics=metrics, checkpoint=None, status=status))
    if not trials:
        return "No trial reported a result (see the errors above)."
    rows = [trial_row(t) for t in trials]
    columns = table_columns(rows, several_sweeps=False)
    front = sorted((r for r, on in zip(rows, front_mask(trials)) if on), key=lambda r: r["macs"])
    best = max(rows, key=lambda r: r["val_acc"])
    return "\n".join([f"Trials with results: {len(rows)}", "", "Best by val_acc:", format_table([best], columns), "",
                      f"Pareto set (val_acc up, MACs down), {len(front)} trials:", format_table(front, columns)])


@hydra.main(config_path="../conf", config_name="sweep", version_base="1.3")
@entry_point
def main(cfg: DictConfig) -> None:
    config = plain(cfg)
    workdir = Path(config["workdir"]).resolve()
    check_workdir(workdir)
    storage = normalize_storage(config["storage_path"])
    name = config["name"] or f"{config['space']}-{time.strftime('%Y%m%d-%H%M%S')}"

    from ray import tune

    if config["resume"]:
        if not config["name"]:
            raise ValueError("resume=true needs name=<sweep>; sweeps here: " + ", ".join(list_sweeps(storage)))
        if not tune.Tuner.can_restore(sweep_uri(storage, name)):
            raise FileNotFoundError(f"No sweep named {name!r} to resume under {storage}; sweeps here: "
                                    + (", ".join(list_sweeps(storage)) or "none"))
        saved = read_state(storage, name)
        base_config, sweep = saved["base_config"], saved["sweep"]
    else:
        if sweep_exists(storage, name):
            raise FileExistsError(f"A sweep named {name!r} already exists in {storage}. Resume it with "
                                  f"`python sweeps/run.py resume=true name={name}` or choose another name=.")
        base_config, sweep = sweep_settings(config)
    run_sweep(name, base_config, sweep, storage, resume=config["resume"])


def max_epochs(base_config: dict[str, Any], space: SearchSpace) -> int:
    from trainable.run_config import trial_config

    return trial_config(base_config, dict(space.pinned))["train"]["epochs"]


def run_sweep(name: str, base_config: dict[str, Any], sweep: dict[str, Any], storage: str, resume: bool) -> None:
    import ray
    from ray import tune

    from data_prep.dataset import prepare_data
    from search_spaces.schema import load_space
    from common.tracking import ensure_experiment, flatten
    from sweeps.mlflow_logging import SweepMLflowCallback
    from sweeps.pareto_asha import ParetoASHA, ParetoASHAStateCallback
    from sweeps.tuning import default_scheduler, make_scheduler, make_searcher, num_samples, param_space
    from trainable.teacher import teacher_inputs
    from trainable.tune_trainable import run_trial

    space = load_space(sweep["space"], flatten(base_config), accepted_values())
    check_space_configs(space, base_config)
    gpus = resolve_gpus(sweep["resources"]["gpus_per_trial"], sweep["ray"]["address"])
    workdir = Path(base_config["workdir"]).resolve()
    exp_dir = sweep_uri(storage, name)

    start_ray(sweep["ray"]["address"], sweep["ray"]["num_cpus"], gpus)
    log.info("Preparing data (and the teacher, if KD is in the space) before any trial starts")
    data = prepare_data(base_config["data"], workdir)
    kd_inputs = teacher_inputs(base_config, data) if may_use_kd(space, base_config) else {}
    cpus = sweep["resources"]["cpus_per_trial"]
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base_config={**base_config, "train": {**base_config["train"],
                                                                            "num_threads": cpus}},
                             data=data, **kd_inputs),
        {"cpu": cpus, "gpu": gpus})
    tracking_uri = sweep["mlflow"]["tracking_uri"]
    ensure_experiment(tracking_uri, name, workdir / "mlflow-artifacts" / name)
    objective = sweep["search"]["objective"]
    if resume:
        log.info("Resuming sweep %s from %s", name, exp_dir)
        # scheduler, searcher and callbacks come back from the sweep's own pickled state (tuner.pkl)
        tuner = tune.Tuner.restore(exp_dir, trainable=trainable, resume_errored=True)
    else:
        scheduler_name = sweep["scheduler"]["name"] or default_scheduler(space, objective)
        scheduler = make_scheduler(scheduler_name, objective, max_epochs(base_config, space),
                                   sweep["scheduler"]["grace_period"], sweep["scheduler"]["reduction_factor"])
        callback = SweepMLflowCallback(tracking_uri, name, base_config, tags={
            "space": sweep["space"], "sampler": sweep["search"]["sampler"], "scheduler": scheduler_name})
        callbacks = [callback] + ([ParetoASHAStateCallback(scheduler)] if isinstance(scheduler, ParetoASHA) else [])
        run_config = tune.RunConfig(name=name, storage_path=storage, callbacks=callbacks, verbose=1,
                                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1))
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(space),
            tune_config=tune.TuneConfig(  # no metric/mode here: it would make OptunaSearch single-objective
                search_alg=make_searcher(space, sweep["search"]["sampler"], objective, base_config["seed"]),
                scheduler=scheduler,
                num_samples=num_samples(space, sweep["num_samples"]),
                max_concurrent_trials=sweep["resources"]["max_concurrent_trials"],
                reuse_actors=True),
            run_config=run_config,
        )
        write_state(storage, name, {"base_config": base_config, "sweep": sweep})
    results = tuner.fit()
    errors = [r for r in results if r.error]
    print("\n" + summarize(results, name, base_config))
    if errors:
        print(f"\n{len(errors)} trial(s) errored; their messages are in MLflow (tag 'error') and {exp_dir}.")
    print(f"\nRay results: {exp_dir}\nMLflow:      {tracking_uri} (experiment {name!r})\n"
          f"Next: python analysis/pareto.py name={name}\n"
          f"      mlflow ui --backend-store-uri {tracking_uri}")
    ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
