"""The analysis scripts on a real tiny sweep: Pareto files + MLflow run, test-set evaluation, ONNX export."""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from common.front import hypervolume, pareto_mask
from common.objectives import LABELS
from data_prep.layout import make_example
from tests.nsynth_fixtures import synth_note
from tests.test_sweep import ROOT, sweep_cmd

SWEEP = "ana"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A finished 3-trial quick sweep (KD + pruning, 3 families); fifo so every trial runs all epochs."""
    workdir = tmp_path_factory.mktemp("analysis")
    out = subprocess.run(
        sweep_cmd(workdir, "space=quick", "num_samples=3", f"name={SWEEP}", "scheduler.name=fifo"),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir


def analysis_cmd(script: str, workdir: Path, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "analysis" / script), f"workdir={workdir}", *args]


def run(script: str, workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(analysis_cmd(script, workdir, *args), capture_output=True, text=True, timeout=300, cwd=ROOT)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def analysis_runs(workdir: Path, experiment: str) -> tuple:
    """(MLflow client, the experiment's runs tagged analysis=true)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return client, client.search_runs([experiment_id], "tags.analysis = 'true'")


@pytest.mark.slow
def test_pareto_writes_csv_plot_report_and_mlflow_run(workdir):
    out = run("pareto.py", workdir, f"name={SWEEP}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Pareto front" in out.stdout and "Hypervolume" in out.stdout
    sweep_dir = workdir / "ray_results" / SWEEP
    rows = read_csv(sweep_dir / "pareto.csv")
    assert len(rows) == 3 and {r["status"] for r in rows} == {"completed"}
    assert {
        "trial_id",
        "sweep",
        "val_acc",
        "val_macro_f1",
        "target_macs",
        "macs",
        "params",
        "epochs",
        "kd",
        "T",
        "alpha",
        "n_mels",
        "width",
        "pruning",
        "target_macs_ratio",
        "steps",
        "step_epochs",
        "lr",
        "on_front",
    } <= set(rows[0])
    # the front, the hypervolume and the plot use the searched objective: MACs at the end of the pruning schedule
    points = np.array([[float(r["val_acc"]), float(r["target_macs"])] for r in rows])
    assert [r["on_front"] == "True" for r in rows] == pareto_mask(points, [True, False]).tolist()
    assert "Pareto front (val_acc, target_macs)" in out.stdout
    png = (sweep_dir / "pareto.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    report = (sweep_dir / "report.html").read_text()
    assert '<img src="data:image/png;base64,' in report
    assert LABELS["target_macs"] in report and "measured MACs" in report
    reference = 1.1 * points[:, 1].max()
    expected_hv = hypervolume(points / [1.0, reference], [0.0, 1.0], [True, False])
    assert f"{expected_hv:.4f}" in report and f"{reference:,.0f}" in report
    # not retrained (the test sweeps run with retrain.enabled=false): the report says how, and compares the search
    # trials within MACs bins instead; the quick space has no KD-off trial
    assert "Not retrained yet: run <code>python sweeps/run.py stage=retrain name=ana</code>" in report
    assert "KD vs no KD at matched MACs (search trials, exploratory)" in report and "n too small" in report
    assert "Retrained front: not retrained yet: run python sweeps/run.py stage=retrain name=ana" in out.stdout
    # what one reads last: where the plot, the report and the table are
    assert out.stdout.rstrip().splitlines()[-3:] == [
        f"Plot:   {sweep_dir / 'pareto.png'}",
        f"Report: {sweep_dir / 'report.html'}",
        f"Table:  {sweep_dir / 'pareto.csv'}",
    ]
    client, runs = analysis_runs(workdir, SWEEP)
    assert len(runs) == 1
    assert {a.path for a in client.list_artifacts(runs[0].info.run_id)} == {"pareto.csv", "pareto.png", "report.html"}


def write_extra_folder(folder: Path) -> None:
    """NSynth split folder: bass and keyboard notes (known), brass notes (unknown), one entry without its wav."""
    examples = {}
    for family, instrument in (("bass", 900), ("keyboard", 901), ("brass", 902)):
        for pitch in (48, 55):
            ex = make_example(family, "acoustic", instrument, f"{family}_acoustic_{instrument}", pitch, 100)
            examples[ex["note_str"]] = ex
            path = folder / "audio" / f"{ex['note_str']}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, synth_note(pitch, 100, seconds=1.0, timbre=instrument % 3), 16000)
    missing = make_example("keyboard", "acoustic", 901, "keyboard_acoustic_901", 60, 100)
    examples[missing["note_str"]] = missing
    (folder / "examples.json").write_text(json.dumps(examples))


@pytest.mark.slow
def test_evaluate_adds_test_and_extra_columns_and_reports_unknown_families(workdir, tmp_path):
    extra = tmp_path / "nsynth-extra"
    write_extra_folder(extra)
    out = run("evaluate.py", workdir, f"name={SWEEP}", f"eval.extra=[{extra}]")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "nsynth_extra: 4 notes scored; skipped (family unknown to the model): brass 2; unreadable: 1" in out.stdout
    sweep_dir = workdir / "ray_results" / SWEEP
    rows = read_csv(sweep_dir / "pareto.csv")
    front = [r for r in rows if r["on_front"] == "True"]
    assert front and all(0.0 <= float(r["test_acc"]) <= 1.0 and r["test_macro_f1"] for r in front)
    assert all(r["nsynth_extra_n"] == "4" and 0.0 <= float(r["nsynth_extra_acc"]) <= 1.0 for r in front)
    assert all(r["test_acc"] == "" for r in rows if r["on_front"] == "False")
    evaluations = json.loads((sweep_dir / "evaluation.json").read_text())
    assert set(evaluations) == {r["trial_id"] for r in front}
    assert all(e["extra"]["nsynth_extra"]["skipped_families"] == {"brass": 2} for e in evaluations.values())
    assert "test acc" in (sweep_dir / "report.html").read_text()
    _, runs = analysis_runs(workdir, SWEEP)
    assert len(runs) == 1  # the report is re-logged into the same analysis run


@pytest.mark.slow
def test_unloadable_checkpoint_is_reported_and_the_others_are_evaluated(workdir, tmp_path):
    import torch

    from analysis.evaluate import evaluate_trials
    from analysis.results import load_sweep
    from data_prep.dataset import prepare_data

    torch.set_num_threads(1)
    sweep = load_sweep(workdir / "ray_results" / SWEEP)
    broken_file = tmp_path / "checkpoint.pt"
    broken_file.write_bytes(b"not a checkpoint")
    good, other = sweep.trials[:2]
    broken = dataclasses.replace(other, checkpoint=broken_file)
    data = prepare_data(sweep.base_config["data"], sweep.base_config["workdir"])
    results = evaluate_trials([broken, good], data, [], torch.device("cpu"), 16)
    assert results[broken.trial_id]["error"] and "test_acc" not in results[broken.trial_id]
    n = len(data.splits["test"])
    assert results[good.trial_id]["error"] is None and results[good.trial_id]["test_n"] == n
    assert results[good.trial_id]["test_acc"] * n == pytest.approx(round(results[good.trial_id]["test_acc"] * n))


@pytest.mark.slow
def test_export_front_to_onnx_matches_pytorch(workdir):
    import onnxruntime
    import torch

    from analysis.results import load_sweep
    from trainable.checkpoints import load_checkpoint, restore_model

    out = run("export.py", workdir, f"name={SWEEP}", "trial=front")
    assert out.returncode == 0, out.stderr[-3000:]
    sweep_dir = workdir / "ray_results" / SWEEP
    manifest = json.loads((sweep_dir / "export" / "export.json").read_text())
    checkpoints = {t.trial_id: t.checkpoint for t in load_sweep(sweep_dir).trials}
    assert manifest
    for trial_id, entry in manifest.items():
        path = Path(entry["onnx"])
        assert path.name == f"{trial_id}.onnx" and entry["bytes"] == path.stat().st_size > 0
        assert f"{entry['bytes']} bytes" in out.stdout
        assert max(entry["max_abs_diff_random"], entry["max_abs_diff_real"]) < 1e-3
        ckpt = load_checkpoint(checkpoints[trial_id])
        model = restore_model(ckpt).eval()
        inputs = torch.randn(5, *ckpt["input_shape"][1:])  # a batch size the export never saw
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (onnx_logits,) = session.run(None, {"features": inputs.numpy()})
        with torch.no_grad():
            torch_logits = model(inputs).numpy()
        assert onnx_logits.shape == (5, ckpt["num_classes"])
        assert np.abs(onnx_logits - torch_logits).max() < 1e-3


@pytest.mark.slow
def test_unknown_sweep_name_lists_the_sweeps_found(workdir):
    out = run("pareto.py", workdir, "name=no-such-sweep")
    assert out.returncode == 2
    assert "no-such-sweep" in out.stderr and SWEEP in out.stderr and "Traceback" not in out.stderr


def test_sweep_without_results_is_a_clear_error(tmp_path):
    from analysis.results import load_sweeps

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "sweep_config.json").write_text(json.dumps({"base_config": {}, "sweep": {}}))
    with pytest.raises(ValueError, match="no finished trials"):
        load_sweeps({"name": "empty", "path": None, "storage_path": str(tmp_path)})


def test_matched_macs_comparison_bins_by_factor_two_and_flags_small_groups():
    from analysis.sweep_stats import matched_difference, matched_macs_comparison

    # binned on target_macs (the objective); the measured macs of these trials (all 9M) must not matter
    rows = [
        {"kd": kd, "target_macs": macs, "macs": 9e6, "val_acc": acc}
        for kd, macs, acc in [
            ("on", 1.1e6, 0.60),
            ("on", 1.5e6, 0.70),
            ("off", 1.2e6, 0.50),
            ("off", 1.9e6, 0.60),  # bin 1-2M
            ("on", 5e6, 0.90),
            ("off", 6e6, 0.20),
        ]
    ]  # bin 4-8M, n = 1 each
    comparisons = matched_macs_comparison(rows, "kd", ("on", "off"))
    assert [c.label for c in comparisons] == ["1-2M", "4-8M", "all MACs (not matched)"]
    assert comparisons[0].difference == pytest.approx(0.10)
    assert comparisons[1].difference is None and [g.n for g in comparisons[1].groups] == [1, 1]
    assert matched_difference(comparisons) == (pytest.approx(0.10), 1)


def test_overlaid_sweeps_share_one_hypervolume_reference():
    from analysis.sweep_stats import normalised_hypervolumes

    rows = [
        {"sweep": "a", "val_acc": 0.5, "target_macs": 1e6, "macs": 5e6, "params": 10},
        {"sweep": "b", "val_acc": 0.8, "target_macs": 2e6, "macs": 2e6, "params": 20},
    ]
    hv = normalised_hypervolumes(rows, None)
    assert hv.reference == {"val_acc": 0.0, "target_macs": pytest.approx(2.2e6)}
    assert hv.by_sweep["a"] == pytest.approx(0.5 * (1 - 1 / 2.2))
    assert hv.by_sweep["b"] == pytest.approx(0.8 * (1 - 2 / 2.2))
    assert hv.by_sweep["all sweeps"] == pytest.approx(0.5 * (1 - 1 / 2.2) + 0.3 * (1 - 2 / 2.2))
    with_params = normalised_hypervolumes(rows, "params")
    assert with_params.reference == {"val_acc": 0.0, "target_macs": pytest.approx(2.2e6), "params": pytest.approx(22)}


def synthetic_trial(trial_id: str, val_acc: float, target_macs: float, macs: float, mode: str = "single"):
    """A trial as analysis/results.py loads it; `macs` is what it measured at its last epoch."""
    from common.trial_table import TrialRecord

    config = {
        "kd": {"enabled": True, "T": 3.0, "alpha": 0.5},
        "features": {"n_mels": 64},
        "student": {"width_mult": 1.0},
        "train": {"lr": 1e-3, "epochs": 8},
        "pruning": {"mode": mode, "target_macs_ratio": 0.5, "weight_keep_ratio": 0.3, "steps": 3, "step_epochs": 1},
    }
    metrics = {
        "val_acc": val_acc,
        "val_macro_f1": val_acc,
        "target_macs": target_macs,
        "macs": macs,
        "params": 1000,
        "epoch": 2,
    }
    return TrialRecord(
        sweep="s",
        trial_id=trial_id,
        trial_dir=Path(trial_id),
        config=config,
        metrics=metrics,
        checkpoint=None,
        status="stopped",
    )


# Stopped before their pruning step, a and d still measure their unpruned MACs: ranked on measured MACs the
# front would be a, b, c; ranked on target_macs (as the search did) it is d, a.
DISAGREEING = [("a", 0.8, 1e6, 4e6), ("b", 0.7, 2e6, 2e6), ("c", 0.6, 3e6, 1e6), ("d", 0.5, 0.5e6, 5e6)]


def test_front_is_chosen_on_target_macs_not_on_measured_macs(tmp_path):
    from analysis.pareto import build_rows, select_trials
    from analysis.results import Sweep
    from common.objectives import front_mask
    from common.trial_table import front_rows, table_columns, trial_row

    trials = [synthetic_trial(*t) for t in DISAGREEING]
    sweep = Sweep(name="s", path=tmp_path, base_config={}, settings={}, trials=trials)
    assert [t.trial_id for t in select_trials([sweep], "front", None)] == ["d", "a"]
    rows = build_rows([sweep], None)
    assert {r["trial_id"] for r in rows if r["on_front"]} == {"d", "a"}
    assert [r["trial_id"] for r in front_rows(rows)] == ["d", "a"]
    assert [r["macs"] for r in rows] == [4e6, 2e6, 1e6, 5e6]  # the measured MACs stay a column
    # the sweep CLI's summary ranks the same rows the same way
    assert front_mask([trial_row(t) for t in trials]).tolist() == [True, False, False, True]
    headers = dict(table_columns(rows, several_sweeps=False))
    assert headers["target_macs"] == "target MACs" and headers["macs"] == "measured MACs"


def test_target_macs_ratio_column_only_where_the_mode_uses_it():
    from common.trial_table import trial_row

    ratios = {
        mode: trial_row(synthetic_trial("t", 0.5, 1e6, 1e6, mode))["target_macs_ratio"]
        for mode in ("none", "single", "progressive", "unstructured")
    }
    assert ratios == {"none": None, "single": 0.5, "progressive": 0.5, "unstructured": None}


def test_plot_x_axis_is_target_macs_and_its_label_says_so(tmp_path):
    import matplotlib.pyplot as plt

    from analysis.pareto import build_rows
    from analysis.plot import front_figure
    from analysis.results import Sweep

    sweep = Sweep(
        name="s", path=tmp_path, base_config={}, settings={}, trials=[synthetic_trial(*t) for t in DISAGREEING]
    )
    fig = front_figure(build_rows([sweep], None), "title")
    try:
        ax = fig.axes[0]
        assert LABELS["target_macs"] in ax.get_xlabel() and "millions" in ax.get_xlabel()
        plotted = sorted(x for c in ax.collections for x, _ in c.get_offsets())
        assert plotted == pytest.approx(sorted(m / 1e6 for _, _, m, _ in DISAGREEING))
    finally:
        plt.close(fig)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("trial=641040e5", "641040e5"),  # Hydra alone: the float 6.4104e10
        ("trial=12e45678", "12e45678"),  # Hydra alone: inf
        ("name=20261123", "20261123"),  # Hydra alone: an int
        ("trial=[641040e5, abc,'1e5',00012345]", ["641040e5", "abc", "1e5", "00012345"]),
        ("trial=['a,b',1e3]", ["a,b", "1e3"]),
        ("+trial=1_000", "1_000"),
        ("trial=front", "front"),
        ("trial='0e1'", "0e1"),  # quoting still works
        ("name=null", None),
    ],
)
def test_names_and_trial_ids_are_read_as_typed(override, expected):
    from common.cli import value_as_typed

    key, value = value_as_typed(override)
    assert key == override.lstrip("+").split("=")[0] and value == expected


