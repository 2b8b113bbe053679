"""The sweep's stages, in order, in one process: `run_sweep` is what `python sweeps/run.py` runs once its command
line is read (sweeps/run.py).

plan_sweep (every refusal, before any work) -> connect (Ray) -> data -> teacher -> search -> retrain -> close ->
report. Ray Tune runs the trials (local Ray or a cluster), Optuna samples the space, ParetoASHA stops dominated trials
early, MLflow records everything, the report is the analysis's own functions.
"""

from __future__ import annotations

import json
import logging
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import ray
import ray.cloudpickle as cloudpickle
from ray import tune
from ray.tune import CLIReporter, ExperimentAnalysis, ResultGrid

from analysis.export import export_models
from analysis.pareto import write_report
from analysis.results import load_sweep, trials_line
from common.cli import USER_ERRORS, compose
from common.config import Stage, accepted_values
from common.objectives import ACCURACY, TARGET_MACS
from common.sweep_layout import sweep_uri, write_state
from common.tracking import ensure_experiment, flatten, runs_page
from data_prep.dataset import check_data, prepare_data
from data_prep.waveform_cache import WaveformData
from search_spaces.schema import SearchSpace, load_space
from sweeps.budget import Budget, BudgetCallback, check_reachable
from sweeps.cluster import (
    TrialResources,
    check_shared_folders,
    cluster_nodes,
    code_runtime_env,
    is_local_address,
    plan_resources,
    requested_share,
    run_teacher,
    start_ray,
)
from sweeps.mlflow_logging import SweepMLflowCallback
from sweeps.pareto_asha import ParetoASHA, ParetoASHAStateCallback
from sweeps.retrain import (
    check_points,
    check_retrain_settings,
    describe,
    front_configs,
    retrain_experiment,
    retrain_points,
    spread,
)
from sweeps.tuning import default_scheduler, make_scheduler, make_searcher, num_samples, param_space
from trainable.run_config import trial_config, validate_config, validate_teacher
from trainable.tune_trainable import run_trial

log = logging.getLogger("sweeps.pipeline")


def may_use_kd(space: SearchSpace, base_config: dict[str, Any]) -> bool:
    """Whether any trial of the space can run with KD (then the teacher is prepared up front)."""
    if space.searcher == "grid":
        return any(trial_config(base_config, {"grid_point": point})["kd"]["enabled"] for point in space.grid())
    possible = space.possible_values("kd.enabled")
    return any(possible) if possible is not None else bool(base_config["kd"]["enabled"])


def check_space_configs(space: SearchSpace, base_config: dict[str, Any], samples: int = 200) -> None:
    """Validate the run configs the space can produce (grid points, or random draws) before Ray starts,
    so impossible combinations (e.g. pruning steps beyond train.epochs) fail now, not in every trial."""
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


def check_tracking_uri(uri: str, timeout_s: float = 3.0) -> None:
    """An MLflow server that does not answer would retry for minutes after the data and teacher work; ask now."""
    if not uri.startswith(("http://", "https://")):
        return  # sqlite:/// and file: stores live under a path the workdir check already covers
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return  # something answers there (a proxy may not route /health): the server is up
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ValueError(
            f"mlflow.tracking_uri={uri} is unreachable ({reason}). Start a server there (e.g. `mlflow "
            "server --host 127.0.0.1 --port 5000`) or leave mlflow.tracking_uri unset for the SQLite "
            "default sqlite:///<workdir>/mlflow.db."
        ) from None


