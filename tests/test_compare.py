"""Paired comparisons (analysis/compare.py), the retrained front in the loader, plot, report and pareto.py's output.

Fast and without Ray: runs are rows or result.json files written here; the run configs come from the real schema.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from analysis.compare import (
    DENSE_QUESTION,
    KD_QUESTION,
    PRUNING_QUESTION,
    dense_macs_pairs,
    dense_pairs,
    kd_pairs,
    paired_comparison,
    pruning_pairs,
    retrained_comparisons,
    retrained_front_table,
    scenario_comparisons,
)


def run(
    front_trial: str,
    role: str,
    seed: int,
    kd: str,
    pruning: str,
    test: float | None,
    ratio: float = 0.5,
    target_macs: float = 2e6,
    params: int = 1000,
    val: float = 0.5,
    sweep: str = "s",
    width: float = 0.75,
    macs: float | None = None,
) -> dict:
    """A retraining run as compare.retrained_row makes it; test None = not finished (missing)."""
    return {
        "sweep": sweep,
        "trial_id": f"{front_trial}-{role}-{seed}",
        "front_trial": front_trial,
        "role": role,
        "seed": seed,
        "kd": kd,
        "pruning": pruning,
        "target_macs_ratio": ratio,
        "width_mult": width,
        "status": "completed",
        "epochs": 4,
        "train_epochs": 4,
        "test_acc": test,
        "val_acc": val,
        "target_macs": target_macs,
        "macs": target_macs if macs is None else macs,
        "params": params,
        "feasible": True,
    }


# Two front configurations x 3 seeds with both ablations; some runs have no test accuracy yet.
# fa: KD off, single-shot; fb: KD on, progressive.
RUNS = [
    *[run("fa", "front", s, "off", "single", t) for s, t in enumerate([0.70, 0.74, 0.78])],
    *[run("fa", "kd_toggled", s, "on", "single", t) for s, t in enumerate([0.75, 0.77, None])],
    *[run("fa", "pruning_toggled", s, "off", "progressive", t) for s, t in enumerate([0.72, 0.73, 0.80])],
    *[run("fb", "front", s, "on", "progressive", t, 0.25, 1e6) for s, t in enumerate([0.60, 0.62, None])],
    *[run("fb", "kd_toggled", s, "off", "progressive", t, 0.25, 1e6) for s, t in enumerate([0.58, 0.57, 0.59])],
    *[run("fb", "pruning_toggled", s, "on", "single", t, 0.25, 1e6) for s, t in enumerate([0.61, 0.60, 0.55])],
]


# The dense_same_macs runs of both configurations: unpruned, narrower, about the pruned model's MACs.
DENSE = [
    *[
        run("fa", "dense_same_macs", s, "off", "none", t, None, 2.05e6, width=0.51)
        for s, t in enumerate([0.72, 0.70, None])
    ],
    *[
        run("fb", "dense_same_macs", s, "on", "none", t, None, 0.98e6, width=0.377)
        for s, t in enumerate([0.59, 0.64, 0.60])
    ],
]


def test_t_interval_matches_a_hand_computation():
    # differences 1, 2, 3, 4: mean 2.5, sd 1.2910, t(0.975, 3) = 3.1824, half-width 3.1824 * 1.2910 / 2 = 2.0542
    c = paired_comparison([(1.0, 0.0), (2.0, 0.0), (3.0, 0.0), (4.0, 0.0)])
    assert c.n == 4 and c.mean == pytest.approx(2.5)
    assert c.sd == pytest.approx(1.29099, abs=1e-5)
    assert c.high - c.mean == pytest.approx(2.0542, abs=1e-4) and c.mean - c.low == pytest.approx(2.0542, abs=1e-4)
    assert c.excludes_zero is True
    one = paired_comparison([(0.8, 0.7)])
    assert one.n == 1 and one.mean == pytest.approx(0.1) and one.low is None and one.high is None
    assert one.excludes_zero is None and "n=1" in one.sentence and "no interval" in one.sentence
    none = paired_comparison([], question=KD_QUESTION, source="retrained front")
    assert none.n == 0 and none.mean is None
    assert none.sentence == "KD vs no KD (retrained front): no finished pairs yet."


def test_verdicts_in_words():
    pairs = [(0.71, 0.70), (0.72, 0.70), (0.73, 0.70), (0.74, 0.70)]  # +1, +2, +3, +4 points
    assert paired_comparison(pairs, "KD", "test accuracy").sentence == (
        "KD adds +2.5 points of test accuracy (95% CI +0.4 to +4.6, n=4): the interval excludes 0."
    )
    mixed = [(0.73, 0.70), (0.68, 0.70), (0.71, 0.70)]  # +3, -2, +1: mean +0.7, sd 2.52, t(0.975, 2) = 4.303
    assert paired_comparison(mixed, "KD", "test accuracy").sentence == (
        "KD adds +0.7 points of test accuracy (95% CI -5.6 to +6.9, n=3): the interval includes 0: no detectable "
        "difference at this n."
    )
    worse = [(0.67, 0.70), (0.66, 0.70), (0.65, 0.70)]  # -3, -4, -5: mean -4, sd 1, half-width 2.48
    c = paired_comparison(worse, "Progressive pruning", "validation accuracy")
    assert c.excludes_zero and c.sentence == (
        "Progressive pruning costs 4.0 points of validation accuracy (95% CI -6.5 to -1.5, n=3): the interval "
        "excludes 0."
    )


def test_kd_pairs_are_oriented_kd_on_minus_kd_off_and_skip_unfinished_runs():
    pairs, unmatched = kd_pairs(RUNS)
    # fa (front KD off) seeds 0, 1 against its KD-on copies; fb (front KD on) seeds 0, 1 against KD off.
    # Left out: fa front seed 2 (its kd_toggled run has no test_acc), fb kd_toggled seed 2 (front unfinished).
    assert sorted(pairs) == sorted([(0.75, 0.70), (0.77, 0.74), (0.60, 0.58), (0.62, 0.57)])
    assert unmatched == 2
    only_kd_off_front = [
        r for r in RUNS if r["front_trial"] == "fa" and r["seed"] == 0 and r["role"] != "pruning_toggled"
    ]
    (kd,) = [c for c in retrained_comparisons(only_kd_off_front) if c.question == KD_QUESTION]
    assert kd.n == 1 and kd.mean == pytest.approx(0.75 - 0.70)  # KD on (the toggled run) minus KD off (the front)


def test_pruning_pairs_are_progressive_minus_single_at_the_same_target():
    pairs, unmatched = pruning_pairs(RUNS)
    # fa: front single vs toggled progressive; fb: front progressive vs toggled single
    assert sorted(pairs) == sorted([(0.72, 0.70), (0.73, 0.74), (0.80, 0.78), (0.60, 0.61), (0.62, 0.60)])
    assert unmatched == 1  # fb pruning_toggled seed 2: its front run has not finished
    # a partner at another MACs target, another seed or another front configuration is no pair
    strays = [
        run("fa", "front", 0, "off", "single", 0.7),
        run("fa", "pruning_toggled", 0, "off", "progressive", 0.8, ratio=0.3),
        run("fa", "pruning_toggled", 1, "off", "progressive", 0.8),
        run("fc", "pruning_toggled", 0, "off", "progressive", 0.8),
    ]
    assert pruning_pairs(strays) == ([], 4)


def test_retrained_comparisons_pool_seeds_and_configurations():
    kd, pruning = retrained_comparisons(RUNS)
    assert (kd.question, kd.source, kd.metric) == (KD_QUESTION, "retrained front", "test accuracy")
    diffs = [0.05, 0.03, 0.02, 0.05]
    mean = sum(diffs) / 4
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 3)
    assert kd.n == 4 and kd.mean == pytest.approx(mean) and kd.sd == pytest.approx(sd)
    assert kd.high - kd.mean == pytest.approx(3.182446 * sd / 2, rel=1e-5) and kd.unmatched == 2
    assert pruning.question == PRUNING_QUESTION and pruning.n == 5
    assert pruning.mean == pytest.approx((0.02 - 0.01 + 0.02 - 0.01 + 0.02) / 5)
    assert pruning.excludes_zero is False and "no detectable difference at this n" in pruning.sentence
    # without ablation runs (retrain.ablations=false) there is nothing to compare
    assert retrained_comparisons([r for r in RUNS if r["role"] == "front"]) == []


def test_dense_pairs_are_pruned_minus_dense_of_the_same_seed_with_each_sides_macs():
    pairs, unmatched = dense_pairs(RUNS + DENSE)
    # fa seeds 0, 1 (its dense seed 2 has no test_acc); fb seeds 0, 1 (its front seed 2 has none)
    assert sorted(pairs) == sorted([(0.70, 0.72), (0.74, 0.70), (0.60, 0.59), (0.62, 0.64)])
    assert unmatched == 2
    kd, pruning, dense = retrained_comparisons(RUNS + DENSE)
    diffs = [-0.02, 0.04, 0.01, -0.02]
    mean = sum(diffs) / 4
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 3)
    assert (dense.question, dense.n, dense.unmatched) == (DENSE_QUESTION, 4, 2)
    assert dense.mean == pytest.approx(mean) and dense.sd == pytest.approx(sd)
    assert dense.high - dense.mean == pytest.approx(3.182446 * sd / 2, rel=1e-5)
    assert dense.sentence.startswith(
        "Pruning (instead of training a dense student of about the same MACs) adds +0.3 points of test accuracy (95% CI"
    )
    macs = dense_macs_pairs(RUNS + DENSE)
    assert [(p.front_trial, p.seed) for p in macs] == [("fa", 0), ("fa", 1), ("fb", 0), ("fb", 1)]
    assert macs[0].gap == pytest.approx(2.05e6 / 2e6 - 1) and macs[2].gap == pytest.approx(0.98e6 / 1e6 - 1)
    assert (macs[0].dense_width, macs[0].pruned_test, macs[0].dense_test) == (0.51, 0.70, 0.72)
    # a "dense" partner that is itself pruned is no pair; without dense runs the question is not asked
    pruned_partner = [
        run("fa", "front", 0, "off", "single", 0.7),
        run("fa", "dense_same_macs", 0, "off", "single", 0.8),
    ]
    assert dense_pairs(pruned_partner) == ([], 2)
    assert DENSE_QUESTION not in {c.question for c in retrained_comparisons(RUNS)}


def test_retrained_extra_folder_accuracies_reach_the_rows_and_the_table(tiny_config):
    from analysis.compare import extra_folders, retrained_row
    from common.trial_table import TrialRecord
    from trainable.run_config import trial_config

    config = trial_config(
        tiny_config, {"origin.front_trial": "fa", "origin.role": "front", "train.epochs": 4, "pruning.mode": "single"}
    )
    trial = TrialRecord(
        sweep="s",
        trial_id="r0",
        trial_dir=Path("."),
        config=config,
        status="completed",
        checkpoint=None,
        metrics={
            "epoch": 4,
            "val_acc": 0.5,
            "test_acc": 0.61,
            "test_macro_f1": 0.6,
            "target_macs": 1e6,
            "macs": 1e6,
            "params": 100,
        },
    )
    evaluation = {
        "test_acc": 0.60,
        "test_macro_f1": 0.59,
        "extra": {"nsynth_test": {"acc": 0.33, "macro_f1": 0.3, "n": 40}},
    }
    row = retrained_row(trial, evaluation)
    assert row["test_acc"] == 0.61 and row["test_macro_f1"] == 0.6  # the run's own test numbers stay
    assert (row["nsynth_test_acc"], row["nsynth_test_macro_f1"], row["nsynth_test_n"]) == (0.33, 0.3, 40)
    assert row["width_mult"] == config["student"]["width_mult"] and retrained_row(trial)["test_acc"] == 0.61
    runs = [
        run("fa", "front", s, "off", "single", t) | ({"nsynth_test_acc": a, "nsynth_test_n": 40} if a else {})
        for s, (t, a) in enumerate([(0.70, 0.30), (0.74, 0.36), (0.78, None)])
    ]
    assert extra_folders(runs) == ["nsynth_test"]
    (fa,) = retrained_front_table(runs)
    mean, std, n = fa.extra["nsynth_test"]
    assert (n, mean, std) == (2, pytest.approx(0.33), pytest.approx(0.06 / math.sqrt(2)))


def test_retrained_front_table_mean_and_sample_std_over_seeds():
    fb, fa = retrained_front_table(RUNS)  # ordered by target MACs: fb 1M, fa 2M
    assert (fa.front_trial, fa.kd, fa.pruning, fa.target_macs_ratio) == ("fa", "off", "single", 0.5)
    assert fa.n == 3 and fa.missing == 0 and fa.seeds == (0, 1, 2)
    assert fa.test_mean == pytest.approx(0.74) and fa.test_std == pytest.approx(0.04)  # ddof=1
    assert fa.target_macs == 2e6 and fa.params == 1000 and fa.val_mean == pytest.approx(0.5)
    assert fb.n == 2 and fb.missing == 1 and fb.test_mean == pytest.approx(0.61)
    assert fb.test_std == pytest.approx(math.sqrt(2) * 0.01)
    (single,) = retrained_front_table(
        [run("fc", "front", 0, "on", "none", 0.9), run("fc", "front", 1, "on", "none", None)]
    )
    assert single.n == 1 and single.test_mean == 0.9 and single.test_std is None and single.missing == 1
    (waiting,) = retrained_front_table([run("fd", "front", 0, "on", "none", None, target_macs=3e6)])
    assert waiting.n == 0 and waiting.test_mean is None and waiting.target_macs == 3e6 and waiting.params is None


SCENARIOS = {
    "nokd_noprune": (False, "none"),
    "nokd_single": (False, "single"),
    "nokd_progressive": (False, "progressive"),
    "kd_noprune": (True, "none"),
    "kd_single": (True, "single"),
    "kd_progressive": (True, "progressive"),
}


def scenario_trial(scenario: str, seed: int, val: float, status: str = "completed"):
    from common.trial_table import TrialRecord

    kd, mode = SCENARIOS[scenario]
    config = {"kd": {"enabled": kd}, "pruning": {"mode": mode}, "train": {"seed": seed}}
    metrics = {"val_acc": val, "config": {"grid_point": {"scenario": scenario, "train.seed": seed}}}
    return TrialRecord(
        sweep="g",
        trial_id=f"{scenario}-{seed}",
        trial_dir=Path("."),
        config=config,
        metrics=metrics,
        checkpoint=None,
        status=status,
    )


def scenario_grid() -> list:
    """The scenarios grid: KD adds 0.05 (seed 0) / 0.03 (seed 1); progressive adds 0.02 over single."""
    base = {"none": 0.80, "single": 0.70, "progressive": 0.72}
    trials = []
    for seed, kd_gain in ((0, 0.05), (1, 0.03)):
        for scenario, (kd, mode) in SCENARIOS.items():
            trials.append(scenario_trial(scenario, seed, base[mode] + (kd_gain if kd else 0.0) + 0.01 * seed))
    return trials


def test_scenarios_grid_pairs_by_pruning_mode_and_seed_then_by_kd_and_seed():
    trials = scenario_grid()
    kd, pruning = scenario_comparisons(trials, {})
    assert kd.source == "scenarios grid" and kd.metric == "validation accuracy"  # no test accuracy measured
    assert kd.n == 6 and kd.mean == pytest.approx(0.04) and kd.unmatched == 0  # 3 modes x 2 seeds
    assert pruning.n == 4 and pruning.mean == pytest.approx(0.02) and pruning.sd == pytest.approx(0.0, abs=1e-12)
    # test accuracy from analysis/evaluate.py is used once every grid trial has one
    tests = {(t.sweep, t.trial_id): 0.5 + (0.1 if t.config["kd"]["enabled"] else 0.0) for t in trials}
    kd, _ = scenario_comparisons(trials, tests)
    assert kd.metric == "test accuracy" and kd.mean == pytest.approx(0.1)
    del tests[("g", "kd_single-1")]
    assert scenario_comparisons(trials, tests)[0].metric == "validation accuracy"
    # a grid trial that did not finish is left out, and its partner is unpaired
    trials[0] = scenario_trial("nokd_noprune", 0, 0.1, status="errored")
    kd, _ = scenario_comparisons(trials, {})
    assert kd.n == 5 and kd.unmatched == 1
    # trials of a searcher sweep carry no scenario grid point
    plain = scenario_trial("kd_single", 0, 0.5)
    plain = type(plain)(**{**plain.__dict__, "metrics": {"val_acc": 0.5, "config": {"kd.T": 2.0}}})
    assert scenario_comparisons([plain], {}) == []


# --- on disk: the loader, pareto.py's files and printed end ---------------------------------------------------------


def write_result(
    folder: Path,
    trial_id: str,
    params: dict,
    epochs: int,
    train_epochs: int,
    val: float,
    test: float | None = None,
    target_macs: float = 2e6,
    torn_line: bool = False,
) -> None:
    """result.json as Ray Tune writes it: one JSON line per epoch; test_acc on the last epoch of a finished run."""
    folder.mkdir(parents=True)
    lines = []
    for epoch in range(1, epochs + 1):
        line = {
            "val_acc": val,
            "val_macro_f1": val,
            "target_macs": target_macs,
            "macs": target_macs,
            "params": 1000,
            "epoch": epoch,
            "trial_id": trial_id,
            "config": params,
        }
        if epoch == train_epochs and test is not None:
            line |= {"test_acc": test, "test_macro_f1": test}
        lines.append(json.dumps(line))
    (folder / "result.json").write_text("\n".join(lines) + ('\n{"val_acc": 0.9, "ep' if torn_line else "\n"))


def retrain_point(front_trial: str, role: str, seed: int, kd: bool, mode: str, train_epochs: int = 4) -> dict:
    return {
        "grid_point": {
            "kd.enabled": kd,
            "pruning.mode": mode,
            "pruning.target_macs_ratio": 0.5,
            "train.epochs": train_epochs,
            "train.seed": seed,
            "train.test_at_end": True,
            "origin.front_trial": front_trial,
            "origin.role": role,
        }
    }


@pytest.fixture
def sweep_dir(tmp_path, tiny_config) -> Path:
    """A search sweep of two trials (3 epochs) whose front trial `front1` (KD off, single) was retrained for 4
    epochs with seeds 0 and 1, with KD toggled; the KD-on run of seed 1 was killed at epoch 2."""
    folder = tmp_path / "ray_results" / "sw"
    folder.mkdir(parents=True)
    base = tiny_config | {"workdir": str(tmp_path)}
    (folder / "sweep_config.json").write_text(json.dumps({"base_config": base, "sweep": {"space": "quick"}}))
    search = {"kd.enabled": False, "pruning.mode": "single", "pruning.target_macs_ratio": 0.5}
    write_result(folder / "trial_front1", "front1", search, 3, 3, 0.66)
    write_result(
        folder / "trial_other", "other", search | {"pruning.target_macs_ratio": 0.9}, 3, 3, 0.60, target_macs=4e6
    )
    retrain = folder / "retrain"
    write_result(retrain / "run_a", "ra", retrain_point("front1", "front", 0, False, "single"), 4, 4, 0.70, 0.68)
    write_result(
        retrain / "run_b", "rb", retrain_point("front1", "front", 1, False, "single"), 4, 4, 0.72, 0.72, torn_line=True
    )
    write_result(retrain / "run_c", "rc", retrain_point("front1", "kd_toggled", 0, True, "single"), 4, 4, 0.75, 0.74)
    write_result(retrain / "run_d", "rd", retrain_point("front1", "kd_toggled", 1, True, "single"), 2, 4, 0.40)
    (retrain / "experiment_state.json").write_text("{}")  # Tune's own files next to the run folders are not runs
    return folder


def test_a_sweep_saved_before_the_rename_loads_its_final_folder_and_retrain_labels(sweep_dir):
    """Sweeps made before issue 20 kept the retrain stage in `<sweep>/final/`, its settings under `final`, and
    labelled its runs `retrain.front_trial` / `retrain.role`: they still load, in today's names."""
    from analysis.compare import retrained_row
    from analysis.results import load_retrained, load_sweep

    (sweep_dir / "retrain").rename(sweep_dir / "final")
    for result in (sweep_dir / "final").glob("*/result.json"):
        result.write_text(result.read_text().replace('"origin.', '"retrain.'))
    state = json.loads((sweep_dir / "sweep_config.json").read_text())
    state["sweep"]["final"] = {"enabled": True, "epochs": 4}
    (sweep_dir / "sweep_config.json").write_text(json.dumps(state))
    sweep = load_sweep(sweep_dir)
    assert "final" not in sweep.settings  # today's name, with today's defaults for keys it predates
    assert sweep.settings["retrain"] == {
        "enabled": True,
        "epochs": 4,
        "max_configs": 3,
        "seeds": 3,
        "ablations": True,
        "export": None,
    }
    runs = {r["trial_id"]: r for r in map(retrained_row, load_retrained(sweep))}
    assert set(runs) == {"ra", "rb", "rc", "rd"}
    assert (runs["rc"]["front_trial"], runs["rc"]["role"]) == ("front1", "kd_toggled")


