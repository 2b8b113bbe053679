import pickle

import pytest
from ray.tune.callback import CallbackList
from ray.tune.experiment import Trial
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from common.config import sweep_defaults
from sweeps.pareto_asha import ParetoASHA, ParetoASHAStateCallback

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP
METRIC = sweep_defaults()["scheduler"]["metric"]  # the schema's scheduler.metric


def _trial(trial_id: str) -> Trial:
    # Same construction as Ray's own scheduler tests: a stub Trial needs no cluster.
    return Trial("__fake", stub=True, trial_id=trial_id)


def _result(epoch: int, acc: float, macs: float) -> dict:
    return {"training_iteration": epoch, "val_acc": acc, "target_macs": macs}


def _scheduler() -> ParetoASHA:
    scheduler = ParetoASHA(max_t=10, grace_period=1, reduction_factor=3)
    scheduler.set_search_properties(None, None)  # what Tune does with an unset TuneConfig metric/mode
    return scheduler


def _report(scheduler, trial, epoch, acc, macs):
    return scheduler.on_trial_result(None, trial, _result(epoch, acc, macs))


def test_rungs_sit_at_grace_period_times_powers_of_eta_below_max_t():
    assert ParetoASHA(max_t=10, grace_period=1, reduction_factor=3).rung_milestones == [1, 3, 9]
    assert ParetoASHA(max_t=9, grace_period=1, reduction_factor=3).rung_milestones == [1, 3]
    assert ParetoASHA(max_t=20, grace_period=2, reduction_factor=2).rung_milestones == [2, 4, 8, 16]


def test_hand_worked_rung_decisions():
    scheduler = _scheduler()
    trials = {name: _trial(name) for name in "ABCDEF"}
    for trial in trials.values():
        scheduler.on_trial_add(None, trial)

    # Rung 1, keep max(1, ceil(n / 3)) by (Pareto rank, crowding distance desc).
    # A alone: continues.
    assert _report(scheduler, trials["A"], 1, 0.80, 100) == CONTINUE
    # B dominated by A (rank 1), n=2 keep 1 -> position 1: stop.
    assert _report(scheduler, trials["B"], 1, 0.70, 120) == STOP
    # C is cheaper and less accurate: front {A, C}, both extremes (inf crowding); ties go to
    # the trial being decided -> position 0 of keep 1: continue.
    assert _report(scheduler, trials["C"], 1, 0.60, 20) == CONTINUE
    # D dominated by A: rank 1, two rank-0 trials ahead, n=4 keep 2: stop.
    assert _report(scheduler, trials["D"], 1, 0.75, 150) == STOP
    # E is on the front but interior (finite crowding) behind extremes A and C; n=5 keep 2: stop.
    assert _report(scheduler, trials["E"], 1, 0.78, 50) == STOP
    # F is the new accuracy extreme: inf crowding like C (A is now interior), ties go to F
    # -> position 0; n=6 keep 2: continue.
    assert _report(scheduler, trials["F"], 1, 0.85, 140) == CONTINUE

    # Between rungs nothing is decided; a repeated rung result does not re-record.
    assert _report(scheduler, trials["A"], 2, 0.10, 1000) == CONTINUE
    assert _report(scheduler, trials["A"], 1, 0.10, 1000) == CONTINUE
    assert len(scheduler.get_state()["records"][1]) == 6

    # Rung 3: A arrives first and continues. F dominates A there and continues; A's earlier
    # decision stands (decisions are taken on arrival only, as in ASHA).
    assert _report(scheduler, trials["A"], 3, 0.82, 100) == CONTINUE
    assert _report(scheduler, trials["F"], 3, 0.86, 99) == CONTINUE
    # A late, dominated trial at rung 3: rank 1 behind F, n=3 keep 1: stop.
    assert _report(scheduler, _trial("G"), 3, 0.50, 200) == STOP

    # Reaching max_t always stops.
    assert _report(scheduler, trials["F"], 10, 0.9, 99) == STOP
    assert "num_stopped=5" in scheduler.debug_string()


