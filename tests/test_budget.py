"""Hard budgets (budget.max_macs / max_params / max_kb): validation, kB counting, constraints in the Optuna
study, refusal of unreachable budgets, and one real sweep whose over-budget trials stop at epoch 1."""

from __future__ import annotations

import json
import math
import sqlite3
import subprocess
import time
from pathlib import Path

import optuna
import pytest

from common.config import sweep_defaults
from common.trial_table import param_kb
from sweeps.budget import Budget, check_reachable, smallest_reachable

ROOT = Path(__file__).resolve().parent.parent
QUICK = {
    "kd.enabled": True,
    "kd.T": 3.0,
    "kd.alpha": 0.5,
    "features.n_mels": 64,
    "student.width_mult": 1.0,
    "pruning.mode": "none",
    "pruning.target_macs_ratio": 0.5,
    "pruning.steps": 2,
    "pruning.step_epochs": 1,
    "pruning.at_epoch": 2,
    "train.epochs": 3,
    "train.warmup_epochs": 0,
}


def budget_of(**settings) -> Budget | None:
    """The Budget of a sweep's budget.* section: the schema's (common.config.sweep_defaults), `settings` over it."""
    return Budget.from_config(sweep_defaults()["budget"] | settings)


# ---- kB, validation, constraint values ---------------------------------------------------------------------


def test_parameter_kb_is_bytes_per_parameter_over_1000():
    assert param_kb(128_000, "int8") == 128.0  # the DCASE limit: 128 kB = 128,000 int8 parameters
    assert param_kb(64_000, "fp16") == 128.0
    assert param_kb(32_000, "fp32") == 128.0
    assert param_kb(61_148, "fp16") == pytest.approx(122.296)  # the DCASE 2024 baseline at 16 bits


@pytest.mark.parametrize(
    "config, message",
    [
        ({"max_macs": 0}, "budget.max_macs=0 must be a number > 0"),
        ({"max_params": -5.0}, "budget.max_params=-5.0 must be a number > 0"),
        ({"max_kb": 0.0, "precision": "fp16"}, "budget.max_kb=0.0 must be a number > 0"),
        ({"max_kb": math.inf}, "budget.max_kb=inf must be a number > 0"),
        ({"max_macs": math.nan}, "budget.max_macs=nan must be a number > 0"),
        ({"max_macs": True}, "budget.max_macs=True must be a number > 0"),
        ({"max_latency": 5}, "budget.max_latency is not a budget; the budgets are budget.max_macs"),
        ({"max_kb": 128, "precision": "int4"}, "budget.precision='int4'; choose one of int8, fp16, fp32"),
    ],
)
def test_invalid_budgets_are_one_clear_line(config, message):
    with pytest.raises(ValueError) as error:
        budget_of(**config)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_no_budget_set_means_no_budget():
    assert budget_of(precision="fp32") is None
    budget = budget_of(max_macs=3e6, max_kb=128, precision="int8")
    assert budget.limits == {"max_macs": 3e6, "max_kb": 128.0}


def test_constraint_values_and_result_annotations():
    budget = Budget(max_macs=1e6, max_params=200_000, max_kb=128, precision="int8")
    result = {"epoch": 1, "target_macs": 5e5, "macs": 2e6, "params": 256_000, "pruning_step": 0}
    # before its pruning is done a trial is judged on its target MACs (known) and its current params (measured)
    assert budget.constraints(result, at_end=False) == pytest.approx(
        {"max_macs": -0.5, "max_params": 0.28, "max_kb": 1.0}
    )
    assert budget.broken(result, at_end=False) == {}  # params may still fall with pruning
    assert budget.broken(result, at_end=True) == {"max_macs": 2e6, "max_params": 256_000, "max_kb": 256.0}
    notes = budget.annotations(result, at_end=False)
    assert notes["feasible"] == 0 and notes["param_kb"] == 256.0
    assert notes["constraint_max_macs"] == pytest.approx(-0.5) and notes["constraint_max_kb"] == pytest.approx(1.0)
    assert budget_of(max_macs=1e6).annotations(result, at_end=False) == {"feasible": 1, "constraint_max_macs": -0.5}


# ---- constraints reach the Optuna study ---------------------------------------------------------------------


