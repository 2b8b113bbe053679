"""Rung fidelity (analysis/rung_fidelity.py): rank agreement of each epoch with the last one, trials at chance, the
scheduler's rungs, and the report / printed summary that show them. Fast, no Ray: curves are dicts or result.json
files written here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from analysis.rung_fidelity import Curve, at_chance, rung_epochs, rung_fidelity, spearman_interval

Z975 = 1.959963984540054  # the standard normal's 97.5th percentile

# Six trials trained for 4 epochs: val_acc at epoch 2 and at epoch 4.
AT_2 = [0.30, 0.50, 0.40, 0.20, 0.60, 0.35]
AT_4 = [0.50, 0.55, 0.70, 0.40, 0.65, 0.45]


def curve(
    trial_id: str, accs: dict[int, float], last_epoch: int = 4, clips: int | None = 100, classes: int = 4
) -> Curve:
    """A trial's results: val_acc per epoch, val_loss = 1 - val_acc, val_macro_f1 = val_acc / 2."""
    results = {
        e: {"val_acc": a, "val_loss": 1 - a, "val_macro_f1": a / 2} | ({"val_clips": clips} if clips else {})
        for e, a in accs.items()
    }
    return Curve(trial_id, last_epoch, classes, results)


def synthetic() -> list[Curve]:
    finished = [curve(f"t{i}", {1: 0.25, 2: a2, 3: (a2 + a4) / 2, 4: a4}) for i, (a2, a4) in enumerate(zip(AT_2, AT_4))]
    stopped = curve("s", {1: 0.20, 2: 0.26})  # stopped at the epoch-2 rung: counted there, not in rho
    return [*finished, stopped]


def test_rank_agreement_matches_a_hand_computation():
    # ranks at epoch 2: [2, 5, 4, 1, 6, 3]; at epoch 4: [3, 4, 6, 1, 5, 2]; d^2 sums to 8
    rho = 1 - 6 * 8 / (6 * (6**2 - 1))
    half = Z975 * math.sqrt((1 + rho**2 / 2) / (6 - 3))
    fidelity = rung_fidelity(synthetic(), "val_acc", rungs=[2])
    epoch2 = fidelity.epochs[1]
    a = epoch2.agreements["val_acc"]
    assert (a.n, epoch2.reported, epoch2.rung) == (6, 7, True)
    assert a.rho == pytest.approx(rho) and rho == pytest.approx(0.7714, abs=1e-4)
    assert a.low == pytest.approx(math.tanh(math.atanh(rho) - half))
    assert a.high == pytest.approx(math.tanh(math.atanh(rho) + half))
    # val_loss is ranked lower-is-better, so 1 - val_acc agrees exactly as much; f1 = acc / 2 ranks alike
    assert epoch2.agreements["val_loss"].rho == pytest.approx(rho)
    assert epoch2.agreements["val_macro_f1"].rho == pytest.approx(rho)
    assert fidelity.epochs[0].agreements["val_acc"].rho is None  # every trial scored 0.25 at epoch 1: no ranking
    assert [e.epoch for e in fidelity.epochs] == [1, 2, 3] and fidelity.last_epoch == 4
    assert (fidelity.trials, fidelity.finished, fidelity.early_stopping) == (7, 6, True)
    assert fidelity.first_rung is epoch2


def test_trials_at_chance_are_those_a_uniform_guesser_matches():
    # Binomial(100, 1/4): the smallest c with P(X <= c) >= 0.95
    cdf, threshold = 0.0, None
    for c in range(101):
        cdf += math.comb(100, c) * 0.25**c * 0.75 ** (100 - c)
        if cdf >= 0.95:
            threshold = c
            break
    assert threshold == 32
    assert at_chance({"val_acc": 0.32, "val_clips": 100}, 4) and not at_chance({"val_acc": 0.33, "val_clips": 100}, 4)
    assert at_chance({"val_acc": 0.9}, 4) is None  # a result without the validation size says nothing
    fidelity = rung_fidelity(synthetic(), "val_acc", rungs=[2])
    # epoch 1: all seven at 0.20-0.25; epoch 2: 0.20, 0.26, 0.30 are at chance (<= 32 of 100), 0.35 and up are not
    assert [e.at_chance for e in fidelity.epochs[:2]] == [7, 3]
    no_size = rung_fidelity([curve("a", {1: 0.3, 2: 0.4}, last_epoch=2, clips=None)], "val_acc")
    assert no_size.epochs[0].at_chance is None


