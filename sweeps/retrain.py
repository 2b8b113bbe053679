"""The retrain stage: the search's front configurations trained again, longer and with seeds, scored on test.

A search ranks configurations by validation accuracy after a few epochs, one seed each: good enough to choose
candidates, not to quote. Here up to `retrain.max_configs` front configurations, spread over the front's MACs range,
are retrained for `retrain.epochs` epochs with `retrain.seeds` seeds, and with `retrain.ablations` each also with KD
toggled, with the other structured pruning mode at the same MACs target and, for a pruned configuration, as a
dense (unpruned) student whose width gives about the pruned model's MACs (`dense_same_macs`), so that "does KD
help", "does progressive pruning help" and "does pruning beat training a smaller dense model" have paired answers.
The runs are one more Ray Tune experiment (a grid), in the sweep's folder as `retrain/`, logged to the sweep's MLflow
experiment with tag stage=retrain, resumable like the search.
Each run reports `test_acc` at its last epoch (`train.test_at_end`), so nothing here needs the analysis scripts.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.config import OLD_RETRAIN_STAGE, PruningMode, RetrainRole, Stage
from common.objectives import ACCURACY, MEASURED_MACS, TARGET_MACS, front_mask
from common.trial_table import trial_status
from sweeps.budget import measured_at_end
from trainable.run_config import trial_config

log = logging.getLogger(__name__)

# The experiment name of the retrain stage, under the sweep's own folder: <storage>/<sweep>/retrain/. Sweeps made
# before the stage was renamed have it as <sweep>/final/ (retrain_experiment finds either).
RETRAIN_EXPERIMENT = Stage.retrain.value
STRUCTURED_MODES = (PruningMode.single.value, PruningMode.progressive.value)


@dataclass(frozen=True)
class FrontConfig:
    """A front trial of the search: the keys it sampled, and where it sits on the front."""

    trial_id: str
    params: dict[str, Any]
    target_macs: float
    val_acc: float
    macs: float | None = None  # measured MACs of its pruned model, once its pruning was done (else None)


def sampled_keys(trial_params: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's sampled dotted keys, whether a searcher drew them or a grid point carried them."""
    params = {k: v for k, v in trial_params.items() if k != "grid_point"}
    return params | dict(trial_params.get("grid_point", {}))


def retrain_experiment(has_experiment: Callable[[str], bool]) -> str:
    """The name of the sweep's retrain experiment: `retrain`, or `final` for a sweep that has only that one (made
    before the rename). `has_experiment(name)`: whether the sweep's folder holds that experiment."""
    if not has_experiment(RETRAIN_EXPERIMENT) and has_experiment(OLD_RETRAIN_STAGE):
        return OLD_RETRAIN_STAGE
    return RETRAIN_EXPERIMENT


def check_retrain_settings(settings: Mapping[str, Any]) -> None:
    """The retrain settings the schema's types cannot check, refused before any data or teacher work."""
    for key in ("seeds", "epochs", "max_configs"):
        if settings[key] < 1:
            raise ValueError(
                f"retrain.{key}={settings[key]} must be >= 1 (or retrain.enabled=false to skip retraining)."
            )


def front_configs(results: Iterable[Any], base_config: Mapping[str, Any]) -> list[FrontConfig]:
    """The search's front (val_acc up, target MACs down; over-budget results excluded, as everywhere: see
    common.objectives.front_mask) among the trials of Tune's ResultGrid that reported a result and did not error
    (common.trial_table.trial_status, as the analysis reads them), ordered by MACs."""
    usable = [
        r
        for r in results
        if r.metrics
        and ACCURACY in r.metrics
        and trial_status(r.metrics["epoch"], trial_config(base_config, r.config)["train"]["epochs"], bool(r.error))
        != "errored"
    ]
    on_front = front_mask([r.metrics for r in usable]) if usable else []
    front = [
        FrontConfig(
            trial_id=str(r.metrics["trial_id"]),
            params=sampled_keys(r.config),
            target_macs=float(r.metrics[TARGET_MACS]),
            val_acc=float(r.metrics[ACCURACY]),
            macs=float(r.metrics[MEASURED_MACS]) if pruning_done(r.metrics) else None,
        )
        for r, on in zip(usable, on_front)
        if on
    ]
    return sorted(front, key=lambda c: (c.target_macs, -c.val_acc))


