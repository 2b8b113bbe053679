"""CUDA checks that a bare GPU machine can run: `pytest -m gpu tests/test_gpu.py` (or `bash benchmarks/gpu_check.sh`);
skipped without CUDA.

Such a machine has torch (CUDA), torchaudio, torchvision, timm, transformers and onnxruntime, and no Ray, Optuna,
MLflow or Hydra: whatever else the imports below need comes along as wheels (benchmarks/gpu_wheels.txt), and
test_gpu_checks_import_only_what_a_gpu_machine_has (no GPU needed, not marked gpu) keeps it that way.

AKDS_GPU_TEST_DEVICE=cpu runs the same code paths on the CPU (AMP forced on all the same; fp16 with its grad scaler
needs CUDA and skips): a way to try these checks on a machine without a GPU, not a substitute for them.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DEVICE = torch.device(os.environ.get("AKDS_GPU_TEST_DEVICE", "cuda"))
requires_device = pytest.mark.skipif(
    DEVICE.type == "cuda" and not torch.cuda.is_available(),
    reason="no CUDA device (AKDS_GPU_TEST_DEVICE=cpu tries these on the CPU)",
)
on_gpu = [pytest.mark.gpu, requires_device]
FAMILIES = ["bass", "keyboard", "reed", "string", "vocal"]  # the released NSynth sample's families


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory) -> tuple[dict[str, Any], Any]:
    """The composed run config on the device, and NSynth-layout data (synthetic audio, 40 notes per split) prepared
    through the real data path."""
    from common.cli import compose
    from data_prep.dataset import prepare_data
    from tests.nsynth_fixtures import write_official_layout

    work = tmp_path_factory.mktemp("gpu")
    write_official_layout(work / "nsynth", copies_per_split=8)
    config = compose(
        "config",
        [
            f"workdir={work}",
            "data=nsynth",
            f"data.root={work / 'nsynth'}",
            f"data.families=[{','.join(FAMILIES)}]",
            "features.n_mels=32",
            "train.epochs=2",
            "train.batch_size=16",
            "train.warmup_epochs=0",
            "train.num_threads=2",
            "teacher.epochs=2",
            "teacher.batch_size=16",
            "teacher.features.n_mels=32",
            f"device={DEVICE}",
        ],
    )
    return config, prepare_data(config["data"], config["workdir"])


class Seen:
    """What reached the models' first layer: the devices and dtypes of its outputs, in training mode."""

    def __init__(self) -> None:
        self.devices: set[str] = set()
        self.dtypes: set[torch.dtype] = set()

    def hook(self, module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if module.training:
            self.devices.add(output.device.type)
            self.dtypes.add(output.dtype)

    def watch(self, model: torch.nn.Module) -> torch.nn.Module:
        first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        first.register_forward_hook(self.hook)
        return model


@pytest.fixture
def seen(monkeypatch) -> Seen:
    """Every model `train` builds is watched (students and timm teachers alike)."""
    import trainable.loop

    watcher, build = Seen(), trainable.loop.build_model
    monkeypatch.setattr(trainable.loop, "build_model", lambda *a, **k: watcher.watch(build(*a, **k)))
    return watcher


def run_dir(config: dict[str, Any], name: str) -> Path:
    return Path(config["workdir"]) / "runs" / name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.gpu
@requires_device
def test_amp_training_steps(gpu_run, seen, monkeypatch, dtype):
    """Both AMP precisions train on the device: the forward runs in the AMP dtype, the weights stay fp32, the loss is
    finite, and fp16 goes through the grad scaler (its state is in the checkpoint), bf16 needs none."""
    import trainable.loop
    from trainable.checkpoints import load_checkpoint, restore_model

    if dtype == torch.float16 and DEVICE.type != "cuda":
        pytest.skip("fp16 AMP and its grad scaler need CUDA")
    if dtype == torch.bfloat16 and DEVICE.type == "cuda" and not torch.cuda.is_bf16_supported():
        pytest.skip("this card has no bf16")
    config, data = gpu_run
    monkeypatch.setattr(trainable.loop, "amp_settings", lambda device: (True, dtype))
    out = run_dir(config, f"amp-{dtype}")
    metrics = trainable.loop.train(config, data, out)
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["val_loss"])
    assert seen.devices == {DEVICE.type} and seen.dtypes == {dtype}
    checkpoint = load_checkpoint(out / "checkpoint")
    assert {p.dtype for p in restore_model(checkpoint).parameters()} == {torch.float32}  # AMP leaves weights fp32
    if dtype == torch.float16:
        assert checkpoint["scaler"].get("scale", 0) > 0  # the scaler scaled (and survives a resume)
    else:
        assert not checkpoint["scaler"]