def test_sentences_say_how_far_a_rung_can_be_trusted_and_name_the_selection_bias():
    fidelity = rung_fidelity(synthetic(), "val_acc", rungs=[2])
    assert fidelity.sentence() == (
        "The epoch-2 rung ranks trials like their last epoch with ρ = 0.77 (95 % CI -0.26 to 0.98, n = 6, val_acc): "
        "stopping there mostly keeps the better trials, with some mistakes. 3 of 7 trials were still at chance there."
    )
    assert "survivors" in fidelity.bias_note and "fidelity.fifo_samples" in fidelity.bias_note
    # reversed ranks: close to random or worse
    flipped = [curve(f"t{i}", {2: a2, 4: 1 - a2}) for i, a2 in enumerate(AT_2)]
    unbiased = rung_fidelity(flipped, "val_acc", early_stopping=False)
    assert unbiased.first_rung is None and unbiased.sentence(unbiased.epochs[1]).endswith(
        "with ρ = -1.00 (95 % CI -1.00 to -1.00, n = 6, val_acc): stopping there is close to random. 2 of 6 trials "
        "were still at chance there."
    )
    assert "no selection bias" in unbiased.bias_note
    assert unbiased.sentence() == (
        "No rung: the scheduler stopped no trial early (6 trials ran all 4 epochs). No "
        "earlier epoch ranks trials like the last with ρ >= 0.5 (val_acc)."
    )
    fifo = rung_fidelity(synthetic(), "val_acc", early_stopping=False)  # epoch 2 is the first with rho >= 0.5
    assert fifo.earliest() is fifo.epochs[1] and fifo.earliest(0.9) is fifo.epochs[2]
    assert fifo.sentence().endswith(
        "is 2: the epoch-2 result ranks trials like their last epoch with ρ = 0.77 (95 % "
        "CI -0.26 to 0.98, n = 6, val_acc): stopping there mostly keeps the better trials, "
        "with some mistakes. 3 of 7 trials were still at chance there. A first rung "
        "decides on signal from there (scheduler.grace_period=2)."
    )
    few = spearman_interval([0.1, 0.2, 0.3], [0.3, 0.1, 0.2])
    assert few.n == 3 and few.rho == pytest.approx(-0.5) and few.low is None  # n = 3: rho, no interval
    assert spearman_interval([0.1, 0.2], [0.2, 0.1]).rho is None


def test_an_unknown_rung_metric_is_refused():
    with pytest.raises(ValueError, match=r"scheduler.metric='val_top5'; choose one of \('val_acc', 'val_loss', "):
        rung_fidelity(synthetic(), "val_top5")


@pytest.mark.parametrize(
    "scheduler, last_epoch, grid, expected",
    [
        ({"name": "pareto_asha", "grace_period": 2, "reduction_factor": 3}, 10, False, (2, 6)),
        (
            {"name": None, "grace_period": 2, "reduction_factor": 3},
            10,
            False,
            (2, 6),
        ),  # null: the default rung scheduler
        ({"name": None, "grace_period": 2, "reduction_factor": 3}, 10, True, ()),  # null on a grid: fifo
        ({"name": "asha", "grace_period": 3, "reduction_factor": 2}, 10, False, (3, 6)),
        ({"name": "pareto_asha", "grace_period": 2, "reduction_factor": 2.5}, 10, False, (2, 5)),
        ({"name": "pareto_asha", "grace_period": 12, "reduction_factor": 3}, 10, False, ()),  # grace clipped to the end
        ({"name": "fifo", "grace_period": 2, "reduction_factor": 3}, 10, False, ()),
    ],
)
def test_rung_epochs_are_the_schedulers(scheduler, last_epoch, grid, expected):
    assert rung_epochs(scheduler, last_epoch, grid) == expected