def pruning_done(metrics: Mapping[str, Any]) -> bool:
    """Whether a result's measured `macs` are those of the trial's pruned model (its last pruning step is done)."""
    return MEASURED_MACS in metrics and measured_at_end(metrics, metrics.get("epoch", 0), math.inf)


def spread(front: Sequence[FrontConfig], max_configs: int) -> list[FrontConfig]:
    """At most `max_configs` configurations spread evenly over the front's MACs range (ends included)."""
    if len(front) <= max_configs:
        return list(front)
    picks = sorted({int(round(i)) for i in np.linspace(0, len(front) - 1, max_configs)})
    return [front[i] for i in picks]


def ablations(config: Mapping[str, Any], base_pruning: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Role -> the keys that turn a front configuration (its effective run config) into its KD and pruning-mode
    ablations (dense_same_macs: `dense_role`).

    kd_toggled flips kd.enabled. pruning_toggled swaps single <-> progressive at the same target_macs_ratio (so
    the same MACs): progressive takes the base config's steps/step_epochs/schedule from the search's first pruning
    epoch on; single prunes once at that epoch. Only structured modes have a pruning counterpart.
    """
    roles = {RetrainRole.kd_toggled.value: {"kd.enabled": not config["kd"]["enabled"]}}
    mode = config["pruning"]["mode"]
    if mode in STRUCTURED_MODES:
        other = {"pruning.mode": STRUCTURED_MODES[1 - STRUCTURED_MODES.index(mode)]}
        if other["pruning.mode"] == PruningMode.progressive.value:
            other |= {f"pruning.{k}": base_pruning[k] for k in ("steps", "step_epochs", "schedule")}
        roles[RetrainRole.pruning_toggled.value] = other
    return roles


# width_mult resolution of the dense_same_macs search: torchvision rounds channel counts to multiples of 8, so
# finer widths give the same network.
WIDTH_STEP = 0.001


@dataclass(frozen=True)
class DenseWidth:
    """The unpruned student closest in MACs to a pruned configuration's model."""

    width_mult: float
    macs: int  # its MACs (thop, on the configuration's input shape)
    target_macs: float  # the pruned model's MACs it was matched to

    @property
    def gap(self) -> float:
        """Relative MACs difference, dense minus pruned, over the pruned model's MACs."""
        return self.macs / self.target_macs - 1.0


def dense_width(config: Mapping[str, Any], target_macs: float) -> DenseWidth:
    """The width_mult (a multiple of WIDTH_STEP, at most the configuration's own) whose unpruned student has the MACs
    closest to `target_macs`, on the configuration's input shape: MACs only grow with the width, so a bisection over
    the allowed widths finds the two on either side of the target, and the closer one wins."""
    import torch

    from trainable.models import create_student
    from trainable.pruning import count_macs_params

    student, data = config["student"], config["data"]
    frames = int(round(data["clip_seconds"] * data["sample_rate"])) // config["features"]["hop_length"] + 1
    shape = (1, 1, config["features"]["n_mels"], frames)
    measured: dict[int, int] = {}

    def macs_at(steps: int) -> int:
        if steps not in measured:
            model = create_student(student["arch"], steps * WIDTH_STEP, len(data["families"]), student["dropout"])
            measured[steps] = count_macs_params(model, shape)[0]
        return measured[steps]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a dozen small models: one thread is faster than contending for the driver's cores
    try:
        low, high = 1, max(1, round(student["width_mult"] / WIDTH_STEP))
        if macs_at(low) < target_macs <= macs_at(high):
            while high - low > 1:  # macs_at(low) < target <= macs_at(high)
                middle = (low + high) // 2
                low, high = (middle, high) if macs_at(middle) < target_macs else (low, middle)
        steps = min((low, high), key=lambda k: abs(macs_at(k) - target_macs))
    finally:
        torch.set_num_threads(threads)
    return DenseWidth(round(steps * WIDTH_STEP, 3), macs_at(steps), float(target_macs))


def dense_role(front: FrontConfig, config: Mapping[str, Any]) -> dict[str, Any]:
    """The keys that make a structured-pruned front configuration its dense_same_macs ablation: no pruning, at the
    width whose MACs are closest to the pruned model's (measured by the search when its pruning was done, else the
    schedule's target); said in the log, with a warning when no width lands within the pruner's own tolerance."""
    from trainable.pruning import MACS_TOLERANCE

    choice = dense_width(config, front.macs or front.target_macs)
    message = (
        f"front trial {front.trial_id}: {RetrainRole.dense_same_macs.value} at student.width_mult="
        f"{choice.width_mult:g}: {choice.macs / 1e6:.3f}M MACs against the pruned model's "
        f"{choice.target_macs / 1e6:.3f}M ({100 * choice.gap:+.1f} %)"
    )
    if abs(choice.gap) > MACS_TOLERANCE:
        log.warning(
            "%s: the closest width_mult allows, outside the pruner's +-%g %% tolerance", message, 100 * MACS_TOLERANCE
        )
    else:
        log.info(message)
    return {"pruning.mode": PruningMode.none.value, "student.width_mult": choice.width_mult}


def retrain_points(
    configs: Sequence[FrontConfig], base_config: Mapping[str, Any], settings: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """The grid of the retrain stage: every configuration (and its ablations) x `retrain.seeds` seeds.

    A point is a front trial's sampled keys plus the retrain settings; ablation keys come last so they win.
    """
    from trainable.run_config import trial_config

    points = []
    for front in configs:
        roles = {RetrainRole.front.value: {}}
        if settings["ablations"]:
            config = trial_config(base_config, front.params)
            roles |= ablations(config, base_config["pruning"])
            if config["pruning"]["mode"] in STRUCTURED_MODES:
                roles[RetrainRole.dense_same_macs.value] = dense_role(front, config)
        for role, changes in roles.items():
            for seed in range(base_config["train"]["seed"], base_config["train"]["seed"] + settings["seeds"]):
                points.append(
                    front.params
                    | changes
                    | {
                        "train.epochs": settings["epochs"],
                        "train.seed": seed,
                        "train.test_at_end": True,
                        "origin.front_trial": front.trial_id,
                        "origin.role": role,
                    }
                )
    return points


def check_points(points: Sequence[Mapping[str, Any]], base_config: Mapping[str, Any]) -> None:
    """Every retrain run is a valid run config (e.g. the pruning schedule fits retrain.epochs), checked now."""
    from trainable.run_config import trial_config, validate_config

    for point in points:
        try:
            validate_config(trial_config(base_config, {"grid_point": point}))
        except ValueError as err:
            raise ValueError(
                f"retrain stage: the run {point['origin.role']} of front trial "
                f"{point['origin.front_trial']} is invalid: {err} (set retrain.epochs at least as high as "
                "the search's train.epochs)"
            ) from None


def describe(configs: Sequence[FrontConfig], points: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]) -> str:
    """One paragraph for the console: what will be retrained."""
    roles = sorted({p["origin.role"] for p in points})
    lines = [
        f"{len(points)} runs: {len(configs)} front configuration(s) x {settings['seeds']} seed(s) x roles "
        f"{roles}, {settings['epochs']} epochs each"
    ]
    lines += [
        f"  {c.trial_id}: target MACs {c.target_macs / 1e6:.2f}M, search val_acc {c.val_acc:.3f}" for c in configs
    ]
    return "\n".join(lines)
