"""The one typed config: every key, its type, default and allowed values, for every entry point.

Hydra composes `conf/*.yaml` over these dataclasses (registered in its ConfigStore by `register()`), so a
wrong type or an unknown key fails at compose time. The pipeline's own config objects are the same
classes: `FeatureConfig(**config["features"])` is what the feature code runs on. Library code receives
the composed config as a plain nested dict (`common.cli.plain`): picklable for Ray, loggable to MLflow.

Sections: `RunConfig` is what one training run (and every sweep trial) needs; `SweepConfig` and
`AnalysisConfig` extend it with their own top-level keys, and `run_section()` keeps only the
`RunConfig` fields, so sweep-only keys never reach trials or MLflow params.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import math
import numbers
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class DataSource(str, enum.Enum):
    gm_render = "gm_render"
    nsynth = "nsynth"


class SplitBy(str, enum.Enum):
    instrument = "instrument"
    note = "note"


class Normalize(str, enum.Enum):
    per_band = "per_band"
    global_ = "global"
    none = "none"


class StudentArch(str, enum.Enum):
    mobilenet_v2 = "mobilenet_v2"
    mobilenet_v3_small = "mobilenet_v3_small"
    mobilenet_v3_large = "mobilenet_v3_large"


class TeacherLogits(str, enum.Enum):
    cached = "cached"
    online = "online"


class PruningMode(str, enum.Enum):
    none = "none"
    single = "single"
    progressive = "progressive"
    unstructured = "unstructured"


# The channel-pruning modes: they remove whole channels, so MACs and params drop (unstructured only zeroes weights).
STRUCTURED_MODES = (PruningMode.single.value, PruningMode.progressive.value)


class PruningSchedule(str, enum.Enum):
    cubic = "cubic"
    linear = "linear"


class Importance(str, enum.Enum):
    l1 = "l1"
    l2 = "l2"
    taylor = "taylor"
    random = "random"


class Sampler(str, enum.Enum):
    tpe = "tpe"
    nsga2 = "nsga2"
    random = "random"


class SearchObjective(str, enum.Enum):
    multi = "multi"
    single = "single"


class Precision(str, enum.Enum):
    int8 = "int8"
    fp16 = "fp16"
    fp32 = "fp32"


# Bytes per parameter at each deployment precision: the parameter memory of budget.max_kb and the reports' kB.
BYTES_PER_PARAM: dict[str, int] = {Precision.int8.value: 1, Precision.fp16.value: 2, Precision.fp32.value: 4}


def bytes_per_param(precision: str, key: str = "precision") -> int:
    """Bytes per parameter at `precision`; anything but int8 | fp16 | fp32 is refused, naming the `key` it came from."""
    if precision not in BYTES_PER_PARAM:
        raise ValueError(f"{key}={precision!r}; choose one of {', '.join(BYTES_PER_PARAM)}.")
    return BYTES_PER_PARAM[precision]


class SchedulerName(str, enum.Enum):
    pareto_asha = "pareto_asha"
    asha = "asha"
    fifo = "fifo"


class RungMetric(str, enum.Enum):
    """Validation metrics a scheduler can rank trials on at its rungs (reported every epoch by the trainable)."""

    val_acc = "val_acc"
    val_loss = "val_loss"
    val_macro_f1 = "val_macro_f1"


# "max" | "min": which way each rung metric is better.
RUNG_METRIC_MODES: dict[str, str] = {
    RungMetric.val_acc.value: "max",
    RungMetric.val_loss.value: "min",
    RungMetric.val_macro_f1.value: "max",
}


class Stage(str, enum.Enum):
    search = "search"  # search, then (retrain.enabled) retrain the front
    retrain = "retrain"  # retrain the front of an existing sweep (name=<sweep>)


class RetrainRole(str, enum.Enum):
    """What a retraining run is, relative to the front configuration it comes from."""

    front = "front"  # the front configuration itself
    kd_toggled = "kd_toggled"  # the same with KD switched (on -> off, off -> on)
    pruning_toggled = "pruning_toggled"  # the same MACs target with the other structured mode (single <-> progressive)
    dense_same_macs = "dense_same_macs"  # structured-pruned configs: unpruned, at the width whose MACs are closest


def values(choices: type[enum.Enum]) -> tuple[str, ...]:
    """The accepted strings of an enum, as users write them."""
    return tuple(member.value for member in choices)


# NSynth's instrument families, in its `instrument_family` index order (data_prep/layout.py reads labels with it).
FAMILIES: tuple[str, ...] = (
    "bass",
    "brass",
    "flute",
    "guitar",
    "keyboard",
    "mallet",
    "organ",
    "reed",
    "string",
    "synth_lead",
    "vocal",
)


@dataclass
class DataConfig:
    """Dataset selection and waveform cache (data_prep/). `data=gm_render|nsynth` sets source and root."""

    source: DataSource = DataSource.gm_render
    root: str = "./runs/data/gm_render"  # NSynth-layout folder: <root>/nsynth-<split>/{examples.json,audio/}
    families: list[str] = field(default_factory=lambda: list(FAMILIES))
    per_family: int | None = 180  # cap on notes per family (all splits together); null = no cap
    max_total_size_mb: float | None = 1000  # cap on the selected audio on disk (16-bit wav); null = no cap
    # cap on notes per family in each split (data=nsynth_subset: train 650, valid 50, test 50); null = no cap
    split_caps: dict[str, int | None] = field(default_factory=lambda: {"train": None, "valid": None, "test": None})
    split_by: SplitBy = SplitBy.instrument  # instrument (no instrument in two splits) | note
    split_fractions: dict[str, float] = field(default_factory=lambda: {"train": 0.7, "valid": 0.15, "test": 0.15})
    clip_seconds: float = 1.0  # the waveform cache keeps this much from the onset
    sample_rate: int = 16000
    seed: int = 0
    # gm_render: GM SoundFonts; each (SoundFont, program) is one base instrument. `default` (or null) = TimGM6mb.sf2
    # inside pretty_midi; any .sf2 path. The order fixes instrument ids (data_prep/soundfonts.py).
    soundfonts: list[str | None] = field(default_factory=lambda: ["default"])
    variants: int = 19  # gm_render: derived instruments (seeded timbre transforms) per base one
    min_eval_instruments: int = 2  # base instruments valid and test each get per family (if >= 2n+1 exist)
    render_workers: int = 2  # gm_render: rendering processes
    prep_workers: int | None = None  # processes decoding wavs into the waveform cache; null = all CPUs here
    hf_id: str | None = None  # nsynth: stream a capped subset from this hub dataset
    hf_splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "valid": "validation", "test": "test"})


# Added to the standard deviation so silent clips (std 0) normalise to 0 instead of NaN (used by the features).
NORMALIZE_EPS = 1e-5


@dataclass(unsafe_hash=True)
class FeatureConfig:
    """Log-mel and augmentation parameters; validated on construction so bad sweeps fail before training.

    Immutable once built (a cache key depends on it), but not a frozen dataclass: OmegaConf would make the
    `features` node of the composed config read-only, and Hydra could not override it.
    """

    sample_rate: int = 16000
    n_fft: int = 1024
    hop_length: int = 160
    n_mels: int = 64
    f_min: float = 20.0
    f_max: float = 8000.0
    normalize: str = "per_band"  # per_band | global | none (per-clip standardisation)
    log_floor: float = 1e-6
    freq_masks: int = 2  # SpecAugment, train mode only; 0 disables
    freq_mask_param: int = 8
    time_masks: int = 2
    time_mask_param: int = 10
    gain_db: float = 0.0  # waveform augmentation (off): random gain +-gain_db
    noise_snr_db: float | None = None  # waveform augmentation (off): white noise at this SNR

    def __post_init__(self) -> None:
        self.validate()
        object.__setattr__(self, "_built", True)

    def __setattr__(self, name: str, value: Any) -> None:
        if getattr(self, "_built", False):
            raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}: FeatureConfig is immutable")
        super().__setattr__(name, value)

    @property
    def waveform_augmentation(self) -> bool:
        """Whether train batches need the log-mel recomputed from augmented waveforms."""
        return self.gain_db > 0 or self.noise_snr_db is not None

    def frames(self, num_samples: int) -> int:
        """Frames per clip: the centred STFT starts a frame at every hop, including sample 0."""
        return num_samples // self.hop_length + 1

    def validate(self) -> None:
        """Raise ValueError naming the key and the fix for any parameter that would crash or degrade features."""
        for key in ("sample_rate", "n_fft", "hop_length", "n_mels"):
            value = getattr(self, key)
            _require(_is_int(value) and value > 0, key, value, "must be a positive integer")
        for key in ("freq_masks", "freq_mask_param", "time_masks", "time_mask_param"):
            value = getattr(self, key)
            _require(_is_int(value) and value >= 0, key, value, "must be a non-negative integer (0 disables it)")
        for key in ("f_min", "f_max", "log_floor", "gain_db"):
            value = getattr(self, key)
            _require(is_finite_number(value), key, value, "must be a finite number")
        nyquist = self.sample_rate / 2
        _require(self.f_min >= 0, "f_min", self.f_min, "must be >= 0 Hz")
        _require(
            self.f_max <= nyquist,
            "f_max",
            self.f_max,
            f"exceeds the Nyquist frequency sample_rate/2={nyquist:g}; set f_max <= {nyquist:g}",
        )
        _require(
            self.f_min < self.f_max,
            "f_min",
            self.f_min,
            f"must be below f_max={self.f_max}; lower f_min or raise f_max",
        )
        _require(
            self.normalize in values(Normalize), "normalize", self.normalize, f"must be one of {values(Normalize)}"
        )
        _require(self.log_floor > 0, "log_floor", self.log_floor, "must be > 0 (log(0) is -inf); e.g. 1e-6")
        _require(
            self.freq_mask_param <= self.n_mels,
            "freq_mask_param",
            self.freq_mask_param,
            f"is wider than the mel axis (n_mels={self.n_mels}); lower freq_mask_param",
        )
        _require(self.gain_db >= 0, "gain_db", self.gain_db, "is the half-width of the random gain; use 0 to disable")
        _require(
            self.gain_db == 0 or self.normalize == "none",
            "gain_db",
            self.gain_db,
            f"has no effect with normalize={self.normalize!r} (per-clip standardisation removes any gain) "
            "but forces a per-batch STFT; set gain_db=0 or normalize='none'",
        )
        _require(
            self.noise_snr_db is None or is_finite_number(self.noise_snr_db),
            "noise_snr_db",
            self.noise_snr_db,
            "must be a finite SNR in dB, or None to disable added noise",
        )
        empty_filters = _empty_mel_filters(self)
        if empty_filters:
            raise ValueError(
                f"feature config n_mels={self.n_mels} is too high for n_fft={self.n_fft} between "
                f"f_min={self.f_min} and f_max={self.f_max} Hz: mel filter(s) {empty_filters} cover no FFT bin "
                "and would output constant features; lower n_mels or raise n_fft"
            )

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> FeatureConfig:
        """Build from a dict; unknown keys are errors so typos don't silently use defaults."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(cfg) - set(known))
        if unknown:
            raise ValueError(f"unknown feature config key(s) {unknown}; valid keys are {known}")
        return cls(**cfg)


