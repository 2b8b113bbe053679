"""The sweep's Optuna searcher tells the study last-epoch results only (stopped trials are PRUNED)."""

from __future__ import annotations

import optuna

from search_spaces.schema import load_space
from sweeps.tuning import make_searcher
from tests.test_budget import QUICK


def quick_searcher():
    space = load_space("quick", QUICK)
    searcher = make_searcher(space, "tpe", "multi", seed=0, last_epoch=3)
    searcher.set_search_properties(None, None, {})
    return searcher


def test_stopped_and_errored_trials_do_not_reach_the_study_as_complete():
    searcher = quick_searcher()
    for trial_id in ("stopped", "finished", "errored"):
        assert searcher.suggest(trial_id)
    searcher.on_trial_complete("stopped", {"epoch": 1, "val_acc": 0.9, "target_macs": 1e6})
    searcher.on_trial_complete("finished", {"epoch": 3, "val_acc": 0.6, "target_macs": 2e6})
    searcher.on_trial_complete("errored", {"epoch": 2, "val_acc": 0.7, "target_macs": 1e6}, error=True)
    study = next(value for value in vars(searcher).values() if isinstance(value, optuna.Study))
    states = [(t.state, t.values) for t in study.get_trials(deepcopy=False)]
    assert states == [
        (optuna.trial.TrialState.PRUNED, None),
        (optuna.trial.TrialState.COMPLETE, [0.6, 2e6]),
        (optuna.trial.TrialState.FAIL, None),
    ]