# --- on disk: a sweep's result.json files, the report and the printed summary --------------------------------------


def write_trial(folder: Path, trial_id: str, accs: list[float], train_epochs: int, resumed_at: int | None = None):
    """result.json with one line per epoch; `resumed_at`: the trial was restored from its checkpoint of that epoch
    and reported the later epochs again (the first time with a different val_acc)."""
    folder.mkdir(parents=True)
    lines = [
        {
            "epoch": e,
            "val_acc": a,
            "val_loss": 2 - a,
            "val_macro_f1": a,
            "val_clips": 100,
            "target_macs": 1e6,
            "macs": 1e6,
            "params": 1000,
            "trial_id": trial_id,
            "config": {"train.epochs": train_epochs},
        }
        for e, a in enumerate(accs, 1)
    ]
    if resumed_at is not None:
        lines = [line | {"val_acc": 0.99} for line in lines[resumed_at:]] + lines
        lines.sort(key=lambda line: line["epoch"] > resumed_at)  # killed lines first, then the resumed epochs
    (folder / "result.json").write_text("\n".join(json.dumps(line) for line in lines) + "\n")


@pytest.fixture
def rung_sweep(tmp_path, tiny_config) -> Path:
    """A ParetoASHA sweep of 4-epoch trials with a rung at epoch 2 (three families: chance is 1/3)."""
    folder = tmp_path / "ray_results" / "rs"
    folder.mkdir(parents=True)
    base = tiny_config | {"workdir": str(tmp_path), "train": tiny_config["train"] | {"epochs": 4}}
    settings = {
        "space": "quick",
        "scheduler": {"name": None, "grace_period": 2, "reduction_factor": 2, "metric": "val_loss"},
    }
    (folder / "sweep_config.json").write_text(json.dumps({"base_config": base, "sweep": settings}))
    for i, (a2, a4) in enumerate(zip(AT_2, AT_4)):
        write_trial(folder / f"trial_{i}", f"t{i}", [0.30, a2, a4, a4], 4, resumed_at=2 if i == 0 else None)
    write_trial(folder / "trial_s", "s", [0.30, 0.31], 4)
    return folder


def test_sweep_fidelity_reads_each_epochs_last_report(rung_sweep):
    from analysis.results import load_sweep, sweep_fidelity, trial_curves

    sweep = load_sweep(rung_sweep)
    curves = {c.trial_id: c for c in trial_curves(sweep)}
    assert sorted(curves["t0"].results) == [1, 2, 3, 4] and curves["t0"].results[3]["val_acc"] == AT_4[0]
    fidelity = sweep_fidelity(sweep)
    assert (fidelity.metric, fidelity.rungs, fidelity.last_epoch) == ("val_loss", (2,), 4)
    epoch2 = fidelity.epochs[1]
    assert epoch2.agreements["val_loss"].rho == pytest.approx(1 - 6 * 8 / (6 * 35))
    # three families: uniform guessing scores up to 41 of 100 clips (95th percentile): 0.20 to 0.40 are at chance
    assert (epoch2.reported, epoch2.at_chance) == (7, 5)


def test_report_and_summary_show_the_rung_fidelity_table_and_sentence(rung_sweep, monkeypatch):
    import analysis.pareto as pareto
    from analysis.results import load_sweep

    monkeypatch.setattr(pareto, "log_to_mlflow", lambda *args: "run-id")
    analysis = pareto.analyse([load_sweep(rung_sweep)], None, "sqlite:///unused.db")
    sentence = analysis.fidelity["rs"].sentence()
    assert sentence.startswith("The epoch-2 rung ranks trials like their last epoch with ρ = 0.77 (95 % CI")
    report = (rung_sweep / "report.html").read_text()
    assert "<h2>Rung fidelity</h2>" in report and sentence in report
    assert "<th><b>&rho; val_loss</b></th>" in report and "<th>&rho; val_acc</th>" in report
    # epoch 2: the rung, 7 trials reporting, 5 at chance, n = 6
    assert "<tr><td>2</td><td>rung</td><td>7</td><td>5</td><td>6</td><td>0.77</td>" in report
    assert "survivors" in report
    text = pareto.summary(analysis, "sqlite:///unused.db", "rs")
    assert "Rung fidelity (rung metric val_loss against the last epoch's val_acc):" in text
    assert f"  {sentence}" in text.splitlines()