def test_load_retrained_reads_the_retrain_stage_runs(sweep_dir):
    from analysis.compare import retrained_row
    from analysis.results import load_retrained, load_sweep

    sweep = load_sweep(sweep_dir)
    assert sorted(t.trial_id for t in sweep.trials) == ["front1", "other"]  # retrain/ is not a search trial
    runs = [retrained_row(t) for t in load_retrained(sweep)]
    by_id = {r["trial_id"]: r for r in runs}
    assert set(by_id) == {"ra", "rb", "rc", "rd"}
    assert {r["front_trial"] for r in runs} == {"front1"}
    assert [(by_id[i]["role"], by_id[i]["seed"], by_id[i]["kd"], by_id[i]["test_acc"]) for i in sorted(by_id)] == [
        ("front", 0, "off", 0.68),
        ("front", 1, "off", 0.72),
        ("kd_toggled", 0, "on", 0.74),
        ("kd_toggled", 1, "on", None),
    ]
    assert by_id["rb"]["epochs"] == 4 and by_id["rb"]["status"] == "completed"  # the torn last line is skipped
    assert by_id["rd"]["status"] == "stopped" and by_id["rd"]["epochs"] == 2 and by_id["rd"]["train_epochs"] == 4
    assert by_id["ra"]["pruning"] == "single" and by_id["ra"]["target_macs_ratio"] == 0.5
    (config,) = retrained_front_table(runs)
    assert config.n == 2 and config.test_mean == pytest.approx(0.70)
    assert config.test_std == pytest.approx(0.02 * math.sqrt(2))
    (kd,) = retrained_comparisons(runs)
    assert kd.n == 1 and kd.mean == pytest.approx(0.74 - 0.68) and kd.unmatched == 1