def copy_with_numeric_names(workdir: Path, sweep_name: str, trial_id: str) -> tuple[Path, str]:
    """A copy of the fixture sweep named `sweep_name` whose first trial reports the id `trial_id`."""
    import shutil

    from analysis.results import load_sweep

    source = workdir / "ray_results" / SWEEP
    copy = workdir / "ray_results" / sweep_name
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("evaluation.json", "export", "pareto.*", "report.html"))
    old = load_sweep(copy).trials[0]
    result = old.trial_dir / "result.json"
    result.write_text(result.read_text().replace(f'"{old.trial_id}"', f'"{trial_id}"'))
    return copy, old.trial_id


@pytest.mark.slow
def test_trial_ids_and_sweep_names_that_look_like_numbers(workdir):
    copy, _ = copy_with_numeric_names(workdir, "20261123", "641040e5")
    out = run("export.py", workdir, "name=20261123", "trial=641040e5")
    assert out.returncode == 0, out.stderr[-3000:]
    assert set(json.loads((copy / "export" / "export.json").read_text())) == {"641040e5"}
    assert (copy / "export" / "641040e5.onnx").is_file()
    out = run("evaluate.py", workdir, "name=20261123", "trial=[641040e5]")
    assert out.returncode == 0, out.stderr[-3000:]
    assert set(json.loads((copy / "evaluation.json").read_text())) == {"641040e5"}
    out = run("evaluate.py", workdir, "name=20261123", "trial=12e45678")
    assert out.returncode == 2 and "trial=['12e45678'] not found" in out.stderr and "641040e5" in out.stderr


