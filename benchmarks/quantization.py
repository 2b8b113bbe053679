"""fp32 vs int8 of a sweep's front models: test accuracy, parameter kB, file size and ONNX Runtime CPU latency.

Reads a sweep the way the analysis scripts do (same keys: `name=`/`path=`, `trial=`, `quant.*`, `latency.*`,
`workdir=`). Models that analysis/export.py has not exported and quantized yet (no `export/<trial>.int8.onnx`
recorded in `export/export.json`) are exported and quantized first, exactly as export.py does, and recorded there;
accuracies come from that record (fp32 and int8 both scored with ONNX Runtime on the test split). Latency is
measured now, on this machine (batch 1, `latency.warmup` + `latency.runs`, 1 thread and all threads), so the
printed numbers and the ratio are this machine's.

    python benchmarks/quantization.py name=<sweep> [trial=front latency.runs=300 workdir=./runs]

The last line is `ratio=<fp32 latency / int8 latency>` (1 thread, medians) of the median front model by MACs
(`ratio=nan` when that model has no int8 version).
"""

from __future__ import annotations

import math
from typing import Any

import hydra
from omegaconf import DictConfig

from analysis.export import check_settings, export_trial, problem_lines, write_manifest
from analysis.latency import measure_latency
from analysis.pareto import EXPORT_DIR, chosen_by_sweep, read_exports
from analysis.results import NAME_KEYS, load_sweeps, sweep_data
from common.cli import entry_point, plain, string_overrides
from common.trial_table import format_table


def ensure_exported(config: dict[str, Any]) -> list[tuple[Any, dict[str, Any]]]:
    """(trial, its export.json entry) of the chosen trials, exporting and quantizing those not done yet."""
    pairs = []
    for sweep, trials in chosen_by_sweep(load_sweeps(config), config):
        done = read_exports(sweep.path)
        missing = [t for t in trials if not ((done.get(t.trial_id) or {}).get("int8") or {}).get("onnx")]
        if missing:
            data = sweep_data(sweep, missing)
            fresh = {}
            for trial in missing:
                print(f"exporting and quantizing trial {trial.trial_id} ...")
                try:
                    fresh[trial.trial_id] = export_trial(
                        trial,
                        data,
                        sweep.path / EXPORT_DIR,
                        config["export"]["opset"],
                        config["export"]["tolerance"],
                        config["quant"] | {"enabled": True},
                        None,
                        config["seed"],
                        config["device"],
                    )
                except Exception as err:  # reported below; the other models go on
                    fresh[trial.trial_id] = {"onnx": None, "error": f"{type(err).__name__}: {err}"}
            write_manifest(sweep.path / EXPORT_DIR, fresh)
            done |= fresh
        pairs += [(t, done[t.trial_id]) for t in trials]
    return pairs


@hydra.main(config_path="../conf", config_name="analysis", version_base="1.3")
@entry_point
def main(cfg: DictConfig) -> None:
    config = string_overrides(plain(cfg), NAME_KEYS)
    check_settings(config)
    warmup, runs = config["latency"]["warmup"], config["latency"]["runs"]
    rows, cpu = [], None
    for trial, entry in ensure_exported(config):
        row = {
            "trial_id": trial.trial_id,
            "macs": trial.metrics["macs"],
            "params": entry.get("params"),
            "error": entry.get("error"),
            "int8": entry.get("int8"),
            "latency": None,
        }
        if entry.get("onnx"):
            int8 = entry.get("int8") or {}
            row |= {
                "kb_fp32": entry["kb"]["fp32"],
                "kb_int8": entry["kb"]["int8"],
                "fp32_bytes": entry["bytes"],
                "fp32_test_acc": entry["fp32_test_acc"],
            }
            shape = tuple(entry["input_shape"])
            fp32 = measure_latency(entry["onnx"], shape, warmup, runs)
            cpu, all_threads = fp32["cpu"], fp32["all_threads"]
            row |= {
                "fp32_ms_1": fp32["threads"]["1"]["median_ms"],
                "fp32_p90_ms_1": fp32["threads"]["1"]["p90_ms"],
                "fp32_ms_all": fp32["threads"][str(all_threads)]["median_ms"],
            }
            if int8.get("onnx"):
                q = measure_latency(int8["onnx"], shape, warmup, runs)
                row |= {
                    "int8_bytes": int8["bytes"],
                    "int8_test_acc": int8["test_acc"],
                    "int8_agreement": int8["agreement"],
                    "int8_ms_1": q["threads"]["1"]["median_ms"],
                    "int8_p90_ms_1": q["threads"]["1"]["p90_ms"],
                    "int8_ms_all": q["threads"][str(all_threads)]["median_ms"],
                }
                row["speedup_1"] = row["fp32_ms_1"] / row["int8_ms_1"]
        rows.append(row)
    columns = [
        ("trial_id", "trial"),
        ("macs", "MACs"),
        ("params", "params"),
        ("kb_fp32", "kB fp32"),
        ("kb_int8", "kB int8"),
        ("fp32_bytes", "fp32 bytes"),
        ("int8_bytes", "int8 bytes"),
        ("fp32_test_acc", "fp32 test acc"),
        ("int8_test_acc", "int8 test acc"),
        ("int8_agreement", "agreement"),
        ("fp32_ms_1", "fp32 ms 1T"),
        ("fp32_p90_ms_1", "p90"),
        ("int8_ms_1", "int8 ms 1T"),
        ("int8_p90_ms_1", "p90"),
        ("fp32_ms_all", "fp32 ms allT"),
        ("int8_ms_all", "int8 ms allT"),
        ("speedup_1", "fp32/int8 1T"),
    ]
    print(
        f"\nfp32 vs int8, {len(rows)} model(s); latency: ONNX Runtime CPU on {cpu!r}, batch 1, median (and p90) ms "
        f"of {runs} runs after {warmup} warm-up runs, 1T = 1 thread, allT = all threads"
    )
    print(format_table(rows, columns))
    for line in problem_lines(rows):
        print(line)
    timed = sorted((r for r in rows if r.get("fp32_ms_1")), key=lambda r: r["macs"])
    median = timed[(len(timed) - 1) // 2] if timed else {}
    ratio = median.get("speedup_1", math.nan)
    if median:
        print(f"median model by MACs: {median['trial_id']} ({median['macs'] / 1e6:.2f}M MACs)")
    print(f"ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