def test_trial_all_selects_every_search_trial(sweep_dir):
    """evaluate.py trial=all scores a whole scenarios grid, so its comparisons can use test accuracy."""
    from analysis.pareto import select_trials
    from analysis.results import load_sweep

    sweep = load_sweep(sweep_dir)
    assert [t.trial_id for t in select_trials([sweep], "all", None)] == ["front1", "other"]
    assert [t.trial_id for t in select_trials([sweep], "front", None)] == ["front1"]


def test_trial_retrained_selects_the_finished_front_runs_of_every_seed(sweep_dir):
    """export.py trial=retrained: the models to ship are the retrained front runs (not the ablations, not a run
    without test accuracy)."""
    import shutil

    from analysis.pareto import select_trials
    from analysis.results import load_sweep

    assert [t.trial_id for t in select_trials([load_sweep(sweep_dir)], "retrained", None)] == ["ra", "rb"]
    shutil.rmtree(sweep_dir / "retrain")
    with pytest.raises(
        ValueError,
        match=r"^trial=retrained: sweep\(s\) sw have no finished retraining run yet; run "
        r"python sweeps/run.py stage=retrain name=sw",
    ):
        select_trials([load_sweep(sweep_dir)], "retrained", None)


def exported(test_int8: float, ms: float, int8_ms: float, int8_error: str | None = None) -> dict:
    """The export columns (common.trial_table.export_columns) of a run analysis/export.py did."""
    return {
        "onnx_bytes": 5000,
        "int8_test_acc": test_int8,
        "latency_ms_1thread": ms,
        "int8_latency_ms_1thread": int8_ms,
        **({"int8_error": int8_error} if int8_error else {}),
    }