def stopped_and_completed_rows() -> list[dict]:
    """Rows as build_rows makes them: two completed trials, two stopped at epoch 2 (one of them on the front)."""
    from common.objectives import front_mask

    rows = [
        {
            "sweep": "s",
            "trial_id": tid,
            "status": status,
            "epochs": epochs,
            "kd": kd,
            "pruning": mode,
            "val_acc": acc,
            "target_macs": macs,
            "macs": macs,
            "params": 1,
        }
        for tid, status, epochs, kd, mode, acc, macs in [
            ("c1", "completed", 8, "on", "single", 0.8, 4e6),
            ("c2", "completed", 8, "off", "single", 0.6, 8e6),
            ("s1", "stopped", 2, "on", "single", 0.1, 6e6),
            ("s2", "stopped", 2, "off", "none", 0.3, 1e6),
        ]
    ]
    for row, on in zip(rows, front_mask(rows)):
        row["on_front"] = bool(on)
    return rows


def test_plot_draws_trials_stopped_early_hollow_with_their_epoch():
    import matplotlib.pyplot as plt

    from analysis.plot import front_figure

    rows = stopped_and_completed_rows()
    assert [r["trial_id"] for r in rows if r["on_front"]] == ["c1", "s2"]
    fig = front_figure(rows, "title")
    try:
        ax = fig.axes[0]
        by_point = {}
        for collection in ax.collections:
            for x, y in collection.get_offsets():
                by_point[(round(float(x), 3), round(float(y), 3))] = collection
        for row in rows:
            collection = by_point[(round(row["target_macs"] / 1e6, 3), round(row["val_acc"], 3))]
            faces = collection.get_facecolor()
            if row["status"] == "completed":
                assert len(faces) and faces[0][3] > 0  # filled
            else:
                assert len(faces) == 0  # hollow: facecolors 'none'
                assert len(collection.get_edgecolor()) == 1
        stopped_off_front = by_point[(6.0, 0.1)]
        assert stopped_off_front.get_alpha() < by_point[(8.0, 0.6)].get_alpha()  # fainter than a completed one
        texts = [t.get_text() for t in ax.texts]
        assert "2" in texts  # the epoch s1 reached, next to it
        assert "s2 (epoch 2)" in texts and "c1" in texts  # front labels; a stopped one says its epoch
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert "stopped early (hollow; number = epoch reached)" in legend and "ran all epochs (filled)" in legend
        assert "KD on" in legend and "single-shot" in legend  # colour = KD, marker = pruning mode, as before
    finally:
        plt.close(fig)