def check_sweep_settings(sweep: dict[str, Any]) -> None:
    """Sweep settings that the schema's types cannot check, refused before any data or teacher work."""
    resources = sweep["resources"]
    for key in ("cpus_per_trial", "gpus_per_trial"):  # auto is decided by the cluster, after connecting
        requested_share(f"resources.{key}", resources[key])
    if resources["max_failures"] < -1:
        raise ValueError(
            f"resources.max_failures={resources['max_failures']} must be >= 0 (retries of a failed "
            "trial), or -1 for no limit."
        )
    if resources["max_concurrent_trials"] is not None and resources["max_concurrent_trials"] < 1:
        raise ValueError(
            f"resources.max_concurrent_trials={resources['max_concurrent_trials']} must be >= 1 "
            "(or null for as many as the resources allow)."
        )
    if sweep["scheduler"]["grace_period"] < 1 or sweep["scheduler"]["reduction_factor"] <= 1:
        raise ValueError(
            f"scheduler.grace_period={sweep['scheduler']['grace_period']} must be >= 1 and "
            f"scheduler.reduction_factor={sweep['scheduler']['reduction_factor']} > 1."
        )
    check_tracking_uri(sweep["mlflow"]["tracking_uri"])


def set_aside_truncated_state(exp_dir: str) -> None:
    """Rename Tune state files a kill left half-written, so that Tuner.restore reads the last whole ones.

    Ray writes its state atomically in a staging folder but copies it into storage_path with a plain copy; a
    SIGKILL during that copy leaves a truncated pickle, and Tuner.restore then fails on it ("Ran out of input").
    Local storage only: remote stores write objects whole.
    """
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
            log.warning(
                "Tune state file %s is unreadable (%s: a kill during Ray's copy); using the previous one",
                path.name,
                type(err).__name__,
            )
            path.rename(path.with_name(path.name + ".truncated"))


def max_epochs(base_config: dict[str, Any], space: SearchSpace) -> int:
    return trial_config(base_config, dict(space.pinned))["train"]["epochs"]


def progress_reporter(space: SearchSpace) -> CLIReporter:
    """Ray's table with the columns that matter: epoch, val_acc, MACs, and the KD/pruning/T/n_mels of each trial."""
    wanted = {
        "kd.enabled": "KD",
        "pruning.mode": "pruning",
        "kd.T": "T",
        "features.n_mels": "n_mels",
        "scenario": "scenario",
        "train.seed": "seed",
    }
    if space.searcher == "grid":  # grid trials carry their whole point under grid_point (sweeps/tuning.py)
        params = {f"grid_point/{key}": label for key, label in wanted.items() if key in space.keys()}
    else:
        params = {key: label for key, label in wanted.items() if key in space.keys()}
    return CLIReporter(
        metric_columns={"epoch": "epoch", ACCURACY: ACCURACY, TARGET_MACS: "MACs"},
        parameter_columns=params,
        max_report_frequency=30,
        sort_by_metric=False,
    )


def search_results(exp_dir: str, name: str, base_config: dict[str, Any]) -> Any:
    """The search's results as Tune recorded them (a ResultGrid), for `stage=retrain`; none finished is an error."""
    try:
        results = ResultGrid(ExperimentAnalysis(exp_dir))
    except (FileNotFoundError, ValueError):
        results = []
    if not front_configs(results, base_config):
        raise ValueError(
            f"stage=retrain: sweep {name!r} has no finished trial to retrain (no trial reported a result "
            f"in {exp_dir}). Resume its search first: python sweeps/run.py resume=true name={name}"
        )
    return results