def _require(condition: bool, key: str, value: Any, problem: str) -> None:
    if not condition:
        raise ValueError(f"feature config {key}={value!r} {problem}")


def _is_int(value: Any) -> bool:
    import numpy as np

    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """A finite real (numpy scalars included), not a bool: what a numeric config value or budget must be."""
    import numpy as np

    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and math.isfinite(value)


def _empty_mel_filters(cfg: FeatureConfig) -> list[int]:
    """Indices of mel filters that no FFT bin falls into (torchaudio only warns about them)."""
    import torch
    import torchaudio

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        filterbank = torchaudio.functional.melscale_fbanks(
            cfg.n_fft // 2 + 1, float(cfg.f_min), float(cfg.f_max), cfg.n_mels, cfg.sample_rate
        )
    return torch.nonzero(filterbank.amax(dim=0) == 0).flatten().tolist()


@dataclass
class StudentConfig:
    arch: StudentArch = StudentArch.mobilenet_v3_small
    width_mult: float = 0.75
    dropout: float = 0.2


@dataclass
class TeacherConfig:
    """The KD teacher (trainable/teacher.py, docs/teachers.md): one model, or an ensemble whose logits are averaged.

    Every key but `members` is also a member key: a member dict in `teacher.members` overrides these for itself.
    """

    # Any timm model name (timm.list_models()), or hf:<hub id or local save_pretrained folder> for a Hugging Face
    # AutoModelForAudioClassification with its own AutoFeatureExtractor
    # (e.g. hf:MIT/ast-finetuned-audioset-10-10-0.4593). resnet10t: the fastest CPU training step of the timm CNNs
    # measured (docs/teachers.md)
    name: str = "resnet10t"
    # timm only: none (train from scratch) | imagenet (timm's own weights, downloaded by name) | <local weights file>
    # (ImageNet format: 3-channel stem summed to one, 1000-class head replaced). hf: models start from their weights.
    pretrained: str = "none"
    # A finished teacher used as it is: our checkpoint.pt (or a list of them: an ensemble). A plain weights file here
    # is fine-tuned like teacher.pretrained=<file>.
    checkpoint: Any = None
    freeze: bool = False  # true: linear probe (backbone frozen, new head trained); needs weights
    epochs: int = 15  # training / fine-tuning epochs (hf teachers: a few, e.g. 3-5)
    lr: float = 3.0e-3  # its AdamW lr (fine-tuning pretrained weights wants less, e.g. 1e-4)
    batch_size: int = 64
    # An int n: n copies of this teacher with seeds seed, seed+1, ... ; or a list of member dicts mixing architectures,
    # e.g. [{name: resnet18, pretrained: imagenet}, {name: 'hf:MIT/ast-...', lr: 5e-5, epochs: 3}]. Members' logits
    # are averaged; each is trained and cached once (a member's `seed` key offsets the global seed).
    members: Any = 1
    mixup_alpha: float = 0.0  # the teacher's train.mixup_alpha
    # timm teachers' own features, merged over features.* (the student's may differ); hf teachers use their extractor.
    features: dict[str, Any] = field(default_factory=lambda: {"n_mels": 128})