def test_report_tables_scroll_sideways_inside_the_page():
    from html.parser import HTMLParser

    from analysis.report import render_report
    from analysis.sweep_stats import normalised_hypervolumes

    rows = stopped_and_completed_rows()
    for row in rows:  # many evaluation columns: the widest front table the report can get
        row |= {f"nsynth_extra_{i}_acc": 0.5 for i in range(8)}
    page = render_report(rows, normalised_hypervolumes(rows, None), b"png", None)

    class Tables(HTMLParser):
        def __init__(self):
            super().__init__()
            self.stack, self.parents = [], []

        def handle_starttag(self, tag, attrs):
            if tag == "table":
                self.parents.append(self.stack[-1])
            if tag not in ("meta", "img", "wbr"):  # void elements have no end tag
                self.stack.append((tag, dict(attrs).get("class")))

        def handle_endtag(self, tag):
            assert self.stack.pop()[0] == tag

    tables = Tables()
    tables.feed(page)
    assert len(tables.parents) == 4  # hypervolume, front, the two comparisons
    assert set(tables.parents) == {("div", "table-wrap")}
    assert ".table-wrap { overflow-x: auto; max-width: 100%;" in page
    assert "td { white-space: nowrap;" in page and "th { background: #eee; white-space: normal;" in page
    assert "nsynth_<wbr>extra_<wbr>0 acc" in page  # long headers may break after an underscore


