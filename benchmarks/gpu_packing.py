"""Trials per GPU, measured: throughput and GPU memory of real sweep trials at 1, 2 and 4 trials per card.

For each `resources.gpus_per_trial` in (1, 0.5, 0.25) the same N trials (default 4 per GPU, differing only in
`train.seed`) run as Ray Tune trials of `tune.with_resources(..., {"cpu": c, "gpu": g})`, exactly as the sweep
launches them: the composed Hydra run config, the data and (with kd.enabled=true) the teacher's logits go through
`tune.with_parameters`, and each trial calls the sweep's training function, `trainable.loop.train`, with a
Tune checkpoint per epoch (AMP is on by itself on CUDA: bf16 where supported, else fp16). At 1 GPU per trial
the N trials run one after another, at 0.25 four share a card. Measured per setting:

* wall time from `Tuner.fit` start to end (trial actors starting, training, checkpoints, Tune's bookkeeping)
  -> trial-epochs per minute = N * epochs / wall minutes; and the mean `epoch_seconds` a trial reports
  (how much slower one trial gets when it shares the card);
* per-trial peak memory, `torch.cuda.max_memory_allocated()` / `max_memory_reserved()` read inside the trial
  after each epoch (the largest trial is shown);
* device-wide peak memory used while the trials ran (NVML, else `nvidia-smi`, else `torch.cuda.mem_get_info`,
  sampled every 0.2 s; CUDA contexts and the caching allocator's slack included), also above the idle level
  measured just before the fit, and the mean GPU utilisation (NVML / nvidia-smi only).

The student's log-mel cache is built before the first setting, so no setting pays for it.

    python benchmarks/gpu_packing.py [--families N --per-family N --clip-seconds S --epochs E --trials N
                                      --cpus-per-trial C --num-cpus C --workdir DIR --dry-run] [key=value ...]

Trailing key=value arguments are Hydra overrides of the run config (e.g. student.arch=mobilenet_v2
train.batch_size=256 kd.enabled=true). Without a CUDA GPU (or with --dry-run) it says so and runs a dry run
instead: one 1-epoch trial through the same harness with gpus_per_trial=0 on the CPU (data flags not given
default to 3 families x 15 notes of 0.5 s), memory columns n/a.

The last line is `ratio=<trial-epochs per minute at 4 trials per GPU / at 1 trial per GPU>` (`ratio=nan` on a
dry run).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# As sweeps/run.py: Tune records its experiment state after every result (without warning that it does so),
# and prints the classic output.
os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from common.cli import plain  # noqa: E402
from common.config import FeatureConfig  # noqa: E402
from data_prep.dataset import prepare_data  # noqa: E402
from data_prep.waveform_cache import WaveformData  # noqa: E402
from trainable.evaluation import make_pipeline  # noqa: E402
from trainable.teacher import kd_inputs  # noqa: E402

log = logging.getLogger("benchmarks.gpu_packing")

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GPU_SETTINGS = (1.0, 0.5, 0.25)  # resources.gpus_per_trial: 1, 2 and 4 trials per GPU
TRIALS_PER_GPU = 4  # default trials per setting, per GPU: 0.25 fills the card once, 1.0 runs them one by one
SAMPLE_INTERVAL_S = 0.2
MIB = 2**20
# A dry run's data when --families/--per-family/--clip-seconds are not given: seconds to render, not minutes.
DRY_RUN_DATA = {"families": 3, "per_family": 15, "clip_seconds": 0.5}


def visible_gpu_ids() -> list[str] | None:
    """CUDA_VISIBLE_DEVICES as NVML/nvidia-smi ids (indices or UUIDs), in CUDA order; None = all, in order."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None or not value.strip():
        return None
    return [part.strip() for part in value.split(",") if part.strip()]


def compose_config(overrides: list[str]) -> dict[str, Any]:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return plain(compose("config", overrides=overrides))


