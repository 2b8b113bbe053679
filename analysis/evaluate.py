"""Held-out test accuracy of a sweep's Pareto-front models, plus any extra NSynth-layout folders.

    python analysis/evaluate.py name=<sweep>                                  # the front, on the test split
    python analysis/evaluate.py name=<sweep> trial=<trial_id>                  # or trial=[<id>,<id>]
    python analysis/evaluate.py name=<sweep> eval.extra=[/data/nsynth/nsynth-test]
    python analysis/evaluate.py name=<sweep> trial=retrained eval.extra=[...]  # the retrained front, every seed

Trial ids, sweep names and paths are read as typed: `trial=641040e5` and `name=20261123` need no quotes, although
Hydra alone would read them as numbers (common.cli.string_overrides).

The front is chosen on the validation split, so its validation accuracy is optimistic; the test split
(never seen by training or selection) gives the number to quote. Each model is scored with its own
feature config from its checkpoint. Results go to `<sweep>/evaluation.json`, then pareto.csv,
pareto.png and report.html are regenerated with the test columns (and logged to MLflow again). For the retrained
runs (`trial=retrained`) the extra folders' columns go to retrained.csv, and the report's retrained table shows
their mean ± std over seeds (the runs scored the test split themselves).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from analysis.pareto import analyse, require_checkpoints, select_trials, summary
from analysis.results import NAME_KEYS, load_sweeps, sweep_data, write_evaluations
from common.cli import entry_point, plain, string_overrides
from common.config import FeatureConfig
from common.trial_table import TrialRecord, evaluation_columns, evaluation_headers, format_table
from data_prep.waveform_cache import WaveformData, load_clip
from trainable.checkpoints import load_checkpoint, restore_model
from trainable.evaluation import amp_settings, evaluate, make_pipeline
from trainable.features.pipeline import FeaturePipeline
from trainable.run_config import pick_device

log = logging.getLogger("analysis.evaluate")


@dataclass(frozen=True)
class ExtraSet:
    """The decodable clips of one extra folder, at the sweep data's sample rate and clip length."""

    label: str  # column prefix in pareto.csv
    folder: Path
    families: np.ndarray  # (N,) instrument_family_str per clip
    waveforms: np.ndarray  # (N, clip_samples) float32
    fingerprint: str  # identifies the clips, so their log-mel cache is reused
    unreadable: dict[str, str]  # note_str -> why it was skipped


def extra_label(folder: Path) -> str:
    """Column-safe name of an extra folder: nsynth-test -> nsynth_test."""
    return re.sub(r"[^0-9A-Za-z]+", "_", Path(folder).resolve().name).strip("_") or "extra"


def check_extra_folders(folders: Sequence[str | Path]) -> list[Path]:
    """Fail before any model work when an extra folder is missing or two would share a column name."""
    paths = [Path(f) for f in folders]
    for path in paths:
        if not (path / "examples.json").is_file():
            raise FileNotFoundError(
                f"eval.extra folder {path} has no examples.json: pass NSynth split folders "
                "(examples.json + audio/), e.g. eval.extra=[/data/nsynth/nsynth-test]."
            )
    labels = Counter(extra_label(p) for p in paths)
    clashes = [label for label, n in labels.items() if n > 1]
    if clashes:
        raise ValueError(
            f"eval.extra folders {[str(p) for p in paths]} share the column name(s) {clashes}; "
            "give each folder a distinct name (e.g. a symlink)."
        )
    return paths


