"""Decoded, resampled, onset-trimmed waveforms per split as memory-mappable arrays.

Every trial reads this cache (the sweep puts it in Ray's object store once). It is keyed by a
fingerprint of the selected files and the decoding parameters and rebuilt only when that changes.
Bad files are skipped (or repaired when safe) and listed in a prep report instead of failing the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from tqdm import tqdm

from common.io import atomic_write_text
from data_prep.layout import SPLITS, NoteRecord

log = logging.getLogger(__name__)

CACHE_VERSION = 1
ONSET_THRESHOLD = 0.01  # fraction of the clip's peak (-40 dB) that marks the onset
SILENCE_PEAK = 1e-4     # a file whose peak is below this carries no note


@dataclass
class WaveformSplit:
    waveforms: np.ndarray  # (N, clip_samples) float32, memory-mapped when loaded from disk
    labels: np.ndarray     # (N,) int64 class indices into WaveformData.classes
    ids: list[str]         # note_str per row

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class WaveformData:
    fingerprint: str
    classes: list[str]
    sample_rate: int
    clip_samples: int
    splits: dict[str, WaveformSplit]
    cache_dir: Path
    report: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def fingerprint(split_records: dict[str, list[NoteRecord]], classes: list[str], clip_seconds: float,
                sample_rate: int) -> str:
    """Hash of what the cache holds: which files (by size and mtime) and how they are decoded."""
    h = hashlib.sha256()
    h.update(json.dumps({"v": CACHE_VERSION, "classes": classes, "clip_seconds": clip_seconds,
                         "sample_rate": sample_rate}).encode())
    for split in SPLITS:
        for r in split_records.get(split, []):
            try:
                st = r.path.stat()
                stamp = f"{st.st_size}:{st.st_mtime_ns}"
            except OSError:
                stamp = "missing"
            h.update(f"{split}|{r.note_str}|{r.family}|{r.path}|{stamp}\n".encode())
    return h.hexdigest()[:20]


def load_clip(path: Path, sample_rate: int, clip_samples: int) -> tuple[np.ndarray, list[str]]:
    """Decode one wav to mono at sample_rate, trimmed to clip_samples from the onset.

    Returns the clip and the repairs made (resampled/downmixed/padded); raises ValueError for
    files that cannot be used (unreadable, empty, silent).
    """
    if not path.is_file():
        raise ValueError("missing file")
    try:
        audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as err:  # soundfile raises several types for corrupt data
        raise ValueError(f"unreadable ({type(err).__name__}: {err})") from err
    repairs = []
    if audio.shape[0] == 0:
        raise ValueError("empty audio")
    if audio.shape[1] != 1:
        audio = audio.mean(axis=1, keepdims=True)
        repairs.append("downmixed")
    mono = audio[:, 0]
    if sr != sample_rate:
        mono = AF.resample(torch.from_numpy(np.ascontiguousarray(mono)), sr, sample_rate).numpy()
        repairs.append("resampled")
    peak = float(np.abs(mono).max())
    if not np.isfinite(peak) or peak < SILENCE_PEAK:
        raise ValueError("silent or non-finite audio")
    onset = int(np.argmax(np.abs(mono) >= ONSET_THRESHOLD * peak))
    clip = mono[onset:onset + clip_samples]
    if len(clip) < clip_samples:
        clip = np.pad(clip, (0, clip_samples - len(clip)))
        repairs.append("padded")
    return clip.astype(np.float32), repairs


def _write_split(out_dir: Path, split: str, records: list[NoteRecord], class_index: dict[str, int],
                 sample_rate: int, clip_samples: int, skipped: list[dict], repaired: Counter) -> int:
    waves = np.lib.format.open_memmap(out_dir / f"{split}.npy", mode="w+", dtype=np.float32,
                                      shape=(len(records), clip_samples))
    labels, ids = [], []
    for r in tqdm(records, desc=f"decode {split}", unit="clip", leave=False):
        try:
            clip, repairs = load_clip(r.path, sample_rate, clip_samples)
        except ValueError as err:
            skipped.append({"split": split, "note_str": r.note_str, "path": str(r.path), "reason": str(err)})
            continue
        repaired.update(repairs)
        waves[len(labels)] = clip
        labels.append(class_index[r.family])
        ids.append(r.note_str)
    waves.flush()
    del waves
    if len(labels) < len(records):  # shrink to the clips that decoded
        full = np.load(out_dir / f"{split}.npy", mmap_mode="r")
        np.save(out_dir / f"{split}.tmp.npy", np.asarray(full[: len(labels)]))
        del full
        os.replace(out_dir / f"{split}.tmp.npy", out_dir / f"{split}.npy")
    np.save(out_dir / f"{split}_labels.npy", np.asarray(labels, dtype=np.int64))
    (out_dir / f"{split}_ids.json").write_text(json.dumps(ids))
    return len(labels)


def build_waveform_cache(split_records: dict[str, list[NoteRecord]], classes: list[str], clip_seconds: float,
                         sample_rate: int, cache_root: Path) -> WaveformData:
    """Return the cache for this selection, decoding the wavs only when its fingerprint is new."""
    fp = fingerprint(split_records, classes, clip_seconds, sample_rate)
    final_dir = Path(cache_root) / fp
    if (final_dir / "meta.json").is_file():
        log.info("Waveform cache hit: %s", final_dir)
        return load_waveform_cache(final_dir)
    clip_samples = int(round(clip_seconds * sample_rate))
    class_index = {c: i for i, c in enumerate(classes)}
    Path(cache_root).mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(dir=cache_root, prefix=f".{fp}."))
    try:
        skipped: list[dict] = []
        repaired: Counter = Counter()
        counts = {s: _write_split(tmp_dir, s, split_records[s], class_index, sample_rate, clip_samples,
                                  skipped, repaired) for s in SPLITS}
        report = {"kept": counts, "skipped": len(skipped), "skipped_by_reason": dict(Counter(
            s["reason"].split(" (")[0] for s in skipped)), "repaired": dict(repaired), "skipped_files": skipped}
        for split, n in counts.items():
            if n == 0:
                raise ValueError(f"No usable clips in the {split} split ({len(skipped)} files skipped; "
                                 f"see the reasons above). Check the data under data.root or rebuild it.")
        (tmp_dir / "prep_report.json").write_text(json.dumps(report, indent=2))
        (tmp_dir / "classes.json").write_text(json.dumps(classes))
        meta = {"fingerprint": fp, "classes": classes, "sample_rate": sample_rate,
                "clip_samples": clip_samples, "clip_seconds": clip_seconds, "counts": counts}
        atomic_write_text(tmp_dir / "meta.json", json.dumps(meta, indent=2))
        try:
            os.rename(tmp_dir, final_dir)
        except OSError:  # another process finished the same cache first: use theirs
            shutil.rmtree(tmp_dir, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    if skipped:
        log.warning("Skipped %d unusable files (%s); listed in %s", len(skipped),
                    report["skipped_by_reason"], final_dir / "prep_report.json")
    if repaired:
        log.info("Repaired on load: %s", dict(repaired))
    return load_waveform_cache(final_dir)


def load_waveform_cache(cache_dir: Path) -> WaveformData:
    cache_dir = Path(cache_dir)
    meta = json.loads((cache_dir / "meta.json").read_text())
    report_path = cache_dir / "prep_report.json"
    splits = {
        s: WaveformSplit(
            waveforms=np.load(cache_dir / f"{s}.npy", mmap_mode="r"),
            labels=np.load(cache_dir / f"{s}_labels.npy"),
            ids=json.loads((cache_dir / f"{s}_ids.json").read_text()),
        )
        for s in SPLITS
    }
    return WaveformData(fingerprint=meta["fingerprint"], classes=meta["classes"], sample_rate=meta["sample_rate"],
                        clip_samples=meta["clip_samples"], splits=splits, cache_dir=cache_dir,
                        report=json.loads(report_path.read_text()) if report_path.is_file() else {})
