"""ONNX export of a sweep's models, checked against PyTorch with ONNX Runtime; int8 versions; CPU latency.

    python analysis/export.py name=<sweep> trial=front            # every Pareto-front model
    python analysis/export.py name=<sweep> trial=<trial_id>       # or trial=[<id>,<id>]; ids as typed, no quotes
    python analysis/export.py name=<sweep> quant.enabled=false latency.runs=300

Writes `<sweep>/export/<trial_id>.onnx` (input: log-mel features (batch, 1, n_mels, frames) of the model's
own feature config, dynamic batch; output: logits over the checkpoint's classes) and
`<sweep>/export/export.json` (size, opset, parity, parameters and kB, test accuracy, int8, latency). A model whose
ONNX Runtime output differs from PyTorch by more than export.tolerance on random or real test-split inputs is not
written.

With quant.enabled (default) each model also gets `<trial_id>.int8.onnx`: post-training static quantization
(analysis/quantize.py) calibrated on `quant.calibration_clips` train clips; the fp32 and int8 models are both
scored on the test split with ONNX Runtime, and the share of clips where they predict the same class is printed.
With quant.qat_epochs > 0 the int8 model is made from a copy of the model fine-tuned that many epochs under
simulated int8 first (trainable/qat.py: quantization-aware training at quant.qat_lr), and its accuracy and agreement
are still measured against the unchanged fp32 model.
A model the quantizer cannot handle keeps its fp32 export and gets one line saying why. Then each model's ONNX
Runtime CPU latency is measured (analysis/latency.py: batch 1, 1 thread and all threads, `latency.warmup` +
`latency.runs`, median and p90, fp32 and int8, with the CPU model string). pareto.csv, pareto.png and report.html
are regenerated with these columns; `objectives.third_objective=latency` ranks on the measured latency.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from analysis.latency import measure_latency
from analysis.pareto import EXPORT_DIR, EXPORT_MANIFEST, analyse, chosen_by_sweep, summary
from analysis.quantize import calibration_indices, compare_models, ops_left_in_fp32, quantize_onnx
from analysis.results import NAME_KEYS, load_sweeps, sweep_data
from common.cli import entry_point, plain, string_overrides
from common.config import FeatureConfig
from common.io import atomic_write_text
from common.trial_table import TrialRecord, export_columns, format_table, param_kb
from data_prep.waveform_cache import WaveformData
from trainable.checkpoints import load_checkpoint, restore_model
from trainable.evaluation import make_pipeline
from trainable.qat import qat_finetune
from trainable.run_config import pick_device

log = logging.getLogger("analysis.export")

MANIFEST = EXPORT_MANIFEST
MIN_OPSET = 17
PARITY_BATCH = 8  # real test clips (and 3 random inputs) compared; both differ from the export batch of 2
FEATURE_BATCH = 64


def export_onnx(model: torch.nn.Module, input_shape: Sequence[int], path: Path, opset: int) -> None:
    """Trace the model to ONNX with a dynamic batch axis (input "features", output "logits")."""
    example = torch.randn(2, *input_shape[1:], generator=torch.Generator().manual_seed(0))
    # dynamo=False: the TorchScript exporter. The torch.export-based default needs onnxscript,
    # which is not a dependency of this project; its deprecation notice is expected, not news.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="You are using the legacy TorchScript-based ONNX export", category=DeprecationWarning
        )
        torch.onnx.export(
            model,
            (example,),
            str(path),
            opset_version=opset,
            dynamo=False,
            input_names=["features"],
            output_names=["logits"],
            dynamic_axes={"features": {0: "batch"}, "logits": {0: "batch"}},
        )


def max_abs_difference(session: Any, model: torch.nn.Module, inputs: torch.Tensor) -> float:
    """Largest |ONNX Runtime - PyTorch| over the logits of a batch."""
    with torch.no_grad():
        expected = model(inputs).numpy()
    (actual,) = session.run(["logits"], {"features": inputs.numpy()})
    return float(np.abs(actual - expected).max())


def split_features(
    data: WaveformData, split: str, feats: FeatureConfig, run_config: Mapping[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, 1, n_mels, frames) float32, labels (N,)) of a whole split, in clip order, no augmentation;
    its log-mel cache is the one of `run_config` (a trial's config: workdir, train.*)."""
    pipeline = make_pipeline(
        data, split, feats, torch.device("cpu"), run_config["workdir"], run_config["train"]["device_data_share"]
    )
    batches = list(pipeline.batches(FEATURE_BATCH, train=False))
    if not batches:
        raise ValueError(f"the {split} split has no clips")
    return (
        np.concatenate([b.features.numpy() for b in batches]).astype(np.float32),
        np.concatenate([b.labels.numpy() for b in batches]),
    )


