"""The KD teacher: each ensemble member trained or fine-tuned once, its logits cached by note, averaged.

A member is any timm model (from scratch, ImageNet weights by name, or a local weights file; a linear probe with
teacher.freeze=true) or a Hugging Face audio classifier (`hf:<hub id or folder>`, its own feature extractor and
sample rate, fed from the original wavs). Each member lives in
`<workdir>/teachers/members/<name>-<hash of data fingerprint + member spec>/`: checkpoint, `logits-<split>.npz`
(note ids + logits for train/valid/test) and `member.json` (its scores), so adding a member to an ensemble reuses
the others. The ensemble's averaged logits go to `<workdir>/teachers/<name>-<hash of its members>/`.

`python trainable/teacher.py` prepares the teacher and prints per member and for the ensemble: valid/test
accuracy and macro-F1, per-family test accuracy, MACs/params, then the teacher - reference student test accuracy.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from common.cli import entry_point, plain
from common.config import FeatureConfig
from common.io import atomic_path, atomic_write_text, build_once
from data_prep.layout import SPLITS
from data_prep.waveform_cache import WaveformData, load_waveform_cache
from trainable.checkpoints import CHECKPOINT_NAME, load_checkpoint, make_model_spec, restore_model
from trainable.evaluation import make_pipeline
from trainable.loop import train
from trainable.metrics import accuracy, confusion_matrix, macro_f1
from trainable.models import TeacherEnsemble, freeze, hf_source, is_hf_teacher
from trainable.pruning import count_macs_params
from trainable.run_config import pick_device, validate_teacher
from trainable.teacher_frontend import ExtractorFrontend, OnlineTeacherInputs, WaveformPipeline, make_frontend
from trainable.teacher_spec import check_members, member_specs

log = logging.getLogger(__name__)

MEMBER_FILE = "member.json"  # written last in a member's folder: the member is complete
TEACHER_FILE = "teacher.json"  # the ensemble's folder: its members, for online KD and the report
SCORING_BATCH = 64


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name).name if is_hf_teacher(name) else name).strip("_")[:48]


def _file_identity(path: str) -> dict[str, Any]:
    """A local file or folder by resolved path, size and mtime: replacing the weights invalidates the member."""
    target = Path(path).expanduser().resolve()
    files = sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else [target]
    return {"path": str(target), "files": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]}


def member_key(spec: Mapping[str, Any], data: WaveformData) -> str:
    """Hash of what determines a member's logits: the students' data (its notes and splits) and the member spec."""
    sources = [spec["checkpoint"], spec["pretrained"] if spec["pretrained"] not in ("none", "imagenet") else None]
    if is_hf_teacher(spec["name"]) and Path(hf_source(spec["name"])).exists():
        sources.append(hf_source(spec["name"]))
    features = None if is_hf_teacher(spec["name"]) else spec["features"]  # hf: its extractor is the front-end
    return _digest(
        {"data": data.fingerprint, **spec, "features": features, "files": [_file_identity(s) for s in sources if s]}
    )


def member_dir(spec: Mapping[str, Any], config: Mapping[str, Any], data: WaveformData) -> Path:
    return Path(config["workdir"]) / "teachers" / "members" / f"{_slug(spec['name'])}-{member_key(spec, data)}"


def teacher_dir(config: Mapping[str, Any], data: WaveformData) -> Path:
    """The ensemble's folder: <workdir>/teachers/<first member's name>[xN]-<hash of its members' keys>."""
    return _ensemble_dir(config, member_specs(config), data)


def _ensemble_dir(config: Mapping[str, Any], specs: list[dict[str, Any]], data: WaveformData) -> Path:
    keys = [member_key(spec, data) for spec in specs]
    label = _slug(specs[0]["name"]) + (f"x{len(specs)}" if len(specs) > 1 else "")
    return Path(config["workdir"]) / "teachers" / f"{label}-{_digest(keys)}"


