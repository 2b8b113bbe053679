"""int8 export, parameter kB, CPU latency records and the deployment hooks, on small models built here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

INPUT_SHAPE = (1, 1, 32, 26)  # (batch, channel, n_mels, frames) of a 0.4 s clip at hop 256


@pytest.fixture(scope="module")
def fp32_model(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """A MobileNetV3-small student exported to ONNX, with calibration and 'test' features and labels."""
    from analysis.export import export_onnx
    from tests.test_models import student_model

    torch.manual_seed(0)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    features = rng.standard_normal((40, *INPUT_SHAPE[1:])).astype(np.float32)
    features[:, :, :16] += 1.5 * rng.standard_normal((40, 1, 1, 1)).astype(np.float32)  # some spread between clips
    labels = rng.integers(0, 3, 40)
    model = student_model(width_mult=0.5, num_classes=3)
    for module in model.modules():  # BatchNorm statistics of these inputs, as training would leave them
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    with torch.no_grad():
        model.train()(torch.from_numpy(features))
    path = tmp_path_factory.mktemp("quant") / "model.onnx"
    export_onnx(model.eval(), INPUT_SHAPE, path, 17)
    return path, features, labels


def test_int8_export_is_smaller_runs_and_reports_agreement(fp32_model):
    import onnx

    from analysis.export import int8_entry
    from analysis.quantize import op_types

    fp32_path, features, labels = fp32_model
    int8_path = fp32_path.with_name("model.int8.onnx")
    entry = int8_entry(fp32_path, int8_path, lambda: features[:24], features[24:], labels[24:])
    assert entry["error"] is None, entry["error"]
    assert entry["onnx"] == str(int8_path) and entry["bytes"] == int8_path.stat().st_size
    assert entry["bytes"] < 0.5 * fp32_path.stat().st_size  # int8 weights: about a quarter, plus scales
    assert entry["calibration_clips"] == 24 and entry["format"] == "QDQ" and entry["per_channel"]
    assert entry["calibrate_method"] == "Percentile" and "calibration_fallback" not in entry
    assert entry["method"].endswith("(Percentile 99.999 calibration on 24 train clips)")
    assert entry["test_n"] == 16 and 0.0 <= entry["agreement"] <= 1.0
    assert entry["acc_drop"] == pytest.approx(entry["fp32_test_acc"] - entry["test_acc"])
    assert entry["agreement"] * 16 == pytest.approx(round(entry["agreement"] * 16))  # a share of the 16 clips
    ops = op_types(int8_path)
    assert ops["QuantizeLinear"] and ops["DequantizeLinear"]
    weights = {i.name: i.data_type for i in onnx.load(str(int8_path)).graph.initializer}
    assert onnx.TensorProto.INT8 in weights.values()  # int8 weights stored as int8
    assert "HardSigmoid" in entry["ops_in_fp32"]  # MobileNetV3's hard-sigmoid has no int8 form: stays fp32
    assert not list(fp32_path.parent.glob(".*"))  # no temporary files left behind


def test_percentile_calibration_that_fails_falls_back_to_minmax(fp32_model, monkeypatch):
    import analysis.quantize
    from analysis.quantize import quantize_onnx

    real = analysis.quantize._quantize
    methods = []

    def fussy(prepared, out, calibration, settings, chatter):
        methods.append(settings["calibrate_method"])
        if settings["calibrate_method"] == "Percentile":
            raise ValueError("Too many bins for data range. Cannot create 2048 finite-sized bins.")
        real(prepared, out, calibration, settings, chatter)

    monkeypatch.setattr(analysis.quantize, "_quantize", fussy)
    fp32_path, features, _ = fp32_model
    done = quantize_onnx(fp32_path, fp32_path.with_name("fallback.int8.onnx"), features[:8])
    assert methods == ["Percentile", "MinMax"] and done["calibrate_method"] == "MinMax"
    assert (
        done["calibration_fallback"] == "Percentile failed: Too many bins for data range. Cannot create 2048 "
        "finite-sized bins."
    )
    assert "MinMax calibration on 8 train clips; Percentile failed: Too many bins" in done["method"]
    assert Path(done["onnx"]).is_file()


def test_quantizer_failure_keeps_fp32_and_reports_one_line(fp32_model, monkeypatch):
    import onnxruntime.quantization

    from analysis.export import int8_entry, problem_lines
    from common.trial_table import export_columns

    def refuse(*args, **kwargs):
        raise RuntimeError(
            "[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED :\n Could not find an implementation for "
            "HardSigmoid(6) node with name ''"
        )

    monkeypatch.setattr(onnxruntime.quantization, "quantize_static", refuse)
    fp32_path, features, labels = fp32_model
    int8_path = fp32_path.with_name("refused.int8.onnx")
    int8_path.write_bytes(b"stale int8 model of an earlier run")
    entry = int8_entry(fp32_path, int8_path, lambda: features[:8], features[8:], labels[8:])
    assert entry["onnx"] is None and entry["error"].startswith("RuntimeError: [ONNXRuntimeError]")
    assert "\n" not in entry["error"] and "HardSigmoid" in entry["ops_in_fp32"]
    assert not int8_path.exists() and fp32_path.is_file()  # the fp32 model is untouched
    manifest = {
        "trial_id": "t1",
        "onnx": str(fp32_path),
        "bytes": fp32_path.stat().st_size,
        "error": None,
        "kb": {"fp32": 4.0, "int8": 1.0},
        "int8": entry,
        "latency": None,
    }
    lines = problem_lines([manifest])
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith("trial t1: int8 not exported, fp32 kept: RuntimeError:")
    assert "no int8 form for: HardSigmoid" in lines[0]
    columns = export_columns(manifest)
    assert columns["precision"] == "fp32" and columns["int8_error"] == entry["error"]
    assert columns["int8_test_acc"] is None and columns["kb_fp32"] == 4.0


def test_parameter_kb_counted_by_hand():
    from analysis.export import count_params
    from common.trial_table import param_kb

    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(16, 3)
    )
    # conv 4*1*3*3 + 4 bias = 40; BN weight + bias 8 (running stats are buffers, not parameters); linear 16*3 + 3 = 51
    assert count_params(model) == 40 + 8 + 51 == 99
    assert param_kb(99, "fp32") == pytest.approx(0.396)
    assert param_kb(99, "fp16") == pytest.approx(0.198)
    assert param_kb(99, "int8") == pytest.approx(0.099)
    assert param_kb(128_000, "int8") == 128.0  # DCASE task 1: 128 kB = 128,000 int8 parameters
    with pytest.raises(ValueError, match="precision='int4'"):
        param_kb(99, "int4")


def test_latency_record_fields(fp32_model):
    from analysis.latency import available_cores, cpu_model, measure_latency, session, time_session

    fp32_path, _, _ = fp32_model
    record = measure_latency(fp32_path, INPUT_SHAPE, warmup=2, runs=15)
    cores = available_cores()
    assert record["cpu"] == cpu_model() and record["cpu"].strip()
    assert record["all_threads"] == cores and record["batch"] == 1
    assert (record["warmup"], record["runs"]) == (2, 15)
    assert set(record["threads"]) == {"1", str(cores)}
    for timing in record["threads"].values():
        assert 0 < timing["min_ms"] <= timing["median_ms"] <= timing["p90_ms"] <= timing["max_ms"]
    assert session(fp32_path, 1).get_session_options().intra_op_num_threads == 1
    with pytest.raises(ValueError, match="latency.runs=0"):
        time_session(session(fp32_path, 1), np.zeros(INPUT_SHAPE, np.float32), 0, 0)


def test_export_settings_fail_before_any_work():
    from analysis.export import check_settings

    good = {
        "export": {"opset": 17},
        "latency": {"warmup": 10, "runs": 100},
        "quant": {"enabled": True, "calibration_clips": 256, "qat_epochs": 0, "qat_lr": 1e-4},
    }
    check_settings(good)
    check_settings(good | {"quant": good["quant"] | {"qat_epochs": 2}})
    with pytest.raises(ValueError, match=r"^quant.qat_epochs=-1 must be 0"):
        check_settings(good | {"quant": good["quant"] | {"qat_epochs": -1}})
    with pytest.raises(ValueError, match=r"^quant.qat_lr=0.0 must be positive"):
        check_settings(good | {"quant": good["quant"] | {"qat_epochs": 1, "qat_lr": 0.0}})
    with pytest.raises(ValueError, match="calibration_clips=0"):
        check_settings(good | {"quant": good["quant"] | {"calibration_clips": 0}})
    with pytest.raises(ValueError, match="latency.runs=0"):
        check_settings(good | {"latency": {"warmup": 1, "runs": 0}})


def test_calibration_clips_are_a_seeded_subset():
    from analysis.quantize import calibration_indices

    picked = calibration_indices(100, 10, seed=3)
    assert len(set(picked)) == 10 and list(picked) == sorted(picked)
    assert list(picked) == list(calibration_indices(100, 10, seed=3))
    assert list(calibration_indices(5, 10, seed=3)) == [0, 1, 2, 3, 4]  # fewer train clips than asked: all


def test_activation_type_follows_the_architecture():
    from analysis.quantize import recipe

    assert recipe("x86_64")["activation_type"] == "QUInt8" and recipe("AMD64")["activation_type"] == "QUInt8"
    assert recipe("aarch64")["activation_type"] == "QInt8"


def budget_rows() -> list[dict]:
    rows = [
        {"trial_id": "big", "val_acc": 0.9, "target_macs": 8e6, "params": 200_000},
        {"trial_id": "mid", "val_acc": 0.8, "target_macs": 4e6, "params": 100_000},
        {"trial_id": "mid2", "val_acc": 0.8, "target_macs": 3e6, "params": 120_000},
        {"trial_id": "small", "val_acc": 0.6, "target_macs": 1e6, "params": 20_000},
        {"trial_id": "broken", "val_acc": 0.95, "target_macs": 1e6, "params": 40_000, "int8_error": "x"},
    ]
    return [row | {"macs": row["target_macs"]} for row in rows]  # finished models: measured MACs = their target


@pytest.mark.parametrize(
    "budget, best",
    [
        ({}, "broken"),  # no limit, fp32 would not need int8
        ({"precision": "int8"}, "big"),  # its int8 export failed: not deployable at int8
        ({"max_macs": 5e6, "precision": "int8"}, "mid2"),  # equal accuracy: fewer MACs wins
        ({"max_macs": 5e6, "max_params": 110_000, "precision": "int8"}, "mid"),
        ({"max_kb": 100.0, "precision": "int8"}, "mid"),  # 100,000 B = 100 kB fits; 120,000 B = 120 kB not
        ({"max_kb": 100.0, "precision": "fp32"}, "small"),  # 4 x 20,000 B = 80 kB; broken's 160,000 B do not fit
        ({"max_kb": 200.0, "max_macs": 1e6, "precision": "fp32"}, "broken"),
        ({"max_kb": 10.0, "precision": "int8"}, None),  # nothing fits
    ],
)
def test_best_under_budget(budget, best):
    from analysis.pareto import best_under_budget
    from sweeps.budget import BUDGETS, Budget

    no_limits = dict.fromkeys(BUDGETS) | {"precision": "fp32"}  # a Budget with none set, which from_config never gives
    found = best_under_budget(budget_rows(), Budget(**no_limits | budget))
    assert (found or {}).get("trial_id") == best


def test_best_under_budget_judges_measured_macs_and_the_sweeps_verdict():
    """The one fit check (sweeps.budget.Budget.fits): a finished model's measured MACs, not its target, and a trial
    the sweep marked over the budget never fits."""
    from analysis.pareto import best_under_budget
    from tests.test_budget import budget_of

    rows = budget_rows()
    rows[2]["macs"] = 5.2e6  # mid2's pruner landed above its 3e6 target, and above the budget
    assert best_under_budget(rows, budget_of(max_macs=5e6))["trial_id"] == "mid"
    rows[1]["feasible"] = 0  # the sweep judged mid over the budget (e.g. before its last pruning step)
    assert best_under_budget(rows, budget_of(max_macs=5e6))["trial_id"] == "small"


def latency_record(ms: float) -> dict:
    timing = {"median_ms": ms, "p90_ms": ms * 1.2, "mean_ms": ms, "min_ms": ms, "max_ms": ms * 2}
    return {
        "cpu": "Test CPU",
        "machine": "x86_64",
        "onnxruntime": "1",
        "cores": 2,
        "all_threads": 2,
        "batch": 1,
        "warmup": 1,
        "runs": 5,
        "threads": {"1": timing, "2": timing},
    }


def test_third_objective_latency_needs_measurements_then_ranks_on_them(tmp_path):
    from analysis.pareto import build_rows, select_trials
    from analysis.results import Sweep
    from common.objectives import front_objectives
    from tests.test_analysis import synthetic_trial

    assert list(front_objectives("latency")) == ["val_acc", "target_macs", "latency_ms_1thread"]
    # a dominates b on (accuracy, MACs); b is faster, so on (accuracy, MACs, latency) both are on the front
    trials = [
        synthetic_trial("a", 0.8, 1e6, 1e6),
        synthetic_trial("b", 0.7, 2e6, 2e6),
        synthetic_trial("c", 0.9, 3e6, 3e6),
    ]
    sweep = Sweep(name="s", path=tmp_path, base_config={}, settings={}, trials=trials)
    for call in (lambda: build_rows([sweep], "latency"), lambda: select_trials([sweep], "front", "latency")):
        with pytest.raises(ValueError, match=r"no latency has been measured yet .* run analysis/export\.py first"):
            call()
    (tmp_path / "export").mkdir()
    exports = {
        tid: {
            "onnx": f"{tid}.onnx",
            "bytes": 10,
            "error": None,
            "kb": {"fp32": 1.0, "int8": 0.25},
            "int8": None,
            "latency": {"fp32": latency_record(ms), "int8": None},
        }
        for tid, ms in (("a", 2.0), ("b", 1.0))
    }  # c not measured
    (tmp_path / "export" / "export.json").write_text(json.dumps(exports))
    rows = build_rows([sweep], "latency")
    assert {r["trial_id"] for r in rows if r["on_front"]} == {"a", "b"}  # c has no latency: never on this front
    assert [t.trial_id for t in select_trials([sweep], "front", "latency")] == ["a", "b"]
    assert {r["trial_id"] for r in build_rows([sweep], None) if r["on_front"]} == {"a", "c"}
    by_id = {r["trial_id"]: r for r in rows}
    assert by_id["b"]["latency_ms_1thread"] == 1.0 and by_id["b"]["latency_p90_ms_1thread"] == pytest.approx(1.2)
    assert by_id["b"]["latency_cpu"] == "Test CPU" and by_id["b"]["precision"] == "fp32"
    assert "latency_ms_1thread" not in by_id["c"]


def test_qat_simulates_ort_int8_grids_then_leaves_a_plain_fp32_model():
    import onnx
    from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType
    from torch.nn.utils import parametrize

    from tests.test_models import student_model
    from trainable.qat import quantized_layers, simulated_int8

    torch.manual_seed(0)
    model = student_model(width_mult=0.5, num_classes=3).eval()
    keys = set(model.state_dict())
    x = torch.randn(2, *INPUT_SHAPE[1:])
    with torch.no_grad():
        plain = model(x)
        with simulated_int8(model):
            for layer in quantized_layers(model):
                latent = layer.parametrizations.weight.original.detach().numpy()
                # what ONNX Runtime's quantizer makes of it: symmetric QInt8 per output channel, its own functions
                qmin, qmax = get_qmin_qmax_for_qType(onnx.TensorProto.INT8, symmetric=True)
                expected = np.empty_like(latent)
                for c, channel in enumerate(latent):
                    absmax = np.abs(channel).max()
                    _, scale = compute_scale_zp(-absmax, absmax, qmin, qmax, symmetric=True)
                    expected[c] = np.clip(np.round(channel / scale), qmin, qmax) * scale
                np.testing.assert_allclose(layer.weight.detach().numpy(), expected, rtol=1e-5, atol=1e-7)
            simulated = model(x)
        assert not torch.allclose(simulated, plain, rtol=1e-2, atol=0)  # the rounding is really applied
        assert torch.equal(model(x), plain)  # and gone afterwards, latent weights untouched
    assert set(model.state_dict()) == keys
    assert not any(parametrize.is_parametrized(layer) for layer in quantized_layers(model))
    assert not any("fake_quant" in name for name, _ in model.named_modules())


def test_qat_finetune_changes_weights_and_records_epochs():
    from trainable.qat import qat_finetune

    class Batch:
        def __init__(self, features, labels):
            self.features, self.labels = features, labels

    class Pipeline:  # FeaturePipeline's interface over fixed tensors
        def __init__(self, n):
            gen = torch.Generator().manual_seed(0)
            self.features, self.labels = torch.randn(n, *INPUT_SHAPE[1:], generator=gen), torch.arange(n) % 3

        def __len__(self):
            return len(self.labels)

        def num_batches(self, batch_size, drop_last=False):
            return len(self) // batch_size

        def batches(self, batch_size, train, generator=None, drop_last=False):
            for i in range(0, len(self) - batch_size + 1, batch_size):
                yield Batch(self.features[i : i + batch_size], self.labels[i : i + batch_size])

    from common.config import run_defaults
    from tests.test_models import student_model

    seed = run_defaults()["seed"]
    torch.manual_seed(0)
    model = student_model(width_mult=0.5, num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = qat_finetune(model, Pipeline(16), epochs=2, lr=1e-3, batch_size=8, seed=seed)
    assert [h["epoch"] for h in history] == [1, 2] and all(np.isfinite(h["train_loss"]) for h in history)
    after = model.state_dict()
    assert set(after) == set(before) and not model.training
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))
    with pytest.raises(ValueError, match="quant.qat_epochs=0"):
        qat_finetune(model, Pipeline(16), epochs=0, lr=1e-3, batch_size=8, seed=seed)
    with torch.no_grad():  # unstructured pruning's zeros stay zero through QAT
        model.classifier[-1].weight[:, ::2] = 0.0
    qat_finetune(model, Pipeline(16), epochs=1, lr=1e-2, batch_size=8, seed=seed)
    assert (model.classifier[-1].weight[:, ::2] == 0).all() and (model.classifier[-1].weight[:, 1::2] != 0).any()


def test_with_qat_the_int8_model_is_quantized_from_the_fine_tuned_model(fp32_model):
    import onnx
    from onnx import numpy_helper

    from analysis.export import int8_entry

    fp32_path, features, labels = fp32_model
    stem = next(n for n in onnx.load(str(fp32_path)).graph.node if n.op_type == "Conv").input[1]

    def negated_stem(tuned_path):  # stands in for a fine-tune: a recognisably different fp32 model
        model = onnx.load(str(fp32_path))
        weight = next(i for i in model.graph.initializer if i.name == stem)
        weight.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(weight), stem))
        onnx.save(model, str(tuned_path))
        return {"epochs": 1}

    def stem_int8(path):
        return next(
            numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer if i.name == f"{stem}_quantized"
        )

    plain = int8_entry(fp32_path, fp32_path.with_name("ptq.int8.onnx"), lambda: features[:8], features[8:], labels[8:])
    tuned = int8_entry(
        fp32_path, fp32_path.with_name("qat.int8.onnx"), lambda: features[:8], features[8:], labels[8:], negated_stem
    )
    assert plain["error"] is None and tuned["error"] is None and tuned["qat"] == {"epochs": 1}
    np.testing.assert_array_equal(stem_int8(tuned["onnx"]), -stem_int8(plain["onnx"]))
    assert not list(fp32_path.parent.glob(".*"))  # the fine-tuned intermediate model is removed

    def failing(tuned_path):
        raise RuntimeError("CUDA error: no kernel image is available")

    failed = int8_entry(
        fp32_path, fp32_path.with_name("fail.int8.onnx"), lambda: features[:8], features[8:], labels[8:], failing
    )
    assert failed == {
        "onnx": None,
        "ops_in_fp32": [],
        "error": "quantization-aware fine-tune failed: RuntimeError: CUDA error: no kernel image is available",
    }