def plain_copy(workdir: Path, sweep_name: str) -> Path:
    """A copy of the fixture sweep under another name, without anything the analysis scripts wrote."""
    import shutil

    copy = workdir / "ray_results" / sweep_name
    shutil.copytree(
        workdir / "ray_results" / SWEEP,
        copy,
        ignore=shutil.ignore_patterns("evaluation.json", "export", "pareto.*", "report.html"),
    )
    return copy


@pytest.mark.slow
def test_export_int8_and_latency_then_latency_as_third_objective(workdir):
    from common.front import pareto_mask

    copy = plain_copy(workdir, "lat")
    out = run("pareto.py", workdir, "name=lat", "objectives.third_objective=latency")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "no latency has been measured yet in sweep(s) lat; run analysis/export.py first" in out.stderr
    out = run("export.py", workdir, "name=lat", "trial=front", "objectives.third_objective=latency", "latency.runs=20")
    assert out.returncode == 0, out.stderr[-3000:]
    manifest = json.loads((copy / "export" / "export.json").read_text())
    assert manifest
    for trial_id, entry in manifest.items():
        fp32, int8 = Path(entry["onnx"]), Path(entry["int8"]["onnx"])
        assert int8.name == f"{trial_id}.int8.onnx" and int8.parent == fp32.parent
        assert entry["int8"]["bytes"] == int8.stat().st_size < entry["bytes"] == fp32.stat().st_size
        assert entry["kb"] == {
            "fp32": pytest.approx(entry["params"] * 4 / 1000),
            "int8": pytest.approx(entry["params"] / 1000),
        }
        assert 0.0 <= entry["int8"]["agreement"] <= 1.0 and entry["int8"]["test_n"] == entry["test_n"] > 0
        assert (
            f"predicts the same class as fp32 on {entry['int8']['agreement']:.1%} of the {entry['test_n']} test "
            "clips" in out.stdout
        )
        assert entry["fp32_test_acc"] - entry["int8"]["test_acc"] == pytest.approx(entry["int8"]["acc_drop"])
        for precision in ("fp32", "int8"):
            record = entry["latency"][precision]
            assert record["cpu"].strip() and record["runs"] == 20 and record["batch"] == 1
            assert set(record["threads"]) == {"1", str(record["all_threads"])}
            assert all(t["median_ms"] <= t["p90_ms"] for t in record["threads"].values())
    assert f"on {record['cpu']!r}" in out.stdout
    rows = read_csv(copy / "pareto.csv")
    measured = [r for r in rows if r["latency_ms_1thread"]]
    assert {r["trial_id"] for r in measured} == set(manifest)
    assert all(
        r["precision"] == "fp32+int8"
        and float(r["kb_int8"]) * 4 == pytest.approx(float(r["kb_fp32"]))
        and r["int8_acc_drop"]
        and r["int8_latency_ms_1thread"]
        and r["latency_cpu"]
        for r in measured
    )
    # the front over (val_acc, target_macs, latency) among the measured trials; the others are never on it
    points = np.array(
        [[float(r["val_acc"]), float(r["target_macs"]), float(r["latency_ms_1thread"])] for r in measured]
    )
    assert [r["on_front"] == "True" for r in measured] == pareto_mask(points, [True, False, False]).tolist()
    assert all(r["on_front"] == "False" for r in rows if not r["latency_ms_1thread"])
    report = (copy / "report.html").read_text()
    assert "Deployment" in report and record["cpu"] in report and "int8 acc drop" in report
    assert LABELS["latency_ms_1thread"] in report
    out = run("pareto.py", workdir, "name=lat", "objectives.third_objective=latency")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Pareto front (val_acc, target_macs, latency_ms_1thread)" in out.stdout and "fp32 ms 1 thread" in out.stdout


