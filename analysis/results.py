"""A sweep's trials as Ray Tune left them on disk, read the same way by every analysis script.

`<storage_path>/<sweep>/` holds `sweep_config.json` (base config + sweep settings, written by
sweeps/run.py) and one folder per trial with `result.json` (one JSON line per reported epoch) and the
last kept `checkpoint_NNNNNN/`. The retrain stage (sweeps/retrain.py) adds `retrain/`, one more Tune experiment
of the same shape whose runs report `test_acc` at their last epoch (`load_retrained`). Reading the files
(not Tune's pickled experiment state) keeps the analysis independent of the Ray version that ran the sweep
and lets it run while a sweep is going on.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis.rung_fidelity import Curve, RungFidelity, last_epoch, rung_epochs, rung_fidelity
from common.config import STRUCTURED_MODES, upgrade_saved_config, upgrade_saved_settings
from common.io import atomic_write_text
from common.objectives import within_budget
from common.sweep_layout import STATE_FILE, list_sweeps
from common.trial_table import TrialRecord, trial_status
from data_prep.dataset import prepare_data
from data_prep.waveform_cache import WaveformData, load_waveform_cache
from sweeps.budget import CONSTRAINT_PREFIX, measured_at_end
from sweeps.retrain import retrain_experiment
from trainable.checkpoints import CHECKPOINT_NAME
from trainable.run_config import trial_config

log = logging.getLogger(__name__)

# Per-trial test-set (and extra-folder) metrics written by analysis/evaluate.py, merged into every table.
EVALUATION_FILE = "evaluation.json"


@dataclass(frozen=True)
class Sweep:
    name: str
    path: Path
    base_config: dict[str, Any]
    settings: dict[str, Any]
    trials: list[TrialRecord]


# Keys whose values name things (sweeps, folders, trials): read as the characters typed on the command line, so
# `trial=641040e5` is that trial and not the float 6.4104e10 (common.cli.string_overrides).
NAME_KEYS = ("name", "path", "trial")


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def sweep_dirs(names: str | list[str] | None, paths: str | list[str] | None, storage_path: str | Path) -> list[Path]:
    """Folders of the requested sweeps: `name=` looks under storage_path, `path=` points at the folder itself."""
    storage = Path(storage_path)
    available = ", ".join(list_sweeps(str(storage))) or "none"
    names, paths = _as_list(names), _as_list(paths)
    if not names and not paths:
        raise ValueError(
            f"Pass name=<sweep> (sweeps under {storage}: {available}) or path=<sweep folder>; "
            "name=[a,b] overlays several sweeps."
        )
    folders = [storage / name for name in names] + [Path(p) for p in paths]
    for folder, given in zip(folders, [f"name={n}" for n in names] + [f"path={p}" for p in paths]):
        if not (folder / STATE_FILE).is_file():
            raise FileNotFoundError(
                f"No sweep at {folder} ({given}): it has no {STATE_FILE}. "
                f"Sweeps under storage_path={storage}: {available}."
            )
    return folders


def read_results(result_file: Path) -> list[dict[str, Any]]:
    """Reported results in order; a line cut off by a running or killed trial is skipped."""
    results = []
    for line in result_file.read_text().splitlines():
        try:
            result = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "val_acc" in result:
            results.append(result)
    return results


def last_checkpoint(trial_dir: Path, last_result: dict[str, Any]) -> Path | None:
    """The checkpoint of the last result when Tune kept it, else the newest one in the folder."""
    named = trial_dir / str(last_result.get("checkpoint_dir_name")) / CHECKPOINT_NAME
    if named.is_file():
        return named
    found = sorted(trial_dir.glob(f"checkpoint_*/{CHECKPOINT_NAME}"))
    return found[-1] if found else None


def load_trial(sweep: str, trial_dir: Path, base_config: dict[str, Any]) -> TrialRecord | None:
    """A trial (or retraining run) as Tune left it, with its status (common.trial_table.trial_status)."""
    results = read_results(trial_dir / "result.json")
    if not results:
        return None
    last = results[-1]
    config = trial_config(base_config, last.get("config", {}))
    status = trial_status(last["epoch"], config["train"]["epochs"], (trial_dir / "error.txt").is_file())
    return TrialRecord(
        sweep=sweep,
        trial_id=str(last["trial_id"]),
        trial_dir=trial_dir,
        config=config,
        metrics=last,
        checkpoint=last_checkpoint(trial_dir, last),
        status=status,
    )


def load_sweep(path: Path) -> Sweep:
    """The sweep's settings and every trial that reported a result; none reported is an error."""
    path = Path(path)
    state = json.loads((path / STATE_FILE).read_text())
    base_config = upgrade_saved_config(state["base_config"])
    trials = []
    for trial_dir in sorted(path.iterdir()):
        trial = load_trial(path.name, trial_dir, base_config) if (trial_dir / "result.json").is_file() else None
        if trial is not None:
            trials.append(trial)
    if not trials:
        raise ValueError(
            f"Sweep {path.name!r} ({path}) has no finished trials: no trial folder has a result.json "
            "with val_acc yet. Wait for its trials to report an epoch, or check their error.txt."
        )
    log.info("Sweep %s: %d trials with results", path.name, len(trials))
    return Sweep(
        name=path.name,
        path=path,
        base_config=base_config,
        settings=upgrade_saved_settings(state["sweep"]),
        trials=trials,
    )


