"""Per-epoch batches of one split's features on the training device, from the log-mel cache or recomputed."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from common.config import FeatureConfig
from data_prep.waveform_cache import as_float
from trainable.features.cache import cached_logmel
from trainable.features.transforms import LogMel, SpecAugment, WaveformAugment

log = logging.getLogger(__name__)

# Free GPU memory a split may take at most, whatever its share says: the rest is left for the model.
_FREE_MEMORY_SHARE = 0.8


class FeatureBatch(NamedTuple):
    features: torch.Tensor  # (B, 1, n_mels, frames) float32 on the pipeline's device
    labels: torch.Tensor  # (B,) int64 on the device
    indices: torch.Tensor  # (B,) int64 clip indices into the split (e.g. to look up cached teacher logits)


def batch_count(clips: int, batch_size: int, drop_last: bool) -> int:
    """Batches in one epoch over `clips` clips, for every pipeline (log-mel, teachers' own front-ends)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be a positive integer")
    return clips // batch_size if drop_last else math.ceil(clips / batch_size)


class FeaturePipeline:
    """Batches of one split's features, produced on the training device.

    Eval batches, and train batches without waveform augmentation, are slices of the cached
    log-mel; with waveform augmentation, train batches are recomputed from augmented
    waveforms (int16 on disk, converted per batch). SpecAugment is applied to train batches.
    On a GPU a split is moved to the device once when it fits in `device_data_share` of the card
    (a Ray trial's share of it: trials packed on one card must not all claim it); otherwise
    batches are gathered from the memory-mapped cache into pinned memory on a background
    thread, one batch ahead, and copied asynchronously.
    """

    def __init__(
        self,
        waveforms: np.ndarray,
        labels: np.ndarray,
        wave_fingerprint: str,
        cfg: FeatureConfig,
        device: torch.device | str,
        cache_dir: Path | str,
        device_data_share: float,
        cache_batch_size: int | None = None,
    ) -> None:
        if waveforms.ndim != 2:
            raise ValueError(f"waveforms must be (clips, samples), got shape {waveforms.shape}")
        if len(labels) != len(waveforms):
            raise ValueError(f"got {len(labels)} labels for {len(waveforms)} waveforms; they must pair up one to one")
        self.cfg = cfg
        self.device = torch.device(device)
        self.waveforms = waveforms
        self.wave_fingerprint = wave_fingerprint
        self.cache_dir = Path(cache_dir)
        self.cache_batch_size = cache_batch_size
        self.device_data_share = device_data_share
        # a copy: labels may be a read-only memmap
        self.labels = torch.as_tensor(np.array(labels, dtype=np.int64)).to(self.device)
        self.logmel = LogMel(cfg).to(self.device)
        self.waveform_augment = WaveformAugment(cfg)
        self.spec_augment = SpecAugment(cfg)
        self._features: torch.Tensor | None = None
        self._device_waveforms: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.waveforms)

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        return batch_count(len(self), batch_size, drop_last)

    def batches(
        self,
        batch_size: int,
        train: bool,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        max_batches: int | None = None,
    ) -> Iterator[FeatureBatch]:
        """One epoch: shuffled with `generator` (a CPU torch.Generator) and augmented when `train`, else in clip order.

        `drop_last` skips a final partial batch (a batch of one breaks BatchNorm in train mode); `max_batches`
        ends the epoch early (train.steps_per_epoch: a fixed-size epoch drawn from a large split).
        """
        num_batches = min(self.num_batches(batch_size, drop_last), max_batches or math.inf)
        host_order = torch.randperm(len(self), generator=generator) if train else torch.arange(len(self))
        device_order = host_order.to(self.device)
        recompute = train and self.cfg.waveform_augmentation
        source = self._waveforms_source() if recompute else self._features_source()
        source_on_device = source.device.type == self.device.type
        self.waveform_augment.train(train)
        self.spec_augment.train(train)
        starts = range(0, num_batches * batch_size, batch_size)
        if source_on_device:
            rows_per_batch = (source.index_select(0, device_order[start : start + batch_size]) for start in starts)
        else:
            rows_per_batch = _host_batches(source, host_order, starts, batch_size, self.device)
        for start, rows in zip(starts, rows_per_batch):
            indices = device_order[start : start + batch_size]
            with torch.no_grad():
                features = self.logmel(self.waveform_augment(as_float(rows))) if recompute else rows
                features = self.spec_augment(features)
            yield FeatureBatch(features, self.labels[indices], indices)

    def prepare(self, train: bool) -> None:
        """Build or open what this split's batches read (the log-mel cache, or the waveforms) now, not inside the
        first epoch: epoch times and clips/s then measure training."""
        self._waveforms_source() if train and self.cfg.waveform_augmentation else self._features_source()

    def _features_source(self) -> torch.Tensor:
        if self._features is None:
            features = cached_logmel(
                self.waveforms, self.wave_fingerprint, self.cfg, self.cache_dir, self.device, self.cache_batch_size
            )
            self._features = _to_device_if_it_fits(features, self.device, self.device_data_share)
        return self._features

    def _waveforms_source(self) -> torch.Tensor:
        if self._device_waveforms is None:
            with warnings.catch_warnings():
                # Read-only memmaps are fine: every augmentation is out of place, nothing writes to them.
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                waveforms = torch.from_numpy(self.waveforms)  # int16, still memory-mapped
            self._device_waveforms = _to_device_if_it_fits(waveforms, self.device, self.device_data_share)
        return self._device_waveforms


def _host_batches(
    source: torch.Tensor, order: torch.Tensor, starts: range, batch_size: int, device: torch.device
) -> Iterator[torch.Tensor]:
    """Rows of each batch gathered from host memory (a memmap); on a GPU one batch ahead, on a background thread,
    into pinned memory, and copied without blocking."""

    def gather(start: int) -> torch.Tensor:
        rows = source.index_select(0, order[start : start + batch_size])
        return rows.pin_memory() if device.type == "cuda" else rows

    if device.type != "cuda":
        yield from (gather(start) for start in starts)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="prefetch") as pool:
        pending = pool.submit(gather, starts[0]) if len(starts) else None
        for k in range(len(starts)):
            rows = pending.result()
            if k + 1 < len(starts):
                pending = pool.submit(gather, starts[k + 1])
            yield rows.to(device, non_blocking=True)


def _to_device_if_it_fits(tensor: torch.Tensor, device: torch.device, device_data_share: float) -> torch.Tensor:
    """Move a whole split to the GPU once when it fits in `device_data_share` of the card (and in the free memory);
    otherwise it stays in host memory (memory-mapped) and batches are copied."""
    if device.type != "cuda":
        return tensor  # the memmap itself: shared through the page cache, never copied
    free_bytes, total_bytes = torch.cuda.mem_get_info(device)
    budget = min(total_bytes * device_data_share, free_bytes * _FREE_MEMORY_SHARE)
    if tensor.nbytes > budget:
        log.info(
            "split data (%.2f GiB) kept on the host: over this run's %.2f GiB of the GPU (%.0f%% of the "
            "card); batches are prefetched through pinned memory",
            tensor.nbytes / 2**30,
            budget / 2**30,
            100 * device_data_share,
        )
        return tensor
    return tensor.to(device)