@dataclass
class SweepPlan:
    """A sweep checked and ready to run: what each stage needs, decided before any work."""

    name: str
    base_config: dict[str, Any]
    settings: dict[str, Any]  # the sweep's own keys (SweepConfig minus RunConfig), as saved
    storage: str
    stage: str  # search (then retrain, when retrain.enabled) | retrain
    resume: bool
    space: SearchSpace
    trials: int  # trials of the search
    budget: Budget | None
    last_epoch: int  # the search's train.epochs
    retrain: bool  # whether the retrain stage runs
    kd_possible: bool  # whether some trial (or retraining run) distils: the teacher is needed
    exp_dir: str  # the sweep's folder: the search's Tune experiment
    retrain_name: str  # the retrain stage's Tune experiment, inside exp_dir
    searched: Any = None  # stage=retrain: the search's ResultGrid, read up front
    experiment_id: str = ""  # the sweep's MLflow experiment, made when Ray is up (connect)

    @property
    def workdir(self) -> Path:
        return Path(self.base_config["workdir"])

    @property
    def tracking_uri(self) -> str:
        return self.settings["mlflow"]["tracking_uri"]

    @property
    def steps(self) -> list[str]:
        return (
            ["data"]
            + (["teacher"] if self.kd_possible else [])
            + (["search"] if self.stage == "search" else [])
            + (["retrain"] if self.retrain else [])
            + ["report"]
        )

    def step(self, label: str, what: str) -> None:
        print(f"[{self.steps.index(label) + 1}/{len(self.steps)}] {label}: {what}", flush=True)

    def callbacks(self, stage: str, last_epoch: int, tags: dict[str, str]) -> list[Any]:
        """A stage's Tune callbacks: the budget's annotations first (the others record them), then MLflow."""
        tags = {"space": self.settings["space"], "sampler": self.settings["search"]["sampler"], "stage": stage} | tags
        mlflow = SweepMLflowCallback(
            self.tracking_uri, experiment_name=self.name, base_config=self.base_config, tags=tags
        )
        return ([BudgetCallback(self.budget, last_epoch)] if self.budget is not None else []) + [mlflow]


def plan_sweep(
    name: str, base_config: dict[str, Any], settings: dict[str, Any], storage: str, resume: bool, stage: str
) -> SweepPlan:
    """Everything that can be refused is refused here, before data, teacher or Ray work."""
    budget = Budget.from_config(settings["budget"])
    space = load_space(settings["space"], flatten(base_config), accepted_values())
    retrain_settings = settings["retrain"]
    retrain = stage == "retrain" or retrain_settings["enabled"]
    check_sweep_settings(settings)
    check_data(base_config["data"])  # data root, examples.json, caps: before any rendering or decoding
    check_space_configs(space, base_config)
    check_reachable(budget, space, base_config)  # a budget no trial can meet, with the smallest reachable value
    last_epoch = max_epochs(base_config, space)
    if retrain:
        check_retrain_settings(retrain_settings)
        if retrain_settings["epochs"] < last_epoch:
            raise ValueError(
                f"retrain.epochs={retrain_settings['epochs']} is below the search's train.epochs="
                f"{last_epoch}: the retrained models would train less than the searched ones; raise "
                "retrain.epochs."
            )
    exp_dir = sweep_uri(storage, name)
    # the retrain stage's Tune experiment, inside the sweep's folder (`final` in sweeps made before the rename)
    retrain_name = retrain_experiment(lambda experiment: tune.Tuner.can_restore(sweep_uri(exp_dir, experiment)))
    searched = None
    if stage == "retrain":
        searched = search_results(exp_dir, name, base_config)
        if not resume and tune.Tuner.can_restore(sweep_uri(exp_dir, retrain_name)):
            raise FileExistsError(
                f"Sweep {name!r} already has a retrain stage; continue it with "
                f"`python sweeps/run.py resume=true stage=retrain name={name}`."
            )
    # KD ablations switch KD on for configurations that searched without it: they need the teacher too.
    kd_possible = may_use_kd(space, base_config) or (retrain and retrain_settings["ablations"])
    if kd_possible:
        validate_teacher(base_config)  # the teacher trains on the base config, whatever the trials sample
    return SweepPlan(
        name=name,
        base_config=base_config,
        settings=settings,
        storage=storage,
        stage=stage,
        resume=resume,
        space=space,
        trials=num_samples(space, settings["num_samples"]),
        budget=budget,
        last_epoch=last_epoch,
        retrain=retrain,
        kd_possible=kd_possible,
        exp_dir=exp_dir,
        retrain_name=retrain_name,
        searched=searched,
    )