@pytest.mark.gpu
@requires_device
def test_data_teacher_and_logits_live_on_the_trials_device(gpu_run, seen):
    """Batches come out on the device; the teacher trains there (trainable.teacher, as the Ray task runs it); the
    cached logits and the online teacher (model and front-end) are put on the device a trial asks for."""
    from common.config import FeatureConfig
    from trainable.evaluation import make_pipeline
    from trainable.teacher import kd_arguments, teacher_inputs

    config, data = gpu_run
    pipeline = make_pipeline(
        data,
        "train",
        FeatureConfig.from_mapping(config["features"]),
        DEVICE,
        config["workdir"],
        config["train"]["device_data_share"],
    )
    pipeline.prepare(train=True)
    batch = next(pipeline.batches(8, train=True, generator=torch.Generator().manual_seed(0)))
    assert {batch.features.device.type, batch.labels.device.type, batch.indices.device.type} == {DEVICE.type}

    cached = teacher_inputs(config, data)  # trains the teacher on config["device"]
    assert seen.devices == {DEVICE.type}
    logits = kd_arguments(cached, data, DEVICE)["teacher_logits"]
    assert logits.shape == (len(data.splits["train"]), data.num_classes) and torch.isfinite(logits).all()

    online = {**config, "kd": {**config["kd"], "enabled": True, "teacher_logits": "online"}}
    model, frontend = kd_arguments(teacher_inputs(online, data), data, DEVICE)["teacher"]
    assert {p.device.type for p in model.parameters()} == {DEVICE.type}
    inputs = frontend(batch.indices)
    assert all(x.device.type == DEVICE.type for x in (inputs if isinstance(inputs, (list, tuple)) else [inputs]))
    with torch.no_grad():
        assert model(inputs).device.type == DEVICE.type


@pytest.mark.gpu
@requires_device
def test_online_kd_trains_on_the_trials_device(gpu_run, seen):
    """kd.teacher_logits=online: the frozen teacher runs per batch next to the student, on the same device."""
    from trainable.loop import train
    from trainable.teacher import kd_arguments, teacher_inputs

    config, data = gpu_run
    online = {**config, "kd": {**config["kd"], "enabled": True, "teacher_logits": "online"}}
    kd = kd_arguments(teacher_inputs(online, data), data, DEVICE)
    teacher_seen = Seen()
    model, frontend = kd["teacher"]
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    first.register_forward_hook(lambda m, i, o: teacher_seen.devices.add(o.device.type))  # frozen: eval mode
    metrics = train(online, data, run_dir(config, "online-kd"), **kd)
    assert metrics["kd_loss"] > 0 and math.isfinite(metrics["kd_loss"]) and math.isfinite(metrics["val_loss"])
    assert seen.devices == {DEVICE.type} and teacher_seen.devices == {DEVICE.type}


