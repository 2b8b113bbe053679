"""The on-disk log-mel cache: one .npy per (waveforms, deterministic feature params), built once
(common.io.build_once)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common.config import FeatureConfig
from common.io import atomic_path, build_once
from data_prep.waveform_cache import as_float
from trainable.features.transforms import LogMel

log = logging.getLogger(__name__)

# Bump whenever the cached computation changes meaning, so stale cache files are not reused.
_CACHE_FORMAT_VERSION = 1
# Fields that determine the cached log-mel; the augmentation fields do not.
_DETERMINISTIC_FIELDS = ("sample_rate", "n_fft", "hop_length", "n_mels", "f_min", "f_max", "normalize", "log_floor")


def feature_fingerprint(wave_fingerprint: str, cfg: FeatureConfig) -> str:
    """Hex id of the cached log-mel: the waveforms' fingerprint plus every parameter that changes the values."""
    params = {key: getattr(cfg, key) for key in _DETERMINISTIC_FIELDS}
    for key in ("f_min", "f_max", "log_floor"):
        params[key] = float(params[key])  # 20 and 20.0 are the same config
    payload = {"wave": wave_fingerprint, "version": _CACHE_FORMAT_VERSION, **params}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def cached_logmel(
    waveforms: np.ndarray,
    wave_fingerprint: str,
    cfg: FeatureConfig,
    cache_dir: Path | str,
    device: torch.device | str,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Normalised log-mel of every clip, (N, 1, n_mels, frames) float32 on the CPU, memory-mapped from the cache.

    The file is `cache_dir/logmel-<feature_fingerprint>.npy`, built in batches on `device` only
    when missing; `batch_size` defaults to 256 clips on CUDA and 64 on the CPU, where larger STFT
    batches thrash memory (256 measured 1.2-1.8x slower). `waveforms` are the int16 rows of the waveform
    cache. Concurrent callers (sweep trials sharing a feature config, on one node or several sharing the
    workdir) build it once: one writes a temp file and renames it into place, the others wait and read.
    """
    if waveforms.ndim != 2:
        raise ValueError(f"waveforms must be (clips, samples), got shape {waveforms.shape}")
    device = torch.device(device)
    if batch_size is None:
        batch_size = 256 if device.type == "cuda" else 64
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be a positive integer")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"logmel-{feature_fingerprint(wave_fingerprint, cfg)}.npy"
    expected_shape = (waveforms.shape[0], 1, cfg.n_mels, cfg.frames(waveforms.shape[1]))
    if path.exists():
        log.info("log-mel cache hit: %s", path)
    # Trials sharing a feature config start together: one builds, the others (on any node) wait for it and read.
    build_once(
        path,
        lambda target: _build_logmel_cache(waveforms, cfg, target, expected_shape, device, batch_size),
        what=f"the log-mel cache {path.name}",
    )
    # Copy-on-write mapping: shared page cache across trials, and a writable array torch accepts without warnings.
    features = np.load(path, mmap_mode="c")
    if features.shape != expected_shape:
        raise ValueError(
            f"cached log-mel {path} has shape {features.shape} but the waveforms give {expected_shape}: "
            "the wave fingerprint does not identify these waveforms; fix the fingerprint or delete the file"
        )
    return torch.from_numpy(features)


def _build_logmel_cache(
    waveforms: np.ndarray,
    cfg: FeatureConfig,
    path: Path,
    shape: tuple[int, ...],
    device: torch.device,
    batch_size: int,
) -> None:
    log.info("building log-mel cache %s for %d clips on %s", path, shape[0], device)
    with atomic_path(path) as temp_name:
        # Written batch by batch into a memory map, so a large split never needs two copies in RAM.
        out = np.lib.format.open_memmap(temp_name, mode="w+", dtype=np.float32, shape=shape)
        logmel = LogMel(cfg).to(device).eval()
        with torch.inference_mode(), tqdm(total=shape[0], unit="clip", desc="log-mel cache", delay=2.0) as progress:
            for start in range(0, shape[0], batch_size):
                batch = torch.from_numpy(np.array(waveforms[start : start + batch_size])).to(device)
                out[start : start + len(batch)] = logmel(as_float(batch)).cpu().numpy()
                progress.update(len(batch))
        out.flush()
        del out