def connect(plan: SweepPlan) -> TrialResources:
    """Join or start Ray, size the trials from the cluster's nodes (not this machine's hardware, which may have no
    GPU), check the folders every node must share, and record the sweep so that a kill at any moment resumes."""
    address = plan.settings["ray"]["address"]
    code = (
        None
        if is_local_address(address)
        else code_runtime_env([str(plan.workdir), plan.storage, plan.base_config["data"]["root"]])
    )
    start_ray(address, plan.settings["ray"]["num_cpus"], code)  # a cluster that refuses us leaves no sweep
    nodes = cluster_nodes()
    resources = plan_resources(
        plan.settings["resources"]["cpus_per_trial"],
        plan.settings["resources"]["gpus_per_trial"],
        nodes,
        plan.base_config["device"],
    )
    check_shared_folders(
        len(nodes), {"storage_path": plan.storage, "workdir": str(plan.workdir)}, plan.settings["ray"]["shared_storage"]
    )
    if not plan.resume:
        write_state(plan.storage, plan.name, {"base_config": plan.base_config, "sweep": plan.settings})
    # made here, with its artifact folder under the workdir, before any trial's MLflow run
    plan.experiment_id = ensure_experiment(plan.tracking_uri, plan.name, plan.workdir / "mlflow-artifacts" / plan.name)
    retraining = plan.stage == "retrain"
    print(
        f"Sweep {plan.name} ({'retraining the front of ' if retraining else f'{plan.trials} trials of space '}"
        f"{plan.settings['space']}); if interrupted, continue it with:\n"
        f"  python sweeps/run.py resume=true name={plan.name}{' stage=retrain' if retraining else ''}\n"
        f"Ray: {resources.summary}",
        flush=True,
    )
    return resources


def data_stage(plan: SweepPlan) -> WaveformData:
    plan.step("data", "preparing the dataset and its waveform cache")
    return prepare_data(plan.base_config["data"], plan.workdir)


def teacher_stage(plan: SweepPlan, data: WaveformData, resources: TrialResources) -> dict[str, Any]:
    """The teacher's logits, cached, for the trials that distil ({} when none can)."""
    if not plan.kd_possible:
        return {}
    plan.step("teacher", "training or loading it and caching its logits")
    return run_teacher(plan.base_config, data, resources)  # a Ray task: the driver never trains nor uses CUDA


def make_trainable(plan: SweepPlan, data: WaveformData, kd_inputs: dict[str, Any], resources: TrialResources) -> Any:
    """The trial function with what every trial shares (paths, not arrays) and the resources each one asks for."""
    threads = max(1, int(resources.cpus_per_trial))  # torch threads per trial follow its CPU share (at least one)
    base_config = {**plan.base_config, "train": {**plan.base_config["train"], "num_threads": threads}}
    return tune.with_resources(
        tune.with_parameters(run_trial, base_config=base_config, data_dir=str(data.cache_dir), kd_inputs=kd_inputs),
        {"cpu": resources.cpus_per_trial, "gpu": resources.gpus_per_trial},
    )


def tune_run_config(name: str, storage: str, callbacks: list[Any], reporter: Any, max_failures: int) -> tune.RunConfig:
    """Where and how Tune keeps a stage: storage, callbacks, console table, a checkpoint after every epoch, and
    `max_failures` restarts of a failed trial (a node lost, a process killed) from that checkpoint, on any node.

    num_to_keep=1 makes Tune force a synced experiment snapshot after every trial checkpoint: the only thing that
    puts the state in storage at once (unforced syncs wait for SyncConfig.sync_period). With 2, a SIGKILL lost the
    rung records of the last epochs (measured in the kill/resume test).
    """
    return tune.RunConfig(
        name=name,
        storage_path=storage,
        callbacks=callbacks,
        verbose=1,
        progress_reporter=reporter,
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        failure_config=tune.FailureConfig(max_failures=max_failures),
    )


def restore(experiment_dir: str, trainable: Any, what: str) -> tune.Tuner:
    """A stage's Tuner from its own pickled state (scheduler, searcher, callbacks), after a kill."""
    set_aside_truncated_state(experiment_dir)
    log.info("Resuming %s from %s", what, experiment_dir)
    return tune.Tuner.restore(experiment_dir, trainable=trainable, resume_errored=True)