@dataclass
class KDConfig:
    enabled: bool = False
    T: float = 3.0
    alpha: float = 0.7  # loss weight of the KD term, in [0, 0.99] (1 - alpha goes to the labels)
    teacher_logits: TeacherLogits = TeacherLogits.cached  # cached (once per dataset+teacher) | online (per batch)


@dataclass
class PruningConfig:
    mode: PruningMode = PruningMode.none
    target_macs_ratio: float = 0.5  # single/progressive: fraction of the unpruned MACs to keep
    weight_keep_ratio: float = 0.5  # unstructured: fraction of conv/linear weights kept (MACs unchanged)
    at_epoch: int = 3  # epoch (1-based) at whose start the first pruning step happens
    steps: int = 3  # progressive: number of steps
    step_epochs: int = 1  # progressive: fine-tune epochs between steps
    schedule: PruningSchedule = PruningSchedule.cubic  # progressive: cubic (AGP) | linear
    importance: Importance = Importance.l1
    round_to: int | None = None  # keep channel counts multiples of this (e.g. 8 for fast kernels)


@dataclass
class TrainConfig:
    epochs: int = 8
    batch_size: int = 64
    lr: float = 3.0e-3
    weight_decay: float = 1.0e-2
    warmup_epochs: int = 1
    grad_clip: float = 5.0
    seed: int = 0
    num_threads: int | None = None  # CPU threads; null = the CPUs this process may use
    test_at_end: bool = False  # score the test split after the last epoch (retrain stage: test_acc)
    mixup_alpha: float = 0.0  # > 0: mixup of log-mels, labels and KD targets, lambda ~ Beta(a, a)
    steps_per_epoch: int | None = None  # cap on optimizer steps per epoch (a fresh random draw each); null = a
    # full pass over train
    device_data_share: float = 0.5  # GPU: share of the card a split's data may occupy on the device (a Ray
    # trial: x its gpus_per_trial); larger splits stream via pinned memory


