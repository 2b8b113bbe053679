"""Scoring a model on a whole split, the same way for training runs, the teacher and the analysis scripts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.config import FeatureConfig
from data_prep.waveform_cache import WaveformData
from trainable.features.pipeline import FeaturePipeline
from trainable.metrics import accuracy, macro_f1


def make_pipeline(
    data: WaveformData,
    split: str,
    feats: FeatureConfig,
    device: torch.device,
    workdir: str | Path,
    device_data_share: float,
) -> FeaturePipeline:
    """Batches of one split; its log-mel cache (<workdir>/cache/features, `workdir` absolute) is shared by every
    run with the same data + feature config. `device_data_share` (train.device_data_share): of the GPU, for this
    split's data."""
    part = data.splits[split]
    return FeaturePipeline(
        part.waveforms,
        part.labels,
        f"{data.fingerprint}-{split}",
        feats,
        device,
        Path(workdir) / "cache" / "features",
        device_data_share=device_data_share,
    )


def amp_settings(device: torch.device) -> tuple[bool, torch.dtype]:
    """AMP on CUDA (bf16 where supported, else fp16 with a grad scaler); plain fp32 on CPU."""
    if device.type != "cuda":
        return False, torch.float32
    return True, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, pipeline: FeaturePipeline, batch_size: int, num_classes: int, amp: tuple[bool, torch.dtype]
) -> dict[str, float]:
    """Loss, accuracy and macro-F1 on a whole split (metrics on all predictions, not per-batch means).

    Predictions stay on the device until the end: one host synchronisation per split, not per batch. Macro-F1
    averages over the classes the split holds (`classes` says how many).
    """
    model.eval()
    loss, preds, labels = torch.zeros((), device=pipeline.device), [], []
    for batch in pipeline.batches(batch_size, train=False):
        with torch.autocast(pipeline.device.type, dtype=amp[1], enabled=amp[0]):
            logits = model(batch.features)
        loss += F.cross_entropy(logits.float(), batch.labels, reduction="sum")
        preds.append(logits.argmax(1))
        labels.append(batch.labels)
    y_pred, y_true = torch.cat(preds).cpu().numpy(), torch.cat(labels).cpu().numpy()
    present = np.unique(y_true)
    return {
        "loss": loss.item() / len(y_true),
        "acc": accuracy(y_true, y_pred),
        "macro_f1": macro_f1(y_true, y_pred, num_classes, labels=present),
        "classes": len(present),
    }