@pytest.mark.gpu
@requires_device
def test_pruning_and_macs_on_a_cuda_model(gpu_run, seen):
    """MACs and params counted on the device equal the CPU's; structural pruning of a model on the device reaches its
    MACs target and leaves it there, in a training run with AMP (pruning at the start of epoch 2)."""
    from trainable.loop import train
    from trainable.models import create_student
    from trainable.pruning import MACS_TOLERANCE, count_macs_params, prune_to_macs

    config, data = gpu_run
    shape = (1, 1, 32, 101)
    dropout = config["student"]["dropout"]
    model = create_student("mobilenet_v3_small", 0.75, data.num_classes, dropout).to(DEVICE)
    on_device = count_macs_params(model, shape)
    cpu_model = create_student("mobilenet_v3_small", 0.75, data.num_classes, dropout)
    cpu_model.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    assert on_device == count_macs_params(cpu_model, shape)
    step = prune_to_macs(
        model,
        torch.zeros(shape, device=DEVICE),
        on_device[0],
        0.5,
        config["pruning"]["importance"],
        config["pruning"]["round_to"],
    )
    assert abs(step.macs_ratio_reached - 0.5) <= MACS_TOLERANCE * 0.5
    assert {p.device.type for p in model.parameters()} == {DEVICE.type}
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        assert model(torch.randn(4, *shape[1:], device=DEVICE)).shape == (4, data.num_classes)

    pruned = {**config, "pruning": {**config["pruning"], "mode": "single", "target_macs_ratio": 0.5, "at_epoch": 2}}
    metrics = train(pruned, data, run_dir(config, "pruned"))
    assert metrics["pruning_step"] == 1 and abs(metrics["macs"] / metrics["base_macs"] - 0.5) <= MACS_TOLERANCE * 0.5
    assert seen.devices == {DEVICE.type} and math.isfinite(metrics["val_loss"])


# --- what the checks above need on a bare GPU machine ---------------------------------------------------------

GPU_MACHINE = ("torch", "torchaudio", "torchvision", "timm", "transformers", "onnxruntime")  # and what they require
WHEELS = ROOT / "benchmarks" / "gpu_wheels.txt"
NEVER = ("ray", "optuna", "mlflow")

IMPORTED = r"""
import ast, importlib, sys
sys.path.insert(0, sys.argv[1])  # run with python -S: this folder is the whole of site-packages
for file in sys.argv[2:]:  # every import statement of the file, module level or inside a function
    for node in ast.walk(ast.parse(open(file).read())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module != "__future__":
            importlib.import_module(node.module)
"""
# What runs on the GPU machine: this file, the conftest pytest loads with it, and the packing benchmark.
GPU_FILES = (ROOT / "tests" / "test_gpu.py", ROOT / "tests" / "conftest.py", ROOT / "benchmarks" / "gpu_packing.py")


def requirements_closure(roots: tuple[str, ...]) -> set[str]:
    """The distributions `roots` install, by this environment's package metadata (normalised names)."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen, todo = set(), [canonicalize_name(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(requirement.name))
    return seen


def bare_site_packages(folder: Path, distributions: set[str]) -> None:
    """A site-packages holding only `distributions` (links to this environment's files, metadata included)."""
    from importlib import metadata

    from packaging.utils import canonicalize_name

    folder.mkdir()
    for dist in metadata.distributions():
        if canonicalize_name(dist.metadata["Name"]) not in distributions:
            continue
        base = Path(dist.locate_file(""))
        for top in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            if (base / top).exists() and not (folder / top).exists():
                (folder / top).symlink_to(base / top)


@pytest.mark.slow
def test_gpu_checks_import_only_what_a_gpu_machine_has(tmp_path):
    """Every import of this file, its conftest and benchmarks/gpu_packing.py (module level or in a function) succeeds
    in a Python whose site-packages holds only the GPU machine's packages (and what they require) and
    benchmarks/gpu_wheels.txt: Ray, Optuna, MLflow and the rest of this environment are absent. The wheels' own
    requirements must be met the same way."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    machine = requirements_closure(GPU_MACHINE)
    wheels = {
        canonicalize_name(Requirement(line.split("#")[0]).name)
        for line in WHEELS.read_text().splitlines()
        if line.split("#")[0].strip()
    }
    unmet = {w: sorted(requirements_closure((w,)) - machine - wheels) for w in wheels}
    assert not {w: r for w, r in unmet.items() if r}, f"requirements of {WHEELS.name} entries missing from it: {unmet}"
    assert not {canonicalize_name(n) for n in NEVER} & (machine | wheels)
    bare_site_packages(tmp_path / "site-packages", machine | wheels)
    out = subprocess.run(
        [sys.executable, "-S", "-c", IMPORTED, str(tmp_path / "site-packages"), *map(str, GPU_FILES)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert out.returncode == 0, (
        f"an import needs a package that neither the GPU machine nor {WHEELS.name} has:\n" + out.stderr[-3000:]
    )