def test_constraints_reach_the_study_for_complete_and_pruned_trials():
    from optuna.samplers._tpe.sampler import _get_infeasible_trial_score
    from optuna.study._constrained_optimization import _get_feasible_trials

    from search_spaces.schema import load_space
    from sweeps.tuning import make_searcher

    budget = budget_of(max_macs=2e6, max_kb=100, precision="int8")
    searcher = make_searcher(load_space("quick", QUICK), "tpe", "multi", seed=0, last_epoch=3, budget=budget)
    searcher.set_search_properties(None, None, {})
    for trial_id in ("over_macs", "feasible", "over_kb", "stopped_ok", "errored"):
        assert searcher.suggest(trial_id)
    # stopped at epoch 1 by ParetoASHA: its target MACs break the budget
    searcher.on_trial_complete(
        "over_macs",
        {
            "epoch": 1,
            "val_acc": 0.9,
            "target_macs": 3e6,
            "macs": 6e6,
            "params": 90_000,
            "pruning_step": 0,
            "pruning_steps": 1,
        },
    )
    searcher.on_trial_complete(
        "feasible",
        {
            "epoch": 3,
            "val_acc": 0.6,
            "target_macs": 1.5e6,
            "macs": 1.5e6,
            "params": 80_000,
            "pruning_step": 1,
            "pruning_steps": 1,
        },
    )
    searcher.on_trial_complete(
        "over_kb",
        {
            "epoch": 3,
            "val_acc": 0.7,
            "target_macs": 1e6,
            "macs": 1e6,
            "params": 150_000,
            "pruning_step": 0,
            "pruning_steps": 0,
        },
    )
    searcher.on_trial_complete(
        "stopped_ok",
        {
            "epoch": 2,
            "val_acc": 0.5,
            "target_macs": 1e6,
            "macs": 4e6,
            "params": 99_000,
            "pruning_step": 0,
            "pruning_steps": 1,
        },
    )
    searcher.on_trial_complete("errored", {"epoch": 2, "val_acc": 0.7, "target_macs": 5e6}, error=True)
    study = next(value for value in vars(searcher).values() if isinstance(value, optuna.Study))
    trials = study.get_trials(deepcopy=False)
    states = [t.state for t in trials]
    TS = optuna.trial.TrialState
    assert states == [TS.PRUNED, TS.COMPLETE, TS.COMPLETE, TS.PRUNED, TS.FAIL]
    # Optuna 5 keeps one system attr per named constraint; the samplers read them back as FrozenTrial.constraints
    over_macs, feasible, over_kb, stopped_ok, errored = trials
    assert over_macs.system_attrs["constraints:max_macs"] == pytest.approx(0.5)  # 3e6 / 2e6 - 1, the target
    assert over_macs.constraints == pytest.approx({"max_macs": 0.5, "max_kb": -0.1})
    assert feasible.constraints == pytest.approx({"max_macs": -0.25, "max_kb": -0.2})
    assert over_kb.constraints == pytest.approx({"max_macs": -0.5, "max_kb": 0.5})
    assert stopped_ok.constraints == pytest.approx({"max_macs": -0.5, "max_kb": -0.01})
    assert errored.constraints == {}  # FAIL trials carry none (Optuna ignores them anyway)
    assert [t.user_attrs.get("feasible") for t in trials] == [False, True, False, True, None]
    # what the samplers do with them: TPE's infeasibility score (PRUNED trials included), the feasible set
    assert [_get_infeasible_trial_score(t) for t in trials[:4]] == pytest.approx([0.5, 0.0, 0.5, 0.0])
    assert [t.number for t in _get_feasible_trials(trials[:4])] == [feasible.number, stopped_ok.number]
    # past its 10 random start-up trials, TPE samples from a study with infeasible trials (its constrained split)
    again = make_searcher(load_space("quick", QUICK), "tpe", "multi", seed=1, last_epoch=3, budget=budget)
    again.set_search_properties(None, None, {})
    for n in range(12):
        assert again.suggest(f"t{n}")
        again.on_trial_complete(
            f"t{n}",
            {
                "epoch": 3 - n % 2,
                "val_acc": 0.1 * (n % 7),
                "target_macs": 1e6 * (n % 4),
                "macs": 1e6 * (n % 4),
                "params": 1000,
                "pruning_step": 0,
            },
        )
    assert again.suggest("last")


# ---- refusal of budgets the space cannot meet --------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_base():
    from common.cli import compose
    from common.config import run_section

    return run_section(compose("sweep", ["data.families=[bass,keyboard,organ]", "data.clip_seconds=0.5"]))


def quick_space(base):
    from common.config import accepted_values
    from common.tracking import flatten
    from search_spaces.schema import load_space

    return load_space("quick", flatten(base), accepted_values())