def packing_trial(trial_params: dict[str, Any], base_config: dict[str, Any], data: WaveformData,
                  teacher_logits: torch.Tensor | None = None, teacher: Any = None) -> None:
    """One sweep trial (as trainable/tune_trainable.run_trial, without resume), reporting its GPU memory too."""
    from ray import tune

    from trainable.evaluation import amp_settings
    from trainable.loop import train
    from trainable.run_config import pick_device, trial_config

    config = trial_config(base_config, trial_params)
    if not tune.get_context().get_trial_resources().required_resources.get("GPU", 0):
        config["device"] = "cpu"  # as run_trial: a 0-GPU trial must not land on cuda:0
    device = pick_device(config["device"])
    amp_on, amp_dtype = amp_settings(device)
    about = {"device": str(device), "amp": str(amp_dtype).removeprefix("torch.") if amp_on else "off",
             "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else ""}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # an actor reused from an earlier trial keeps its peak
    run_dir = Path(tune.get_context().get_trial_dir())

    def report(metrics: dict[str, Any], ckpt_dir: Path) -> None:
        memory = {}
        if device.type == "cuda":
            memory = {"gpu_max_allocated_mib": torch.cuda.max_memory_allocated(device) / MIB,
                      "gpu_max_reserved_mib": torch.cuda.max_memory_reserved(device) / MIB}
        tune.report({**metrics, **memory, **about}, checkpoint=tune.Checkpoint.from_directory(str(ckpt_dir)))

    kd = {}
    if config["kd"]["enabled"]:
        kd = {"teacher": teacher} if config["kd"]["teacher_logits"] == "online" else {"teacher_logits": teacher_logits}
    train(config, data, run_dir, report=report, **kd)


class DeviceMemorySampler:
    """Peak memory used (MiB) and mean utilisation (%) per visible GPU, sampled in a thread while `with`-ed.

    NVML (pynvml) when installed, else `nvidia-smi`, else torch.cuda.mem_get_info (no utilisation; it makes a
    CUDA context in this process, which the idle level taken at the start includes).
    """

    def __init__(self, gpus: int, interval_s: float = SAMPLE_INTERVAL_S):
        self.gpus, self.interval_s = gpus, interval_s
        self.ids = visible_gpu_ids()
        self.source, self._nvml = self._pick_source()
        self.idle: list[float] = []
        self.peak: list[float] = []  # stays empty when the device cannot be read
        self._util: list[list[float]] = [[] for _ in range(gpus)]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _pick_source(self) -> tuple[str, Any]:
        try:
            import pynvml

            pynvml.nvmlInit()
            return "nvml", pynvml
        except Exception:  # noqa: BLE001 - not installed, or no NVML library
            pass
        if shutil.which("nvidia-smi"):
            return "nvidia-smi", None
        return "torch.cuda.mem_get_info", None

    def read(self) -> list[tuple[float, float | None]]:
        """(memory used MiB, utilisation % or None) per GPU, in CUDA device order."""
        if self.source == "nvml":
            nvml = self._nvml
            out = []
            for i in range(self.gpus):
                gpu = self.ids[i] if self.ids else str(i)
                handle = (nvml.nvmlDeviceGetHandleByIndex(int(gpu)) if gpu.isdigit()
                          else nvml.nvmlDeviceGetHandleByUUID(gpu))
                out.append((nvml.nvmlDeviceGetMemoryInfo(handle).used / MIB,
                            float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)))
            return out
        if self.source == "nvidia-smi":
            select = [f"--id={','.join(self.ids[: self.gpus])}"] if self.ids else []
            text = subprocess.run(["nvidia-smi", "--query-gpu=memory.used,utilization.gpu",
                                   "--format=csv,noheader,nounits", *select], capture_output=True, text=True,
                                  timeout=10, check=True).stdout
            rows = [line.split(",") for line in text.strip().splitlines()][: self.gpus]
            return [(float(used), float(util) if util.strip().isdigit() else None) for used, util, *_ in rows]
        out = []
        for i in range(self.gpus):
            free, total = torch.cuda.mem_get_info(i)
            out.append(((total - free) / MIB, None))
        return out

    def _sample(self) -> None:
        for i, (used, util) in enumerate(self.read()):
            self.peak[i] = max(self.peak[i], used)
            if util is not None:
                self._util[i].append(util)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._loop_once()

    def __enter__(self) -> DeviceMemorySampler:
        try:
            self.idle = [used for used, _ in self.read()]
        except Exception as err:  # noqa: BLE001 - e.g. MIG ids NVML cannot resolve: no device columns then
            log.warning("cannot read GPU memory via %s (%s): device-wide columns will be n/a", self.source, err)
            return self
        self.peak = list(self.idle)
        self._thread = threading.Thread(target=self._loop, name="gpu-memory-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._loop_once()

    def _loop_once(self) -> None:
        try:
            self._sample()
        except Exception as err:  # noqa: BLE001 - a failed sample must not kill the benchmark
            log.warning("GPU memory sample failed: %s", err)

    @property
    def peak_used(self) -> float | None:
        return max(self.peak) if self.peak else None

    @property
    def peak_over_idle(self) -> float | None:
        return max(p - i for p, i in zip(self.peak, self.idle)) if self.peak else None

    @property
    def mean_util(self) -> float | None:
        samples = [u for per_gpu in self._util for u in per_gpu]
        return sum(samples) / len(samples) if samples else None


@dataclass
class SettingResult:
    gpus_per_trial: float
    trials: int
    epochs: int  # per trial
    wall_s: float  # Tuner.fit start to end
    epoch_seconds: list[float] = field(default_factory=list)  # every epoch of every trial
    trial_allocated_mib: float | None = None  # the largest trial's torch.cuda.max_memory_allocated
    trial_reserved_mib: float | None = None
    device_peak_mib: float | None = None
    device_over_idle_mib: float | None = None
    gpu_util: float | None = None
    about: dict[str, str] = field(default_factory=dict)  # device, amp, gpu_name as a trial saw them

    @property
    def trial_epochs_per_min(self) -> float:
        return len(self.epoch_seconds) / (self.wall_s / 60)


def run_setting(gpus: float, trials: int, cpus: float, base_config: dict[str, Any], data: WaveformData,
                kd: dict[str, Any], storage: Path, sampler_gpus: int) -> SettingResult:
    """Run `trials` trials of the real training with {"cpu": cpus, "gpu": gpus} each; time and measure them."""
    from ray import tune

    label = "cpu" if gpus == 0 else f"{gpus:g}gpu"
    trainable = tune.with_resources(
        tune.with_parameters(packing_trial, base_config={**base_config, "train": {**base_config["train"],
                                                                                "num_threads": math.ceil(cpus)}},
                             data=data, **kd),
        {"cpu": cpus, "gpu": gpus})
    tuner = tune.Tuner(
        trainable,
        param_space={"grid_point": tune.grid_search([{"train.seed": seed} for seed in range(trials)])},
        tune_config=tune.TuneConfig(num_samples=1, reuse_actors=True),
        run_config=tune.RunConfig(name=f"packing-{label}", storage_path=str(storage), verbose=0,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
    log.info("gpus_per_trial=%g: %d trials of %d epochs, %g CPUs each", gpus, trials,
             base_config["train"]["epochs"], cpus)
    with ExitStack() as stack:
        sampler = stack.enter_context(DeviceMemorySampler(sampler_gpus)) if sampler_gpus else None
        start = time.perf_counter()
        results = tuner.fit()
        wall = time.perf_counter() - start
    errors = [r.error for r in results if r.error]
    if errors:
        sys.exit(f"gpus_per_trial={gpus:g}: {len(errors)} of {trials} trials failed; the first error:\n{errors[0]}")
    out = SettingResult(gpus, trials, base_config["train"]["epochs"], wall)
    allocated, reserved = [], []
    for result in results:
        frame = result.metrics_dataframe
        out.epoch_seconds += [float(s) for s in frame["epoch_seconds"]]
        if "gpu_max_allocated_mib" in frame:
            allocated.append(float(frame["gpu_max_allocated_mib"].max()))
            reserved.append(float(frame["gpu_max_reserved_mib"].max()))
        out.about = {k: str(result.metrics.get(k, "")) for k in ("device", "amp", "gpu_name")}
    if allocated:
        out.trial_allocated_mib, out.trial_reserved_mib = max(allocated), max(reserved)
    if sampler is not None:
        out.device_peak_mib, out.device_over_idle_mib, out.gpu_util = (
            sampler.peak_used, sampler.peak_over_idle, sampler.mean_util)
    log.info("gpus_per_trial=%g: %.1f s, %.1f trial-epochs/min", gpus, wall, out.trial_epochs_per_min)
    return out


def warm_student_features(config: dict[str, Any], data: WaveformData) -> None:
    """Build the student's log-mel cache here, on the CPU (no CUDA context in the driver), before any setting."""
    feats = FeatureConfig.from_mapping(config["features"])
    for split in ("train", "valid"):
        next(make_pipeline(data, split, feats, torch.device("cpu"), config["workdir"]).batches(1, train=False))


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_table(rows: list[SettingResult]) -> None:
    header = (f"{'gpus/trial':>10}{'trials/GPU':>11}{'trials':>7}{'wall s':>9}{'trial-ep/min':>13}{'s/epoch':>9}"
              f"{'trial alloc MiB':>16}{'trial resv MiB':>15}{'dev peak MiB':>13}{'dev +idle MiB':>14}{'util %':>8}")
    print(header)
    for r in rows:
        per_gpu = "cpu" if r.gpus_per_trial == 0 else f"{1 / r.gpus_per_trial:g}"
        mean_epoch = sum(r.epoch_seconds) / len(r.epoch_seconds)
        print(f"{r.gpus_per_trial:>10g}{per_gpu:>11}{r.trials:>7}{r.wall_s:>9.1f}{r.trial_epochs_per_min:>13.1f}"
              f"{mean_epoch:>9.2f}{fmt(r.trial_allocated_mib, '.0f'):>16}{fmt(r.trial_reserved_mib, '.0f'):>15}"
              f"{fmt(r.device_peak_mib, '.0f'):>13}{fmt(r.device_over_idle_mib, '.0f'):>14}{fmt(r.gpu_util, '.0f'):>8}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="Hydra overrides of the run config")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="caches and Ray results go here (default: a temp dir under /tmp, removed after); "
                             "rendered notes go to data.root as usual")
    parser.add_argument("--families", type=int, default=None,
                        help="the first N of data.families (default: all; a dry run: 3)")
    parser.add_argument("--per-family", type=int, default=None,
                        help="notes per family (default: data.per_family; a dry run: 15)")
    parser.add_argument("--clip-seconds", type=float, default=None,
                        help="default: data.clip_seconds; a dry run: 0.5")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per trial (a dry run uses 1)")
    parser.add_argument("--trials", type=int, default=None,
                        help=f"trials per setting (default: {TRIALS_PER_GPU} per GPU; a dry run uses 1)")
    parser.add_argument("--cpus-per-trial", type=float, default=None,
                        help=f"Ray CPUs (and torch threads) per trial, the same in every setting "
                             f"(default: Ray's CPUs / ({TRIALS_PER_GPU} x GPUs), at least 1)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--dry-run", action="store_true",
                        help="exercise the harness on the CPU (what happens anyway without a CUDA GPU)")
    args = parser.parse_args()
    if args.epochs < 1 or (args.trials is not None and args.trials < 1):
        parser.error("--epochs and --trials must be >= 1")
    if args.families is not None and args.families < 2:
        parser.error("--families must be >= 2")
    if args.per_family is not None and args.per_family < 1:
        parser.error("--per-family must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0  # no CUDA context in this process
    dry_run = args.dry_run or gpus == 0
    settings_text = "/".join(f"{g:g}" for g in GPU_SETTINGS)
    measures = (f"throughput (trial-epochs/min) and peak GPU memory at gpus_per_trial={settings_text} "
                "(1, 2, 4 trials per GPU), AMP on")
    if dry_run:
        why = "no CUDA GPU present" if gpus == 0 else "--dry-run given"
        print(f"{why}: dry run (one 1-epoch trial through the same Ray harness on the CPU, gpus_per_trial=0); "
              f"on a GPU machine this measures {measures}.", flush=True)
    epochs = 1 if dry_run else args.epochs
    if dry_run:
        for key, value in DRY_RUN_DATA.items():
            if getattr(args, key) is None:
                setattr(args, key, value)

    defaults = compose_config([])
    data_overrides = [] if args.per_family is None else [f"data.per_family={args.per_family}"]
    if args.families is not None:
        data_overrides.append(f"data.families=[{','.join(defaults['data']['families'][: args.families])}]")
    if args.clip_seconds is not None:
        data_overrides.append(f"data.clip_seconds={args.clip_seconds}")
    warmup = min(defaults["train"]["warmup_epochs"], epochs - 1)

    with ExitStack() as stack:
        workdir = (args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_packing-"))))
        workdir = workdir.resolve()
        config = compose_config([f"workdir={workdir}", *data_overrides, f"train.epochs={epochs}",
                                 f"train.warmup_epochs={warmup}", *args.overrides])
        data = prepare_data(config["data"], config["workdir"])
        torch.set_num_threads(args.num_cpus or len(os.sched_getaffinity(0)))
        warm_student_features(config, data)
        kd = kd_inputs(config, data)

        import ray

        ray.init(num_cpus=args.num_cpus, include_dashboard=False, logging_level=logging.WARNING)
        try:
            ray_cpus, ray_gpus = ray.cluster_resources().get("CPU", 1), int(ray.cluster_resources().get("GPU", 0))
            if not dry_run and ray_gpus < 1:
                sys.exit(f"torch sees {gpus} CUDA GPU(s) but the local Ray sees none; check CUDA_VISIBLE_DEVICES.")
            card_count = ray_gpus if not dry_run else 1
            cpus = args.cpus_per_trial or max(1, int(ray_cpus // (TRIALS_PER_GPU * card_count)))
            trials = 1 if dry_run else (args.trials or TRIALS_PER_GPU * ray_gpus)
            if not dry_run and TRIALS_PER_GPU * ray_gpus * cpus > ray_cpus:
                log.warning("%g CPUs per trial x %d trials at 4/GPU > Ray's %g CPUs: the packed setting will be "
                            "CPU-bound, not GPU-bound; lower --cpus-per-trial", cpus, TRIALS_PER_GPU * ray_gpus,
                            ray_cpus)
            settings = (0.0,) if dry_run else GPU_SETTINGS
            storage = workdir / "ray_results"
            rows = [run_setting(g, trials, cpus, config, data, kd, storage, 0 if dry_run else ray_gpus)
                    for g in settings]
        finally:
            ray.shutdown()
        train_clips = len(data.splits["train"])

    about = rows[0].about
    student = config["student"]
    gpu_name = f" ({about['gpu_name']})" if about.get("gpu_name") else ""
    print(f"\ndevice={about.get('device')}{gpu_name} gpus={0 if dry_run else ray_gpus} "
          f"amp={about.get('amp')} ray_cpus={ray_cpus:g} cpus/trial={cpus:g} trials/setting={trials} "
          f"epochs={epochs}")
    print(f"student {student['arch']} x{student['width_mult']}, kd={'on' if config['kd']['enabled'] else 'off'}, "
          f"families={len(data.classes)} train_clips={train_clips} clip={config['data']['clip_seconds']:g}s "
          f"n_mels={config['features']['n_mels']} batch={config['train']['batch_size']}")
    print_table(rows)
    print("(trial-ep/min: trials x epochs / wall minutes of Tuner.fit; s/epoch: mean epoch_seconds of a trial; "
          "trial alloc/resv: the largest trial's torch.cuda.max_memory_allocated/reserved; dev peak: the device's "
          f"memory used, sampled every {SAMPLE_INTERVAL_S:g} s, +idle: above the level before the fit)")
    if dry_run:
        print("ratio=nan")
        return
    by_gpus = {r.gpus_per_trial: r for r in rows}
    print(f"ratio={by_gpus[0.25].trial_epochs_per_min / by_gpus[1.0].trial_epochs_per_min:.2f}")


if __name__ == "__main__":
    main()
