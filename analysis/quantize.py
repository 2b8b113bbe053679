"""Post-training static int8 quantization of an exported ONNX model with ONNX Runtime's quantizer.

Why ONNX Runtime's quantizer (and not PyTorch's PT2E flow): the int8 model it writes is the very ONNX file whose
accuracy and latency are then measured with ONNX Runtime, next to the fp32 one, with no second exporter in between.
PT2E is no longer part of torch (2.11 here: `torch.ao.quantization.quantize_pt2e` is gone; it lives in `torchao`),
and exporting a PT2E model to ONNX needs the dynamo exporter, i.e. `onnxscript`; neither is a dependency.

The recipe (onnxruntime.quantization, see its docs):

1. `quant_pre_process`: symbolic shape inference, graph optimisation (BatchNorm folded into Conv) and ONNX shape
   inference, as the quantizer asks for;
2. `quantize_static` in QDQ format (QuantizeLinear/DequantizeLinear pairs around every quantized operator, which
   ONNX Runtime's CPU provider fuses into integer kernels), int8 weights per output channel (symmetric), 8-bit
   activations whose ranges are calibrated on log-mel features of `quant.calibration_clips` train-split clips
   computed with the model's own feature config, one clip per calibration batch.

Choices, measured on MobileNetV3 students (README, "Deployment"): activations are uint8 on x86 (U8S8: ONNX Runtime's
x86 integer convolutions are built for it; S8S8 ran 1.5-4x slower than fp32 there, U8S8 as fast or up to 3x faster,
with the same predictions) and int8 elsewhere (S8S8, the quantizer's default and what ARM kernels prefer).
Calibration is Percentile (99.999th percentile of each activation's histogram) rather than MinMax: MinMax ranges
widen with every outlier clip, and with 128-256 clips the int8 model agreed with fp32 on 73 % of the test clips against
92-93 % with Percentile (logit RMSE 2.2 vs 0.8). The histogram calibrators need calibration batches of one shape, hence
batches of one clip.

Operators the quantizer has no int8 form for (e.g. HardSwish, HardSigmoid of MobileNetV3) stay in fp32 between a
DequantizeLinear and a QuantizeLinear; they are listed per model (`ops_in_fp32`). A model the quantizer or ONNX
Runtime cannot handle at all raises; analysis/export.py then keeps the fp32 model and reports the error in one line.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import platform
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("analysis.quantize")

X86_MACHINES = frozenset({"x86_64", "amd64", "i386", "i686", "x86"})
CALIBRATION_BATCH = 1  # the histogram (Percentile) calibrator stacks per-batch outputs: every batch must have one shape
PREDICT_BATCH = 64  # clips per ONNX Runtime call when scoring a model: memory, not results (no batch statistics)
# Graph plumbing that carries no arithmetic worth quantizing: never reported as "left in fp32".
PLUMBING_OPS = frozenset(
    {
        "Constant",
        "ConstantOfShape",
        "Shape",
        "Identity",
        "Cast",
        "Dropout",
        "Flatten",
        "Reshape",
        "Squeeze",
        "Unsqueeze",
        "Concat",
        "Gather",
        "Slice",
        "Transpose",
        "QuantizeLinear",
        "DequantizeLinear",
    }
)


def recipe(machine: str | None = None) -> dict[str, Any]:
    """How the int8 models are made on this machine's architecture; recorded with every int8 model."""
    x86 = (machine or platform.machine()).lower() in X86_MACHINES
    return {
        "quantizer": "onnxruntime.quantize_static",
        "format": "QDQ",
        "weight_type": "QInt8",
        "activation_type": "QUInt8" if x86 else "QInt8",
        "per_channel": True,
        "calibrate_method": "Percentile",
        "calibrate_percentile": 99.999,
    }


def describe(settings: dict[str, Any], clips: int) -> str:
    """One line saying how an int8 model was made."""
    activations = "uint8" if settings["activation_type"] == "QUInt8" else "int8"
    channels = "per channel" if settings["per_channel"] else "per tensor"
    calibration = settings["calibrate_method"] + (
        f" {settings['calibrate_percentile']:g}" if settings.get("calibrate_percentile") else ""
    )
    fallback = f"; {settings['calibration_fallback']}" if settings.get("calibration_fallback") else ""
    return (
        f"onnxruntime static {settings['format']}: int8 weights {channels}, {activations} activations "
        f"({calibration} calibration on {clips} train clips{fallback})"
    )


def quantizable_op_types() -> set[str]:
    """The operator types quantize_static quantizes when not told otherwise (its QDQ and QLinear registries)."""
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    return set(QDQRegistry) | set(QLinearOpsRegistry)


def op_types(model_path: str | Path) -> Counter:
    """Operator type -> node count of an ONNX model's main graph."""
    import onnx

    return Counter(node.op_type for node in onnx.load(str(model_path), load_external_data=False).graph.node)


def ops_left_in_fp32(model_path: str | Path) -> list[str]:
    """Operator types of a (pre-processed fp32) model that the quantizer has no int8 form for."""
    return sorted(set(op_types(model_path)) - quantizable_op_types() - PLUMBING_OPS)


