"""Clips/s of the batched, cached log-mel pipeline vs the seed's per-item DataLoader.

Baseline (seed style): a Dataset that reads one wav per item with soundfile, trims it to the
clip length and runs torchaudio's MelSpectrogram + log, in DataLoader workers.
Pipeline: trainable.features.pipeline.FeaturePipeline over a waveform array (what data_prep caches),
first epoch building the log-mel cache, later epochs slicing it and applying SpecAugment on
the device. Both use the same synthetic clips on the same machine in one run.

    python benchmarks/features.py [--clips N --epochs E --device cpu|cuda]

The last line is `ratio=<steady-state pipeline clips/s / steady-state baseline clips/s>`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio
from torch.utils.data import DataLoader, Dataset

from common.config import FeatureConfig, run_defaults
from trainable.features.pipeline import FeaturePipeline

NUM_CLASSES = 11


class WavLogMelDataset(Dataset):
    """The seed's loader: one wav read + STFT per item."""

    def __init__(self, paths: list[Path], labels: np.ndarray, cfg: FeatureConfig, clip_samples: int) -> None:
        self.paths = paths
        self.labels = labels
        self.clip_samples = clip_samples
        self.log_floor = cfg.log_floor
        self.melspec = torchaudio.transforms.MelSpectrogram(
            sample_rate=cfg.sample_rate,
            n_fft=cfg.n_fft,
            hop_length=cfg.hop_length,
            f_min=cfg.f_min,
            f_max=cfg.f_max,
            n_mels=cfg.n_mels,
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        audio, _ = sf.read(self.paths[index], dtype="float32")
        waveform = torch.from_numpy(audio[: self.clip_samples])
        return self.melspec(waveform).clamp_min(self.log_floor).log().unsqueeze(0), int(self.labels[index])


def write_synthetic_wavs(folder: Path, clips: int, wav_samples: int, sample_rate: int) -> tuple[list[Path], np.ndarray]:
    """Decaying harmonic notes plus noise, 16-bit PCM like NSynth."""
    rng = np.random.default_rng(0)
    t = np.arange(wav_samples) / sample_rate
    labels = rng.integers(0, NUM_CLASSES, size=clips)
    paths = []
    for index in range(clips):
        pitch = rng.uniform(50, 2000)
        note = sum(np.sin(2 * np.pi * pitch * harmonic * t) / harmonic for harmonic in (1, 2, 3))
        audio = 0.3 * note * np.exp(-t * rng.uniform(0.5, 3)) + 0.005 * rng.standard_normal(wav_samples)
        path = folder / f"clip{index:05d}.wav"
        sf.write(path, audio.astype(np.float32), sample_rate, subtype="PCM_16")
        paths.append(path)
    return paths, labels


def timed_epoch(batches: Iterable, device: torch.device) -> float:
    start = time.perf_counter()
    for _ in batches:
        pass
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per method; steady state averages epochs 2..E")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="baseline DataLoader workers")
    parser.add_argument("--wav-seconds", type=float, default=4.0, help="length of the wavs on disk (NSynth: 4 s)")
    parser.add_argument("--clip-seconds", type=float, default=1.0, help="length both methods trim clips to")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads in this process (Ray Tune runs a 1-CPU trial with OMP_NUM_THREADS=1; "
        "DataLoader workers always use 1)",
    )
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be >= 2: epoch 1 builds the cache, later ones measure the steady state")

    torch.set_num_threads(args.threads)
    cfg = FeatureConfig()
    device_data_share = run_defaults()["train"]["device_data_share"]
    device = torch.device(args.device)
    clip_samples = int(args.clip_seconds * cfg.sample_rate)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        wav_samples = int(args.wav_seconds * cfg.sample_rate)
        paths, labels = write_synthetic_wavs(tmp_dir, args.clips, wav_samples, cfg.sample_rate)

        dataset = WavLogMelDataset(paths, labels, cfg, clip_samples)
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers)
        baseline = [timed_epoch((features.to(device) for features, _ in loader), device) for _ in range(args.epochs)]

        # data_prep's one-off job, outside both timings: the trimmed waveform array.
        start = time.perf_counter()
        waveforms = np.stack([sf.read(path, dtype="float32", frames=clip_samples)[0] for path in paths])
        waveform_array_s = time.perf_counter() - start

        generator = torch.Generator().manual_seed(0)
        pipeline = FeaturePipeline(waveforms, labels, "bench", cfg, device, tmp_dir / "features", device_data_share)
        pipeline_epochs = [
            timed_epoch(pipeline.batches(args.batch_size, train=True, generator=generator), device)
            for _ in range(args.epochs)
        ]

        # Waveform augmentation forces the log-mel per batch: batching without the cache.
        noisy_cfg = FeatureConfig(noise_snr_db=30.0)
        uncached = FeaturePipeline(
            waveforms, labels, "bench", noisy_cfg, device, tmp_dir / "features", device_data_share
        )
        uncached_s = timed_epoch(uncached.batches(args.batch_size, train=True, generator=generator), device)

    def clips_per_s(seconds: float) -> float:
        return args.clips / seconds

    baseline_steady = clips_per_s(float(np.mean(baseline[1:])))
    pipeline_steady = clips_per_s(float(np.mean(pipeline_epochs[1:])))
    print(f"device={device} torch_threads={torch.get_num_threads()} clips={args.clips} batch={args.batch_size}")
    print(
        f"baseline (per-item wav + MelSpectrogram, {args.workers} workers): "
        f"first epoch {clips_per_s(baseline[0]):.0f} clips/s, steady {baseline_steady:.0f} clips/s"
    )
    print(f"pipeline first epoch (builds log-mel cache): {clips_per_s(pipeline_epochs[0]):.0f} clips/s")
    print(f"pipeline steady (cache hit + SpecAugment on {device}): {pipeline_steady:.0f} clips/s")
    print(f"pipeline with waveform augmentation (batched log-mel, no cache): {clips_per_s(uncached_s):.0f} clips/s")
    print(f"waveform array (data_prep's one-off job, untimed above): {clips_per_s(waveform_array_s):.0f} clips/s")
    print(f"first_epoch_ratio={baseline[0] / pipeline_epochs[0]:.1f}")
    print(f"ratio={pipeline_steady / baseline_steady:.1f}")


if __name__ == "__main__":
    main()