def search_stage(plan: SweepPlan, trainable: Any) -> ResultGrid:
    """The search: Optuna suggests, the scheduler stops, MLflow records; continued where it stopped on resume."""
    plan.step("search", f"{plan.trials} trials; progress table every 30 s")
    settings = plan.settings
    if plan.resume and tune.Tuner.can_restore(plan.exp_dir):
        tuner = restore(plan.exp_dir, trainable, f"sweep {plan.name}")
    else:  # a new sweep, or one killed before its first trial started: data and teacher come from their caches
        objective = settings["search"]["objective"]
        scheduler_name = settings["scheduler"]["name"] or default_scheduler(plan.space, objective)
        scheduler = make_scheduler(
            scheduler_name,
            objective,
            plan.last_epoch,
            settings["scheduler"]["grace_period"],
            settings["scheduler"]["reduction_factor"],
            budget=plan.budget,
            metric=settings["scheduler"]["metric"],
        )
        callbacks = plan.callbacks(Stage.search.value, plan.last_epoch, {"scheduler": scheduler_name})
        if isinstance(scheduler, ParetoASHA):
            callbacks.append(ParetoASHAStateCallback(scheduler))
        searcher = make_searcher(
            plan.space,
            settings["search"]["sampler"],
            objective,
            plan.base_config["seed"],
            plan.last_epoch,
            budget=plan.budget,
            base_config=plan.base_config if settings["budget"]["screen"] else None,
        )
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(plan.space),
            tune_config=tune.TuneConfig(  # no metric/mode here: it would make OptunaSearch single-objective
                search_alg=searcher,
                scheduler=scheduler,
                num_samples=plan.trials,
                max_concurrent_trials=settings["resources"]["max_concurrent_trials"],
                reuse_actors=True,
            ),
            run_config=tune_run_config(
                plan.name, plan.storage, callbacks, progress_reporter(plan.space), settings["resources"]["max_failures"]
            ),
        )
    searched = tuner.fit()
    print("\n" + search_line(plan), flush=True)
    errors = sum(1 for r in searched if r.error)
    if errors:
        print(f"{errors} trial(s) errored; their messages are in MLflow (tag 'error') and {plan.exp_dir}.")
    return searched


def search_line(plan: SweepPlan) -> str:
    """How the search's trials ended, as the analysis counts them (analysis.results.trials_line)."""
    if "://" in plan.storage:
        return f"Search done; its trials are in {plan.exp_dir}."
    try:
        return trials_line(load_sweep(Path(plan.exp_dir)).trials)
    except ValueError:
        return "No trial reported a result (see the errors above)."


def retrain_stage(plan: SweepPlan, searched: Any, trainable: Any) -> None:
    """Retrain the front (sweeps/retrain.py) as the Tune experiment <sweep folder>/<retrain_name>; resumed when
    asked."""
    plan.step("retrain", "the front's configurations, longer and with seeds, scored on the test split")
    settings = plan.settings["retrain"]
    retrain_dir = sweep_uri(plan.exp_dir, plan.retrain_name)
    if plan.resume and tune.Tuner.can_restore(retrain_dir):
        tuner = restore(retrain_dir, trainable, f"the retrain stage of {plan.name}")
    else:
        configs = spread(front_configs(searched, plan.base_config), settings["max_configs"])
        if not configs:
            raise ValueError(
                f"Sweep {plan.name!r} has no front trial to retrain: every trial errored or broke the budget."
            )
        points = retrain_points(configs, plan.base_config, settings)
        check_points(points, plan.base_config)
        print(describe(configs, points, settings), flush=True)
        reporter = CLIReporter(
            metric_columns={"epoch": "epoch", ACCURACY: ACCURACY, "test_acc": "test_acc"},
            parameter_columns={f"grid_point/origin.{k}": k for k in ("front_trial", "role")}
            | {"grid_point/train.seed": "seed"},
            max_report_frequency=30,
            sort_by_metric=False,
        )
        tuner = tune.Tuner(
            trainable,
            param_space={"grid_point": tune.grid_search(points)},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=plan.settings["resources"]["max_concurrent_trials"], reuse_actors=True
            ),
            run_config=tune_run_config(
                plan.retrain_name,
                plan.exp_dir,
                plan.callbacks(Stage.retrain.value, settings["epochs"], {}),
                reporter,
                plan.settings["resources"]["max_failures"],
            ),
        )
    retrained = tuner.fit()
    finished = sum(1 for r in retrained if not r.error)
    print(f"\nRetrained: {finished} of {len(retrained)} runs finished ({retrain_dir}).", flush=True)