@dataclass
class RetrainOrigin:
    """Set on the runs of the retrain stage (sweeps/retrain.py): which front trial a run retrains, and as what."""

    front_trial: str | None = None  # trial id of the search's front configuration
    role: RetrainRole | None = None  # front | kd_toggled | pruning_toggled | dense_same_macs


@dataclass
class RunConfig:
    """What one training run needs: every trial of a sweep gets exactly this (with its sampled keys)."""

    workdir: str = "./runs"  # every generated artefact: dataset, caches, teacher, results, MLflow
    seed: int = 0  # global seed: data subset/splits and training
    device: str = "auto"  # auto = CUDA when available, else CPU; or cpu, cuda, cuda:1, ...
    log_level: str = "INFO"
    scenario: str | None = None  # set by the scenario group (conf/scenario/<name>.yaml)
    resume_from: str | None = None  # trainable/train.py: continue from this checkpoint.pt (or its folder)
    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    origin: RetrainOrigin = field(default_factory=RetrainOrigin)


@dataclass
class SearchConfig:
    sampler: Sampler = Sampler.tpe
    objective: SearchObjective = SearchObjective.multi  # multi (max val_acc, min MACs) | single (max val_acc)


@dataclass
class SchedulerConfig:
    name: SchedulerName | None = None  # null = pareto_asha (multi), asha (single), fifo (grid spaces)
    # Epochs before the first rung. 6 of the default spaces' 10: measured without early stopping on the default data
    # (docs/search.md), epoch 2 ranked trials like their last epoch with Spearman rho -0.11 (22 of 30 at chance),
    # epochs 3-5 with 0.3, epoch 6 with 0.79 (95 % CI 0.56-0.90). Other train.epochs: see the report's rung fidelity.
    grace_period: int = 6
    reduction_factor: float = 3
    # What the rungs rank trials on (with target_macs for pareto_asha); the searcher and the front stay on val_acc.
    # val_acc by measurement: val_macro_f1 ranked alike (within noise); val_loss inversely (the better trials were the
    # more over-confident ones, with the higher validation cross-entropy).
    metric: RungMetric = RungMetric.val_acc