def count_params(model: torch.nn.Module) -> int:
    """Parameters of the (possibly pruned) model, as the sweep counts them (buffers such as BN statistics not)."""
    return sum(p.numel() for p in model.parameters())


def one_line(err: BaseException, limit: int = 400) -> str:
    """`Type: message` on one line (ONNX Runtime's messages span several), cut at `limit` characters."""
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def export_trial(
    trial: TrialRecord,
    data: WaveformData,
    out_dir: Path,
    opset: int,
    tolerance: float,
    quant: dict[str, Any],
    latency: dict[str, Any] | None,
    seed: int,
    device: str,
) -> dict[str, Any]:
    """Export one trial's last checkpoint; the .onnx file only appears once parity holds. Then, when `quant`
    (the quant.* keys) enables it, its int8 version, fp32/int8 test accuracy under ONNX Runtime, and, when `latency`
    (latency.* keys) is given, CPU latency of both. An int8 or latency failure is recorded in the entry (error),
    never raised: the fp32 export stands. `device` (the run's device= key) is where a QAT fine-tune trains."""
    import onnx
    import onnxruntime

    if trial.checkpoint is None:
        raise FileNotFoundError(f"no checkpoint kept in {trial.trial_dir}")
    ckpt = load_checkpoint(trial.checkpoint)
    model = restore_model(ckpt, "cpu").eval()
    input_shape = tuple(ckpt["input_shape"])
    feats = FeatureConfig.from_mapping(ckpt["config"]["features"])
    test_x, test_y = split_features(data, "test", feats, trial.config)
    real = torch.from_numpy(test_x[:PARITY_BATCH])
    if tuple(real.shape[1:]) != input_shape[1:]:
        raise ValueError(
            f"test features have shape {tuple(real.shape[1:])} but the model was trained on "
            f"{input_shape[1:]}: the sweep's data (clip length) changed since training"
        )
    random_inputs = torch.randn(3, *input_shape[1:], generator=torch.Generator().manual_seed(1))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{trial.trial_id}.onnx"
    tmp = out_dir / f".{trial.trial_id}.{os.getpid()}.onnx"
    try:
        export_onnx(model, input_shape, tmp, opset)
        onnx.checker.check_model(str(tmp))
        session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        diffs = {
            "random": max_abs_difference(session, model, random_inputs),
            "real": max_abs_difference(session, model, real),
        }
        if max(diffs.values()) > tolerance:
            raise ValueError(
                f"ONNX Runtime differs from PyTorch by {max(diffs.values()):.2e} "
                f"(random {diffs['random']:.2e}, real {diffs['real']:.2e}) > export.tolerance={tolerance}"
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    params = count_params(model)
    entry: dict[str, Any] = {
        "onnx": str(path),
        "bytes": path.stat().st_size,
        "opset": opset,
        "input_shape": list(input_shape),
        "max_abs_diff_random": diffs["random"],
        "max_abs_diff_real": diffs["real"],
        "error": None,
        "params": params,
        "kb": {"fp32": param_kb(params, "fp32"), "int8": param_kb(params, "int8")},
        "test_n": int(len(test_y)),
        "int8": None,
        "latency": None,
    }
    int8_path = out_dir / f"{trial.trial_id}.int8.onnx"
    if quant["enabled"]:

        def calibration() -> np.ndarray:
            train_x, _ = split_features(data, "train", feats, trial.config)
            return train_x[calibration_indices(len(train_x), quant["calibration_clips"], seed)]

        def qat(tuned_path: Path) -> dict[str, Any]:
            """Fine-tune a copy of the model under simulated int8 and export it (fp32) to `tuned_path`."""
            where = pick_device(device)
            tuned = restore_model(ckpt, where)
            pipeline = make_pipeline(
                data, "train", feats, where, trial.config["workdir"], trial.config["train"]["device_data_share"]
            )
            history = qat_finetune(
                tuned, pipeline, quant["qat_epochs"], quant["qat_lr"], ckpt["config"]["train"]["batch_size"], seed
            )
            export_onnx(tuned.cpu(), input_shape, tuned_path, opset)
            return {"epochs": quant["qat_epochs"], "lr": quant["qat_lr"], "history": history}

        entry["int8"] = int8_entry(
            path, int8_path, calibration, test_x, test_y, qat if quant["qat_epochs"] > 0 else None
        )
    else:
        int8_path.unlink(missing_ok=True)  # an int8 model of an earlier export would not match this fp32 one
    entry["fp32_test_acc"] = (entry["int8"] or {}).get("fp32_test_acc") or compare_models(path, None, test_x, test_y)[
        "fp32_acc"
    ]
    if latency:
        entry["latency"] = latency_entry(
            path,
            int8_path if (entry["int8"] or {}).get("onnx") else None,
            input_shape,
            latency["warmup"],
            latency["runs"],
        )
    return entry


def int8_entry(
    fp32_path: Path,
    int8_path: Path,
    calibration: Callable[[], np.ndarray],
    test_x: np.ndarray,
    test_y: np.ndarray,
    qat: Callable[[Path], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Quantize (calibrated on `calibration()`: train-split features) and score the int8 model against the fp32 one
    on the test split; on any failure the int8 file is removed and the entry says why, in one line, with the
    operators the quantizer has no int8 form for. With `qat`, the model quantized is the one `qat(path)` fine-tunes
    and writes to path (fp32 ONNX), and its record goes into the entry as "qat"."""
    tuned_path = int8_path.with_name(f".{int8_path.stem}.{os.getpid()}.qat.onnx")
    try:
        try:
            qat_record = qat(tuned_path) if qat else None
        except Exception as err:  # not the quantizer's doing: say so, with no operator list
            int8_path.unlink(missing_ok=True)
            log.debug("QAT of %s failed", fp32_path, exc_info=True)
            return {"onnx": None, "ops_in_fp32": [], "error": f"quantization-aware fine-tune failed: {one_line(err)}"}
        done = quantize_onnx(tuned_path if qat else fp32_path, int8_path, calibration())
        scores = compare_models(fp32_path, int8_path, test_x, test_y)
        return done | {
            "test_acc": scores["int8_acc"],
            "fp32_test_acc": scores["fp32_acc"],
            "acc_drop": scores["acc_drop"],
            "agreement": scores["agreement"],
            "test_n": scores["n"],
            "qat": qat_record,
        }
    except Exception as err:  # an operator the quantizer or ONNX Runtime cannot handle: keep fp32, say why
        int8_path.unlink(missing_ok=True)
        log.debug("int8 export of %s failed", fp32_path, exc_info=True)
        try:
            unsupported = ops_left_in_fp32(fp32_path)
        except Exception:  # an fp32 model onnx cannot even read: the error above says enough
            unsupported = []
        return {"onnx": None, "ops_in_fp32": unsupported, "error": one_line(err)}
    finally:
        tuned_path.unlink(missing_ok=True)


def latency_entry(
    fp32_path: Path, int8_path: Path | None, input_shape: tuple[int, ...], warmup: int, runs: int
) -> dict[str, Any]:
    """{"fp32": record, "int8": record | None} (analysis/latency.py), or {"error": ...} when timing fails."""
    try:
        return {
            "fp32": measure_latency(fp32_path, input_shape, warmup, runs),
            "int8": measure_latency(int8_path, input_shape, warmup, runs) if int8_path else None,
        }
    except Exception as err:
        return {"error": one_line(err)}


def problem_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line per trial and problem: fp32 not exported, int8 not exported (fp32 kept), latency not measured."""
    lines = []
    for row in rows:
        if row.get("error"):
            lines.append(f"trial {row['trial_id']}: not exported: {row['error']}")
            continue
        int8 = row.get("int8") or {}
        if int8.get("error"):
            ops = ", ".join(int8.get("ops_in_fp32") or [])
            lines.append(
                f"trial {row['trial_id']}: int8 not exported, fp32 kept: {int8['error']}"
                + (f" (operators the quantizer has no int8 form for: {ops})" if ops else "")
            )
        if (row.get("latency") or {}).get("error"):
            lines.append(f"trial {row['trial_id']}: latency not measured: {row['latency']['error']}")
    return lines


def check_settings(config: dict[str, Any]) -> None:
    """Fail before any work on export/quant/latency settings that cannot run."""
    if config["export"]["opset"] < MIN_OPSET:
        raise ValueError(f"export.opset={config['export']['opset']} is too old; use {MIN_OPSET} or newer.")
    quant, latency = config["quant"], config["latency"]
    if quant["qat_epochs"] < 0:
        raise ValueError(f"quant.qat_epochs={quant['qat_epochs']} must be 0 (no QAT) or more.")
    if quant["qat_epochs"] > 0 and not quant["enabled"]:
        raise ValueError(
            f"quant.qat_epochs={quant['qat_epochs']} fine-tunes for the int8 model, but "
            "quant.enabled=false "
            "writes none; set quant.enabled=true or quant.qat_epochs=0."
        )
    if quant["qat_epochs"] > 0 and not quant["qat_lr"] > 0:
        raise ValueError(f"quant.qat_lr={quant['qat_lr']} must be positive.")
    if quant["enabled"] and quant["calibration_clips"] < 1:
        raise ValueError(f"quant.calibration_clips={quant['calibration_clips']} must be at least 1.")
    if latency["runs"] < 1 or latency["warmup"] < 0:
        raise ValueError(
            f"latency.runs={latency['runs']} must be at least 1 and latency.warmup={latency['warmup']} at least 0."
        )


def write_manifest(out_dir: Path, exports: dict[str, dict[str, Any]]) -> None:
    """Merge into export/export.json: trials exported earlier and not now keep their entries."""
    path = out_dir / MANIFEST
    merged = (json.loads(path.read_text()) if path.is_file() else {}) | exports
    atomic_write_text(path, json.dumps(merged, indent=2, sort_keys=True))


def export_models(config: dict[str, Any]) -> bool:
    """Export, quantize and time the models `trial=` names, print their table, then write the report with these
    columns; False when some model was not exported (the lines above say which; the others are written)."""
    check_settings(config)
    opset, tolerance = config["export"]["opset"], config["export"]["tolerance"]
    quant, latency = config["quant"], config["latency"]
    third = config["objectives"]["third_objective"]
    sweeps = load_sweeps(config)
    rows = []
    for sweep, trials in chosen_by_sweep(sweeps, config):
        data = sweep_data(sweep, trials)
        out_dir = sweep.path / EXPORT_DIR
        exports = {}
        for trial in trials:
            try:
                exports[trial.trial_id] = done = export_trial(
                    trial, data, out_dir, opset, tolerance, quant, latency, config["seed"], config["device"]
                )
                print(
                    f"exported {done['onnx']}: {done['bytes']} bytes; max |onnxruntime - torch| "
                    f"random {done['max_abs_diff_random']:.2e}, real {done['max_abs_diff_real']:.2e}"
                )
                int8 = done["int8"] or {}
                if int8.get("onnx"):
                    print(
                        f"  int8 {int8['onnx']}: {int8['bytes']} bytes; predicts the same class as fp32 on "
                        f"{int8['agreement']:.1%} of the {int8['test_n']} test clips; test accuracy fp32 "
                        f"{int8['fp32_test_acc']:.3f}, int8 {int8['test_acc']:.3f} (drop {int8['acc_drop']:+.3f})"
                        + (f" after {int8['qat']['epochs']} QAT epoch(s)" if int8.get("qat") else "")
                    )
            except Exception as err:  # one failing model must not stop the other exports
                log.error("trial %s not exported: %s", trial.trial_id, err)
                exports[trial.trial_id] = {"onnx": None, "error": one_line(err)}
            retrained_from = trial.config["origin"]["front_trial"]
            rows.append(
                {
                    "trial_id": trial.trial_id,
                    "sweep": sweep.name,
                    "val_acc": trial.metrics["val_acc"],
                    "macs": trial.metrics["macs"],
                    **exports[trial.trial_id],
                    **export_columns(exports[trial.trial_id]),
                    **(
                        {"front_trial": str(retrained_from), "seed": trial.config["train"]["seed"]}
                        if retrained_from
                        else {}
                    ),
                }
            )
        write_manifest(out_dir, exports)
    retrained_columns = [("front_trial", "retrains"), ("seed", "seed")] if any("seed" in r for r in rows) else []
    columns = [
        ("trial_id", "trial"),
        *retrained_columns,
        ("sweep", "sweep"),
        ("val_acc", "val acc"),
        ("macs", "measured MACs"),
        ("params", "params"),
        ("kb_fp32", "kB fp32"),
        ("kb_int8", "kB int8"),
        ("bytes", "ONNX bytes"),
        ("int8_onnx_bytes", "int8 bytes"),
        ("max_abs_diff_random", "diff random"),
        ("max_abs_diff_real", "diff real"),
        ("fp32_test_acc", "fp32 test acc"),
        ("int8_test_acc", "int8 test acc"),
        ("int8_acc_drop", "int8 drop"),
        ("int8_agreement", "agreement"),
        ("latency_ms_1thread", "fp32 ms 1T"),
        ("latency_p90_ms_1thread", "p90"),
        ("int8_latency_ms_1thread", "int8 ms 1T"),
        ("int8_latency_p90_ms_1thread", "p90"),
        ("latency_ms_allthreads", "fp32 ms allT"),
        ("int8_latency_ms_allthreads", "int8 ms allT"),
    ]
    int8_kind = (
        f"{quant['qat_epochs']} QAT epoch(s), then static quantization"
        if quant["qat_epochs"]
        else "post-training static quantization"
    )
    print(
        f"\nONNX export (opset {opset}, tolerance {tolerance:g}"
        + (f", int8: {int8_kind}" if quant["enabled"] else "")
        + f"), {len(rows)} model(s):"
    )
    print(format_table(rows, columns))
    measured = [r for r in rows if r.get("latency_cpu")]
    if measured:
        record = measured[0]["latency"]["fp32"]
        print(
            f"Latency: ONNX Runtime {record['onnxruntime']} CPU on {record['cpu']!r} ({record['cores']} cores), "
            f"batch 1, median (p90) ms of {record['runs']} runs after {record['warmup']} warm-up runs; "
            f"1T = 1 thread, allT = {record['all_threads']} threads. Comparable only on this machine."
        )
    for line in problem_lines(rows):
        print(line)
    if rows:
        tracking_uri = config["mlflow"]["tracking_uri"]
        print("\n" + summary(analyse(sweeps, third, tracking_uri), tracking_uri, sweeps[0].name), flush=True)
    return not any(r["error"] for r in rows)


@hydra.main(config_path="../conf", config_name="analysis", version_base="1.3")
@entry_point
def main(cfg: DictConfig) -> None:
    if not export_models(string_overrides(plain(cfg), NAME_KEYS)):
        sys.exit(1)


if __name__ == "__main__":
    main()