def load_extra_folder(folder: Path, sample_rate: int, clip_samples: int) -> ExtraSet:
    """Decode every note of an NSynth split folder with the same trimming as the training cache."""
    examples_file = folder / "examples.json"
    try:
        examples = json.loads(examples_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{examples_file} is not valid JSON ({err}).") from err
    digest = hashlib.sha256(f"{folder.resolve()}|{sample_rate}|{clip_samples}".encode())
    clips, families, unreadable = [], [], {}
    for key, example in sorted(examples.items()):
        if "instrument_family_str" not in example:
            raise ValueError(
                f"{examples_file}: entry {key!r} has no instrument_family_str; this is not NSynth's "
                "examples.json format."
            )
        note_str = example.get("note_str", key)
        path = folder / "audio" / f"{note_str}.wav"
        try:
            clip, _ = load_clip(path, sample_rate, clip_samples)
        except ValueError as err:
            unreadable[note_str] = str(err)
            continue
        stat = path.stat()
        digest.update(f"{note_str}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
        clips.append(clip)
        families.append(example["instrument_family_str"])
    if not clips:
        raise ValueError(
            f"eval.extra folder {folder}: none of its {len(examples)} notes could be decoded "
            f"(e.g. {next(iter(unreadable.items()), ('-', '-'))})."
        )
    if unreadable:
        log.warning("%s: skipped %d unreadable notes", folder, len(unreadable))
    return ExtraSet(
        label=extra_label(folder),
        folder=folder,
        families=np.array(families),
        waveforms=np.stack(clips),
        fingerprint=f"extra-{digest.hexdigest()[:20]}",
        unreadable=unreadable,
    )


def score_extra(
    model: torch.nn.Module,
    extra: ExtraSet,
    classes: list[str],
    feats: FeatureConfig,
    device: torch.device,
    batch_size: int,
    run_config: Mapping[str, Any],
) -> dict[str, Any]:
    """Accuracy and macro-F1 on the notes of families the model knows; the others are counted as skipped. Their
    log-mels are cached like the run's (`run_config`: the trial's workdir, train.device_data_share)."""
    index = {name: i for i, name in enumerate(classes)}
    known = np.array([family in index for family in extra.families])
    result = {
        "folder": str(extra.folder),
        "n": int(known.sum()),
        "unreadable": len(extra.unreadable),
        "skipped_families": dict(sorted(Counter(extra.families[~known].tolist()).items())),
        "acc": None,
        "macro_f1": None,
    }
    if not known.any():
        return result
    labels = np.array([index[family] for family in extra.families[known]], dtype=np.int64)
    classes_digest = hashlib.sha256(",".join(classes).encode()).hexdigest()[:8]
    pipeline = FeaturePipeline(
        extra.waveforms[known],
        labels,
        f"{extra.fingerprint}-{classes_digest}",
        feats,
        device,
        Path(run_config["workdir"]) / "cache" / "features",
        run_config["train"]["device_data_share"],
    )
    metrics = evaluate(model, pipeline, batch_size, len(classes), amp_settings(device))
    return result | {"acc": metrics["acc"], "macro_f1": metrics["macro_f1"]}


def evaluate_trial(
    trial: TrialRecord, data: WaveformData, extras: Sequence[ExtraSet], device: torch.device, batch_size: int
) -> dict[str, Any]:
    """Test-split (and extra folders') metrics of one trial's last checkpoint."""
    if trial.checkpoint is None:
        raise FileNotFoundError(f"no checkpoint kept in {trial.trial_dir}")
    ckpt = load_checkpoint(trial.checkpoint)
    if list(ckpt["classes"]) != list(data.classes):
        raise ValueError(f"the model's classes {ckpt['classes']} differ from the sweep data's {data.classes}")
    model = restore_model(ckpt, device).eval()
    feats = FeatureConfig.from_mapping(ckpt["config"]["features"])
    test = evaluate(
        model,
        make_pipeline(data, "test", feats, device, trial.config["workdir"], trial.config["train"]["device_data_share"]),
        batch_size,
        data.num_classes,
        amp_settings(device),
    )
    data_changed = ckpt.get("data_fingerprint") != data.fingerprint
    if data_changed:
        log.warning(
            "trial %s was trained on waveform cache %s, the data is now %s: files changed since the sweep",
            trial.trial_id,
            ckpt.get("data_fingerprint"),
            data.fingerprint,
        )
    return {
        "checkpoint": str(trial.checkpoint),
        "epoch": ckpt["epoch"],
        "test_acc": test["acc"],
        "test_macro_f1": test["macro_f1"],
        "test_n": len(data.splits["test"]),
        "data_changed": data_changed,
        "extra": {
            e.label: score_extra(model, e, ckpt["classes"], feats, device, batch_size, trial.config) for e in extras
        },
        "error": None,
    }


def evaluate_trials(
    trials: Sequence[TrialRecord], data: WaveformData, extras: Sequence[ExtraSet], device: torch.device, batch_size: int
) -> dict[str, dict[str, Any]]:
    """trial_id -> its metrics, or {"error": ...} for a trial whose checkpoint cannot be loaded or scored."""
    results = {}
    for trial in trials:
        log.info("Evaluating trial %s (%s)", trial.trial_id, trial.checkpoint)
        try:
            results[trial.trial_id] = evaluate_trial(trial, data, extras, device, batch_size)
        except Exception as err:  # one unreadable checkpoint must not stop the other models' evaluation
            log.error("trial %s could not be evaluated: %s", trial.trial_id, err)
            results[trial.trial_id] = {"checkpoint": str(trial.checkpoint), "error": f"{type(err).__name__}: {err}"}
    return results


def skipped_report(evaluations: dict[str, dict[str, Any]]) -> list[str]:
    """One line per extra folder and distinct set of skipped families (the same for models with equal classes)."""
    lines = {}
    for trial_id, evaluation in evaluations.items():
        for label, extra in (evaluation.get("extra") or {}).items():
            skipped = ", ".join(f"{family} {n}" for family, n in extra["skipped_families"].items())
            text = (
                f"{label}: {extra['n']} notes scored; skipped (family unknown to the model): {skipped or 'none'}"
                f"; unreadable: {extra['unreadable']}"
            )
            lines.setdefault(text, []).append(trial_id)
    return [f"{text}  [trials: {', '.join(ids)}]" for text, ids in lines.items()]


@hydra.main(config_path="../conf", config_name="analysis", version_base="1.3")
@entry_point
def main(cfg: DictConfig) -> None:
    config = string_overrides(plain(cfg), NAME_KEYS)
    sweeps = load_sweeps(config)
    third = config["objectives"]["third_objective"]
    chosen = select_trials(sweeps, config["trial"], third)
    require_checkpoints(chosen)
    extra_folders = check_extra_folders(config["eval"]["extra"])
    device = pick_device(config["device"])
    batch_size = config["eval"]["batch_size"]

    evaluations: dict[tuple[str, str], dict[str, Any]] = {}
    for sweep in sweeps:
        trials = [t for t in chosen if t.sweep == sweep.name]
        if not trials:
            continue
        data = sweep_data(sweep, trials)
        extras = [load_extra_folder(f, data.sample_rate, data.clip_samples) for f in extra_folders]
        results = evaluate_trials(trials, data, extras, device, batch_size)
        write_evaluations(sweep.path, results)
        evaluations |= {(sweep.name, trial_id): result for trial_id, result in results.items()}

    tracking_uri = config["mlflow"]["tracking_uri"]
    analysis = analyse(sweeps, third, tracking_uri)
    # search trials and retrained runs alike (trial=retrained): the rows analyse() built with these evaluations
    evaluated = [r for r in [*analysis.rows, *analysis.retrained_runs] if (r["sweep"], r["trial_id"]) in evaluations]
    retrained = (
        [("front_trial", "retrains"), ("role", "role"), ("seed", "seed")]
        if any("front_trial" in r for r in evaluated)
        else []
    )
    measured = [evaluation_columns(e) for e in evaluations.values()]
    columns = [
        ("trial_id", "trial"),
        *retrained,
        ("val_acc", "val acc"),
        *[c for c in evaluation_headers(measured) if c[0] != "eval_error"],
    ]
    print(
        f"\nEvaluated {len(evaluated)} model(s) on the test split"
        + (f" and {len(extra_folders)} extra folder(s)" if extra_folders else "")
        + ":"
    )
    print(format_table(evaluated, columns))
    for line in skipped_report({trial_id: e for (_, trial_id), e in evaluations.items()}):
        print(line)
    failed = {trial_id: e["error"] for (_, trial_id), e in evaluations.items() if e.get("error")}
    for trial_id, error in failed.items():
        print(f"trial {trial_id}: not evaluated: {error}")
    print("\n" + summary(analysis, tracking_uri, sweeps[0].name))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