@dataclass
class ResourcesConfig:
    """What one trial asks Ray for, decided from the cluster's nodes after connecting (sweeps/cluster.py)."""

    cpus_per_trial: Any = "auto"  # auto = 1 for CPU trials; GPU trials: a GPU node's CPUs split among the
    # trials its cards hold; or a number > 0
    gpus_per_trial: Any = "auto"  # auto = 1/4 of a card when the cluster has GPUs (fewer per card when the
    # node lacks the CPUs), else 0; or 1/k (k trials per card), or whole cards
    max_concurrent_trials: int | None = None  # null = as many as the resources allow
    max_failures: int = 3  # restarts of a failed trial (dead node or process, or an error), each
    # from its last checkpoint; -1 = no limit, 0 = none


@dataclass
class RayConfig:
    address: str | None = None  # null = start a local Ray; auto or ray://host:port joins a cluster
    num_cpus: int | None = None  # local Ray only: CPUs to use (null = all)
    shared_storage: bool = False  # workdir and storage_path are folders every node mounts at the same path
    # (NFS, ...): lets a multi-node cluster use them (network mounts are known)


@dataclass
class MlflowConfig:
    tracking_uri: str = "sqlite:///./runs/mlflow.db"


@dataclass
class BudgetConfig:
    """Hard deployment budgets (any subset; null = no limit): constraints of the search, not objectives."""

    max_macs: float | None = None  # MACs per clip of the trained (pruned) model
    max_params: float | None = None  # parameters of the trained model
    max_kb: float | None = None  # parameter memory in kB at budget.precision (DCASE: int8 = 1 byte)
    precision: Precision = Precision.int8  # int8 (1 byte per parameter) | fp16 (2) | fp32 (4)
    screen: bool = True  # reject suggestions known to break a budget before they train


