#!/usr/bin/env bash
# The GPU checks in one command, for a bare GPU machine: Python 3.12 with torch (CUDA), torchaudio, torchvision, timm,
# transformers and onnxruntime; no Ray, Optuna, MLflow or Hydra, no network (docs/clusters.md, "Checking a GPU").
#
#   bash benchmarks/gpu_check.sh --download  # here, with PyPI: the wheels of benchmarks/gpu_wheels.txt into ./.whl
#   bash benchmarks/gpu_check.sh             # there: install ./.whl (if present), pytest -m gpu, packing benchmark
#
# PYTHON (default python3) runs everything; WHEEL_PYTHON (default 3.12) is the GPU machine's Python for --download;
# PACKING_ARGS are passed to benchmarks/gpu_packing.py (e.g. "--clips 40000 --batch-size 256").
# Exit status: 0 when the GPU tests pass (or skip without CUDA) and the benchmark ran; 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=benchmarks/gpu_wheels.txt

requirements() { sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$WHEELS"; }

if [ "${1:-}" = "--download" ]; then
    rm -rf .whl && mkdir -p .whl
    target=(--python-version "${WHEEL_PYTHON:-3.12}" --implementation cp --only-binary=:all:
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
            --platform manylinux_2_5_x86_64 --platform any)
    for req in $(requirements); do
        # a binary wheel for the GPU machine's Python; a pure-Python package that PyPI serves only as a source
        # archive (antlr4-python3-runtime) is built into a wheel here instead
        "$PY" -m pip download -q --no-deps --dest .whl "${target[@]}" "$req" 2>/dev/null \
            || "$PY" -m pip wheel -q --no-deps --wheel-dir .whl "$req" \
            || { echo "could not fetch $req" >&2; exit 1; }
    done
    ls .whl && du -sh .whl
    exit 0
fi

if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --find-links .whl --no-deps $(requirements) || exit 1
fi
status=0
"$PY" -m pytest -m gpu tests/test_gpu.py -q -rs -p no:cacheprovider || status=1
"$PY" benchmarks/gpu_packing.py ${PACKING_ARGS:-} || status=1
exit $status