def test_replay_runs_the_real_scheduler_over_recorded_curves():
    """analysis/schedule_replay.py (benchmarks/search_fidelity.py (d)): ParetoASHA fed the recorded epochs, one trial
    at a time in order: what it stops, the epoch-seconds it trains, and the front it ends with."""
    from analysis.schedule_replay import replay, replays

    curves = []
    for i, (a2, a4) in enumerate(zip(AT_2, AT_4)):
        accs = {1: 0.25, 2: a2, 3: (a2 + a4) / 2, 4: a4}
        curves.append(
            Curve(
                f"t{i}",
                4,
                4,
                {
                    e: {
                        "epoch": e,
                        "val_acc": a,
                        "val_loss": 1 - a,
                        "val_macro_f1": a,
                        "target_macs": 1e6,
                        "epoch_seconds": 1.0,
                        "val_clips": 100,
                    }
                    for e, a in accs.items()
                },
            )
        )
    reached, seconds = replay(curves, "multi", 4, 3, "val_acc", workers=1)  # first rung at the end: no stop
    assert set(reached.values()) == {4} and seconds == 24
    # rung at epoch 2 keeps ceil(n/3) of those recorded so far: t0 (alone), t1 (best of 2), t4 (best of 5)
    reached, seconds = replay(curves, "multi", 2, 3, "val_acc", workers=1)
    assert reached == {"t0": 4, "t1": 4, "t2": 2, "t3": 2, "t4": 4, "t5": 2} and seconds == 18
    by_setting = {(r.grace_period, r.metric): r for r in replays(curves, "multi", 3, workers=1, orders=1)}
    assert sorted({g for g, _ in by_setting}) == [1, 2, 3]
    r = by_setting[(2, "val_acc")]
    assert r.rungs == (2,) and r.share == pytest.approx(18 / 24) and r.at_chance == 2  # 0.20 and 0.30
    assert r.first_rung_rho == pytest.approx(1 - 6 * 8 / (6 * 35)) and r.share_sd == 0 and r.orders == 1
    # the full-length front is t2 alone (0.70 at the same MACs), and the epoch-2 rung stopped it
    assert (r.front_kept, r.front_size) == (0, 1)
    assert r.hypervolume == pytest.approx(0.65 * (1 - 1 / 1.1))  # t4's 0.65 is the best it kept
    assert by_setting[(3, "val_acc")].hypervolume == pytest.approx(0.70 * (1 - 1 / 1.1))  # t2 led at epoch 3 too
    # other arrival orders: the asynchronous rung keeps different trials, and the spread says how much
    shuffled = {(r.grace_period, r.metric): r for r in replays(curves, "multi", 3, workers=1, orders=8)}
    assert shuffled[(2, "val_acc")].orders == 8 and shuffled[(2, "val_acc")].hypervolume_sd > 0
    assert shuffled[(3, "val_acc")].front_kept < 1  # t2 arriving after a better-at-epoch-3 trial is stopped


def test_the_default_scheduler_ranks_once_at_epoch_6_of_the_default_10_on_val_acc():
    """The measured default (docs/search.md): epochs 1-5 rank trials like their last epoch with rho <= 0.31 on the
    default data, epoch 6 with 0.79; one rung there (6 x 3 > 10), on validation accuracy."""
    import dataclasses

    from common.config import SchedulerConfig

    default = {k: getattr(v, "value", v) for k, v in dataclasses.asdict(SchedulerConfig()).items()}
    assert rung_epochs(default, 10) == (6,) and default["metric"] == "val_acc"