@dataclass
class RetrainConfig:
    """The retrain stage: the search's front configurations retrained longer, with seeds, and scored on test."""

    enabled: bool = True  # false: stop after the search
    max_configs: int = 3  # front configurations retrained, spread over the front's MACs range
    epochs: int = 15  # epochs of each retraining run (the search's trials run 10)
    seeds: int = 3  # seeds per configuration: train.seed = seed, seed+1, ...
    # also retrain each config with KD toggled, with the other pruning mode and (pruned ones) as a dense student of
    # about the same MACs (dense_same_macs)
    ablations: bool = True
    export: bool | None = None  # then ONNX + int8 + CPU latency of the retrained front (analysis/export.py
    # trial=retrained); null = only when a budget is set


@dataclass
class SweepConfig(RunConfig):
    """sweeps/run.py: the run config plus the sweep's own keys (never passed to trials)."""

    space: str = "kd_prune"  # search_spaces/<space>.yaml or a path
    num_samples: int | None = None  # trials; null = 50 (searcher spaces) or 1 pass over the grid
    name: str | None = None  # sweep name; null = <space>-<timestamp>
    resume: bool = False  # true + name=<sweep>: continue an interrupted sweep
    storage_path: str = "./runs/ray_results"  # local dir or any pyarrow filesystem URI Ray accepts
    search: SearchConfig = field(default_factory=SearchConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    stage: Stage = Stage.search  # search (then retrain when retrain.enabled) | retrain: retrain
    # name=<sweep>'s front
    retrain: RetrainConfig = field(default_factory=RetrainConfig)


@dataclass
class ObjectivesConfig:
    third_objective: str | None = None  # null (accuracy vs MACs) | params | latency (measured by export.py)


@dataclass
class EvalConfig:
    extra: list[str] = field(default_factory=list)  # evaluate.py: extra NSynth-layout split folders to score
    batch_size: int = 64


@dataclass
class ExportConfig:
    opset: int = 17  # ONNX opset (>= 17)
    tolerance: float = 1.0e-3  # max |ONNX Runtime - PyTorch| allowed on the parity check


@dataclass
class QuantConfig:
    """Post-training int8 quantization of the exported front models (analysis/export.py)."""

    enabled: bool = True  # also write and check an int8 model next to each fp32 one
    calibration_clips: int = 256  # train-split clips used to calibrate activation ranges
    qat_epochs: int = 0  # > 0: the int8 model comes from a quantization-aware fine-tune first
    qat_lr: float = 1.0e-4  # its AdamW learning rate (cosine to 0)


@dataclass
class LatencyConfig:
    """ONNX Runtime CPU latency of the exported models, batch 1."""

    warmup: int = 10  # runs discarded before timing
    runs: int = 100  # timed runs; median and p90 are reported


@dataclass
class FidelityConfig:
    """benchmarks/search_fidelity.py: how far the search's signals can be trusted."""

    # > 0: also run (or reuse) <sweep>-fifo<n>, n trials of the sweep's space and settings that stop nothing, to
    # measure the rung fidelity without selection bias and replay the scheduler on its curves; 0 = skip
    fifo_samples: int = 20
    seed_spread: bool = True  # retrain the best trial with 3 seeds (the seed noise of one config)


@dataclass
class AnalysisConfig(RunConfig):
    """analysis/*.py: the run config plus the analysis keys."""

    name: Any = None  # sweep under storage_path; a list [a,b] overlays sweeps
    path: Any = None  # or the sweep folder itself; a list overlays
    storage_path: str = "./runs/ray_results"
    objectives: ObjectivesConfig = field(default_factory=ObjectivesConfig)
    trial: Any = "front"  # evaluate.py / export.py: front | retrained | all | <trial_id>
    # | [<id>, ...]
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)


