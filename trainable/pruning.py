"""Compression by pruning: structural channel pruning to a MACs target (Torch-Pruning), the mask-only baseline,
and checkpoints for pruned architectures.

Structural pruning goes through Torch-Pruning's dependency graph, which keeps coupled channels consistent
(residual adds, depthwise convs, MobileNetV3's squeeze-excitation rescaling) without per-architecture code.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import thop
import torch
import torch.nn as nn
import torch.nn.utils.prune as torch_prune
import torch_pruning as tp

from common.config import PruningMode, PruningSchedule, values

logger = logging.getLogger(__name__)

PRUNING_MODES: tuple[str, ...] = values(PruningMode)
SCHEDULES: tuple[str, ...] = values(PruningSchedule)
IMPORTANCES: dict[str, Callable[[], tp.importance.Importance]] = {  # keys: common.config.Importance
    "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
    "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
    "taylor": lambda: tp.importance.GroupTaylorImportance(),
    "random": lambda: tp.importance.RandomImportance(),
}
MACS_TOLERANCE = 0.05  # a pruned model must land within this relative error of its MACs target
# Stop searching the pruning ratio once this close: whole channels make MACs move in ~0.5 % steps.
_SEARCH_TOLERANCE = 0.01
_MAX_SEARCH_EVALS = 12
# Above ~0.9 per-layer channel ratio the narrowest layers would hit 0 channels, which Torch-Pruning refuses,
# so MACs stop falling monotonically; targets needing more are reported as unreachable.
_MAX_CHANNEL_PRUNING_RATIO = 0.9


@dataclass(frozen=True)
class PruneStep:
    """Outcome of one structural pruning call; ratios are relative to the unpruned model's MACs."""

    macs: int
    params: int
    macs_ratio_reached: float
    target_macs_ratio: float


