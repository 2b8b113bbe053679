"""Teacher member specs: the `teacher.*` config resolved into one dict per ensemble member, and their checks.

Kept apart from trainable/teacher.py (which trains) so that the sweep can refuse a bad teacher before any data or
teacher work without importing the training code. Every check here is cheap: names, files, a hub look-up, and a
shape-only forward on the meta device.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from data_prep.layout import NSYNTH_SAMPLE_RATE
from trainable.models import hf_source, is_hf_teacher

# The keys a member of teacher.members may set (each defaults to the same teacher.* key); `seed` offsets the seed.
MEMBER_KEYS = (
    "name",
    "pretrained",
    "checkpoint",
    "freeze",
    "epochs",
    "lr",
    "batch_size",
    "mixup_alpha",
    "features",
    "seed",
)
# Sample rate of every wav in the NSynth layout that data_prep writes or reads (NSynth itself, the GM renders).
SOURCE_SAMPLE_RATE = NSYNTH_SAMPLE_RATE


def member_label(config: Mapping[str, Any], index: int, key: str) -> str:
    """The config key a user set for this member's `key` (teacher.members[1].lr, or teacher.lr)."""
    return f"teacher.members[{index}].{key}" if isinstance(config["teacher"]["members"], list) else f"teacher.{key}"


