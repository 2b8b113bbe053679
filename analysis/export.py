"""ONNX export of a sweep's models, checked against PyTorch with ONNX Runtime.

    python analysis/export.py name=<sweep> trial=front            # every Pareto-front model
    python analysis/export.py name=<sweep> trial=<trial_id>       # or trial=[<id>,<id>]; ids as typed, no quotes

Writes `<sweep>/export/<trial_id>.onnx` (input: log-mel features (batch, 1, n_mels, frames) of the model's
own feature config, dynamic batch; output: logits over the checkpoint's classes) and
`<sweep>/export/export.json` (size, opset, parity). A model whose ONNX Runtime output differs from
PyTorch by more than export.tolerance on random or real test-split inputs is not written.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from analysis.pareto import select_trials
from analysis.results import NAME_KEYS, load_sweeps, sweep_data
from common.cli import entry_point, plain, string_overrides
from common.io import atomic_write_text
from data_prep.waveform_cache import WaveformData
from common.config import FeatureConfig
from common.trial_table import Trial, format_table
from trainable.checkpoints import load_checkpoint, restore_model
from trainable.evaluation import make_pipeline

log = logging.getLogger("analysis.export")

EXPORT_DIR = "export"
MANIFEST = "export.json"
MIN_OPSET = 17
PARITY_BATCH = 8  # real test clips (and 3 random inputs) compared; both differ from the export batch of 2


def export_onnx(model: torch.nn.Module, input_shape: Sequence[int], path: Path, opset: int) -> None:
    """Trace the model to ONNX with a dynamic batch axis (input "features", output "logits")."""
    example = torch.randn(2, *input_shape[1:], generator=torch.Generator().manual_seed(0))
    # dynamo=False: the TorchScript exporter. The torch.export-based default needs onnxscript,
    # which is not a dependency of this project; its deprecation notice is expected, not news.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export",
                                category=DeprecationWarning)
        torch.onnx.export(model, (example,), str(path), opset_version=opset, dynamo=False, input_names=["features"],
                          output_names=["logits"], dynamic_axes={"features": {0: "batch"}, "logits": {0: "batch"}})


def max_abs_difference(session: Any, model: torch.nn.Module, inputs: torch.Tensor) -> float:
    """Largest |ONNX Runtime - PyTorch| over the logits of a batch."""
    with torch.no_grad():
        expected = model(inputs).numpy()
    (actual,) = session.run(["logits"], {"features": inputs.numpy()})
    return float(np.abs(actual - expected).max())


def export_trial(trial: Trial, data: WaveformData, out_dir: Path, opset: int, tolerance: float) -> dict[str, Any]:
    """Export one trial's last checkpoint; the .onnx file only appears once parity holds."""
    import onnx
    import onnxruntime

    if trial.checkpoint is None:
        raise FileNotFoundError(f"no checkpoint kept in {trial.trial_dir}")
    ckpt = load_checkpoint(trial.checkpoint)
    model = restore_model(ckpt, "cpu").eval()
    input_shape = tuple(ckpt["input_shape"])
    feats = FeatureConfig.from_mapping(ckpt["config"]["features"])
    real = next(make_pipeline(data, "test", feats, torch.device("cpu"), trial.config["workdir"])
                .batches(PARITY_BATCH, train=False)).features
    if tuple(real.shape[1:]) != input_shape[1:]:
        raise ValueError(f"test features have shape {tuple(real.shape[1:])} but the model was trained on "
                         f"{input_shape[1:]}: the sweep's data (clip length) changed since training")
    random_inputs = torch.randn(3, *input_shape[1:], generator=torch.Generator().manual_seed(1))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{trial.trial_id}.onnx"
    tmp = out_dir / f".{trial.trial_id}.{os.getpid()}.onnx"
    try:
        export_onnx(model, input_shape, tmp, opset)
        onnx.checker.check_model(str(tmp))
        session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        diffs = {"random": max_abs_difference(session, model, random_inputs),
                 "real": max_abs_difference(session, model, real)}
        if max(diffs.values()) > tolerance:
            raise ValueError(f"ONNX Runtime differs from PyTorch by {max(diffs.values()):.2e} "
                             f"(random {diffs['random']:.2e}, real {diffs['real']:.2e}) > export.tolerance={tolerance}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"onnx": str(path), "bytes": path.stat().st_size, "opset": opset, "input_shape": list(input_shape),
            "max_abs_diff_random": diffs["random"], "max_abs_diff_real": diffs["real"], "error": None}


def write_manifest(out_dir: Path, exports: dict[str, dict[str, Any]]) -> None:
    path = out_dir / MANIFEST
    merged = (json.loads(path.read_text()) if path.is_file() else {}) | exports
    atomic_write_text(path, json.dumps(merged, indent=2, sort_keys=True))


@hydra.main(config_path="../conf", config_name="analysis", version_base="1.3")
@entry_point
def main(cfg: DictConfig) -> None:
    config = string_overrides(plain(cfg), NAME_KEYS)
    opset, tolerance = config["export"]["opset"], config["export"]["tolerance"]
    if opset < MIN_OPSET:
        raise ValueError(f"export.opset={opset} is too old; use {MIN_OPSET} or newer.")
    sweeps = load_sweeps(config)
    chosen = select_trials(sweeps, config["trial"], config["objectives"]["third_objective"])
    rows = []
    for sweep in sweeps:
        trials = [t for t in chosen if t.sweep == sweep.name]
        if not trials:
            continue
        data = sweep_data(sweep, trials)
        out_dir = sweep.path / EXPORT_DIR
        exports = {}
        for trial in trials:
            try:
                exports[trial.trial_id] = done = export_trial(trial, data, out_dir, opset, tolerance)
                print(f"exported {done['onnx']}: {done['bytes']} bytes; max |onnxruntime - torch| "
                      f"random {done['max_abs_diff_random']:.2e}, real {done['max_abs_diff_real']:.2e}")
            except Exception as err:  # one failing model must not stop the other exports
                log.error("trial %s not exported: %s", trial.trial_id, err)
                exports[trial.trial_id] = {"onnx": None, "error": f"{type(err).__name__}: {err}"}
            rows.append({"trial_id": trial.trial_id, "sweep": sweep.name, "val_acc": trial.metrics["val_acc"],
                         "macs": trial.metrics["macs"], **exports[trial.trial_id]})
        write_manifest(out_dir, exports)
    columns = [("trial_id", "trial"), ("sweep", "sweep"), ("val_acc", "val acc"), ("macs", "measured MACs"),
               ("bytes", "ONNX bytes"), ("max_abs_diff_random", "diff random"), ("max_abs_diff_real", "diff real"),
               ("onnx", "file")]
    print(f"\nONNX export (opset {opset}, tolerance {tolerance:g}), {len(rows)} model(s):")
    print(format_table(rows, columns))
    failed = [r for r in rows if r["error"]]
    for row in failed:
        print(f"trial {row['trial_id']}: not exported: {row['error']}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