def test_best_to_ship_is_the_retrained_config_inside_the_budget_with_the_best_validation_mean():
    from analysis.pareto import best_to_ship, budget_line
    from tests.test_budget import budget_of

    runs = [  # fa: 2e6 MACs, 1,000 params; fb: 1e6 MACs, 500 params, less accurate on validation
        *[
            run("fa", "front", s, "off", "single", t, val=v) | exported(t - 0.01, 0.2, 0.1)
            for s, (t, v) in enumerate([(0.70, 0.80), (0.74, 0.84)])
        ],
        *[
            run("fb", "front", s, "on", "progressive", t, 0.25, 1e6, params=500, val=v) | exported(t - 0.02, 0.1, 0.05)
            for s, (t, v) in enumerate([(0.76, 0.60), (0.80, 0.64)])
        ],
        run("fa", "kd_toggled", 0, "on", "single", 0.99, val=0.99),  # an ablation is never shipped
    ]
    table = retrained_front_table(runs)
    search_rows = [{"trial_id": "t1", "val_acc": 0.9, "target_macs": 1e5, "macs": 1e5, "params": 100}]
    budget = budget_of(max_macs=3e6)
    best = best_to_ship(search_rows, table, budget)
    assert best["trial_id"] == "fa" and best["val_acc"] == pytest.approx(0.82)  # validation chooses, not test
    line = budget_line(budget, best)
    assert line == (
        "Best under budget (budget.max_macs=3,000,000): front configuration fa (retrained, 2 seeds; "
        "means): "
        "val acc 0.82, test acc fp32/int8 0.72/0.71, target MACs 2,000,000, params 1,000, "
        "kB fp32/int8 4/1, "
        "latency ms 1 thread fp32/int8 0.2/0.1"
    )
    assert best_to_ship(search_rows, table, budget_of(max_macs=1.5e6))["trial_id"] == "fb"
    # none retrained fits
    assert best_to_ship(search_rows, table, budget_of(max_macs=3e6, max_kb=0.2))["trial_id"] == "t1"
    over = retrained_front_table(
        [r | ({"feasible": False} if r["front_trial"] == "fb" and r["seed"] else {}) for r in runs]
    )
    # a seed of fb broke the budget
    assert best_to_ship(search_rows, over, budget_of(max_macs=1.5e6))["trial_id"] == "t1"
    broken = retrained_front_table([r | ({"int8_error": "x"} if r["front_trial"] == "fa" else {}) for r in runs])
    assert best_to_ship(search_rows, broken, budget)["trial_id"] == "fb"  # fa cannot ship as int8