def close(plan: SweepPlan) -> None:
    """Trials' scratch files removed, Ray left, and where the results are."""
    shutil.rmtree(plan.workdir / "trial-scratch", ignore_errors=True)  # trials' working files (tune_trainable.py)
    ray.shutdown()
    print(
        f"\nRay results: {plan.exp_dir}\nMLflow:      {plan.tracking_uri} (experiment {plan.name!r})\n"
        f"      mlflow ui --backend-store-uri {plan.tracking_uri}   # then open {runs_page(plan.experiment_id)}\n",
        flush=True,
    )


def report_stage(plan: SweepPlan) -> None:
    """The analysis of the finished sweep, in this process: front, plot, retrained numbers and conclusions; first,
    when asked (retrain.export, or a budget), ONNX, int8 and CPU latency of the retrained front models, so the report
    names the model to ship with them. A failing report loses nothing: the sweep is done, the lines say how to rerun
    it."""
    export = plan.retrain and (
        plan.settings["retrain"]["export"]
        if plan.settings["retrain"]["export"] is not None
        else plan.budget is not None
    )
    plan.step(
        "report",
        ("ONNX, int8 and CPU latency of the retrained front models, then " if export else "")
        + "front, plot, retrained numbers and conclusions",
    )  # last: the report's file paths end the output
    if "://" in plan.storage:
        print(
            "Storage is remote; the analysis reads local folders. Copy the sweep folder here, then run:\n  "
            f"python analysis/{'export.py trial=retrained' if export else 'pareto.py'} path=<local sweep folder>"
        )
        return
    config = compose("analysis") | {
        "name": plan.name,
        "storage_path": plan.storage,
        "workdir": str(plan.workdir),
        "trial": "retrained",
    }
    config["mlflow"] = {**config["mlflow"], "tracking_uri": plan.tracking_uri}
    if export:
        retry = f"python analysis/export.py name={plan.name} trial=retrained"
        try:
            if not export_models(config):
                print(
                    f"Some retrained models were not exported (lines above); the report is written. Retry them "
                    f"with: {retry}"
                )
            return
        except USER_ERRORS as err:
            print(
                f"The retrained models were not exported ({err}); writing the report without them. Retry with: {retry}"
            )
        except Exception:  # noqa: BLE001 - the sweep's results stay; the report is written without the export
            log.exception(
                "The export of the retrained models failed; writing the report without it. Retry with: %s", retry
            )
    try:
        write_report(config)
    except Exception:  # noqa: BLE001 - the sweep is done and saved; only its report is missing
        log.exception("The report failed; rerun it with: python analysis/pareto.py name=%s", plan.name)


def run_sweep(
    name: str, base_config: dict[str, Any], settings: dict[str, Any], storage: str, resume: bool, stage: str
) -> None:
    """The sweep's stages, in order: search (stage=search), then retrain its front (retrain.enabled), then the report;
    stage=retrain: only the retraining and the report, for a sweep that has searched. resume=true continues whichever
    stage was cut."""
    plan = plan_sweep(name, base_config, settings, storage, resume, stage)  # every refusal, before any work
    resources = connect(plan)
    data = data_stage(plan)
    kd_inputs = teacher_stage(plan, data, resources)
    trainable = make_trainable(plan, data, kd_inputs, resources)
    searched = search_stage(plan, trainable) if stage == "search" else plan.searched
    if plan.retrain:
        retrain_stage(plan, searched, trainable)
    close(plan)
    report_stage(plan)
