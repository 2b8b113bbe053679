"""Teacher front-ends: from waveform rows at the teacher's own sample rate to what its model reads.

A timm teacher reads the project's log-mels (LogMel with teacher.features); a Hugging Face teacher reads its own
AutoFeatureExtractor's output (AST: 128-bin Kaldi fbanks, its own normalisation). `WaveformPipeline` serves an hf
teacher's batches to the training loop and to scoring, and `OnlineTeacherInputs` computes every member's inputs for
the clips of a student's batch (kd.teacher_logits=online), reading only those rows from the waveform memmaps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from common.config import FeatureConfig
from data_prep.waveform_cache import WaveformSplit, as_float
from trainable.features.pipeline import FeatureBatch, batch_count
from trainable.features.transforms import LogMel
from trainable.models import hf_source, is_hf_teacher

Frontend = Callable[[torch.Tensor], torch.Tensor]


class ExtractorFrontend:
    """An hf teacher's AutoFeatureExtractor on a batch: (B, samples) float waveforms -> its input tensor on `device`.

    The extractor works on host numpy arrays clip by clip, so batches go through the CPU whatever the device.
    """

    def __init__(self, source: str, device: torch.device | str) -> None:
        import transformers

        self.extractor = transformers.AutoFeatureExtractor.from_pretrained(source)
        self.input_name = self.extractor.model_input_names[0]
        self.sampling_rate = int(self.extractor.sampling_rate)
        self.device = torch.device(device)

    def __call__(self, waveforms: torch.Tensor) -> torch.Tensor:
        clips = list(waveforms.detach().float().cpu().numpy())
        out = self.extractor(clips, sampling_rate=self.sampling_rate, return_tensors="pt")
        return out[self.input_name].to(self.device, non_blocking=True)


def make_frontend(name: str, features: Mapping[str, Any], device: torch.device | str) -> Frontend:
    """The front-end of a teacher called `name`: its extractor (hf:) or log-mels with `features` (timm)."""
    if is_hf_teacher(name):
        return ExtractorFrontend(hf_source(name), device)
    return LogMel(FeatureConfig.from_mapping(dict(features))).to(device).eval()


class WaveformPipeline:
    """One split's batches for a teacher with its own front-end: rows read from the waveform memmap per batch.

    The same interface as trainable.features.pipeline.FeaturePipeline (batches in clip order for scoring,
    shuffled with the caller's generator for training), so `train` and `evaluate` take either.
    """

    def __init__(self, split: WaveformSplit, frontend: Frontend, device: torch.device | str) -> None:
        self.split = split
        self.frontend = frontend
        self.device = torch.device(device)
        self.labels = torch.as_tensor(np.array(split.labels, dtype=np.int64)).to(self.device)

    def __len__(self) -> int:
        return len(self.split)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One clip's model input, batch dimension included."""
        return tuple(self.frontend(as_float(self.split.waveforms[:1])).shape)

    def prepare(self, train: bool) -> None:
        """Nothing to build ahead: rows are read and featurised per batch."""

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
        order = torch.randperm(len(self), generator=generator) if train else torch.arange(len(self))
        count = min(self.num_batches(batch_size, drop_last), max_batches or math.inf)
        for start in range(0, count * batch_size, batch_size):
            indices = order[start : start + batch_size]
            waves = as_float(self.split.waveforms[indices.numpy()])
            with torch.no_grad():
                features = self.frontend(waves)
            device_indices = indices.to(self.device)
            yield FeatureBatch(features, self.labels[device_indices], device_indices)


class OnlineTeacherInputs:
    """Train-clip indices of a student's batch -> each ensemble member's model input on the device.

    `row_maps[m][i]` is the row of student train clip i in member m's waveform split (matched by note id: a member
    at another sample rate has its own cache); only the batch's rows are read from the memmap and moved.
    """

    def __init__(
        self,
        splits: Sequence[WaveformSplit],
        row_maps: Sequence[np.ndarray],
        frontends: Sequence[Frontend],
        device: torch.device | str,
    ) -> None:
        self.splits, self.row_maps, self.frontends = list(splits), list(row_maps), list(frontends)
        self.device = torch.device(device)

    def __call__(self, indices: torch.Tensor) -> list[torch.Tensor]:
        student_rows = indices.cpu().numpy()
        inputs = []
        for split, row_map, frontend in zip(self.splits, self.row_maps, self.frontends):
            waves = as_float(split.waveforms[row_map[student_rows]])
            inputs.append(frontend(waves.to(self.device, non_blocking=True)))
        return inputs
