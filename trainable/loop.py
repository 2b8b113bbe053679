"""The training run every sweep trial is: student (+KD) (+pruning) on cached log-mels, resumable per epoch.

One function, top to bottom. Its command line is trainable/train.py; the Ray Tune trainable
(trainable/tune_trainable.py) and the teacher (trainable/teacher.py) call the very same `train`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from common.config import FeatureConfig
from common.io import atomic_write_text
from data_prep.waveform_cache import WaveformData
from trainable.checkpoints import (
    CHECKPOINT_NAME,
    build_model,
    load_checkpoint,
    make_model_spec,
    restore_model,
    save_checkpoint,
)
from trainable.evaluation import amp_settings, evaluate, make_pipeline
from trainable.kd import Mixup, kd_loss, mixed_cross_entropy
from trainable.pruning import (
    apply_masks,
    count_macs_params,
    model_state,
    prune_to_macs,
    unstructured_prune,
    weight_sparsity,
    zero_masks,
)
from trainable.run_config import pick_device, pruning_plan, validate_config

log = logging.getLogger(__name__)

Report = Callable[[dict[str, Any], Path], None]


class Inputs(Protocol):
    """The batches of a model that does not read the cached log-mels (a Hugging Face teacher's own features)."""

    input_shape: tuple[int, ...]  # one example's input, batch dimension included: for the MACs count

    def pipeline(self, split: str) -> Any:
        """What `make_pipeline` returns for a split: `prepare`, `batches`, `num_batches`, `len()`, `device`."""


def student_spec(config: dict[str, Any]) -> dict[str, Any]:
    return make_model_spec("student", config["student"])


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Linear warmup then cosine decay to zero (per optimizer step)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loader": generator.get_state(),
    }


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["loader"])