def test_cheap_front_trial_survives_where_single_metric_asha_stops_it():
    asha = AsyncHyperBandScheduler(metric="val_acc", mode="max", max_t=10, grace_period=1, reduction_factor=3)
    pareto = _scheduler()
    history = [("big", 0.80, 100.0), ("mid", 0.79, 90.0), ("cheap", 0.70, 15.0)]
    asha_decisions, pareto_decisions = {}, {}
    for name, acc, macs in history:
        trial = _trial(name)
        asha.on_trial_add(None, trial)
        pareto.on_trial_add(None, trial)
        asha_decisions[name] = asha.on_trial_result(None, trial, _result(1, acc, macs))
        pareto_decisions[name] = pareto.on_trial_result(None, trial, _result(1, acc, macs))
    assert asha_decisions["cheap"] == STOP
    assert pareto_decisions["cheap"] == CONTINUE


def test_buffered_result_jumping_past_a_rung_is_ranked_at_the_highest_rung_reached():
    scheduler = _scheduler()
    assert _report(scheduler, _trial("A"), 4, 0.8, 10) == CONTINUE
    records = scheduler.get_state()["records"]
    assert records[1] == {} and list(records[3]) == ["A"]


def test_completion_records_a_result_the_scheduler_was_not_asked_about():
    scheduler = _scheduler()
    scheduler.on_trial_complete(None, _trial("A"), _result(1, 0.9, 10))
    scheduler.on_trial_complete(None, _trial("B"), {})  # stopped before reporting: ignored
    assert _report(scheduler, _trial("C"), 1, 0.5, 20) == STOP


def test_missing_objective_is_a_clear_error():
    scheduler = _scheduler()
    with pytest.raises(ValueError, match=r"lacks \['target_macs'\]"):
        scheduler.on_trial_result(None, _trial("A"), {"training_iteration": 1, "val_acc": 0.5})


def test_invalid_construction_is_rejected():
    with pytest.raises(ValueError, match="'max' or 'min'"):
        ParetoASHA(objectives={"val_acc": "maximize"}, max_t=10, grace_period=1, reduction_factor=3)
    with pytest.raises(ValueError, match="reduction_factor"):
        ParetoASHA(max_t=10, grace_period=1, reduction_factor=1)


def test_tune_metric_and_mode_are_accepted_but_do_not_change_the_objectives():
    scheduler = _scheduler()
    assert scheduler.set_search_properties("val_acc", "max", config={}) is True
    assert scheduler.metric is None  # Tune then does not demand a single scheduler metric
    with pytest.raises(ValueError, match="target_macs"):
        scheduler.on_trial_result(None, _trial("A"), {"training_iteration": 1, "val_acc": 0.5})


def _fill(scheduler):
    _report(scheduler, _trial("A"), 1, 0.8, 100)
    _report(scheduler, _trial("B"), 1, 0.6, 20)
    _report(scheduler, _trial("C"), 3, 0.7, 50)


def test_pickle_round_trip_keeps_rungs_and_decisions():
    scheduler = _scheduler()
    _fill(scheduler)
    restored = pickle.loads(pickle.dumps(scheduler))
    assert restored.get_state() == scheduler.get_state()
    assert restored.debug_string() == scheduler.debug_string()
    # Same next decision as the original: dominated by A and B's front at rung 1.
    assert _report(restored, _trial("D"), 1, 0.5, 150) == STOP
    assert _report(scheduler, _trial("D"), 1, 0.5, 150) == STOP


def test_save_and_restore_files(tmp_path):
    scheduler = _scheduler()
    _fill(scheduler)
    scheduler.save(str(tmp_path / "scheduler.pkl"))
    fresh = _scheduler()
    fresh.restore(str(tmp_path / "scheduler.pkl"))
    assert fresh.get_state() == scheduler.get_state()
    mismatched = ParetoASHA(max_t=100, grace_period=1, reduction_factor=3)
    with pytest.raises(ValueError, match="same max_t"):
        mismatched.restore(str(tmp_path / "scheduler.pkl"))