@pytest.mark.slow
def test_qat_fine_tunes_the_model_the_int8_export_comes_from(workdir):
    copy = plain_copy(workdir, "qat")
    out = run("export.py", workdir, "name=qat", "quant.qat_epochs=-1")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "quant.qat_epochs=-1 must be 0 (no QAT) or more." in out.stderr and not (copy / "export").exists()
    out = run("export.py", workdir, "name=qat", "quant.qat_epochs=2", "quant.enabled=false")
    assert out.returncode == 2 and "set quant.enabled=true or quant.qat_epochs=0" in out.stderr
    trial_id = read_csv(workdir / "ray_results" / SWEEP / "pareto.csv")[0]["trial_id"]
    out = run("export.py", workdir, "name=qat", f"trial={trial_id}", "quant.qat_epochs=2", "latency.runs=5")
    assert out.returncode == 0, out.stderr[-3000:]
    entry = json.loads((copy / "export" / "export.json").read_text())[trial_id]
    int8 = entry["int8"]
    assert int8["error"] is None and Path(int8["onnx"]).is_file()
    assert int8["qat"]["epochs"] == 2 and int8["qat"]["lr"] == 1e-4
    assert [h["epoch"] for h in int8["qat"]["history"]] == [1, 2]
    assert all(np.isfinite(h["train_loss"]) for h in int8["qat"]["history"])
    assert "after 2 QAT epoch(s)" in out.stdout and "int8: 2 QAT epoch(s), then static quantization" in out.stdout
    assert not list((copy / "export").glob(".*"))  # the fine-tuned intermediate model is not left behind
    # the shipped fp32 model is the trial's own (unchanged by QAT): ONNX Runtime matches its checkpoint
    assert entry["max_abs_diff_real"] <= 1e-3


