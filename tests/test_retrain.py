"""The retrain stage (sweeps/retrain.py): which configurations and runs it makes, and the real CLI end to end
(seeds x (front + ablations) runs in MLflow with test metrics, early errors, kill + resume of stage=retrain)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from common.config import run_defaults
from sweeps.retrain import FrontConfig, ablations, check_retrain_settings, front_configs, retrain_points, spread
from tests.test_sweep import ROOT, sweep_cmd

RETRAIN = ["retrain.max_configs=2", "retrain.seeds=2", "retrain.epochs=3"]


def result(trial_id: str, val_acc: float, target_macs: float, error: bool = False, **metrics) -> SimpleNamespace:
    """A Tune Result as front_configs reads it: last metrics, sampled config, error."""
    return SimpleNamespace(
        metrics={"trial_id": trial_id, "val_acc": val_acc, "target_macs": target_macs, "epoch": 1, **metrics},
        config={"kd.T": 2.0, "pruning.mode": "single", "train.epochs": 10},
        error=error,
    )


def test_front_configs_keep_the_non_dominated_feasible_finished_trials_by_macs():
    base = run_defaults()
    results = [
        result("a", 0.5, 3e6),
        result("b", 0.4, 1e6),
        result("c", 0.3, 2e6),  # c is dominated by b
        result("d", 0.9, 0.5e6, error=True),  # errored: never retrained
        result("e", 0.8, 0.4e6, feasible=0),  # over the budget
        result("f", 0.2, 0.1e6, error=True, epoch=10),
    ]  # errored once, then resumed to its end: completed
    assert [c.trial_id for c in front_configs(results, base)] == ["f", "b", "a"]
    # the measured MACs of a front trial whose pruning was done (else None: the target is what is known)
    done = result("p", 0.95, 0.3e6, macs=0.31e6, pruning_step=2, pruning_steps=2, epoch=10)
    early = result("q", 0.96, 0.35e6, macs=3e6, pruning_step=0, pruning_steps=2, epoch=2)
    assert [(c.trial_id, c.macs) for c in front_configs([done, early], base)] == [("p", 0.31e6), ("q", None)]
    assert front_configs([SimpleNamespace(metrics={}, config={}, error=False)], base) == []


def test_spread_keeps_both_ends_of_the_front():
    front = [FrontConfig(str(i), {}, float(i), 0.0) for i in range(7)]
    assert [c.trial_id for c in spread(front, 3)] == ["0", "3", "6"]
    assert spread(front[:2], 3) == front[:2]


def test_retrain_points_are_configs_x_roles_x_seeds_with_matched_ablations(tiny_config):
    base = tiny_config | {"train": tiny_config["train"] | {"seed": 5}}
    single = FrontConfig(
        "t1", {"pruning.mode": "single", "pruning.target_macs_ratio": 0.4, "kd.enabled": True}, 1e6, 0.5
    )
    unpruned = FrontConfig("t2", {"pruning.mode": "none", "kd.enabled": False}, 2e6, 0.6)
    settings = {"seeds": 2, "epochs": 4, "ablations": True}
    points = retrain_points([single, unpruned], base, settings)
    roles = [(p["origin.front_trial"], p["origin.role"], p["train.seed"]) for p in points]
    assert roles == [
        ("t1", "front", 5),
        ("t1", "front", 6),
        ("t1", "kd_toggled", 5),
        ("t1", "kd_toggled", 6),
        ("t1", "pruning_toggled", 5),
        ("t1", "pruning_toggled", 6),
        ("t1", "dense_same_macs", 5),
        ("t1", "dense_same_macs", 6),  # pruned: its dense twin too
        ("t2", "front", 5),
        ("t2", "front", 6),
        ("t2", "kd_toggled", 5),
        ("t2", "kd_toggled", 6),
    ]
    assert all(p["train.epochs"] == 4 and p["train.test_at_end"] for p in points)
    toggled = next(p for p in points if p["origin.role"] == "pruning_toggled")
    # the other mode at the same MACs target, with the base config's progressive schedule
    assert toggled["pruning.mode"] == "progressive" and toggled["pruning.target_macs_ratio"] == 0.4
    assert toggled["pruning.steps"] == base["pruning"]["steps"] and toggled["kd.enabled"] is True
    assert (
        next(p for p in points if p["origin.front_trial"] == "t2" and p["origin.role"] == "kd_toggled")["kd.enabled"]
        is True
    )  # KD switched on for a configuration that searched without it
    dense = next(p for p in points if p["origin.role"] == "dense_same_macs")
    # unpruned, narrower, same KD setting, epochs and seeds as the front run
    assert dense["pruning.mode"] == "none" and dense["student.width_mult"] < base["student"]["width_mult"]
    assert dense["kd.enabled"] is True and dense["train.epochs"] == 4
    assert ablations({"kd": {"enabled": True}, "pruning": {"mode": "progressive"}}, base["pruning"])[
        "pruning_toggled"
    ] == {"pruning.mode": "single"}
    assert len(retrain_points([single], base, settings | {"ablations": False})) == 2


@pytest.mark.parametrize(
    "width, n_mels, ratio, mode",
    [
        (0.75, 64, 0.5, "single"),
        (1.0, 128, 0.2, "progressive"),
        (0.5, 32, 0.3, "single"),
        (1.0, 96, 0.6, "progressive"),
    ],
)
@pytest.mark.slow
def test_dense_width_lands_within_the_pruners_tolerance_of_the_pruned_models_macs(
    tiny_config, width, n_mels, ratio, mode
):
    """The dense twin's width: the unpruned student whose MACs are closest to the pruned model's, as measured after
    the real pruner ran (within trainable.pruning.MACS_TOLERANCE here), and no other allowed width is closer."""
    import torch

    from sweeps.retrain import WIDTH_STEP, dense_width
    from trainable.models import create_student
    from trainable.pruning import MACS_TOLERANCE, count_macs_params, prune_to_macs
    from trainable.run_config import trial_config

    config = trial_config(
        tiny_config,
        {
            "student.width_mult": width,
            "features.n_mels": n_mels,
            "pruning.mode": mode,
            "pruning.target_macs_ratio": ratio,
        },
    )
    data, student = config["data"], config["student"]
    shape = (1, 1, n_mels, int(round(data["clip_seconds"] * data["sample_rate"])) // 160 + 1)
    model = create_student(student["arch"], width, len(data["families"]), student["dropout"])
    base_macs, _ = count_macs_params(model, shape)
    pruned = prune_to_macs(
        model, torch.zeros(shape), base_macs, ratio, config["pruning"]["importance"], config["pruning"]["round_to"]
    ).macs
    choice = dense_width(config, pruned)
    assert choice.target_macs == pruned and abs(choice.gap) <= MACS_TOLERANCE, choice
    dense = create_student(student["arch"], choice.width_mult, len(data["families"]), student["dropout"])
    assert count_macs_params(dense, shape)[0] == choice.macs  # what a dense_same_macs run will measure
    for neighbour in (choice.width_mult - WIDTH_STEP, choice.width_mult + WIDTH_STEP):
        other = create_student(student["arch"], neighbour, len(data["families"]), student["dropout"])
        assert abs(count_macs_params(other, shape)[0] - pruned) >= abs(choice.macs - pruned)


def test_a_target_below_every_width_takes_the_narrowest_and_says_so(tiny_config, caplog):
    from sweeps.retrain import WIDTH_STEP, FrontConfig, dense_role
    from trainable.run_config import trial_config

    config = trial_config(tiny_config, {"pruning.mode": "single", "pruning.target_macs_ratio": 0.5})
    front = FrontConfig("tiny", {}, target_macs=1000.0, val_acc=0.5)  # 1,000 MACs: below any MobileNet
    with caplog.at_level("INFO", logger="sweeps.retrain"):
        keys = dense_role(front, config)
    assert keys == {"pruning.mode": "none", "student.width_mult": WIDTH_STEP}
    assert "the closest width_mult allows, outside the pruner's +-5 % tolerance" in caplog.text
    measured = FrontConfig("m", {}, target_macs=5e6, val_acc=0.5, macs=1000.0)
    assert dense_role(measured, config) == keys  # the measured MACs of the pruned model win over the target


@pytest.mark.parametrize("key", ["seeds", "epochs", "max_configs"])
def test_retrain_settings_below_one_are_refused(key):
    with pytest.raises(ValueError, match=f"retrain.{key}=0 must be >= 1"):
        check_retrain_settings({"seeds": 3, "epochs": 10, "max_configs": 3} | {key: 0})


# ---- the real CLI ------------------------------------------------------------------------------------------


def retrain_runs(exp_dir: Path) -> dict[str, dict]:
    """Last result of every retrain run that reached its test evaluation, by trial folder."""
    out = {}
    for path in (exp_dir / "retrain").glob("*/result.json"):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if lines and "test_acc" in lines[-1]:
            out[path.parent.name] = lines[-1]
    return out


def stage_runs(workdir: Path, stage: str) -> int:
    with sqlite3.connect(workdir / "mlflow.db") as db:
        return db.execute("SELECT COUNT(*) FROM tags WHERE key = 'stage' AND value = ?", (stage,)).fetchone()[0]


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> Path:
    """A finished quick search with no retrain stage. Its saved state names this workdir (data, MLflow), so the
    tests below share it: the refusals first (they must leave it untouched), then the retrain stage itself."""
    workdir = tmp_path_factory.mktemp("retrain")
    out = subprocess.run(
        sweep_cmd(workdir, "space=quick", "num_samples=3", "name=s", "scheduler.name=fifo"),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert not (workdir / "ray_results" / "s" / "retrain").exists()  # retrain.enabled=false in the tiny config
    return workdir


@pytest.mark.parametrize(
    "args, message",
    [
        (["retrain.seeds=0"], "retrain.seeds=0 must be >= 1"),
        (["name=nosuch"], "No sweep named 'nosuch'"),
        (["retrain.epochs=2"], "retrain.epochs=2 is below the search's train.epochs=3"),
    ],
)
@pytest.mark.slow
def test_stage_retrain_errors_are_one_line_before_work(searched, args, message):
    workdir = searched
    out = subprocess.run(
        sweep_cmd(workdir, "stage=retrain", "name=s", *args), capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert not (workdir / "ray_results" / "s" / "retrain").exists()


@pytest.mark.slow
def test_stage_retrain_on_a_sweep_without_finished_trials_is_refused(searched):
    workdir = searched
    empty = workdir / "ray_results" / "empty"
    empty.mkdir()
    shutil.copy(workdir / "ray_results" / "s" / "sweep_config.json", empty)
    out = subprocess.run(
        sweep_cmd(workdir, "stage=retrain", "name=empty"), capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert out.returncode == 2 and "has no finished trial to retrain" in out.stderr, out.stderr[-2000:]
    assert sorted(p.name for p in empty.iterdir()) == ["sweep_config.json"]  # nothing written, nothing lost


@pytest.mark.slow
def test_stage_retrain_retrains_seeds_x_roles_in_mlflow_and_resumes_after_a_kill(searched):
    workdir = searched
    exp_dir = workdir / "ray_results" / "s"
    search_runs = stage_runs(workdir, "search")
    driver = subprocess.Popen(
        sweep_cmd(
            workdir, "stage=retrain", "name=s", *RETRAIN, "resources.max_concurrent_trials=1", "retrain.export=true"
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
        start_new_session=True,
    )
    deadline = time.time() + 400
    try:
        while len(retrain_runs(exp_dir)) < 2:  # kill after some runs finished and before all did
            if time.time() > deadline or driver.poll() is not None:
                pytest.fail("the retrain stage did not finish two runs in time")
            time.sleep(0.3)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    done_before = set(retrain_runs(exp_dir))
    again = subprocess.run(
        sweep_cmd(workdir, "stage=retrain", "name=s", *RETRAIN), capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert again.returncode == 2 and "resume=true stage=retrain" in again.stderr  # never overwritten
    out = subprocess.run(
        sweep_cmd(workdir, "resume=true", "stage=retrain", "name=s"),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    runs = retrain_runs(exp_dir)
    assert done_before <= set(runs)  # finished runs were kept, not rerun
    labels = sorted(
        (
            r["config"]["grid_point"]["origin.front_trial"],
            r["config"]["grid_point"]["origin.role"],
            r["config"]["grid_point"]["train.seed"],
        )
        for r in runs.values()
    )
    configs = {label[0] for label in labels}
    assert 1 <= len(configs) <= 2 and len(labels) == len(set(labels))
    # seeds x (front + KD toggled + the other pruning mode where the config prunes)
    for config in configs:
        roles = {(role, seed) for trial, role, seed in labels if trial == config}
        assert {("front", 0), ("front", 1), ("kd_toggled", 0), ("kd_toggled", 1)} <= roles
    assert all(0 <= r["test_acc"] <= 1 and r["epoch"] == 3 for r in runs.values())
    with sqlite3.connect(workdir / "mlflow.db") as db:
        staged = db.execute(
            "SELECT r.status, t.value FROM runs r JOIN tags t ON r.run_uuid = t.run_uuid "
            "JOIN tags s ON r.run_uuid = s.run_uuid WHERE t.key = 'trial_id' AND s.key = 'stage' "
            "AND s.value = 'retrain'"
        ).fetchall()
        test_metrics = db.execute(
            "SELECT COUNT(DISTINCT m.run_uuid) FROM metrics m JOIN tags s ON "
            "m.run_uuid = s.run_uuid WHERE m.key = 'test_acc' AND s.key = 'stage' AND "
            "s.value = 'retrain'"
        ).fetchone()[0]
    assert len(staged) == len(runs) and len({trial for _, trial in staged}) == len(runs)  # one MLflow run each
    assert all(status == "FINISHED" for status, _ in staged) and test_metrics == len(runs)
    assert stage_runs(workdir, "search") == search_runs == 3  # the search's runs are left as they were
    # the sweep ends with the answer: the report's files, paths printed
    for name in ("pareto.png", "report.html", "pareto.csv"):
        assert (exp_dir / name).is_file() and str(exp_dir / name) in out.stdout
    # retrain.export=true (kept by the resume): every finished seed of the retrained front exported, int8, timed
    front_runs = {r["trial_id"] for r in runs.values() if r["config"]["grid_point"]["origin.role"] == "front"}
    manifest = json.loads((exp_dir / "export" / "export.json").read_text())
    assert set(manifest) == front_runs
    assert all(Path(e["int8"]["onnx"]).is_file() and e["latency"]["int8"]["runs"] == 100 for e in manifest.values())
    assert "ONNX, int8 and CPU latency of the retrained front models" in out.stdout
    table = out.stdout.split("ONNX export (opset")[1].splitlines()
    assert table[1].split()[:3] == ["trial", "retrains", "seed"]  # which configuration and seed each model is
    assert {(line.split()[1], int(line.split()[2])) for line in table[2 : 2 + len(front_runs)]} == {
        (r["config"]["grid_point"]["origin.front_trial"], r["config"]["grid_point"]["train.seed"])
        for r in runs.values()
        if r["trial_id"] in front_runs
    }
    report = (exp_dir / "report.html").read_text()
    assert "exported seeds" in report and "No deployment numbers yet" not in report
    assert f"From <code>analysis/export.py</code> ({len(front_runs)} model(s))" in report
    with (exp_dir / "retrained.csv").open() as f:
        exported = [row for row in csv.DictReader(f) if row["int8_test_acc"]]
    assert {row["trial_id"] for row in exported} == front_runs


@pytest.mark.slow
def test_evaluate_trial_retrained_lists_the_retrained_models_and_their_extra_folder_scores(searched, tmp_path):
    """evaluate.py trial=retrained scores every finished seed of the retrained front, prints them (which configuration,
    role and seed), and their extra-folder accuracies reach retrained.csv and the report's retrained table."""
    import sys

    from tests.test_analysis import write_extra_folder

    workdir = searched
    exp_dir = workdir / "ray_results" / "s"
    if not retrain_runs(exp_dir):  # run on its own: retrain first (the test above leaves a finished stage)
        out = subprocess.run(
            sweep_cmd(workdir, "stage=retrain", "name=s", *RETRAIN),
            capture_output=True,
            text=True,
            timeout=600,
            cwd=ROOT,
        )
        assert out.returncode == 0, out.stderr[-3000:]
    extra = tmp_path / "nsynth-extra"
    write_extra_folder(extra)
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "analysis" / "evaluate.py"),
            f"workdir={workdir}",
            "name=s",
            "trial=retrained",
            f"eval.extra=[{extra}]",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    front = {k: r for k, r in retrain_runs(exp_dir).items() if r["config"]["grid_point"]["origin.role"] == "front"}
    assert f"Evaluated {len(front)} model(s) on the test split and 1 extra folder(s):" in out.stdout
    table = out.stdout.split("extra folder(s):\n")[1].splitlines()
    assert table[0].split()[:6] == ["trial", "retrains", "role", "seed", "val", "acc"]
    assert "nsynth_extra acc" in table[0]
    listed = {line.split()[0]: line.split() for line in table[1 : 1 + len(front)]}
    assert set(listed) == {r["trial_id"] for r in front.values()}
    assert all(cells[2] == "front" for cells in listed.values())
    with (exp_dir / "retrained.csv").open() as f:
        rows = list(csv.DictReader(f))
    scored = {r["trial_id"]: r for r in rows if r["nsynth_extra_acc"]}
    assert set(scored) == set(listed) and all(r["nsynth_extra_n"] == "4" for r in scored.values())
    assert all(0 <= float(r["nsynth_extra_acc"]) <= 1 for r in scored.values())
    report = (exp_dir / "report.html").read_text()
    assert "<th>nsynth_<wbr>extra acc (mean &plusmn; std)</th>" in report