def test_state_callback_restores_rungs_the_way_tuner_restore_does(tmp_path):
    # Tuner pickles scheduler and callbacks together at creation (tuner.pkl), before any result.
    scheduler = _scheduler()
    callbacks = [ParetoASHAStateCallback(scheduler)]
    tuner_pkl = pickle.dumps({"scheduler": scheduler, "callbacks": callbacks})
    _fill(scheduler)
    # Experiment checkpoint: TuneController.save_to_dir -> CallbackList.save_to_dir.
    CallbackList(callbacks).save_to_dir(str(tmp_path), session_str="s1")

    restored = pickle.loads(tuner_pkl)
    assert all(not records for records in restored["scheduler"].get_state()["records"].values())
    restored_callbacks = CallbackList(restored["callbacks"])
    assert restored_callbacks.can_restore(str(tmp_path))
    restored_callbacks.restore_from_dir(str(tmp_path))
    # Trials are re-added after the callbacks are restored; that must not clear the records.
    restored["scheduler"].on_trial_add(None, _trial("A"))
    assert restored["scheduler"].get_state() == scheduler.get_state()


# Budgets (sweeps/budget.py): a trial known to break one is stopped at once and never ranked.


def _budgeted(**limits) -> ParetoASHA:
    from tests.test_budget import budget_of

    scheduler = ParetoASHA(time_attr="epoch", max_t=10, grace_period=1, reduction_factor=3, budget=budget_of(**limits))
    scheduler.set_search_properties(None, None)
    return scheduler


def _epoch(epoch, acc, target_macs, macs=None, params=1000, pruning_step=0, **extra) -> dict:
    return {
        "epoch": epoch,
        "val_acc": acc,
        "target_macs": target_macs,
        "macs": target_macs if macs is None else macs,
        "params": params,
        "pruning_step": pruning_step,
        **extra,
    }


def test_budget_breaking_trial_is_stopped_at_its_first_report_and_never_ranked():
    scheduler = _budgeted(max_macs=100)
    # alone at rung 1 it would continue (see test_hand_worked_rung_decisions); its target MACs break the budget
    assert scheduler.on_trial_result(None, _trial("big"), _epoch(1, 0.99, 150, macs=400)) == STOP
    assert scheduler.get_state()["records"][1] == {}  # not recorded: it cannot push feasible trials down
    assert scheduler.over_budget == {"big": {"max_macs": 150.0}}
    # the feasible trials are ranked among themselves only
    assert scheduler.on_trial_result(None, _trial("A"), _epoch(1, 0.50, 90, macs=400)) == CONTINUE
    assert scheduler.on_trial_result(None, _trial("B"), _epoch(1, 0.40, 95, macs=400)) == STOP  # dominated by A
    assert list(scheduler.get_state()["records"][1]) == ["A", "B"]
    assert "1 trial(s) stopped over budget" in scheduler.debug_string()
    # the same trial without a budget continues
    assert _scheduler().on_trial_result(None, _trial("big"), _result(1, 0.99, 150)) == CONTINUE


def test_measured_macs_after_the_last_pruning_step_are_judged_too():
    scheduler = _budgeted(max_macs=100)
    trial = _trial("A")
    assert scheduler.on_trial_result(None, trial, _epoch(1, 0.5, 98, macs=400, pruning_steps=1)) == CONTINUE
    # pruning done (pruning_step == pruning_steps): the pruner landed 4 % above the target, above the budget
    assert scheduler.on_trial_result(None, trial, _epoch(2, 0.5, 98, macs=104, pruning_step=1, pruning_steps=1)) == STOP
    assert scheduler.over_budget == {"A": {"max_macs": 104.0}}
    assert all(not records for records in scheduler.get_state()["records"].values())  # its rung-1 record is gone


def test_params_and_kb_budgets_stop_a_trial_only_once_its_pruning_is_done():
    scheduler = _budgeted(max_params=500, max_kb=2, precision="fp32")  # 2 kB at fp32 = 500 parameters
    trial = _trial("A")
    # 900 params before the pruning step: pruning may still bring them under the budget
    assert scheduler.on_trial_result(None, trial, _epoch(1, 0.5, 50, params=900, pruning_steps=2)) == CONTINUE
    second, last = (
        _epoch(epoch, 0.5, 50, params=params, pruning_step=epoch - 1, pruning_steps=2)
        for epoch, params in ((2, 700), (3, 600))
    )
    assert scheduler.on_trial_result(None, trial, second) == CONTINUE
    assert scheduler.on_trial_result(None, trial, last) == STOP
    assert scheduler.over_budget == {"A": {"max_params": 600.0, "max_kb": 2.4}}
    # an unpruned trial (pruning_steps=0) is final from epoch 1
    assert scheduler.on_trial_result(None, _trial("B"), _epoch(1, 0.5, 50, params=501, pruning_steps=0)) == STOP
    # without pruning_steps in the results, params are final only at the last epoch
    trial = _trial("C")
    assert scheduler.on_trial_result(None, trial, _epoch(1, 0.9, 50, params=900)) == CONTINUE
    assert scheduler.on_trial_result(None, trial, _epoch(10, 0.9, 50, params=900)) == STOP
    assert set(scheduler.over_budget) == {"A", "B", "C"}
    # and params within budget never stop a trial
    assert scheduler.on_trial_result(None, _trial("D"), _epoch(1, 0.9, 10, params=400, pruning_steps=0)) == CONTINUE