def test_budget_keeps_over_budget_trials_off_the_front_and_names_the_best_under_it(tmp_path):
    import dataclasses

    import matplotlib.pyplot as plt

    from analysis.pareto import best_under_budget, budget_line, build_rows, select_trials, sweep_budget
    from analysis.plot import front_figure
    from analysis.results import Sweep

    trials = [synthetic_trial(*t) for t in DISAGREEING]
    # the sweep's callback marked "a" (the most accurate) infeasible: it broke budget.max_macs
    trials[0] = dataclasses.replace(trials[0], metrics={**trials[0].metrics, "feasible": 0})
    section = {"max_macs": 3.5e6, "max_params": None, "max_kb": 128.0, "precision": "int8", "screen": True}
    sweep = Sweep(name="s", path=tmp_path, base_config={}, settings={"budget": section}, trials=trials)
    rows = build_rows([sweep], None)
    assert {r["trial_id"] for r in rows if r["on_front"]} == {"b", "d"}  # a is never on the front
    assert [t.trial_id for t in select_trials([sweep], "front", None)] == ["d", "b"]  # nor exported/evaluated as one
    budget = sweep_budget([sweep])
    assert budget.limits == {"max_macs": 3.5e6, "max_kb": 128.0}
    assert (
        sweep_budget([dataclasses.replace(sweep, settings={"budget": section | {"max_macs": None, "max_kb": None}})])
        is None
    )
    best = best_under_budget(rows, budget)
    assert best["trial_id"] == "b"  # c is less accurate; a is over the budget
    line = budget_line(budget, best)
    assert line.startswith(
        "Best under budget (budget.max_macs=3,500,000, budget.max_kb=128 at int8): trial b: val acc 0.7"
    )
    assert budget_line(budget, None).endswith("no trial fits.")
    fig = front_figure(rows, "t", budget)
    labels = fig.axes[0].get_legend().get_texts()
    assert {"over the budget (never on the front)", "budget.max_macs = 3.5M"} <= {t.get_text() for t in labels}
    plt.close(fig)