def load_retrained(sweep: Sweep) -> list[TrialRecord]:
    """The runs of the sweep's retrain stage (`<sweep>/retrain/<run>/result.json`; `final/` in sweeps made before
    the rename) that reported an epoch, read like the search's trials (their config labels them: `origin.front_trial`,
    `origin.role`, `train.seed`); a run
    still going or killed has no `test_acc` in its last result yet. [] before the stage has run."""
    folder = sweep.path / retrain_experiment(lambda experiment: (sweep.path / experiment).is_dir())
    if not folder.is_dir():
        return []
    runs = [
        load_trial(sweep.name, run_dir, sweep.base_config)
        for run_dir in sorted(folder.iterdir())
        if (run_dir / "result.json").is_file()
    ]
    return [run for run in runs if run is not None]


def trials_line(trials: Sequence[TrialRecord]) -> str:
    """How the trials ended, one line: printed when the search ends (sweeps/run.py) and atop every analysis summary.
    Trials over the budget are counted, and among them those the scheduler stopped before their last pruning step:
    pruning only lowers params, so the unpruned model they left may be over a params/kB budget its schedule met."""
    counts = {status: sum(t.status == status for t in trials) for status in ("completed", "stopped", "errored")}
    over = [t for t in trials if not within_budget(t.metrics)]
    early = sum(
        1
        for t in over
        if t.status == "stopped"
        and t.config["pruning"]["mode"] in STRUCTURED_MODES
        and t.metrics.get(f"{CONSTRAINT_PREFIX}max_macs", -1.0) <= 0  # over on params/kB only
        and not measured_at_end(t.metrics, t.metrics["epoch"], t.config["train"]["epochs"])
    )
    line = f"Trials with results: {len(trials)} (" + ", ".join(f"{n} {status}" for status, n in counts.items() if n)
    line += ")" + (f", {len(over)} over the budget" if over else "")
    return line + (
        f" ({early} of them stopped by the scheduler before their last pruning step: the model they left is unpruned)"
        if early
        else ""
    )


def trial_curves(sweep: Sweep) -> list[Curve]:
    """Every trial's reported epochs (result.json), the last line of an epoch winning (a resumed trial reports the
    epochs after its checkpoint again)."""
    curves = []
    for trial in sweep.trials:
        by_epoch = {int(r["epoch"]): r for r in read_results(trial.trial_dir / "result.json") if "epoch" in r}
        if by_epoch:
            curves.append(
                Curve(
                    trial.trial_id,
                    int(trial.config["train"]["epochs"]),
                    len(trial.config["data"]["families"]),
                    by_epoch,
                )
            )
    return curves


def sweep_fidelity(sweep: Sweep) -> RungFidelity:
    """The sweep's rung fidelity (analysis/rung_fidelity.py) on the metric and rungs its scheduler used."""
    curves = trial_curves(sweep)
    scheduler = sweep.settings["scheduler"]
    grid = any("grid_point" in (t.metrics.get("config") or {}) for t in sweep.trials)
    return rung_fidelity(curves, scheduler["metric"], rung_epochs(scheduler, last_epoch(curves), grid))


def load_sweeps(config: dict[str, Any]) -> list[Sweep]:
    """The sweeps an analysis config names (`name=` and/or `path=`, under `storage_path`)."""
    return [load_sweep(d) for d in sweep_dirs(config["name"], config["path"], config["storage_path"])]


def read_evaluations(sweep_dir: Path) -> dict[str, dict[str, Any]]:
    """trial_id -> what analysis/evaluate.py measured for it ({} before any evaluation)."""
    path = Path(sweep_dir) / EVALUATION_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_evaluations(sweep_dir: Path, evaluations: dict[str, dict[str, Any]]) -> None:
    """Merge into the sweep's evaluation file: trials evaluated earlier and not now keep their entries."""
    merged = read_evaluations(sweep_dir) | evaluations
    atomic_write_text(Path(sweep_dir) / EVALUATION_FILE, json.dumps(merged, indent=2, sort_keys=True))


def sweep_data(sweep: Sweep, trials: Sequence[TrialRecord]) -> WaveformData:
    """The waveform cache the trials were trained on (by the fingerprint in their checkpoints), without
    re-materialising the dataset; rebuilt through prepare_data only if that cache is gone or of an older format."""
    import torch

    workdir = Path(sweep.base_config["workdir"])
    for trial in trials:
        if trial.checkpoint is not None:
            ckpt = torch.load(trial.checkpoint, map_location="cpu", weights_only=False)
            cache_dir = workdir / "cache" / "waveforms" / ckpt.get("data_fingerprint", "")
            if (cache_dir / "meta.json").is_file():
                try:
                    return load_waveform_cache(cache_dir)
                except ValueError as err:  # written by an earlier version: the same notes are decoded again
                    log.warning("Sweep %s: %s", sweep.name, err)
            break
    log.warning("Waveform cache of sweep %s not found or outdated; preparing the data again", sweep.name)
    return prepare_data(sweep.base_config["data"], workdir)