def train(
    config: dict[str, Any],
    data: WaveformData,
    run_dir: Path | str,
    *,
    teacher_logits: torch.Tensor | None = None,
    teacher: tuple[torch.nn.Module, Callable[[torch.Tensor], Any]] | None = None,
    resume_from: Path | str | None = None,
    report: Report | None = None,
    model_spec: dict[str, Any] | None = None,
    inputs: Inputs | None = None,
) -> dict[str, Any]:
    """Train one model for config["train"]["epochs"] epochs, checkpointing and reporting after each.

    KD targets come from `teacher_logits` (cached, one row per train clip) or `teacher` (a frozen model on the
    device and its front-end: train-clip indices -> the model's inputs, run per batch; trainable.teacher.kd_arguments
    builds both). `inputs` gives the batches of a model that does not read log-mels (a Hugging Face teacher).
    Returns the last epoch's metrics.
    """
    config = copy.deepcopy(config)
    validate_config(config)
    tcfg, kcfg, pcfg = config["train"], config["kd"], config["pruning"]
    run_dir = Path(run_dir)
    device = pick_device(config["device"])
    torch.set_num_threads(tcfg["num_threads"] or len(os.sched_getaffinity(0)))
    amp = amp_settings(device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp[0] and amp[1] == torch.float16)
    random.seed(tcfg["seed"])
    np.random.seed(tcfg["seed"])
    torch.manual_seed(tcfg["seed"])
    generator = torch.Generator().manual_seed(tcfg["seed"])

    feat_cfg = FeatureConfig.from_mapping(config["features"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels once
    make_inputs = (
        inputs.pipeline
        if inputs
        else partial(
            make_pipeline,
            data,
            feats=feat_cfg,
            device=device,
            workdir=config["workdir"],
            device_data_share=tcfg["device_data_share"],
        )
    )
    pipelines = {split: make_inputs(split) for split in ("train", "valid")}
    for split, pipeline in pipelines.items():  # caches built or opened now: epoch times measure training
        pipeline.prepare(train=split == "train")
    input_shape = inputs.input_shape if inputs else (1, 1, feat_cfg.n_mels, feat_cfg.frames(data.clip_samples))
    kd_on = kcfg["enabled"]
    if kd_on and teacher_logits is None and teacher is None:
        raise ValueError("kd.enabled=true needs teacher logits or a teacher model (see trainable/teacher.py).")
    if kd_on and teacher is not None:
        teacher_model, teacher_frontend = teacher
    if teacher_logits is not None:
        teacher_logits = teacher_logits.to(device)

    model_spec = model_spec or student_spec(config)
    model = build_model(model_spec, data.num_classes).to(device)
    base_macs, base_params = count_macs_params(model, input_shape)
    plan = pruning_plan(pcfg, tcfg["epochs"])  # {epoch (1-based): keep ratio}, applied at the start of that epoch
    target_macs = int(base_macs * min(plan.values())) if plan and pcfg["mode"] != "unstructured" else base_macs
    batch_size = min(tcfg["batch_size"], len(pipelines["train"]))  # tiny datasets still get a step per epoch
    steps_per_epoch = pipelines["train"].num_batches(batch_size, drop_last=True)
    if tcfg["steps_per_epoch"]:  # epochs of a fixed size on a large data set (each a fresh random draw)
        steps_per_epoch = min(steps_per_epoch, tcfg["steps_per_epoch"])
    total_steps, warmup_steps = tcfg["epochs"] * steps_per_epoch, tcfg["warmup_epochs"] * steps_per_epoch

    def make_optimizer() -> torch.optim.Optimizer:
        # Rebuilt after each pruning step: parameter shapes change, so Adam moments start fresh.
        return torch.optim.AdamW(model.parameters(), lr=tcfg["lr"], weight_decay=tcfg["weight_decay"])

    optimizer, start_epoch, step, pruning_step, history = make_optimizer(), 1, 0, 0, []
    masks: dict[str, torch.Tensor] = {}  # unstructured mode: zeroed weights stay zero during fine-tuning
    if resume_from is not None:
        ckpt = load_checkpoint(resume_from)
        model = restore_model(ckpt, device)
        optimizer = make_optimizer()
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"]:  # empty when written without fp16 AMP (CPU, bf16)
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, step, pruning_step = ckpt["epoch"] + 1, ckpt["step"], ckpt["pruning_step"]
        history = ckpt["history"]
        if pcfg["mode"] == "unstructured" and pruning_step:
            masks = zero_masks(model)
        set_rng_state(ckpt["rng"], generator)
        log.info("Resumed from %s at epoch %d", resume_from, start_epoch)
    macs, params = count_macs_params(model, input_shape)

    for epoch in range(start_epoch, tcfg["epochs"] + 1):  # 1-based, like every reported epoch
        t0 = time.perf_counter()
        if epoch in plan:  # pruning step, then fine-tuning continues with KD as configured
            pruning_step += 1
            if pcfg["mode"] == "unstructured":
                masks = unstructured_prune(model, 1.0 - plan[epoch])
            else:
                calib = next(pipelines["train"].batches(batch_size, train=False))
                prune_to_macs(
                    model,
                    calib.features[:1],
                    base_macs,
                    plan[epoch],
                    pcfg["importance"],
                    pcfg["round_to"],
                    lambda m: F.cross_entropy(m(calib.features), calib.labels),  # noqa: B023 - used at once
                )
            optimizer = make_optimizer()
            macs, params = count_macs_params(model, input_shape)
            log.info(
                "pruning step %d at epoch %d: MACs %.2fM (%.1f%% of %.2fM), params %d",
                pruning_step,
                epoch,
                macs / 1e6,
                100 * macs / base_macs,
                base_macs / 1e6,
                params,
            )

        model.train()
        # Running sums stay on the device (loss, kd, ce, correct): one host sync per epoch, not per step.
        sums, seen = torch.zeros(4, device=device), 0
        for batch in pipelines["train"].batches(
            batch_size, train=True, generator=generator, drop_last=True, max_batches=steps_per_epoch
        ):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, warmup_steps, tcfg["lr"])
            features, mix = batch.features, None
            if tcfg["mixup_alpha"] > 0:  # mixup: convex pairs of clips; labels and KD targets are mixed alike
                lam = float(np.random.beta(tcfg["mixup_alpha"], tcfg["mixup_alpha"]))
                mix = Mixup(lam, torch.randperm(len(features), generator=generator).to(device))
                features = lam * features + (1 - lam) * features[mix.order]
            with torch.autocast(device.type, dtype=amp[1], enabled=amp[0]):
                logits = model(features)
                if kd_on:
                    if teacher_logits is not None:
                        targets = teacher_logits[batch.indices]
                    else:
                        with torch.no_grad():
                            targets = teacher_model(teacher_frontend(batch.indices))
                    loss, kd_part, ce_part = kd_loss(
                        logits.float(), targets.float(), batch.labels, kcfg["T"], kcfg["alpha"], mix
                    )
                else:
                    loss = ce_part = mixed_cross_entropy(logits.float(), batch.labels, mix)
                    kd_part = torch.zeros_like(loss)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg["grad_clip"])
            scaler.step(optimizer)
            scaler.update()
            if masks:
                apply_masks(model, masks)
            step += 1
            n = len(batch.labels)
            correct = (logits.argmax(1) == batch.labels).sum().float()
            sums += torch.stack([loss.detach() * n, kd_part.detach() * n, ce_part.detach() * n, correct])
            seen += n
        loss_sum, kd_sum, ce_sum, correct_sum = sums.tolist()
        train_seconds = time.perf_counter() - t0
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"Non-finite training loss in epoch {epoch}: lower train.lr or check the data.")

        val = evaluate(model, pipelines["valid"], batch_size, data.num_classes, amp)
        metrics = {
            "epoch": epoch,
            "train_loss": loss_sum / seen,
            "kd_loss": kd_sum / seen,
            "ce_loss": ce_sum / seen,
            "train_acc": correct_sum / seen,
            "val_loss": val["loss"],
            "val_acc": val["acc"],
            "val_macro_f1": val["macro_f1"],
            "val_clips": len(pipelines["valid"]),  # for the report's "at chance" test (analysis/rung_fidelity.py)
            "macs": macs,
            "params": params,
            "base_macs": base_macs,
            "base_params": base_params,
            "target_macs": target_macs,
            "pruning_step": pruning_step,
            "pruning_steps": len(plan),
            "sparsity": weight_sparsity(model),
            "lr": optimizer.param_groups[0]["lr"],
            "epoch_seconds": time.perf_counter() - t0,
            "clips_per_second": seen / train_seconds,  # training throughput (pruning step included)
        }
        if epoch == tcfg["epochs"] and tcfg["test_at_end"]:  # the retrain stage's number to quote (sweeps/retrain.py)
            test = evaluate(model, make_inputs("test"), batch_size, data.num_classes, amp)
            metrics |= {"test_acc": test["acc"], "test_macro_f1": test["macro_f1"], "test_loss": test["loss"]}
        history.append(metrics)
        save_checkpoint(
            run_dir / "checkpoint" / CHECKPOINT_NAME,
            {
                "model_spec": model_spec,
                "num_classes": data.num_classes,
                "classes": data.classes,
                "model_state": model_state(model),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch,
                "step": step,
                "pruning_step": pruning_step,
                "rng": rng_state(generator),
                "history": history,
                "config": config,
                "metrics": metrics,
                "input_shape": input_shape,
                "data_fingerprint": data.fingerprint,
            },
        )
        for folder in (run_dir, run_dir / "checkpoint"):  # the checkpoint's copy travels with Tune checkpoints
            atomic_write_text(folder / "history.json", json.dumps(history, indent=1))
        log.info(
            "epoch %d/%d  train_loss %.3f  val_acc %.3f  val_f1 %.3f  MACs %.2fM  (%.1fs)",
            epoch,
            tcfg["epochs"],
            metrics["train_loss"],
            val["acc"],
            val["macro_f1"],
            macs / 1e6,
            metrics["epoch_seconds"],
        )
        if report is not None:
            report(metrics, run_dir / "checkpoint")
    return history[-1] if history else {}