@pytest.mark.slow
def test_unreachable_budget_is_refused_naming_the_smallest_reachable_value(quick_base):
    space = quick_space(quick_base)
    started = time.monotonic()
    reach = smallest_reachable(budget_of(max_macs=1, max_params=1), space, quick_base)
    assert time.monotonic() - started < 20  # a few model builds and one pruning run
    # the smallest quick-space student: width 0.5, 32 mels x 51 frames (0.5 s clips), 30 % of its MACs kept
    assert reach["max_macs"].value == 305_529
    assert "width_mult=0.5" in reach["max_macs"].how and "target_macs_ratio=0.3" in reach["max_macs"].how
    with pytest.raises(
        ValueError,
        match=r"budget.max_macs=300,000 cannot be met by any trial of space quick: the "
        r"smallest it reaches is 305,529 MACs",
    ):
        check_reachable(budget_of(max_macs=300_000), space, quick_base)
    check_reachable(budget_of(max_macs=305_529), space, quick_base)  # exactly reachable: accepted
    params = reach["max_params"].value
    with pytest.raises(
        ValueError,
        match=rf"budget.max_kb=10 cannot be met .* about {params / 1000:,.1f} kB of "
        r"parameters at int8",
    ):
        check_reachable(budget_of(max_kb=10), space, quick_base)
    check_reachable(budget_of(max_params=params, max_kb=params / 1000), space, quick_base)
    check_reachable(None, space, quick_base)


@pytest.mark.slow
def test_the_params_probe_prunes_like_the_trial_with_its_round_to(quick_base):
    """A trial with pruning.round_to prunes to channel counts in its multiples: the params probe prunes the same way
    (it once pruned every student without round_to, whatever the trial's was)."""
    from sweeps.budget import _student_costs
    from trainable.run_config import trial_config

    config = trial_config(
        quick_base,
        {"pruning.mode": "single", "pruning.target_macs_ratio": 0.3, "student.width_mult": 0.5, "features.n_mels": 32},
    )
    params = {
        round_to: _student_costs([config | {"pruning": config["pruning"] | {"round_to": round_to}}], True)[0][1]
        for round_to in (None, 16)
    }
    assert params[16] != params[None]  # the same MACs target, reached with channel counts in multiples of 16


# ---- the real CLI ------------------------------------------------------------------------------------------


def sweep_cmd(workdir: Path, *args: str) -> list[str]:
    from tests.test_sweep import sweep_cmd as tiny_sweep_cmd

    # the quick-space MACs below assume these: 3 classes, 0.5 s clips (51 frames)
    return tiny_sweep_cmd(workdir, "data.families=[bass,keyboard,organ]", "data.clip_seconds=0.5", *args)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["budget.max_macs=1000"],
            "error: budget.max_macs=1,000 cannot be met by any trial of space quick: the smallest "
            "it reaches is 305,529 MACs",
        ),
        (["budget.max_kb=0"], "error: budget.max_kb=0.0 must be a number > 0"),
        (["+budget.max_latency=5"], "error: budget.max_latency is not a budget"),
    ],
)
@pytest.mark.slow
def test_cli_refuses_bad_budgets_before_any_work(tmp_path, args, message):
    out = subprocess.run(
        sweep_cmd(tmp_path, "space=quick", "name=b", *args), capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "data").exists() and not (tmp_path / "ray_results" / "b").exists()  # nothing lost


def _callback_state(exp_dir: Path) -> dict:
    import ray.cloudpickle as cloudpickle

    newest = max(exp_dir.glob("callback-states-*.pkl"))
    states = cloudpickle.loads(newest.read_bytes())
    return next(state for state in states.values() if state and "over_budget" in state)


@pytest.mark.slow
def test_screening_spends_every_suggestion_inside_the_budget_and_tells_the_study(quick_base):
    from sweeps.budget import predicted_constraints
    from sweeps.tuning import make_searcher
    from trainable.run_config import trial_config

    budget = budget_of(max_macs=2e6, max_kb=300)
    searcher = make_searcher(
        quick_space(quick_base), "tpe", "multi", seed=0, last_epoch=3, budget=budget, base_config=quick_base
    )
    searcher.set_search_properties(None, None, {})
    suggestions = [searcher.suggest(f"t{n}") for n in range(6)]
    predicted = [predicted_constraints(budget, trial_config(quick_base, s)) for s in suggestions]
    assert all(value <= 0 for constraints in predicted for value in constraints.values()), predicted
    study = next(value for value in vars(searcher).values() if isinstance(value, optuna.Study))
    screened = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("screened")]
    assert screened and searcher.screened == len(screened)  # seed 0 draws over-budget configs first
    assert all(
        t.state == optuna.trial.TrialState.PRUNED
        and max(t.constraints.values()) > 0
        and t.user_attrs["feasible"] is False
        for t in screened
    )