def calibration_indices(n_available: int, n_wanted: int, seed: int) -> np.ndarray:
    """A seeded subset of clip indices (all clips when fewer are available), in clip order."""
    if n_wanted <= 0:
        raise ValueError(f"quant.calibration_clips={n_wanted} must be positive")
    if n_wanted >= n_available:
        return np.arange(n_available)
    return np.sort(np.random.default_rng(seed).choice(n_available, n_wanted, replace=False))


def make_reader(features: np.ndarray, input_name: str = "features", batch_size: int = CALIBRATION_BATCH) -> Any:
    """A CalibrationDataReader over a (N, 1, n_mels, frames) float32 array, in batches."""
    from onnxruntime.quantization import CalibrationDataReader

    class FeatureReader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches: Iterator[np.ndarray] = iter(())
            self.rewind()

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {input_name: batch}

        def rewind(self) -> None:
            self._batches = (
                np.ascontiguousarray(features[i : i + batch_size], dtype=np.float32)
                for i in range(0, len(features), batch_size)
            )

    return FeatureReader()


def quantize_onnx(fp32_path: str | Path, int8_path: str | Path, calibration: np.ndarray) -> dict[str, Any]:
    """Write the int8 (QDQ) version of an fp32 ONNX model, calibrated on `calibration` inputs.

    The file appears only when the quantizer succeeded and ONNX Runtime can load the result; otherwise this
    raises and nothing is left behind. Returns the recipe, file size and the operator types left in fp32.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from analysis.latency import session

    settings = recipe()
    if len(calibration) == 0:
        raise ValueError("no calibration clips: the train split is empty")
    int8_path = Path(int8_path)
    stem = f".{int8_path.stem}.{os.getpid()}"
    prepared = int8_path.with_name(f"{stem}.prep.onnx")
    tmp = int8_path.with_name(f"{stem}.onnx")
    chatter = io.StringIO()  # the pre-processor and the histogram calibrator print progress to stdout
    try:
        # its progress line ("Performing symbolic shape inference...") is news to no one
        logging.getLogger("onnxruntime.quantization.shape_inference").setLevel(logging.WARNING)
        with contextlib.redirect_stdout(chatter):
            quant_pre_process(str(fp32_path), str(prepared))
        in_fp32 = ops_left_in_fp32(prepared)
        try:
            _quantize(prepared, tmp, calibration, settings, chatter)
        except ValueError as err:  # e.g. numpy cannot bin an activation whose range is ~0: MinMax can
            if settings["calibrate_method"] == "MinMax":
                raise
            log.warning(
                "%s: %s calibration failed (%s); calibrating with MinMax instead",
                fp32_path,
                settings["calibrate_method"],
                err,
            )
            settings |= {
                "calibrate_method": "MinMax",
                "calibrate_percentile": None,
                "calibration_fallback": f"{settings['calibrate_method']} failed: {err}",
            }
            _quantize(prepared, tmp, calibration, settings, chatter)
        session(tmp, 1)  # ONNX Runtime must be able to run it (a missing int8 kernel fails here)
        os.replace(tmp, int8_path)
    finally:
        for path in (prepared, tmp, prepared.with_suffix(".onnx.data")):
            path.unlink(missing_ok=True)
    return {
        **settings,
        "method": describe(settings, len(calibration)),
        "onnx": str(int8_path),
        "bytes": int8_path.stat().st_size,
        "calibration_clips": int(len(calibration)),
        "ops_in_fp32": in_fp32,
        "error": None,
    }


def _quantize(
    prepared: Path, out: Path, calibration: np.ndarray, settings: dict[str, Any], chatter: io.StringIO
) -> None:
    """One quantize_static run with `settings` (see recipe()); its progress prints go to `chatter`."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    extra = {"CalibPercentile": settings["calibrate_percentile"]} if settings["calibrate_percentile"] else {}
    with contextlib.redirect_stdout(chatter):
        quantize_static(
            str(prepared),
            str(out),
            make_reader(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=settings["per_channel"],
            activation_type=QuantType[settings["activation_type"]],
            weight_type=QuantType[settings["weight_type"]],
            calibrate_method=CalibrationMethod[settings["calibrate_method"]],
            extra_options=extra,
        )


def predict(sess: Any, features: np.ndarray) -> np.ndarray:
    """Predicted class per input row under an InferenceSession."""
    name = sess.get_inputs()[0].name
    preds = [
        sess.run(None, {name: np.ascontiguousarray(features[i : i + PREDICT_BATCH], dtype=np.float32)})[0].argmax(1)
        for i in range(0, len(features), PREDICT_BATCH)
    ]
    return np.concatenate(preds) if preds else np.empty(0, dtype=np.int64)


def compare_models(
    fp32_path: str | Path, int8_path: str | Path | None, features: np.ndarray, labels: np.ndarray
) -> dict[str, Any]:
    """Test accuracy of the fp32 model and, when given, of the int8 one, both under ONNX Runtime (so they
    compare), with the int8 accuracy drop (fp32 minus int8) and the share of clips where both predict the same."""
    from analysis.latency import session

    fp32 = predict(session(fp32_path, 0), features)
    out: dict[str, Any] = {"n": int(len(labels)), "fp32_acc": float((fp32 == labels).mean())}
    if int8_path is not None:
        int8 = predict(session(int8_path, 0), features)
        out |= {"int8_acc": float((int8 == labels).mean()), "agreement": float((int8 == fp32).mean())}
        out["acc_drop"] = out["fp32_acc"] - out["int8_acc"]
    return out