def test_budgeted_completion_is_not_recorded_and_state_round_trips():
    scheduler = _budgeted(max_params=500)
    scheduler.on_trial_complete(None, _trial("A"), _epoch(10, 0.9, 50, params=900))
    assert all(not records for records in scheduler.get_state()["records"].values())
    scheduler.on_trial_result(None, _trial("B"), _epoch(1, 0.9, 50, params=900, pruning_steps=0))
    restored = pickle.loads(pickle.dumps(scheduler))
    assert restored.get_state() == scheduler.get_state() and restored.over_budget == {"B": {"max_params": 900.0}}
    legacy = {key: value for key, value in scheduler.get_state().items() if key != "over_budget"}
    fresh = _budgeted(max_params=500)
    fresh.set_state(legacy)  # state saved before budgets existed
    assert fresh.over_budget == {}


def test_budgeted_result_without_the_needed_keys_is_a_clear_error():
    scheduler = _budgeted(max_kb=100)
    with pytest.raises(ValueError, match=r"lacks \['params'\]"):
        scheduler.on_trial_result(None, _trial("A"), {"epoch": 1, "val_acc": 0.5, "target_macs": 10})


def test_rung_metric_val_loss_ranks_lower_loss_first_and_leaves_the_searcher_on_val_acc():
    """scheduler.metric=val_loss: the rungs rank (val_loss down, target_macs down); a trial with the better accuracy
    but the worse loss at the same MACs is the one stopped."""
    from sweeps.tuning import make_scheduler, rung_objectives

    assert rung_objectives("multi", "val_loss") == {"val_loss": "min", "target_macs": "min"}
    assert rung_objectives("single", "val_macro_f1") == {"val_macro_f1": "max"}
    with pytest.raises(ValueError, match=r"scheduler.metric='top5'; choose one of \('val_acc', 'val_loss'"):
        rung_objectives("multi", "top5")
    scheduler = make_scheduler("pareto_asha", "multi", 10, 2, 3, metric="val_loss")
    for name, acc, loss in (("A", 0.5, 1.0), ("B", 0.6, 2.0), ("C", 0.4, 0.9)):
        decision = scheduler.on_trial_result(
            None, _trial(name), {"epoch": 2, "val_acc": acc, "val_loss": loss, "target_macs": 1e6}
        )
        assert decision == {"A": CONTINUE, "B": STOP, "C": CONTINUE}[name]  # keep ceil(n/3) by loss, ties continue
    asha = make_scheduler("asha", "single", 10, 2, 3, metric="val_loss")
    assert isinstance(asha, AsyncHyperBandScheduler) and (asha._metric, asha._mode) == ("val_loss", "min")


def test_a_first_rung_at_or_after_the_last_epoch_is_said(caplog):
    """The default grace_period (6) with a short space (the quick space trains 3 epochs): no rung, said once."""
    from sweeps.tuning import make_scheduler

    with caplog.at_level("WARNING", logger="sweeps.tuning"):
        scheduler = make_scheduler("pareto_asha", "multi", 3, 6, 3, METRIC)
    assert scheduler.rung_milestones == []
    assert "scheduler.grace_period=6 is not below train.epochs=3: pareto_asha has no rung" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="sweeps.tuning"):
        make_scheduler("pareto_asha", "multi", 10, 6, 3, METRIC)
        make_scheduler("fifo", "multi", 3, 6, 3, METRIC)
    assert caplog.text == ""