def test_load_retrained_is_empty_before_the_retrain_stage(sweep_dir):
    import shutil

    from analysis.results import load_retrained, load_sweep

    shutil.rmtree(sweep_dir / "retrain")
    assert load_retrained(load_sweep(sweep_dir)) == []


def test_pareto_writes_retrained_csv_report_and_ends_with_the_paths(sweep_dir, monkeypatch):
    import analysis.pareto as pareto
    from analysis.results import load_sweep

    monkeypatch.setattr(pareto, "log_to_mlflow", lambda *args: "run-id")
    analysis = pareto.analyse([load_sweep(sweep_dir)], None, "sqlite:///unused.db")
    assert [p.name for p in analysis.files] == ["pareto.csv", "pareto.png", "report.html", "retrained.csv"]
    with (sweep_dir / "retrained.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["trial_id"], r["role"], r["seed"], r["test_acc"]) for r in rows) == [
        ("ra", "front", "0", "0.68"),
        ("rb", "front", "1", "0.72"),
        ("rc", "kd_toggled", "0", "0.74"),
        ("rd", "kd_toggled", "1", ""),
    ]
    with (sweep_dir / "pareto.csv").open() as f:
        assert sorted(r["trial_id"] for r in csv.DictReader(f)) == ["front1", "other"]  # search trials only
    report = (sweep_dir / "report.html").read_text()
    assert "<h2>Retrained front (1 configuration)</h2>" in report and "0.700 &plusmn; 0.028" in report
    assert "3 of 4 retraining runs finished" in report
    assert "<h2>Conclusions</h2>" in report
    assert "KD adds +6.0 points of test accuracy (n=1: a single pair gives no interval" in report
    assert "Not retrained yet" not in report
    # no pruning_toggled runs: the pruning question falls back to the search trials, binned by MACs
    assert "Progressive vs single-shot pruning at matched MACs (search trials, exploratory)" in report
    assert "KD vs no KD at matched MACs" not in report  # KD has paired runs
    text = pareto.summary(analysis, "sqlite:///unused.db", "sw", next_steps="Next: more")
    lines = text.splitlines()
    assert lines[-3:] == [
        f"Plot:   {sweep_dir / 'pareto.png'}",
        f"Report: {sweep_dir / 'report.html'}",
        f"Table:  {sweep_dir / 'pareto.csv'} (search trials); {sweep_dir / 'retrained.csv'} (retrained runs)",
    ]
    assert lines[-4] == "" and lines[-5] == "Next: more"
    assert "  front1: target MACs 2.00M, KD off, single: test acc 0.700 ± 0.028 (n=2)" in lines
    assert (
        "  Retrained front: KD adds +6.0 points of test accuracy (n=1: a single pair gives no interval; more "
        "seeds or configurations are needed)."
    ) in lines
    assert "Retrained front (test accuracy, mean ± std over seeds; 3 of 4 runs finished, 1 missing):" in lines


