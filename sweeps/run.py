"""The sweep: `python sweeps/run.py space=kd_prune num_samples=50 [key=value ...]`.

Ray Tune runs the trials (local Ray or a cluster), Optuna samples the space, ParetoASHA stops
dominated trials early, MLflow records everything; `resume=true name=<sweep>` continues a killed sweep.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Tune writes its experiment state at most every TUNE_GLOBAL_CHECKPOINT_S seconds (default >= 10 s);
# after a kill, trials restart from the checkpoint recorded there, so record it after every result.
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
# Ray's documented switch for its "snapshotting has been triggered multiple times" warning: the snapshot forced
# after every checkpoint (num_to_keep=1 below) is what makes a SIGKILL lose nothing, not a bottleneck to warn of.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
# The classic table reporter, whose columns we choose (progress_reporter below).
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from common.cli import entry_point, plain, string_overrides  # noqa: E402
from common.config import Stage, accepted_values, run_section, upgrade_saved_config, upgrade_saved_settings  # noqa: E402
from common.io import check_workdir  # noqa: E402
from common.objectives import ACCURACY, TARGET_MACS  # noqa: E402
from common.sweep_layout import check_storage, list_sweeps, read_state, sweep_exists, sweep_uri, write_state  # noqa: E402

if TYPE_CHECKING:
    from search_spaces.schema import SearchSpace

log = logging.getLogger("sweeps.run")

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


def sweep_settings(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(base run config, sweep settings): the RunConfig fields are what every trial starts from; the rest
    (SweepConfig's own fields) stays with the driver and never reaches trials or MLflow params."""
    base = run_section(config)
    return base, {k: v for k, v in config.items() if k not in base}


def summarize(results: Any, name: str, base_config: dict[str, Any]) -> str:
    """Best trial by val_acc and the Pareto set, ranked on the objectives the search used (common.objectives),
    in the analysis scripts' table format."""
    from common.objectives import front_mask
    from common.trial_table import TrialRecord, format_table, front_rows, table_columns, trial_row
    from trainable.run_config import trial_config

    trials = []
    for result in results:
        metrics = result.metrics or {}
        if "val_acc" not in metrics:
            continue
        config = trial_config(base_config, result.config)
        status = "errored" if result.error else (
            "completed" if metrics["epoch"] >= config["train"]["epochs"] else "stopped")
        trials.append(TrialRecord(sweep=name, trial_id=str(metrics.get("trial_id", "?")), trial_dir=Path(result.path),
                            config=config, metrics=metrics, checkpoint=None, status=status))
    if not trials:
        return "No trial reported a result (see the errors above)."
    rows = [trial_row(t) for t in trials]
    # trials over a budget (budget.*) are neither on the front (see front_mask) nor the best: they cannot ship
    feasible = [row for row in rows if row["feasible"]]
    if not feasible:
        return f"Trials with results: {len(rows)}, none within the budget."
    for row, on_front in zip(rows, front_mask(rows)):
        row["on_front"] = bool(on_front)
    columns = table_columns(rows, several_sweeps=False)
    front = front_rows(feasible)
    best = max(feasible, key=lambda r: r["val_acc"])
    over = ""
    if len(feasible) < len(rows):
        from sweeps.budget import measured_at_end

        # pruning only lowers params: a trial stopped before its last pruning step left an unpruned model, over a
        # params/kB budget its schedule would have met
        early = sum(1 for t, row in zip(trials, rows) if not row["feasible"] and t.status == "stopped"
                    and t.config["pruning"]["mode"] in ("single", "progressive")
                    and t.metrics.get("constraint_max_macs", -1.0) <= 0  # over on params/kB only
                    and not measured_at_end(t.metrics, t.metrics["epoch"], t.config["train"]["epochs"]))
        over = f", {len(rows) - len(feasible)} over the budget" + (
            f" ({early} of them stopped by the scheduler before their last pruning step: the model they left is "
            "unpruned)" if early else "")
    return "\n".join([f"Trials with results: {len(rows)}{over}", "", "Best by val_acc:", format_table([best], columns),
                      "",
                      f"Pareto set (val_acc up, target MACs down), {len(front)} trials:",
                      format_table(front, columns)])


