"""Feature transforms as torch modules: log-mel with per-clip standardisation, and the train-time augmentations."""

from __future__ import annotations

import torch
import torchaudio
from torch import nn

from common.config import NORMALIZE_EPS, FeatureConfig


def _standardise(logmel: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-clip standardisation: needs no dataset statistics, so each feature config's cache stands alone."""
    if mode == "none":
        return logmel
    dims = (-1,) if mode == "per_band" else (-2, -1)
    std, mean = torch.std_mean(logmel, dim=dims, correction=0, keepdim=True)
    return (logmel - mean) / (std + NORMALIZE_EPS)


class LogMel(nn.Module):
    """(B, T) waveforms -> (B, 1, n_mels, frames) normalised log-mel, on whatever device the module is on."""

    def __init__(self, cfg: FeatureConfig) -> None:
        super().__init__()
        self.log_floor = cfg.log_floor
        self.normalize = cfg.normalize
        self.melspec = torchaudio.transforms.MelSpectrogram(
            sample_rate=cfg.sample_rate,
            n_fft=cfg.n_fft,
            hop_length=cfg.hop_length,
            f_min=float(cfg.f_min),
            f_max=float(cfg.f_max),
            n_mels=cfg.n_mels,
            power=2.0,
        )

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        if waveforms.ndim != 2:
            raise ValueError(f"LogMel expects (batch, samples) waveforms, got shape {tuple(waveforms.shape)}")
        logmel = self.melspec(waveforms).clamp_min(self.log_floor).log()
        return _standardise(logmel, self.normalize).unsqueeze(1)


class SpecAugment(nn.Module):
    """Per-example frequency and time masks, applied in train mode only (identity in eval mode).

    Same mask distribution as torchaudio's `FrequencyMasking`/`TimeMasking` with `iid_masks=True`
    (width uniform in [0, mask_param), start uniform over the rest), but all masks of a batch
    are drawn at once and applied in a single pass: torchaudio rewrites the whole batch once per
    mask, which made masking cost more than slicing the cached features. Masked cells get the
    clip's mean (0 for normalised features), so a mask reads as "average energy", not a loud or
    silent patch. Randomness comes from torch's global RNG on the features' device, so
    `torch.manual_seed` makes it repeatable.
    """

    def __init__(self, cfg: FeatureConfig) -> None:
        super().__init__()
        self.freq_masks = cfg.freq_masks
        self.freq_mask_param = cfg.freq_mask_param
        self.time_masks = cfg.time_masks
        self.time_mask_param = cfg.time_mask_param

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if not self.training or self.freq_masks + self.time_masks == 0:
            return features
        batch, _, n_mels, frames = features.shape
        masked_mels = _random_bands(batch, self.freq_masks, self.freq_mask_param, n_mels, features.device)
        masked_frames = _random_bands(batch, self.time_masks, self.time_mask_param, frames, features.device)
        masked = masked_mels[:, None, :, None] | masked_frames[:, None, None, :]
        return torch.where(masked, features.mean(dim=(-2, -1), keepdim=True), features)


def _random_bands(batch: int, count: int, max_width: int, size: int, device: torch.device) -> torch.Tensor:
    """(batch, size) bool: the union of `count` random bands per example along an axis of length `size`."""
    max_width = min(max_width, size)
    widths = (torch.rand(batch, count, 1, device=device) * max_width).long()
    starts = (torch.rand(batch, count, 1, device=device) * (size - widths)).long()
    positions = torch.arange(size, device=device)
    return ((positions >= starts) & (positions < starts + widths)).any(dim=1)


class WaveformAugment(nn.Module):
    """Random gain (uniform in ±gain_db) and white noise at a fixed SNR, per example, in train mode only."""

    def __init__(self, cfg: FeatureConfig) -> None:
        super().__init__()
        self.gain_db = cfg.gain_db
        self.noise_snr_db = cfg.noise_snr_db

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return waveforms
        batch_shape = (waveforms.shape[0], 1)
        if self.gain_db > 0:
            gain_db = (torch.rand(batch_shape, device=waveforms.device, dtype=waveforms.dtype) * 2 - 1) * self.gain_db
            waveforms = waveforms * 10 ** (gain_db / 20)
        if self.noise_snr_db is not None:
            signal_rms = waveforms.pow(2).mean(dim=-1, keepdim=True).sqrt()
            noise_rms = signal_rms / 10 ** (self.noise_snr_db / 20)
            waveforms = waveforms + torch.randn_like(waveforms) * noise_rms
        return waveforms