def test_report_and_summary_say_how_to_retrain_before_the_stage_ran(sweep_dir, monkeypatch):
    import shutil

    import analysis.pareto as pareto
    from analysis.results import load_sweep

    shutil.rmtree(sweep_dir / "retrain")
    monkeypatch.setattr(pareto, "log_to_mlflow", lambda *args: "run-id")
    analysis = pareto.analyse([load_sweep(sweep_dir)], None, "sqlite:///unused.db")
    assert not (sweep_dir / "retrained.csv").exists() and len(analysis.files) == 3
    report = (sweep_dir / "report.html").read_text()
    assert "Not retrained yet: run <code>python sweeps/run.py stage=retrain name=sw</code>" in report
    assert "KD vs no KD at matched MACs (search trials, exploratory)" in report
    text = pareto.summary(analysis, "sqlite:///unused.db", "sw")
    assert "Retrained front: not retrained yet: run python sweeps/run.py stage=retrain name=sw" in text
    assert text.splitlines()[-1] == f"Table:  {sweep_dir / 'pareto.csv'}"


def test_report_shows_the_retrained_table_and_every_verdict():
    from analysis.report import render_report
    from analysis.sweep_stats import normalised_hypervolumes

    rows = [
        {
            "sweep": "s",
            "trial_id": "fa",
            "status": "completed",
            "on_front": True,
            "kd": "off",
            "pruning": "single",
            "val_acc": 0.8,
            "target_macs": 2e6,
            "macs": 2e6,
            "params": 1000,
            "epochs": 3,
        }
    ]
    comparisons = retrained_comparisons(RUNS)
    page = render_report(
        rows, normalised_hypervolumes(rows, None), b"png", None, retrained_runs=RUNS, comparisons=comparisons
    )
    for c in comparisons:
        assert c.sentence in page
    assert "KD adds +3.8 points of test accuracy (95% CI +1.4 to +6.1, n=4): the interval excludes 0." in page
    assert "<td>KD on minus KD off</td><td>4</td><td>+3.8</td><td>+1.4 to +6.1</td><td>yes</td><td>2</td>" in page
    assert "<td>progressive minus single-shot</td><td>5</td>" in page
    # one row per front configuration: trial, KD, pruning, ratio, target MACs, params, test mean ± std, val, search val
    assert (
        "<tr><td>fa</td><td>off</td><td>single</td><td>0.50</td><td>2.00M</td><td>1,000</td>"
        "<td>0.740 &plusmn; 0.040</td><td>0.500</td><td>0.800</td><td>3</td><td>0</td></tr>"
    ) in page
    assert "<td>fb</td>" in page and "<td>0.610 &plusmn; 0.014</td>" in page
    assert "matched MACs (search trials, exploratory)" not in page  # both questions have paired runs
    assert DENSE_QUESTION not in page  # no dense_same_macs runs
    runs = [
        r | ({"nsynth_test_acc": 0.3 + 0.02 * r["seed"], "nsynth_test_n": 40} if r["role"] == "front" else {})
        for r in RUNS + DENSE
    ]  # analysis/evaluate.py trial=retrained eval.extra=[.../nsynth-test] has run
    page = render_report(
        rows,
        normalised_hypervolumes(rows, None),
        b"png",
        None,
        retrained_runs=runs,
        comparisons=retrained_comparisons(runs),
    )
    assert "<th>nsynth_<wbr>test acc (mean &plusmn; std)</th>" in page
    assert (
        "<td>0.740 &plusmn; 0.040</td><td>0.500</td><td>0.800</td><td>3</td><td>0</td><td>0.320 &plusmn; 0.020</td>"
    ) in page
    assert "<td>Pruning vs a dense model of the same MACs</td><td>retrained front</td><td>test accuracy</td>" in page
    assert "<td>pruned minus dense</td><td>4</td><td>+0.3</td>" in page
    # the pairs with their MACs difference
    assert (
        "<tr><td>fa</td><td>0</td><td>2.00M</td><td>0.51</td><td>2.05M</td><td>+2.5&nbsp;%</td><td>0.700</td>"
        "<td>0.720</td></tr>"
    ) in page
    assert "<td>fb</td><td>1</td><td>1.00M</td><td>0.377</td><td>0.98M</td><td>-2.0&nbsp;%</td>" in page