def check_tracking_uri(uri: str, timeout_s: float = 3.0) -> None:
    """An MLflow server that does not answer would retry for minutes after the data and teacher work; ask now."""
    import urllib.error
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return  # sqlite:/// and file: stores live under a path the workdir check already covers
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return  # something answers there (a proxy may not route /health): the server is up
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ValueError(f"mlflow.tracking_uri={uri} is unreachable ({reason}). Start a server there (e.g. `mlflow "
                         "server --host 127.0.0.1 --port 5000`) or leave mlflow.tracking_uri unset for the SQLite "
                         "default sqlite:///<workdir>/mlflow.db.") from None


def check_sweep_settings(sweep: dict[str, Any]) -> None:
    """Sweep settings that the schema's types cannot check, refused before any data or teacher work."""
    from sweeps.cluster import requested_share

    resources = sweep["resources"]
    for key in ("cpus_per_trial", "gpus_per_trial"):  # auto is decided by the cluster, after connecting
        requested_share(f"resources.{key}", resources[key])
    if resources["max_failures"] < -1:
        raise ValueError(f"resources.max_failures={resources['max_failures']} must be >= 0 (retries of a failed "
                         "trial), or -1 for no limit.")
    if resources["max_concurrent_trials"] is not None and resources["max_concurrent_trials"] < 1:
        raise ValueError(f"resources.max_concurrent_trials={resources['max_concurrent_trials']} must be >= 1 "
                         "(or null for as many as the resources allow).")
    if sweep["scheduler"]["grace_period"] < 1 or sweep["scheduler"]["reduction_factor"] <= 1:
        raise ValueError(f"scheduler.grace_period={sweep['scheduler']['grace_period']} must be >= 1 and "
                         f"scheduler.reduction_factor={sweep['scheduler']['reduction_factor']} > 1.")
    check_tracking_uri(sweep["mlflow"]["tracking_uri"])


@hydra.main(config_path="../conf", config_name="sweep", version_base="1.3")
@entry_point
def main(cfg: DictConfig) -> None:
    config = string_overrides(plain(cfg), ("name",))  # name=1e5 stays the string the user typed
    workdir = Path(config["workdir"]).resolve()
    check_workdir(workdir)
    storage = check_storage(config["storage_path"])  # a URI pyarrow cannot open is refused here
    name = config["name"] or f"{config['space']}-{time.strftime('%Y%m%d-%H%M%S')}"

    if config["resume"] or config["stage"] == "retrain":
        if not config["name"]:
            raise ValueError(f"{'resume=true' if config['resume'] else 'stage=retrain'} needs name=<sweep>; "
                             "sweeps here: "
                             + (", ".join(list_sweeps(storage)) or "none"))
        if name not in list_sweeps(storage):
            raise FileNotFoundError(f"No sweep named {name!r} under {storage}; sweeps here: "
                                    + (", ".join(list_sweeps(storage)) or "none"))
        saved = read_state(storage, name)
        base_config = upgrade_saved_config(saved["base_config"])
        sweep = runtime_settings(config, upgrade_saved_settings(saved["sweep"]))
        if config["stage"] == "retrain" and not config["resume"]:  # a new retrain stage takes retrain.* as given now
            sweep = sweep | {"retrain": config["retrain"]}
    else:
        if sweep_exists(storage, name):
            raise FileExistsError(f"A sweep named {name!r} already exists in {storage}. Resume it with "
                                  f"`python sweeps/run.py resume=true name={name}` or choose another name=.")
        base_config, sweep = sweep_settings(config)
    run_sweep(name, base_config, sweep, storage, resume=config["resume"], stage=config["stage"])


# Where a sweep runs, not what it searches: a resume takes the keys of these sections given on its command line (to
# continue on another cluster) over the saved ones, and today's defaults for keys a saved sweep predates.
RUNTIME_SECTIONS = ("ray", "resources")