@pytest.mark.parametrize(
    "exported, calls, message",
    [
        (True, ["export"], None),
        (False, ["export"], "Some retrained models were not exported (lines above); the report is written."),
        (
            ValueError("no finished retraining run"),
            ["export", "report"],
            "The retrained models were not exported (no finished retraining run); writing the report without them.",
        ),
        (RuntimeError("onnx broke"), ["export", "report"], None),  # logged with its traceback, then the report
    ],
)
def test_a_sweep_that_exports_still_ends_with_its_report(
    monkeypatch, capsys, caplog, tmp_path, exported, calls, message
):
    """The report stage runs the analysis in the sweep's process: export first when asked, then the report; a failing
    export or report is a message (the sweep's results are saved), never a lost sweep."""
    import sweeps.pipeline as run

    called, configs = [], []

    def fake_export(config):
        called.append("export")
        configs.append(config)
        if isinstance(exported, Exception):
            raise exported
        return exported

    def fake_report(config):
        called.append("report")
        configs.append(config)

    monkeypatch.setattr(run, "export_models", fake_export)
    monkeypatch.setattr(run, "write_report", fake_report)
    plan = SimpleNamespace(
        name="s",
        storage=str(tmp_path),
        workdir=tmp_path,
        tracking_uri="sqlite:///x.db",
        retrain=True,
        budget=None,
        settings={"retrain": {"export": True}},
        step=lambda *a: None,
    )
    run.report_stage(plan)
    assert called == calls
    assert all(
        c["name"] == "s"
        and c["trial"] == "retrained"
        and c["storage_path"] == str(tmp_path)
        and c["mlflow"]["tracking_uri"] == "sqlite:///x.db"
        for c in configs
    )
    out = capsys.readouterr().out
    assert (message in out) if message else "not exported" not in out
    if isinstance(exported, RuntimeError):
        assert "The export of the retrained models failed" in caplog.text
    called.clear()
    run.report_stage(SimpleNamespace(**{**vars(plan), "settings": {"retrain": {"export": None}}}))  # no budget
    assert called == ["report"]
    monkeypatch.setattr(run, "write_report", lambda config: 1 / 0)
    run.report_stage(SimpleNamespace(**{**vars(plan), "settings": {"retrain": {"export": False}}}))
    assert "The report failed; rerun it with: python analysis/pareto.py name=s" in caplog.text