@pytest.mark.timeout(900)
@pytest.mark.parametrize("screen", [False, True])
@pytest.mark.slow
def test_sweep_over_budget_trials_stopped_at_epoch_1_or_screened_before_training(tmp_path, screen):
    from tests.test_sweep import searcher_study

    budget = 3_000_000  # quick-space targets run from 0.3 M to 5.2 M MACs; seed 0 draws some on each side
    out = subprocess.run(
        sweep_cmd(
            tmp_path,
            "space=quick",
            "num_samples=4",
            "name=bud",
            f"budget.max_macs={budget}",
            f"budget.screen={str(screen).lower()}",
        ),
        capture_output=True,
        text=True,
        timeout=800,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    exp_dir = tmp_path / "ray_results" / "bud"
    trials = {}
    for path in exp_dir.glob("*/result.json"):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        trials[lines[0]["trial_id"]] = lines
    assert len(trials) == 4
    over = {tid for tid, lines in trials.items() if lines[0]["target_macs"] > budget}
    study = searcher_study(exp_dir).get_trials(deepcopy=False)
    if screen:  # every trial that ran is inside the budget; the over-budget draws are in the study, never trained
        assert not over and all(line["feasible"] == 1 for lines in trials.values() for line in lines)
        screened = [t for t in study if t.user_attrs.get("screened")]
        assert screened and len(study) == 4 + len(screened)
        assert all(t.state == optuna.trial.TrialState.PRUNED and t.constraints["max_macs"] > 0 for t in screened)
        return
    assert 0 < len(over) < 4, {tid: lines[0]["target_macs"] for tid, lines in trials.items()}
    for tid, lines in trials.items():
        if tid in over:  # stopped at its first report, and every recorded result says so
            assert [line["epoch"] for line in lines] == [1]
            assert lines[0]["feasible"] == 0
            assert lines[0]["constraint_max_macs"] == pytest.approx(lines[0]["target_macs"] / budget - 1)
        else:
            assert all(line["feasible"] == 1 and line["constraint_max_macs"] <= 0 for line in lines)
    # ParetoASHA counted them and never ranked them
    state = _callback_state(exp_dir)
    assert set(state["over_budget"]) == over
    assert not over & {tid for records in state["records"].values() for tid in records}
    # the study holds them as PRUNED with a violated constraint; the others are feasible
    assert len(study) == 4
    configs = {tid: lines[0]["config"] for tid, lines in trials.items()}
    for frozen in study:
        (tid,) = [
            tid
            for tid, config in configs.items()
            if all(config.get(key) == value for key, value in frozen.params.items())
        ]
        if tid in over:
            assert frozen.state == optuna.trial.TrialState.PRUNED
            assert frozen.constraints["max_macs"] == pytest.approx(trials[tid][-1]["target_macs"] / budget - 1)
            assert frozen.constraints["max_macs"] > 0 and frozen.user_attrs["feasible"] is False
        else:
            assert frozen.constraints["max_macs"] <= 0 and frozen.user_attrs["feasible"] is True
    # MLflow has the feasibility of every run (1/0)
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        logged = db.execute("SELECT COUNT(DISTINCT run_uuid) FROM metrics WHERE key = 'feasible'").fetchone()[0]
    assert logged == 4


def test_sweep_summary_counts_over_budget_trials_and_those_stopped_before_their_pruning(quick_base):
    """The line the sweep prints when its search ends, and atop every analysis summary (analysis.results)."""
    from analysis.results import trials_line
    from common.trial_table import TrialRecord
    from trainable.run_config import trial_config

    epochs = quick_base["train"]["epochs"]
    config = trial_config(quick_base, {"pruning.mode": "single"})

    def trial(trial_id, epoch, feasible, pruning_step, status, macs_constraint=-0.5):
        metrics = {
            "trial_id": trial_id,
            "epoch": epoch,
            "val_acc": 0.5,
            "val_macro_f1": 0.5,
            "feasible": feasible,
            "target_macs": 1e6,
            "macs": 1e6,
            "params": 50_000,
            "pruning_step": pruning_step,
            "pruning_steps": 1,
            "constraint_max_macs": macs_constraint,
        }
        return TrialRecord(
            sweep="s",
            trial_id=trial_id,
            trial_dir=Path("/nonexistent"),
            config=config,
            metrics=metrics,
            checkpoint=None,
            status=status,
        )

    trials = [
        trial("done", epochs, 1, 1, "completed"),  # finished inside the budget
        trial("big", epochs, 0, 1, "completed"),  # finished, measured over the budget
        trial("early", 1, 0, 0, "stopped"),  # stopped before its pruning step: unpruned
        trial("wide", 1, 0, 0, "stopped", 0.5),  # stopped early, but over the MACs budget anyway
        trial("crash", 1, 1, 0, "errored"),
    ]
    assert trials_line(trials) == (
        "Trials with results: 5 (2 completed, 2 stopped, 1 errored), 3 over the budget (1 of them stopped by the "
        "scheduler before their last pruning step: the model they left is unpruned)"
    )
    assert trials_line(trials[:1]) == "Trials with results: 1 (1 completed)"