def test_plot_draws_the_retrained_front_with_error_bars():
    import matplotlib.pyplot as plt
    import numpy as np

    from analysis.plot import front_figure

    rows = [
        {
            "sweep": "s",
            "trial_id": t,
            "status": "completed",
            "on_front": on,
            "kd": "on",
            "pruning": "single",
            "val_acc": acc,
            "target_macs": macs,
            "macs": macs,
            "params": 1,
            "epochs": 3,
            "feasible": True,
        }
        for t, on, acc, macs in (("a", True, 0.5, 1e6), ("b", True, 0.7, 3e6), ("c", False, 0.4, 2e6))
    ]
    table = retrained_front_table(RUNS)
    fig = front_figure(rows, "t", retrained=table)
    try:
        ax = fig.axes[0]
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert "retrained front, test acc, mean ± std over 2-3 seeds" in legend
        (container,) = ax.containers
        x, y = container.lines[0].get_data()
        assert list(x) == pytest.approx([1.0, 2.0]) and list(y) == pytest.approx([0.61, 0.74])  # fb then fa
        (bars,) = container.lines[2]
        lengths = [seg[1, 1] - seg[0, 1] for seg in bars.get_segments()]
        assert lengths == pytest.approx([2 * math.sqrt(2) * 0.01, 2 * 0.04])  # +- one sample std
        assert "test accuracy (retrained front)" in ax.get_ylabel()
        low, high = ax.get_ylim()
        assert low <= 0.4 and high >= 0.78
    finally:
        plt.close(fig)
    fig = front_figure(rows, "t")
    try:
        assert not fig.axes[0].containers and fig.axes[0].get_ylabel() == "validation accuracy"
        assert np.all([not t.get_text().startswith("retrained") for t in fig.axes[0].get_legend().get_texts()])
    finally:
        plt.close(fig)