def runtime_settings(config: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
    """A saved sweep's settings with ray.* and resources.* as given now (RUNTIME_SECTIONS)."""
    from hydra.core.hydra_config import HydraConfig

    from common.cli import value_as_typed

    given = {value_as_typed(o)[0] for o in HydraConfig.get().overrides.task} if HydraConfig.initialized() else set()
    return saved | {section: {**config[section], **saved.get(section, {}),
                              **{k: v for k, v in config[section].items() if f"{section}.{k}" in given}}
                    for section in RUNTIME_SECTIONS}


def set_aside_truncated_state(exp_dir: str) -> None:
    """Rename Tune state files a kill left half-written, so that Tuner.restore reads the last whole ones.

    Ray writes its state atomically in a staging folder but copies it into storage_path with a plain copy; a
    SIGKILL during that copy leaves a truncated pickle, and Tuner.restore then fails on it ("Ran out of input").
    Local storage only: remote stores write objects whole.
    """
    import ray.cloudpickle as cloudpickle

    if "://" in exp_dir:
        return
    names = ("callback-states-", "searcher-state-", "experiment_state-", "search_gen_state-")
    for path in (p for p in Path(exp_dir).iterdir() if p.name.startswith(names) and p.suffix in (".pkl", ".json")):
        data = path.read_bytes()
        try:  # Ray pickles some of its ".json" state files (search_gen_state) and writes others as JSON
            cloudpickle.loads(data)
            continue
        except Exception:  # noqa: BLE001 - not a whole pickle: whole JSON, or torn
            pass
        try:
            json.loads(data)
        except ValueError as err:
            log.warning("Tune state file %s is unreadable (%s: a kill during Ray's copy); using the previous one",
                        path.name, type(err).__name__)
            path.rename(path.with_name(path.name + ".truncated"))


def max_epochs(base_config: dict[str, Any], space: SearchSpace) -> int:
    from trainable.run_config import trial_config

    return trial_config(base_config, dict(space.pinned))["train"]["epochs"]


def progress_reporter(space: SearchSpace) -> Any:
    """Ray's table with the columns that matter: epoch, val_acc, MACs, and the KD/pruning/T/n_mels of each trial."""
    from ray.tune import CLIReporter

    wanted = {"kd.enabled": "KD", "pruning.mode": "pruning", "kd.T": "T", "features.n_mels": "n_mels",
              "scenario": "scenario", "train.seed": "seed"}
    if space.searcher == "grid":  # grid trials carry their whole point under grid_point (sweeps/tuning.py)
        params = {f"grid_point/{key}": label for key, label in wanted.items() if key in space.keys()}
    else:
        params = {key: label for key, label in wanted.items() if key in space.keys()}
    return CLIReporter(metric_columns={"epoch": "epoch", ACCURACY: ACCURACY, TARGET_MACS: "MACs"},
                       parameter_columns=params,
                       max_report_frequency=30, sort_by_metric=False)


def search_results(exp_dir: str, name: str) -> Any:
    """The search's results as Tune recorded them (a ResultGrid), for `stage=retrain`; none finished is an error."""
    from ray.tune import ExperimentAnalysis, ResultGrid

    from sweeps.retrain import front_configs

    try:
        results = ResultGrid(ExperimentAnalysis(exp_dir))
    except (FileNotFoundError, ValueError):
        results = []
    if not front_configs(results):
        raise ValueError(f"stage=retrain: sweep {name!r} has no finished trial to retrain (no trial reported a result "
                         f"in {exp_dir}). Resume its search first: python sweeps/run.py resume=true name={name}")
    return results


def run_sweep(name: str, base_config: dict[str, Any], sweep: dict[str, Any], storage: str, resume: bool,
              stage: str = "search") -> None:
    """Search (stage=search), then retrain its front and write the report (retrain.enabled); stage=retrain: only the
    retraining and the report, for a sweep that has searched. resume=true continues whichever stage was cut."""
    import ray
    from ray import tune

    from common.tracking import ensure_experiment, flatten, runs_page
    from data_prep.dataset import check_data, prepare_data
    from search_spaces.schema import load_space
    from sweeps.budget import Budget, BudgetCallback, check_reachable
    from sweeps.cluster import (
        check_shared_folders,
        cluster_nodes,
        code_runtime_env,
        is_local_address,
        plan_resources,
        run_teacher,
        start_ray,
    )
    from sweeps.mlflow_logging import SweepMLflowCallback
    from sweeps.pareto_asha import ParetoASHA, ParetoASHAStateCallback
    from sweeps.retrain import check_retrain_settings, retrain_experiment
    from sweeps.tuning import default_scheduler, make_scheduler, make_searcher, num_samples, param_space
    from trainable.run_config import validate_teacher
    from trainable.tune_trainable import run_trial

    # Everything that can be refused is refused here, before data, teacher or Ray work.
    budget = Budget.from_config(sweep.get("budget"))  # sweeps saved before budgets existed have none
    space = load_space(sweep["space"], flatten(base_config), accepted_values())
    trials = num_samples(space, sweep["num_samples"])
    settings = sweep.get("retrain") or {"enabled": False}  # sweeps saved before the retrain stage have none
    retrain = stage == "retrain" or settings["enabled"]
    check_sweep_settings(sweep)
    check_data(base_config["data"])  # data root, examples.json, caps: before any rendering or decoding
    check_space_configs(space, base_config)
    check_reachable(budget, space, base_config)  # a budget no trial can meet, with the smallest reachable value
    last_epoch = max_epochs(base_config, space)
    if retrain:
        check_retrain_settings(settings)
        if settings["epochs"] < last_epoch:
            raise ValueError(f"retrain.epochs={settings['epochs']} is below the search's train.epochs={last_epoch}: "
                             "the retrained models would train less than the searched ones; raise retrain.epochs.")
    exp_dir = sweep_uri(storage, name)
    # the retrain stage's Tune experiment, inside the sweep's folder (`final` in sweeps made before the rename)
    retrain_name = retrain_experiment(lambda experiment: tune.Tuner.can_restore(sweep_uri(exp_dir, experiment)))
    retrain_dir = sweep_uri(exp_dir, retrain_name)
    searched = None
    if stage == "retrain":
        searched = search_results(exp_dir, name)
        if not resume and tune.Tuner.can_restore(retrain_dir):
            raise FileExistsError(f"Sweep {name!r} already has a retrain stage; continue it with "
                                  f"`python sweeps/run.py resume=true stage=retrain name={name}`.")
    # KD ablations switch KD on for configurations that searched without it: they need the teacher too.
    kd_possible = may_use_kd(space, base_config) or (retrain and settings["ablations"])
    if kd_possible:
        validate_teacher(base_config)  # the teacher trains on the base config, whatever the trials sample
    workdir = Path(base_config["workdir"]).resolve()
    address = sweep["ray"]["address"]
    code = None if is_local_address(address) else code_runtime_env([str(workdir), storage, base_config["data"]["root"]])
    start_ray(address, sweep["ray"]["num_cpus"], code)  # a cluster that refuses us leaves no sweep
    # What trials ask for comes from the cluster's nodes, not this machine's hardware (which may have no GPU).
    nodes = cluster_nodes()
    resources = plan_resources(sweep["resources"]["cpus_per_trial"], sweep["resources"]["gpus_per_trial"], nodes,
                               base_config["device"])
    check_shared_folders(len(nodes), {"storage_path": storage, "workdir": str(workdir)}, sweep["ray"]["shared_storage"])
    if not resume:  # recorded before any work, so a kill at any moment can be resumed
        write_state(storage, name, {"base_config": base_config, "sweep": sweep})
    steps = (["data"] + (["teacher"] if kd_possible else []) + (["search"] if stage == "search" else [])
             + (["retrain"] if retrain else []) + ["report"])

    def step(label: str, what: str) -> None:
        print(f"[{steps.index(label) + 1}/{len(steps)}] {label}: {what}", flush=True)

    print(f"Sweep {name} ({'retraining the front of ' if stage == 'retrain' else f'{trials} trials of space '}"
          f"{sweep['space']}); if interrupted, continue it with:\n"
          f"  python sweeps/run.py resume=true name={name}{' stage=retrain' if stage == 'retrain' else ''}\n"
          f"Ray: {resources.summary}", flush=True)

    step("data", "preparing the dataset and its waveform cache")
    data = prepare_data(base_config["data"], workdir)
    kd_inputs = {}
    if kd_possible:
        step("teacher", "training or loading it and caching its logits")
        kd_inputs = run_teacher(base_config, data, resources)  # a Ray task: the driver never trains nor uses CUDA
    cpus = resources.cpus_per_trial
    threads = max(1, int(cpus))  # torch threads per trial follow its CPU share (at least one)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base_config={**base_config, "train": {**base_config["train"],
                                                                            "num_threads": threads}},
                             data_dir=str(data.cache_dir), kd_inputs=kd_inputs),
        {"cpu": cpus, "gpu": resources.gpus_per_trial})
    tracking_uri = sweep["mlflow"]["tracking_uri"]
    experiment_id = ensure_experiment(tracking_uri, name, workdir / "mlflow-artifacts" / name)
    objective = sweep["search"]["objective"]
    tags = {"space": sweep["space"], "sampler": sweep["search"]["sampler"]}
    if stage == "search":
        step("search", f"{trials} trials; progress table every 30 s")
        if resume and tune.Tuner.can_restore(exp_dir):
            set_aside_truncated_state(exp_dir)
            log.info("Resuming sweep %s from %s", name, exp_dir)
            # scheduler, searcher and callbacks come back from the sweep's own pickled state (tuner.pkl)
            tuner = tune.Tuner.restore(exp_dir, trainable=trainable, resume_errored=True)
        else:  # a new sweep, or one killed before its first trial started: data and teacher come from their caches
            scheduler_name = sweep["scheduler"]["name"] or default_scheduler(space, objective)
            scheduler = make_scheduler(scheduler_name, objective, last_epoch,
                                       sweep["scheduler"]["grace_period"], sweep["scheduler"]["reduction_factor"],
                                       budget=budget, metric=sweep["scheduler"].get("metric", "val_acc"))
            callback = SweepMLflowCallback(tracking_uri, experiment_name=name, base_config=base_config,
                                           tags=tags | {"scheduler": scheduler_name, "stage": "search"})
            callbacks = [callback] + ([ParetoASHAStateCallback(scheduler)] if isinstance(scheduler, ParetoASHA) else [])
            if budget is not None:  # first: it adds `feasible` and the constraint values to results the others record
                callbacks.insert(0, BudgetCallback(budget, last_epoch))
            tuner = tune.Tuner(
                trainable,
                param_space=param_space(space),
                tune_config=tune.TuneConfig(  # no metric/mode here: it would make OptunaSearch single-objective
                    search_alg=make_searcher(space, sweep["search"]["sampler"], objective, base_config["seed"],
                                             last_epoch, budget=budget,
                                             base_config=base_config if sweep["budget"].get("screen", True) else None),
                    scheduler=scheduler,
                    num_samples=trials,
                    max_concurrent_trials=sweep["resources"]["max_concurrent_trials"],
                    reuse_actors=True),
                run_config=tune_run_config(name, storage, callbacks, progress_reporter(space),
                                           sweep["resources"]["max_failures"]),
            )
        searched = tuner.fit()
        errors = [r for r in searched if r.error]
        print("\n" + summarize(searched, name, base_config))
        if errors:
            print(f"\n{len(errors)} trial(s) errored; their messages are in MLflow (tag 'error') and {exp_dir}.")
    if retrain:
        step("retrain", "the front's configurations, longer and with seeds, scored on the test split")
        callbacks = [SweepMLflowCallback(tracking_uri, experiment_name=name, base_config=base_config,
                                         tags=tags | {"stage": Stage.retrain.value})]
        if budget is not None:
            callbacks.insert(0, BudgetCallback(budget, settings["epochs"]))
        retrained = run_retrain(searched, trainable, exp_dir, retrain_name, base_config, sweep, resume, callbacks)
        finished = sum(1 for r in retrained if not r.error)
        print(f"\nRetrained: {finished} of {len(retrained)} runs finished ({retrain_dir}).")
    shutil.rmtree(workdir / "trial-scratch", ignore_errors=True)  # trials' working files (trainable/tune_trainable.py)
    ray.shutdown()
    print(f"\nRay results: {exp_dir}\nMLflow:      {tracking_uri} (experiment {name!r})\n"
          f"      mlflow ui --backend-store-uri {tracking_uri}   # then open {runs_page(experiment_id)}\n", flush=True)
    export = retrain and (settings["export"] if settings.get("export") is not None else budget is not None)
    step("report", ("ONNX, int8 and CPU latency of the retrained front models, then " if export else "")
         + "front, plot, retrained numbers and conclusions")  # last: the report's file paths end the output
    write_report(name, storage, workdir, tracking_uri, export)