@pytest.mark.parametrize("script", ["evaluate.py", "export.py"])
@pytest.mark.slow
def test_a_front_model_without_checkpoint_is_one_line_before_any_scoring(workdir, script):
    import shutil

    from analysis.pareto import select_trials
    from analysis.results import load_sweep

    copy = plain_copy(workdir, f"nockpt-{script[:-3]}")
    lost = select_trials([load_sweep(copy)], "front", None)[0]
    for folder in lost.trial_dir.glob("checkpoint_*"):
        shutil.rmtree(folder)
    out = run(script, workdir, f"name={copy.name}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"trial(s) {lost.trial_id} of sweep {copy.name} have no checkpoint" in out.stderr
    assert not (copy / "evaluation.json").exists() and not (copy / "export").exists()  # nothing scored or written


@pytest.mark.slow
def test_search_fidelity_benchmark_measures_the_rungs_without_selection_bias(workdir):
    """benchmarks/search_fidelity.py: (a) val/test rank agreement, (c) the sweep's rung fidelity, (d) the same without
    selection bias and the scheduler replayed on full-length curves: on a sweep that stopped nothing, its own
    trials; on one with rungs, a sweep of fidelity.fifo_samples trials that stops nothing, run next to it once."""
    import re
    import shutil

    def benchmark(name: str, *args: str) -> subprocess.CompletedProcess:
        command = [
            sys.executable,
            str(ROOT / "benchmarks" / "search_fidelity.py"),
            f"workdir={workdir}",
            f"name={name}",
            "fidelity.seed_spread=false",
            *args,
        ]
        return subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT)

    out = benchmark(SWEEP)  # the fixture's sweep stopped nothing (fifo)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "(a) Spearman(val_acc, test_acc)" in out.stdout and "(b)" not in out.stdout
    assert (
        "(c) rung fidelity: the sweep stopped no trial early, so it is measured without selection bias in (d)"
        in out.stdout
    )
    assert f"(d) rung fidelity without early stopping ({SWEEP}; the rungs of scheduler.grace_period=1" in out.stdout
    assert "(d) sweep" not in out.stdout and "ParetoASHA replayed on these 3 full-length curves" in out.stdout
    replayed = [line.split() for line in out.stdout.splitlines() if re.match(r"\s+[12]\s+\S+\s+val_", line)]
    assert {(cells[0], cells[2]) for cells in replayed} == {
        (g, m) for g in "12" for m in ("val_acc", "val_loss", "val_macro_f1")
    }
    assert re.fullmatch(
        r"spearman=\S+ seed_std_points=nan first_rung_rho=nan unbiased_first_rung_rho=\S+",
        out.stdout.strip().splitlines()[-1],
    )
    # the same trials as if ParetoASHA had ranked them at epoch 1: the rho is over survivors, so 4 fresh trials that
    # stop nothing are run next to it
    ranked = workdir / "ray_results" / "ranked"
    shutil.copytree(workdir / "ray_results" / SWEEP, ranked)
    state = json.loads((ranked / "sweep_config.json").read_text())
    state["sweep"]["scheduler"] |= {"name": "pareto_asha", "grace_period": 1}
    (ranked / "sweep_config.json").write_text(json.dumps(state))
    out = benchmark("ranked", "fidelity.fifo_samples=4")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "(d) sweep ranked-fifo4: 4 trials of space quick without early stopping (new)" in out.stdout
    assert "(c) rung fidelity: 3 trials, 3 reached epoch 3; rung metric val_acc, rungs [1]" in out.stdout
    assert "survivors" in out.stdout and "ParetoASHA replayed on these 4 full-length curves" in out.stdout
    last = out.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"spearman=\S+ seed_std_points=nan first_rung_rho=\S+ unbiased_first_rung_rho=\S+", last)
    fifo = workdir / "ray_results" / "ranked-fifo4"
    epochs = [
        len((d / "result.json").read_text().splitlines()) for d in fifo.iterdir() if (d / "result.json").is_file()
    ]
    assert epochs == [3, 3, 3, 3]  # nothing stopped
    again = benchmark("ranked", "fidelity.fifo_samples=4")
    assert again.returncode == 0 and "(d) sweep" not in again.stdout  # reused, not run again
    assert again.stdout.strip().splitlines()[-1] == last
    refused = benchmark("ranked", "fidelity.fifo_samples=2")
    assert (
        refused.returncode == 2
        and "fidelity.fifo_samples=2: a rank correlation with an interval needs at least 4" in refused.stderr
    )