def count_macs_params(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """(MACs, params) by thop for one input of `input_shape`, measured on a copy: thop leaves buffers behind."""
    device = next(model.parameters()).device
    return _profile(copy.deepcopy(model), torch.zeros(input_shape, device=device))


def _profile(disposable_model: nn.Module, example_input: torch.Tensor) -> tuple[int, int]:
    disposable_model.eval()
    with torch.no_grad():
        macs, params = thop.profile(disposable_model, inputs=(example_input,), verbose=False)
    return int(macs), int(params)


def pruning_schedule(mode: str, ratio: float, steps: int, schedule: str) -> list[float]:
    """Fractions to keep after each pruning step (fine-tuning goes between steps): of the unpruned MACs, with
    `ratio` = pruning.target_macs_ratio, or of the weights in `unstructured` mode (ratio = pruning.weight_keep_ratio).

    `progressive` follows AGP (Zhu & Gupta 2017): cut hard early while the network has redundancy to spare, gently
    near the target. `unstructured` returns [ratio] (one step): masks do not reduce dense MACs.
    """
    if mode not in PRUNING_MODES:
        raise ValueError(f"unknown pruning mode {mode!r}; choose one of {list(PRUNING_MODES)}")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(
            f"pruning ratio (pruning.target_macs_ratio or pruning.weight_keep_ratio) must be in (0, 1], got {ratio}"
        )
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {list(SCHEDULES)}")
    if mode == "none":
        return []
    if mode in ("single", "unstructured"):
        return [ratio]
    power = 3 if schedule == "cubic" else 1
    keeps = [ratio + (1.0 - ratio) * (1.0 - k / steps) ** power for k in range(1, steps)]
    return keeps + [ratio]


def prune_to_macs(
    model: nn.Module,
    example_input: torch.Tensor,
    base_macs: int,
    target_macs_ratio: float,
    importance: str,
    round_to: int | None,
    calibration: Callable[[nn.Module], torch.Tensor] | None = None,
) -> PruneStep:
    """Channel-prune `model` in place until its MACs are `target_macs_ratio * base_macs` (within MACS_TOLERANCE).

    Torch-Pruning takes a per-layer channel ratio, not a MACs target, so the ratio is searched on deep copies
    (false position, since sqrt(MACs) is nearly linear in it) and the best one is then applied to `model`.
    Calling again on an already pruned model with a smaller `target_macs_ratio` (same `base_macs`) prunes further:
    that is a progressive step. The final Linear (the classifier) keeps its outputs. `calibration(model)`
    must return a loss; it is required for `taylor`, whose scores come from its gradients. Optimizers holding
    the old parameters must be rebuilt afterwards.
    """
    if importance not in IMPORTANCES:
        raise ValueError(f"unknown importance {importance!r}; choose one of {list(IMPORTANCES)}")
    if importance == "taylor" and calibration is None:
        raise ValueError("importance='taylor' needs calibration: a callable returning a loss on a batch")
    if not 0.0 < target_macs_ratio <= 1.0:
        raise ValueError(f"target_macs_ratio must be in (0, 1], got {target_macs_ratio}")
    if base_macs <= 0:
        raise ValueError(f"base_macs must be > 0 (the unpruned model's MACs), got {base_macs}")
    if round_to is not None and round_to < 1:
        raise ValueError(f"round_to must be None or >= 1, got {round_to}")

    target_macs = target_macs_ratio * base_macs
    current_macs, current_params = count_macs_params(model, tuple(example_input.shape))
    if current_macs <= target_macs * (1.0 + _SEARCH_TOLERANCE):
        logger.info("model already at %d MACs, target %.0f; nothing to prune", current_macs, target_macs)
        return PruneStep(current_macs, current_params, current_macs / base_macs, target_macs_ratio)

    def pruned_copy_macs(ratio: float) -> int:
        trial = copy.deepcopy(model)
        # How many channels each layer loses depends on the ratio alone, not on the criterion (which only picks
        # them), so trials use cheap L1 scores: no gradients, no random draws.
        _prune_channels(trial, example_input, ratio, "l1", round_to)
        return _profile(trial, example_input)[0]

    ratio, expected_macs = _search_channel_ratio(pruned_copy_macs, current_macs, target_macs)
    if importance == "taylor":  # in eval mode, so calibration leaves the BN running statistics alone
        was_training = model.training
        model.eval().zero_grad(set_to_none=True)
        calibration(model).backward()
        model.train(was_training)
    _prune_channels(model, example_input, ratio, importance, round_to)
    model.zero_grad(set_to_none=True)
    macs, params = count_macs_params(model, tuple(example_input.shape))
    if macs != expected_macs:
        logger.warning("%s pruning gave %d MACs where the search predicted %d", importance, macs, expected_macs)
    reached = macs / base_macs
    logger.info(
        "pruned %.4f of channels per layer: %d -> %d MACs (keep %.4f of base, target %.4f)",
        ratio,
        current_macs,
        macs,
        reached,
        target_macs_ratio,
    )
    return PruneStep(macs=macs, params=params, macs_ratio_reached=reached, target_macs_ratio=target_macs_ratio)


def _prune_channels(
    model: nn.Module, example_input: torch.Tensor, ratio: float, importance: str, round_to: int | None
) -> None:
    """Remove `ratio` of the channels of every prunable layer group (local, uniform pruning)."""
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError("model has no nn.Linear classifier to protect from pruning")
    was_training = model.training
    model.eval()  # tracing must not update BN running statistics
    pruner = tp.pruner.BasePruner(
        model,
        example_input,
        importance=IMPORTANCES[importance](),
        pruning_ratio=ratio,
        ignored_layers=[linears[-1]],
        round_to=round_to,
    )
    pruner.step()
    model.train(was_training)


def _search_channel_ratio(macs_at: Callable[[float], int], current_macs: int, target_macs: float) -> tuple[float, int]:
    """(ratio, MACs) for the channel pruning ratio closest to `target_macs`. Raises when the model cannot shrink to
    within tolerance of the target; landing further below it (a late progressive step on a narrow model, where
    one channel per layer is already more than the step asks) is kept, with a warning: it only undershoots a budget."""

    def error(macs: float) -> float:  # > 0 while too big; roughly linear in the ratio
        return math.sqrt(macs / target_macs) - 1.0

    low, err_low = 0.0, error(current_macs)
    high, err_high = _MAX_CHANNEL_PRUNING_RATIO, error(current_macs * (1.0 - _MAX_CHANNEL_PRUNING_RATIO) ** 2)
    ratio = min(1.0 - math.sqrt(target_macs / current_macs), _MAX_CHANNEL_PRUNING_RATIO)
    best_ratio, best_macs = 0.0, current_macs
    below: tuple[float, int] | None = None  # the largest model seen under the target
    for _ in range(_MAX_SEARCH_EVALS):
        macs = macs_at(ratio)
        if abs(macs / target_macs - 1.0) < abs(best_macs / target_macs - 1.0):
            best_ratio, best_macs = ratio, macs
        if macs < target_macs and (below is None or macs > below[1]):
            below = (ratio, macs)
        if abs(macs / target_macs - 1.0) <= _SEARCH_TOLERANCE:
            break
        if error(macs) > 0:
            low, err_low = ratio, error(macs)
        else:
            high, err_high = ratio, error(macs)
        if high - low < 1e-4:
            break
        interpolated = low + (high - low) * err_low / (err_low - err_high)
        margin = 0.05 * (high - low)  # keep false position from creeping along one stale bracket end
        ratio = min(max(interpolated, low + margin), high - margin)
    if best_macs / target_macs - 1.0 > MACS_TOLERANCE and below is not None:
        best_ratio, best_macs = below  # still too big unpruned, and the smallest cut passes the target: take the cut
    if best_macs / target_macs - 1.0 < -MACS_TOLERANCE:  # the smallest step prunes past the target: keep it
        logger.warning(
            "pruning to %.0f MACs lands at %d (%.1f%% below): the smallest channel step available overshoots it",
            target_macs,
            best_macs,
            100 * (1 - best_macs / target_macs),
        )
    elif abs(best_macs / target_macs - 1.0) > MACS_TOLERANCE:
        raise ValueError(
            f"cannot prune to {target_macs:.0f} MACs: the closest reachable is {best_macs} "
            f"(channel pruning ratio {best_ratio:.3f}, round_to and the narrowest layers limit it); "
            f"use a larger keep ratio or a smaller round_to"
        )
    return best_ratio, best_macs


def _prunable_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(module, "weight") for module in model.modules() if isinstance(module, (nn.Conv2d, nn.Linear))]


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of conv/linear weights that are exactly zero."""
    weights = _prunable_weights(model)
    zeros = sum(int((module.weight == 0).sum()) for module, _ in weights)
    return zeros / sum(module.weight.numel() for module, _ in weights)


def unstructured_prune(model: nn.Module, amount: float) -> dict[str, torch.Tensor]:
    """Zero the globally smallest-|w| `amount` of conv/linear weights; returns the masks (1 = kept).

    A baseline only: the zeros stay in dense tensors, so MACs (and latency) do not change. The masks must be
    re-applied after every optimizer step (`apply_masks`), or fine-tuning regrows the pruned weights.
    """
    if not 0.0 <= amount < 1.0:
        raise ValueError(f"amount (fraction of weights to zero) must be in [0, 1), got {amount}")
    weights = _prunable_weights(model)
    if not weights:
        raise ValueError("model has no Conv2d/Linear weights to prune")
    torch_prune.global_unstructured(weights, pruning_method=torch_prune.L1Unstructured, amount=amount)
    for module, name in weights:
        torch_prune.remove(module, name)
    return zero_masks(model)


def zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Masks of the non-zero conv/linear weights (how a resumed run recovers its unstructured masks)."""
    return {
        name: (module.weight != 0)
        for name, module in model.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear))
    }


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    for name, module in model.named_modules():
        if name in masks:
            module.weight.mul_(masks[name])