def tune_run_config(name: str, storage: str, callbacks: list[Any], reporter: Any, max_failures: int) -> Any:
    """Where and how Tune keeps a stage: storage, callbacks, console table, a checkpoint after every epoch, and
    `max_failures` restarts of a failed trial (a node lost, a process killed) from that checkpoint, on any node.

    num_to_keep=1 makes Tune force a synced experiment snapshot after every trial checkpoint: the only thing that
    puts the state in storage at once (unforced syncs wait for SyncConfig.sync_period). With 2, a SIGKILL lost the
    rung records of the last epochs (measured in the kill/resume test).
    """
    from ray import tune

    return tune.RunConfig(name=name, storage_path=storage, callbacks=callbacks, verbose=1, progress_reporter=reporter,
                          checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                          failure_config=tune.FailureConfig(max_failures=max_failures))


def run_retrain(searched: Any, trainable: Any, exp_dir: str, experiment: str, base_config: dict[str, Any],
                sweep: dict[str, Any], resume: bool, callbacks: list[Any]) -> Any:
    """Retrain the front (sweeps/retrain.py) as the Tune experiment <sweep folder>/<experiment> (retrain); resumes
    it when asked."""
    from ray import tune
    from ray.tune import CLIReporter

    from sweeps.retrain import check_points, describe, front_configs, retrain_points, spread

    name, retrain_dir, settings = Path(exp_dir).name, sweep_uri(exp_dir, experiment), sweep["retrain"]
    if resume and tune.Tuner.can_restore(retrain_dir):
        set_aside_truncated_state(retrain_dir)
        log.info("Resuming the retrain stage of %s from %s", name, retrain_dir)
        return tune.Tuner.restore(retrain_dir, trainable=trainable, resume_errored=True).fit()
    configs = spread(front_configs(searched), settings["max_configs"])
    if not configs:
        raise ValueError(f"Sweep {name!r} has no front trial to retrain: every trial errored or broke the budget.")
    points = retrain_points(configs, base_config, settings)
    check_points(points, base_config)
    print(describe(configs, points, settings), flush=True)
    reporter = CLIReporter(metric_columns={"epoch": "epoch", ACCURACY: ACCURACY, "test_acc": "test_acc"},
                           parameter_columns={f"grid_point/origin.{k}": k for k in ("front_trial", "role")}
                           | {"grid_point/train.seed": "seed"}, max_report_frequency=30, sort_by_metric=False)
    tuner = tune.Tuner(
        trainable,
        param_space={"grid_point": tune.grid_search(points)},
        tune_config=tune.TuneConfig(max_concurrent_trials=sweep["resources"]["max_concurrent_trials"],
                                    reuse_actors=True),
        run_config=tune_run_config(experiment, exp_dir, callbacks, reporter, sweep["resources"]["max_failures"]),
    )
    return tuner.fit()