def member_specs(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One fully resolved dict per member (MEMBER_KEYS, `seed` absolute, `features` merged over the run's).

    teacher.members: an int n (n seeds of the teacher.* model, as before ensembles mixed architectures) or a list
    of member dicts. A list of paths in teacher.checkpoint is an ensemble of finished teachers, one member each.
    """
    teacher = config["teacher"]
    members, checkpoint = teacher["members"], teacher["checkpoint"]
    base = {key: copy.deepcopy(teacher[key]) for key in MEMBER_KEYS if key not in ("features", "seed")}
    if isinstance(members, bool) or not isinstance(members, (int, list)) or (isinstance(members, int) and members < 1):
        raise ValueError(
            f"teacher.members={members!r} must be a count >= 1 (seeds of one teacher) or a list of "
            "member dicts, e.g. teacher.members='[{name: resnet18}, {name: efficientnet_b0}]'."
        )
    if isinstance(checkpoint, list):
        if members not in (1, []) and members != [{}] * len(members):
            raise ValueError(
                "teacher.checkpoint lists finished teachers (an ensemble of them) and teacher.members "
                "lists others: give the checkpoints as members instead, e.g. "
                "teacher.members='[{checkpoint: a.pt}, {name: resnet18}]' with teacher.checkpoint=null."
            )
        overrides = [{"checkpoint": path} for path in checkpoint]
    elif isinstance(members, int):
        overrides = [{"seed": offset} for offset in range(members)]
    else:
        overrides = members
    if not overrides:
        raise ValueError("teacher.members=[] names no teacher; give at least one member (or teacher.members=1).")
    specs = []
    for index, override in enumerate(overrides):
        if not isinstance(override, Mapping):
            raise ValueError(
                f"teacher.members[{index}]={override!r} must be a dict of teacher keys, e.g. "
                "{name: resnet18, pretrained: imagenet}."
            )
        unknown = sorted(set(override) - set(MEMBER_KEYS))
        if unknown:
            raise ValueError(
                f"teacher.members[{index}] has unknown key(s) {unknown}; a member may set {list(MEMBER_KEYS)}."
            )
        spec = {**base, **copy.deepcopy(dict(override))}
        spec["seed"] = config["seed"] + int(override.get("seed", 0))
        spec["features"] = {**config["features"], **teacher["features"], **(override.get("features") or {})}
        if spec["checkpoint"]:
            trained = trained_checkpoint(spec["checkpoint"])
            if trained is None:  # a plain weights file: fine-tuned like teacher.pretrained=<file>
                spec["pretrained"], spec["checkpoint"] = str(spec["checkpoint"]), None
            elif trained:  # used as it is: its architecture and features are the checkpoint's own
                spec["name"], spec["features"] = trained["model_spec"]["name"], trained["config"]["features"]
        specs.append(spec)
    return specs


def trained_checkpoint(path: str | Path) -> dict[str, Any] | None:
    """The teacher checkpoint this project wrote at `path` (used as it is), or None for a weights file (fine-tuned).

    A missing file gives {}, so that the check names it under teacher.checkpoint.
    """
    import torch

    if not Path(path).is_file():
        return {}
    try:  # memory-mapped: reads the pickle, not the tensors
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # not a zip-format torch file (e.g. legacy or safetensors): weights for timm to read
        return None
    return ckpt if isinstance(ckpt, dict) and "model_spec" in ckpt else None


def check_members(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """member_specs, with every member's settings checked; returns the specs. One-line errors naming key and fix."""
    specs = member_specs(config)
    seen: dict[str, int] = {}
    for index, spec in enumerate(specs):
        _check_member(config, index, spec)
        identity = repr(sorted((k, repr(v)) for k, v in spec.items()))
        if identity in seen:
            raise ValueError(
                f"teacher.members[{index}] repeats teacher.members[{seen[identity]}]: the same teacher "
                f"twice adds nothing; give it another seed, e.g. {{seed: {index}}}."
            )
        seen[identity] = index
    return specs


def _check_member(config: Mapping[str, Any], index: int, spec: dict[str, Any]) -> None:
    def key(name: str) -> str:
        return member_label(config, index, name)

    if spec["epochs"] < 1 or spec["lr"] <= 0 or spec["batch_size"] < 1:
        raise ValueError(
            f"{key('epochs')}={spec['epochs']} and {key('batch_size')}={spec['batch_size']} must be "
            f">= 1 and {key('lr')}={spec['lr']} > 0."
        )
    if spec["mixup_alpha"] < 0:
        raise ValueError(f"{key('mixup_alpha')}={spec['mixup_alpha']} must be >= 0 (0 disables mixup).")
    if spec["checkpoint"]:
        if not Path(spec["checkpoint"]).is_file():
            raise FileNotFoundError(
                f"{key('checkpoint')}={spec['checkpoint']} does not exist; give a local file "
                "(a trained teacher's checkpoint.pt or a weights file), or null to train one."
            )
        return  # a finished teacher is used as it is; a weights file is checked below as `pretrained`
    warmup = config["train"]["warmup_epochs"]
    if spec["epochs"] <= warmup:
        raise ValueError(
            f"{key('epochs')}={spec['epochs']} must be above train.warmup_epochs={warmup} (the teacher "
            "warms up like the students): raise teacher.epochs or lower train.warmup_epochs."
        )
    if is_hf_teacher(spec["name"]):
        rate = _check_hf(spec["name"], key("name"))
    else:
        rate = _check_timm(config, spec, key)
    if rate > SOURCE_SAMPLE_RATE:
        raise ValueError(
            f"{key('name')}={spec['name']} needs audio at {rate} Hz but the source wavs are "
            f"{SOURCE_SAMPLE_RATE} Hz: upsampling adds no information; pick a teacher that takes "
            f"{SOURCE_SAMPLE_RATE} Hz (e.g. hf:MIT/ast-finetuned-audioset-10-10-0.4593) or lower its "
            "rate."
        )


def _check_timm(config: Mapping[str, Any], spec: dict[str, Any], key: Any) -> int:
    """The timm member's name, starting weights and input shape; returns the sample rate its features need."""
    import timm

    name, pretrained = spec["name"], spec["pretrained"]
    if not timm.is_model(name):
        stem = name.split(".")[0].split("_")[0][:8]
        close = timm.list_models(f"*{stem}*")[:5]
        raise ValueError(
            f"{key('name')}={name} is not a timm model{f' (close: {close})' if close else ''}; any name "
            "from timm.list_models() works, or hf:<hub id or folder> for a Hugging Face audio model."
        )
    if spec["freeze"] and pretrained == "none":
        raise ValueError(
            f"{key('freeze')}=true trains only the head, and {key('pretrained')}=none leaves the "
            f"backbone random: set {key('pretrained')}=imagenet (or a weights file) or "
            f"{key('freeze')}=false."
        )
    if pretrained == "imagenet":
        _check_timm_download(name, key("pretrained"))
    elif pretrained != "none" and not Path(pretrained).is_file():
        raise FileNotFoundError(
            f"{key('pretrained')}={pretrained} is neither none, imagenet nor an existing file; "
            "give a local timm weights file (e.g. a torch.save'd state_dict)."
        )
    features = spec["features"]
    _check_input_shape(
        name,
        features["n_mels"],
        int(round(config["data"]["clip_seconds"] * features["sample_rate"])) // features["hop_length"] + 1,
        key("name"),
    )
    return int(features["sample_rate"])


def _check_timm_download(name: str, key: str) -> None:
    """timm's weights for `name` are in the local cache, or the hub that serves them answers."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise ValueError(
            f"{key}=imagenet: timm has no pretrained weights for {name}; pick a tagged name with weights "
            "(timm.list_pretrained()) or pass a local weights file."
        )
    hint = (
        f"download them where there is network (timm.create_model('{name}', pretrained=True) and "
        f"torch.save(model.state_dict(), FILE)) and pass teacher.checkpoint=FILE (or {key}=FILE)"
    )
    if cfg.hf_hub_id:
        repo = cfg.hf_hub_id.split("@")[0]
        files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        if not _hub_reachable(repo, files):
            raise ValueError(
                f"{key}=imagenet needs timm's {name} weights from the Hugging Face hub ({repo}), which "
                f"is not reachable and not in the local cache: {hint}."
            )
        return
    import torch

    if not (Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name).is_file():
        raise ValueError(
            f"{key}=imagenet needs timm's {name} weights from {cfg.url}, which are not in the local "
            f"torch hub cache: {hint}."
        )


def _hub_reachable(repo: str, cached_files: list[str]) -> bool:
    """One of `cached_files` of hub repo `repo` is in the local cache, or (not offline) the hub knows the repo."""
    import huggingface_hub

    if any(isinstance(huggingface_hub.try_to_load_from_cache(repo, f), str) for f in cached_files):
        return True
    if huggingface_hub.constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false"):
        return False
    try:
        huggingface_hub.model_info(repo, timeout=10)  # one request: no retries, unlike a download
    except Exception:  # unreachable, unknown repo, gated: all mean the weights cannot be had from here
        return False
    return True


def _check_input_shape(name: str, n_mels: int, frames: int, key: str) -> None:
    """A shape-only forward on the meta device: models with a fixed input size (most ViTs) fail here, not later."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, in_chans=1, num_classes=2)
        try:
            model.eval()(torch.empty(1, 1, n_mels, frames))
        except Exception as err:
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(
                f"{key}={name} cannot take (1, {n_mels} mels, {frames} frames) inputs ({message}); use "
                "a CNN (global pooling takes any size) or an hf: audio transformer."
            ) from None


def _check_hf(name: str, key: str) -> int:
    """The hf member's source is a saved audio classifier with a feature extractor; returns its sampling rate."""
    source = hf_source(name)
    local = Path(source)
    if local.exists() or source.startswith((".", "/", "~")):
        if not (local / "config.json").is_file() or not (local / "preprocessor_config.json").is_file():
            raise ValueError(
                f"{key}={name}: {source} is not a saved Hugging Face model (it needs config.json and "
                "preprocessor_config.json, as save_pretrained writes for the model and its feature "
                "extractor)."
            )
    elif not _hub_reachable(source, ["config.json"]):
        raise ValueError(
            f"{key}={name}: the Hugging Face hub is not reachable (offline) and {source} is not in the "
            f"local cache; download it where there is network (huggingface-cli download {source} "
            f"--local-dir DIR) and pass {key}=hf:DIR."
        )
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING

    try:
        model_config = transformers.AutoConfig.from_pretrained(source)
        extractor = transformers.AutoFeatureExtractor.from_pretrained(source)
    except Exception as err:
        raise ValueError(
            f"{key}={name}: cannot load its config or feature extractor ({str(err).splitlines()[0]})."
        ) from None
    if type(model_config) not in MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING:
        raise ValueError(
            f"{key}={name} is a {model_config.model_type} model, which AutoModelForAudioClassification "
            "does not load; use an audio classification checkpoint (e.g. an AST)."
        )
    return int(extractor.sampling_rate)