RUN_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RunConfig))


def run_section(config: Mapping[str, Any]) -> dict[str, Any]:
    """The RunConfig part of a composed sweep/analysis config: what trials, MLflow params and checkpoints see."""
    return {key: config[key] for key in RUN_KEYS if key in config}


PATH_KEYS: tuple[str, ...] = ("workdir", "data.root", "storage_path", "resume_from", "eval.extra", "path")
"""Config keys that hold local paths (a string or a list of them). Made absolute on the driver: Ray Tune runs each
trial with its own working directory, where a relative path points into Ray's per-trial folder. The teacher's
files (teacher.pretrained, teacher.checkpoint, hf:<folder>, and the same in teacher.members) are made absolute too."""


def _absolute(value: Any) -> Any:
    if isinstance(value, list):
        return [_absolute(v) for v in value]
    if not isinstance(value, str) or not value or "://" in value:
        return value  # null, or a URI (s3://, gs://, file://) that is not relative to anything here
    return str(Path(value).expanduser().resolve())


def _absolute_teacher(teacher: Mapping[str, Any]) -> dict[str, Any]:
    """A teacher (or member) spec with its local files absolute: a weights file in `pretrained` or `checkpoint`,
    a saved Hugging Face folder in `name=hf:<folder>` (a hub id that is no local folder stays as it is)."""
    out = dict(teacher)
    if out.get("pretrained") not in (None, "none", "imagenet"):
        out["pretrained"] = _absolute(out["pretrained"])
    if "checkpoint" in out:
        out["checkpoint"] = _absolute(out["checkpoint"])
    name = out.get("name")
    if isinstance(name, str) and name.startswith("hf:") and Path(name[3:]).expanduser().exists():
        out["name"] = "hf:" + _absolute(name[3:])
    return out