def write_report(name: str, storage: str, workdir: Path, tracking_uri: str, export: bool = False) -> None:
    """The analysis script (front, plot, report with the retrained numbers) run on the finished sweep, in its own
    process: the sweep ends with the answer, and the analysis stays a separate entry point (imports flow one way).
    With `export`, analysis/export.py trial=retrained first: it exports, quantizes and times the retrained front models,
    then writes the same files, so the report names the model to ship with its int8 and latency numbers. It exits 1
    when some model was not exported (the report is written, the lines above say which) and 2 when it could not start
    (e.g. no retraining run finished); then pareto.py still writes the report."""
    import subprocess

    analysis = Path(__file__).resolve().parent.parent / "analysis"
    keys = [f"name={name}", f"storage_path={storage}", f"workdir={workdir}", f"mlflow.tracking_uri={tracking_uri}"]
    if "://" in storage:
        print("Storage is remote; the analysis reads local folders. Copy the sweep folder here, then run:\n  "
              f"python analysis/{'export.py trial=retrained' if export else 'pareto.py'} path=<local sweep folder>")
        return
    if export:
        code = subprocess.run([sys.executable, str(analysis / "export.py"), *keys, "trial=retrained"]).returncode
        if code == 0:
            return
        if code == 1:
            print(f"Some retrained models were not exported (lines above); the report is written. Retry them with: "
                  f"python analysis/export.py name={name} trial=retrained")
            return
        print(f"The export of the retrained models failed (see above); writing the report without it. Retry with: "
              f"python analysis/export.py name={name} trial=retrained")
    if subprocess.run([sys.executable, str(analysis / "pareto.py"), *keys]).returncode != 0:
        print(f"The report failed (see above); rerun it with: python analysis/pareto.py name={name}")


if __name__ == "__main__":
    sys.exit(main())
