"""Quantization-aware fine-tuning (QAT): a few epochs with int8 arithmetic simulated, so that the weights settle where
the int8 grid of analysis/quantize.py puts them before ONNX Runtime quantizes the model.

What is simulated, and why it matches what ships:

* every Conv2d/Linear weight is fake-quantized the way ONNX Runtime's quantizer does it for symmetric QInt8 weights
  (per output channel, values in [-127, 127], scale = max|w| / 127 from the current weights, every step; see
  onnxruntime.quantization.quant_utils.ONNX_INT_TYPE_SYMMETRIC_RANGE). ONNX Runtime folds BatchNorm into the
  convolution before quantizing; folding multiplies each output channel by one constant, and a symmetric per-channel
  grid scales with it, so the grid simulated here on the unfolded weight is the one that ships;
* the input of every Conv2d/Linear is fake-quantized to 8 bits per tensor with PyTorch's own `FakeQuantize`
  (moving-average min/max observer), the activations whose rounding costs accuracy.

Gradients pass the rounding straight through (PyTorch's fake-quantize ops). The fine-tune minimises cross-entropy on
the train split's labels (no teacher), AdamW at `lr` with cosine decay to zero; weights that are exactly zero
(unstructured pruning) stay zero. Afterwards the simulation is removed
and the model is an ordinary fp32 model again, with the fine-tuned weights: analysis/export.py exports it and ONNX
Runtime's static quantizer (calibrated as without QAT) writes the int8 model from it.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver
from torch.nn.utils import parametrize

from trainable.features.pipeline import FeaturePipeline

log = logging.getLogger(__name__)

WEIGHT_QMIN, WEIGHT_QMAX = -127, 127  # ONNX Runtime's symmetric QInt8 weight range


class PerChannelWeightFakeQuant(nn.Module):
    """Parametrization of a weight (output channels on axis 0): int8, per channel, symmetric, scale from now."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        absmax = weight.detach().abs().flatten(1).amax(1).clamp_min(1e-12)
        scale = absmax / WEIGHT_QMAX
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(weight, scale, zero_point, 0, WEIGHT_QMIN, WEIGHT_QMAX)


def quantized_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@contextlib.contextmanager
def simulated_int8(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, `model` computes with fake-quantized weights and layer inputs; on exit it is plain fp32
    again, keeping what training did to its (latent, unrounded) weights."""
    layers = quantized_layers(model)
    handles = []
    try:
        for layer in layers:
            parametrize.register_parametrization(layer, "weight", PerChannelWeightFakeQuant())
            fake_quant = FakeQuantize(
                observer=MovingAverageMinMaxObserver,
                quant_min=0,
                quant_max=255,
                dtype=torch.quint8,
                qscheme=torch.per_tensor_affine,
            ).to(layer.weight.device)
            layer.add_module("input_fake_quant", fake_quant)
            handles.append(
                layer.register_forward_pre_hook(lambda mod, args: (mod.input_fake_quant(args[0]), *args[1:]))
            )
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for layer in layers:
            if parametrize.is_parametrized(layer, "weight"):
                parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
            if hasattr(layer, "input_fake_quant"):
                del layer.input_fake_quant


def qat_finetune(
    model: nn.Module, pipeline: FeaturePipeline, epochs: int, lr: float, batch_size: int, seed: int
) -> list[dict[str, Any]]:
    """Fine-tune `model` in place for `epochs` epochs under simulated int8; returns per-epoch train loss/accuracy."""
    if epochs < 1:
        raise ValueError(f"quant.qat_epochs={epochs}: QAT needs at least 1 epoch")
    generator = torch.Generator().manual_seed(seed)
    # unstructured pruning's zeros stay zero: masks of the layers that have any, on the very Parameters that the
    # parametrization trains (it keeps the original tensor as `parametrizations.weight.original`)
    pruned = [(layer.weight, layer.weight == 0) for layer in quantized_layers(model) if (layer.weight == 0).any()]
    batch_size = min(batch_size, len(pipeline))
    total_steps = max(1, epochs * pipeline.num_batches(batch_size, drop_last=True))
    history, step = [], 0
    with simulated_int8(model):
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        for epoch in range(1, epochs + 1):
            model.train()
            loss_sum, correct, seen = 0.0, 0, 0
            for batch in pipeline.batches(batch_size, train=True, generator=generator, drop_last=True):
                for group in optimizer.param_groups:
                    group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
                logits = model(batch.features)
                loss = F.cross_entropy(logits, batch.labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    for weight, zero in pruned:
                        weight.masked_fill_(zero, 0.0)
                step += 1
                loss_sum += loss.item() * len(batch.labels)
                correct += int((logits.argmax(1) == batch.labels).sum())
                seen += len(batch.labels)
            if not math.isfinite(loss_sum):
                raise FloatingPointError(f"non-finite loss in QAT epoch {epoch}: lower quant.qat_lr")
            history.append({"epoch": epoch, "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1)})
            log.info(
                "QAT epoch %d/%d  train_loss %.3f  train_acc %.3f",
                epoch,
                epochs,
                history[-1]["train_loss"],
                history[-1]["train_acc"],
            )
    model.eval()
    return history