def absolute_paths(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config with every local path (PATH_KEYS, the teacher's files) absolute, and a relative SQLite MLflow
    store made absolute."""
    out = dict(config)
    for key in PATH_KEYS:
        head, _, tail = key.partition(".")
        if tail and isinstance(out.get(head), Mapping) and tail in out[head]:
            out[head] = {**out[head], tail: _absolute(out[head][tail])}
        elif not tail and key in out:
            out[key] = _absolute(out[key])
    if isinstance(out.get("teacher"), Mapping):
        teacher = _absolute_teacher(out["teacher"])
        if isinstance(teacher.get("members"), list):
            teacher["members"] = [_absolute_teacher(m) if isinstance(m, Mapping) else m for m in teacher["members"]]
        out["teacher"] = teacher
    uri = (out.get("mlflow") or {}).get("tracking_uri")
    if isinstance(uri, str) and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        out["mlflow"] = {**out["mlflow"], "tracking_uri": f"sqlite:///{_absolute(uri[len('sqlite:///') :])}"}
    return out


# Names a saved sweep may still use. The retrain stage was `stage=final` with its settings under `final.*`, and its
# runs' label (today `origin.front_trial`, `origin.role`) was `retrain.*`.
OLD_RETRAIN_STAGE = "final"
OLD_ORIGIN_SECTION = "retrain"


def upgrade_saved_point(params: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's sampled keys as saved by an earlier version, in today's keys (`retrain.role` -> `origin.role`)."""
    prefix = f"{OLD_ORIGIN_SECTION}."
    return {(f"origin.{key[len(prefix) :]}" if key.startswith(prefix) else key): value for key, value in params.items()}


def upgrade_saved_settings(sweep: Mapping[str, Any]) -> dict[str, Any]:
    """A sweep's saved settings (sweep_config.json "sweep") in today's keys: `final.*` became `retrain.*` and
    `stage=final` `stage=retrain`."""
    settings = dict(sweep)
    if OLD_RETRAIN_STAGE in settings:
        settings[Stage.retrain.value] = settings.pop(OLD_RETRAIN_STAGE)
    if settings.get("stage") == OLD_RETRAIN_STAGE:
        settings["stage"] = Stage.retrain.value
    if Stage.retrain.value not in settings:  # saved before the retrain stage existed: such a sweep never retrained
        settings[Stage.retrain.value] = {"enabled": False}
    settings.setdefault("scheduler", {"name": "fifo"})  # the first sweeps, before schedulers, ran every trial out
    return _with_defaults(settings, sweep_defaults())  # keys added since (budget.*, scheduler.metric, ...)


@functools.lru_cache(maxsize=1)
def _sweep_defaults() -> str:
    from omegaconf import OmegaConf

    every = OmegaConf.to_container(OmegaConf.structured(SweepConfig), enum_to_str=True)
    run_keys = run_defaults()
    return json.dumps({key: value for key, value in every.items() if key not in run_keys})


def sweep_defaults() -> dict[str, Any]:
    """Every key of a sweep's own settings (SweepConfig minus RunConfig) with its default, as a plain dict."""
    return json.loads(_sweep_defaults())


def upgrade_saved_config(base_config: Mapping[str, Any]) -> dict[str, Any]:
    """A run config saved by an earlier version (a sweep's sweep_config.json), in today's keys, so old sweeps still
    load: `data.soundfont` (one path or null) became the list `data.soundfonts`, datasets before
    `data.variants` had no derived instruments, and the retrain label `retrain.*` is `origin.*`."""
    config = dict(base_config)
    if OLD_ORIGIN_SECTION in config:
        config["origin"] = config.pop(OLD_ORIGIN_SECTION)
    data = dict(config.get("data") or {})
    if "soundfont" in data:
        data["soundfonts"] = [data.pop("soundfont") or "default"]
    data.setdefault("variants", 0)  # every dataset saved without the key was rendered without derived instruments
    config["data"] = data
    teacher = dict(config.get("teacher") or {})
    if teacher and "pretrained" not in teacher:  # before teacher.pretrained, freeze=true only meant "a fixed target"
        teacher["freeze"] = False
        config["teacher"] = teacher
    return absolute_paths(_with_defaults(config, run_defaults()))  # relative paths: relative to where it resumes


@functools.lru_cache(maxsize=1)
def _run_defaults() -> str:
    from omegaconf import OmegaConf

    return json.dumps(OmegaConf.to_container(OmegaConf.structured(RunConfig), enum_to_str=True))


def run_defaults() -> dict[str, Any]:
    """Every RunConfig key with its default, as a plain dict."""
    return json.loads(_run_defaults())


def _with_defaults(config: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """`config` with every key it lacks (a key added after it was saved) taken from `defaults`, recursively."""
    out = dict(config)
    for key, default in defaults.items():
        if key not in out:
            out[key] = default
        elif isinstance(default, Mapping) and isinstance(out[key], Mapping) and default:
            out[key] = _with_defaults(out[key], default)
    return out


def register() -> None:
    """Put the schemas into Hydra's ConfigStore; conf/*.yaml name them first in their defaults lists."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="run_schema", node=RunConfig)
    store.store(name="sweep_schema", node=SweepConfig)
    store.store(name="analysis_schema", node=AnalysisConfig)


def available_scenarios() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "scenario").glob("*.yaml"))


def accepted_values() -> dict[str, tuple[Any, ...]]:
    """Dotted key -> the values the code accepts, read off the schema's enum and bool fields (+ scenarios)."""
    import typing

    out: dict[str, tuple[Any, ...]] = {"scenario": tuple(available_scenarios())}

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            inner = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
            kind = inner[0]
            if dataclasses.is_dataclass(kind):
                walk(kind, f"{prefix}{f.name}.")
            elif isinstance(kind, type) and issubclass(kind, enum.Enum):
                out[f"{prefix}{f.name}"] = values(kind)
            elif kind is bool:
                out[f"{prefix}{f.name}"] = (True, False)

    walk(RunConfig, "")
    out["features.normalize"] = values(Normalize)
    return out


register()