def model_state(model: nn.Module) -> dict:
    """Weights plus pruned layer shapes (tp.state_dict), restricted to types torch.load(weights_only=True) accepts."""
    state = tp.state_dict(model)
    for module_dict in state["full_state_dict"].values():
        for key in [key for key in module_dict if _is_runtime_only(key)]:
            del module_dict[key]
    for name, module in model.named_modules():  # properties are computed, not state (a Hugging Face teacher's have
        attributes = state["attributions"][name]  # no setter, so tp.load_state_dict could not set them back)
        for key in [key for key in attributes if isinstance(inspect.getattr_static(type(module), key, None), property)]:
            del attributes[key]
    return state


def _is_runtime_only(module_attribute: str) -> bool:
    """Child modules come from the fresh model (pickling them is what breaks torch.load(weights_only=True)),
    and hooks belong to whoever registered them; everything else in a module's __dict__ is weights or shapes."""
    return module_attribute == "_modules" or "hook" in module_attribute


def load_model_state(fresh_model: nn.Module, state: dict) -> nn.Module:
    """Reshape a freshly created (unpruned) model of the same arch into the saved pruned one; returns it."""
    saved_names = set(state["full_state_dict"])
    fresh_names = {name for name, _ in fresh_model.named_modules()}
    if saved_names != fresh_names:
        raise ValueError(
            f"state does not fit this model ({len(saved_names ^ fresh_names)} module names differ, "
            f"e.g. {sorted(saved_names ^ fresh_names)[:3]}); create the same arch/width that was saved"
        )
    return tp.load_state_dict(fresh_model, state)