def member_run_config(spec: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """The run config that trains (or fine-tunes) one member: its own features, epochs, lr, seed and mixup; no KD,
    no pruning."""
    out = copy.deepcopy(dict(config))
    out["features"] = dict(spec["features"])
    out["train"] = {
        **config["train"],
        "epochs": spec["epochs"],
        "lr": spec["lr"],
        "batch_size": spec["batch_size"],
        "seed": spec["seed"],
        "mixup_alpha": spec["mixup_alpha"],
        "test_at_end": False,
    }
    out["kd"] = {**config["kd"], "enabled": False}
    out["pruning"] = {**config["pruning"], "mode": "none"}
    return out


def member_sample_rate(spec: Mapping[str, Any]) -> int:
    """The rate a member's front-end reads: its feature extractor's (hf) or teacher.features.sample_rate (timm)."""
    if is_hf_teacher(spec["name"]):
        import transformers

        return int(transformers.AutoFeatureExtractor.from_pretrained(hf_source(spec["name"])).sampling_rate)
    return int(spec["features"]["sample_rate"])


def member_data(spec: Mapping[str, Any], config: Mapping[str, Any], data: WaveformData) -> WaveformData:
    """The member's audio: the students' cache when the rates agree, else the same notes decoded from the original
    wavs at the member's rate (cached separately by data_prep)."""
    rate = member_sample_rate(spec)
    if rate == data.sample_rate:
        return data
    from data_prep.dataset import prepare_data

    log.info("Teacher %s reads %d Hz audio: decoding the same notes at that rate", spec["name"], rate)
    return prepare_data(config["data"], config["workdir"], sample_rate=rate)


class ExtractorInputs:
    """`trainable.loop.Inputs` for an hf member: its splits through its own feature extractor, per batch."""

    def __init__(self, source: str, data: WaveformData, device: torch.device) -> None:
        self.frontend = ExtractorFrontend(source, device)
        self.data, self.device = data, device

    def pipeline(self, split: str) -> WaveformPipeline:
        return WaveformPipeline(self.data.splits[split], self.frontend, self.device)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.pipeline("train").input_shape


def _member_inputs(spec: Mapping[str, Any], data: WaveformData, device: torch.device) -> ExtractorInputs | None:
    return ExtractorInputs(hf_source(spec["name"]), data, device) if is_hf_teacher(spec["name"]) else None


def _fit_member(
    spec: Mapping[str, Any], config: Mapping[str, Any], data: WaveformData, out: Path, inputs: ExtractorInputs | None
) -> Path:
    """The member's checkpoint: a finished one as given, else trained here (resumed from its last epoch)."""
    if spec["checkpoint"]:
        return Path(spec["checkpoint"]).resolve()
    ckpt_path = out / "checkpoint" / CHECKPOINT_NAME
    ckpt = load_checkpoint(ckpt_path) if ckpt_path.is_file() else None
    if ckpt is None or ckpt["epoch"] < spec["epochs"]:
        how = ("linear probe of" if spec["freeze"] else "fine-tuning") if _has_weights(spec) else "training"
        log.info("Teacher member %s: %s it for %d epochs into %s", spec["name"], how, spec["epochs"], out)
        train(
            member_run_config(spec, config),
            data,
            out,
            resume_from=ckpt_path if ckpt is not None else None,
            model_spec=make_model_spec("teacher", spec),
            inputs=inputs,
        )
    return ckpt_path


def _has_weights(spec: Mapping[str, Any]) -> bool:
    return is_hf_teacher(spec["name"]) or spec["pretrained"] != "none"


def _scoring_pipeline(
    spec: Mapping[str, Any],
    config: Mapping[str, Any],
    data: WaveformData,
    split: str,
    device: torch.device,
    inputs: ExtractorInputs | None,
) -> Any:
    if inputs is not None:
        return inputs.pipeline(split)
    return make_pipeline(
        data,
        split,
        FeatureConfig.from_mapping(spec["features"]),
        device,
        config["workdir"],
        config["train"]["device_data_share"],
    )


@torch.no_grad()
def _split_logits(model: torch.nn.Module, pipeline: Any) -> np.ndarray:
    model.eval()
    return torch.cat([model(b.features).float().cpu() for b in pipeline.batches(SCORING_BATCH, train=False)]).numpy()


def scores(logits: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 (over the classes present) and per-family accuracy (recall) of one split's logits."""
    predicted = logits.argmax(1)
    present = np.unique(labels)
    matrix = confusion_matrix(labels, predicted, len(classes))
    return {
        "acc": accuracy(labels, predicted),
        "macro_f1": macro_f1(labels, predicted, len(classes), labels=present),
        "per_family": {classes[c]: float(matrix[c, c] / matrix[c].sum()) for c in present},
    }


def ensure_member(spec: Mapping[str, Any], config: Mapping[str, Any], data: WaveformData) -> Path:
    """The member's folder, complete: trained or loaded once (one process of all that ask), logits of every split
    cached with their note ids, and its scores in member.json."""
    out = member_dir(spec, config, data)

    def build(target: Path) -> None:
        device = pick_device(config["device"])
        mdata = member_data(spec, config, data)
        inputs = _member_inputs(spec, mdata, device)
        ckpt_path = _fit_member(spec, config, mdata, out, inputs)
        ckpt = load_checkpoint(ckpt_path)
        # training time over every epoch this member trained (across resumes); 0 for a finished checkpoint
        fit_seconds = sum(h["epoch_seconds"] for h in ckpt["history"]) if not spec["checkpoint"] else 0.0
        model = freeze(restore_model(ckpt, device))
        report: dict[str, Any] = {}
        for split in SPLITS:
            logits = _split_logits(model, _scoring_pipeline(spec, config, mdata, split, device, inputs))
            with atomic_path(out / f"logits-{split}.npz") as tmp, open(tmp, "wb") as f:
                np.savez(f, logits=logits, ids=np.asarray(mdata.splits[split].ids))
            if split != "train":
                report[split] = scores(logits, mdata.splits[split].labels, mdata.classes)
        input_shape = (
            inputs.input_shape
            if inputs
            else (
                1,
                1,
                spec["features"]["n_mels"],
                FeatureConfig.from_mapping(spec["features"]).frames(mdata.clip_samples),
            )
        )
        macs, params = count_macs_params(model, input_shape)
        atomic_write_text(
            target,
            json.dumps(
                {
                    "spec": spec,
                    "checkpoint": str(ckpt_path),
                    "data_dir": str(mdata.cache_dir),
                    "sample_rate": mdata.sample_rate,
                    "macs": macs,
                    "params": params,
                    "fit_seconds": fit_seconds,
                    **report,
                },
                indent=2,
            ),
        )
        log.info(
            "Teacher member %s: valid acc %.3f, test acc %.3f (%s)",
            spec["name"],
            report["valid"]["acc"],
            report["test"]["acc"],
            out,
        )

    build_once(out / MEMBER_FILE, build, what=f"the teacher member {out.name}")
    return out


def _rows(have: list[str], want: list[str], where: Path) -> list[int]:
    """The row in `have` of every note id in `want`: cached teacher outputs are looked up by note, never assumed
    aligned, so a subset or a cap of a split reuses them."""
    row = {note: i for i, note in enumerate(have)}
    missing = [note for note in want if note not in row]
    if missing:
        raise ValueError(
            f"the teacher data in {where} lacks {len(missing)} of these notes (e.g. {missing[0]}): it "
            f"was prepared for other data; run teacher_inputs for this data (or delete {where})."
        )
    return [row[note] for note in want]


def _aligned(path: Path, ids: list[str]) -> np.ndarray:
    """Cached logits (a logits-<split>.npz) in the row order of the note ids `ids`."""
    with np.load(path) as f:
        logits, have = f["logits"], f["ids"].tolist()
    return logits[_rows(have, ids, path)]


def ensure_teacher(config: Mapping[str, Any], data: WaveformData) -> Path:
    """Every member complete, then the ensemble's folder: teacher.json (members, scores) and the averaged logits of
    every split (`logits-<split>.npz`, note ids included). Idempotent: a second call only reads the caches."""
    specs = check_members(config)
    members = [ensure_member(spec, config, data) for spec in specs]
    out = _ensemble_dir(config, specs, data)

    def build(target: Path) -> None:
        report: dict[str, Any] = {"members": [str(m) for m in members]}
        for split in SPLITS:
            ids = list(data.splits[split].ids)
            logits = np.mean([_aligned(m / f"logits-{split}.npz", ids) for m in members], axis=0)
            with atomic_path(out / f"logits-{split}.npz") as tmp, open(tmp, "wb") as f:
                np.savez(f, logits=logits, ids=np.asarray(ids))
            if split != "train":
                report[split] = scores(logits, data.splits[split].labels, data.classes)
        infos = [json.loads((m / MEMBER_FILE).read_text()) for m in members]
        report |= {"macs": sum(i["macs"] for i in infos), "params": sum(i["params"] for i in infos)}
        atomic_write_text(target, json.dumps(report, indent=2))

    build_once(out / TEACHER_FILE, build, what=f"the teacher {out.name}")
    return out


def teacher_inputs(config: Mapping[str, Any], data: WaveformData) -> dict[str, Path]:
    """What trials need for KD, as small picklable paths: `teacher_logits` (the cached train logits, by note id) or,
    for kd.teacher_logits=online, `teacher` (the ensemble's folder). Prepares the teacher first when missing; runs
    in any process (a Ray task on another node) from the config and the data's folder alone."""
    out = ensure_teacher(config, data).resolve()
    if config["kd"]["teacher_logits"] == "online":
        return {"teacher": out}
    return {"teacher_logits": out / "logits-train.npz"}


def kd_arguments(inputs: Mapping[str, Any], data: WaveformData, device: torch.device | str) -> dict[str, Any]:
    """`train()`'s KD keyword arguments inside a trial: the teacher logits aligned to data.splits['train'] rows (by
    note id, so a subset or a cap of the train split reuses them), or the frozen teacher on `device` with its
    front-end (train-clip indices -> the members' inputs, read per batch from the waveform memmaps)."""
    ids = list(data.splits["train"].ids)
    if "teacher_logits" in inputs:
        return {"teacher_logits": torch.from_numpy(_aligned(Path(inputs["teacher_logits"]), ids)).float()}
    if "teacher" not in inputs:
        raise ValueError(
            "kd.enabled=true but no teacher was prepared: pass trainable.teacher.teacher_inputs(config, "
            "data) to the trial."
        )
    device = torch.device(device)
    members = [
        json.loads((Path(m) / MEMBER_FILE).read_text())
        for m in json.loads((Path(inputs["teacher"]) / TEACHER_FILE).read_text())["members"]
    ]
    models, splits, row_maps, frontends = [], [], [], []
    for info in members:
        mdata = data if Path(info["data_dir"]) == Path(data.cache_dir) else load_waveform_cache(info["data_dir"])
        models.append(freeze(restore_model(load_checkpoint(info["checkpoint"]), device)))
        splits.append(mdata.splits["train"])
        row_maps.append(np.asarray(_rows(list(mdata.splits["train"].ids), ids, mdata.cache_dir), dtype=np.int64))
        frontends.append(make_frontend(info["spec"]["name"], info["spec"]["features"], device))
    return {"teacher": (freeze(TeacherEnsemble(models)), OnlineTeacherInputs(splits, row_maps, frontends, device))}


def kd_inputs(config: Mapping[str, Any], data: WaveformData) -> dict[str, Any]:
    """In one process (train.py, benchmarks): `kd_arguments(teacher_inputs(...))` when KD is on, else nothing."""
    if not config["kd"]["enabled"]:
        return {}
    return kd_arguments(teacher_inputs(config, data), data, pick_device(config["device"]))


def reference_student(config: dict[str, Any], data: WaveformData) -> dict[str, Any]:
    """The run config's student trained without KD or pruning (train.epochs, train.seed), scored on test: what the
    teacher has to beat by a clear margin for distillation to have something to transfer."""
    run = copy.deepcopy(config)
    run["kd"]["enabled"], run["pruning"]["mode"] = False, "none"
    run["train"] |= {"test_at_end": True, "mixup_alpha": 0.0}
    with tempfile.TemporaryDirectory(dir=Path(config["workdir"])) as run_dir:
        return train(run, data, run_dir)


def _describe(spec: Mapping[str, Any]) -> str:
    weights = "" if spec["pretrained"] == "none" else f" ({Path(spec['pretrained']).name})"
    return spec["name"] + weights + (" probe" if spec["freeze"] else "")


def format_report(teacher: Path, classes: list[str]) -> str:
    """The members' and the ensemble's scores as one table, then per-family test accuracy."""
    ensemble = json.loads((teacher / TEACHER_FILE).read_text())
    infos = [json.loads((Path(m) / MEMBER_FILE).read_text()) for m in ensemble["members"]]
    rows = [(f"{i}: {_describe(info['spec'])}", info) for i, info in enumerate(infos)]
    if len(rows) > 1:
        rows.append(("ensemble (mean logits)", ensemble))
    width = max(len(label) for label, _ in rows) + 2
    lines = [
        f"{'teacher':<{width}}{'valid acc':>10}{'valid F1':>10}{'test acc':>10}{'test F1':>10}{'GMACs':>8}"
        f"{'M params':>10}{'fit s':>8}"
    ]
    for label, r in rows:
        fit = f"{r['fit_seconds']:>8.0f}" if "fit_seconds" in r else f"{'':>8}"
        lines.append(
            f"{label:<{width}}{r['valid']['acc']:>10.4f}{r['valid']['macro_f1']:>10.4f}{r['test']['acc']:>10.4f}"
            f"{r['test']['macro_f1']:>10.4f}{r['macs'] / 1e9:>8.3f}{r['params'] / 1e6:>10.2f}{fit}"
        )
    lines.append("\nper-family test accuracy")
    lines.append(
        f"{'family':<14}" + "".join(f"{label.split(':')[0] if ':' in label else 'ens':>8}" for label, _ in rows)
    )
    for family in classes:
        cells = [r["test"]["per_family"].get(family) for _, r in rows]
        lines.append(f"{family:<14}" + "".join(f"{c:>8.3f}" if c is not None else f"{'-':>8}" for c in cells))
    return "\n".join(lines)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
@entry_point
def main(cfg: DictConfig) -> None:
    from data_prep.dataset import prepare_data

    config = plain(cfg)
    validate_teacher(config)
    data = prepare_data(config["data"], config["workdir"])
    teacher = ensure_teacher(config, data)
    print(f"\nTeacher in {teacher}\n{format_report(teacher, data.classes)}")
    s = config["student"]
    print(
        f"\nReference student: {s['arch']} width {s['width_mult']}, n_mels {config['features']['n_mels']}, "
        f"{config['train']['epochs']} epochs, no KD, no pruning (training it now)",
        flush=True,
    )
    student = reference_student(config, data)
    test_acc = json.loads((teacher / TEACHER_FILE).read_text())["test"]["acc"]
    print(
        f"  test_acc         {student['test_acc']:.4f}\n"
        f"Teacher - student test accuracy: {100 * (test_acc - student['test_acc']):+.1f} points "
        "(KD needs a clearly stronger teacher: >= +10)"
    )


if __name__ == "__main__":
    main()
