"""Decoded, resampled, onset-trimmed waveforms per split, as int16 arrays on disk that every trial memory-maps.

Built once per fingerprint under `<workdir>/cache/waveforms/<fingerprint>/` (in parallel worker processes, by
one process of all those that ask at once, see `common.io.build_once`), then opened read-only: every trial on a
node shares one copy through the OS page cache. A `WaveformData` pickles as its folder's path, so handing it to
a Ray task or trial moves a few bytes, never the arrays. Samples stay int16 as the wavs hold them (half of
float32); `as_float` converts per batch. Bad files are skipped (or repaired when safe) and listed in a prep
report instead of failing the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from common.io import atomic_write_text, build_once
from data_prep.layout import SPLITS, NoteRecord

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: int16 samples, relocatable fingerprint
ONSET_THRESHOLD = 0.01  # fraction of the clip's peak (-40 dB) that marks the onset
SILENCE_PEAK = 1e-4  # a file whose peak is below this carries no note
INT16_SCALE = 32768.0  # PCM_16 full scale: soundfile reads sample s as s / 32768
CHUNK = 64  # clips per worker task


def as_float(rows: np.ndarray | torch.Tensor) -> torch.Tensor:
    """int16 rows (numpy or torch, any device) -> float32 torch tensor in [-1, 1), as soundfile would read them."""
    tensor = torch.from_numpy(np.array(rows)) if isinstance(rows, np.ndarray) else rows  # a batch: copied
    return tensor.float() / INT16_SCALE if tensor.dtype == torch.int16 else tensor.float()


@dataclass
class WaveformSplit:
    waveforms: np.ndarray  # (N, clip_samples) int16, memory-mapped read-only
    labels: np.ndarray  # (N,) int64 class indices into WaveformData.classes
    ids: list[str]  # note_str per row

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

    def classes_in(self, split: str) -> list[str]:
        """The families that have clips in `split` (NSynth's official valid/test have no synth_lead)."""
        present = set(np.unique(self.splits[split].labels).tolist())
        return [c for i, c in enumerate(self.classes) if i in present]

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        # Ray tasks, trials and pickles get the folder, and map the arrays themselves: no copy travels.
        return load_waveform_cache, (str(self.cache_dir),)


def _digest_file(h: Any, path: Path) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def fingerprint(
    split_records: dict[str, list[NoteRecord]],
    classes: list[str],
    clip_seconds: float,
    sample_rate: int,
    root: Path | str,
) -> str:
    """Hash of what the cache holds, independent of where the data folder is mounted.

    Which notes go to which split (paths relative to the data root, file sizes), how they are decoded, and the
    content of the data folder's metadata (every split's examples.json, the render index): the same data under
    another mount point hits the same caches, a re-rendered or re-downloaded note changes them.
    """
    root = Path(root).resolve()
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {"v": CACHE_VERSION, "classes": classes, "clip_seconds": clip_seconds, "sample_rate": sample_rate}
        ).encode()
    )
    metadata = sorted(root.glob("*.json")) + sorted(root.glob("nsynth-*/examples.json"))
    for path in metadata:
        h.update(path.relative_to(root).as_posix().encode())
        _digest_file(h, path)
    for split in SPLITS:
        for r in split_records.get(split, []):
            try:
                size = str(r.path.stat().st_size)
            except OSError:
                size = "missing"
            rel = os.path.relpath(Path(r.path).resolve(), root)
            h.update(f"{split}|{r.note_str}|{r.family}|{rel}|{size}\n".encode())
    return h.hexdigest()[:20]


def to_int16(audio: np.ndarray) -> np.ndarray:
    return np.clip(np.round(audio * INT16_SCALE), -32768, 32767).astype(np.int16)


def load_clip(path: Path, sample_rate: int, clip_samples: int) -> tuple[np.ndarray, list[str]]:
    """Decode one wav to mono int16 at sample_rate, trimmed to clip_samples from the onset.

    Returns the clip and the repairs made (resampled/downmixed/padded); raises ValueError for
    files that cannot be used (unreadable, empty, silent).
    """
    import torchaudio.functional as AF

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
    clip = mono[onset : onset + clip_samples]
    if len(clip) < clip_samples:
        clip = np.pad(clip, (0, clip_samples - len(clip)))
        repairs.append("padded")
    return to_int16(clip), repairs


def _decode_chunk(task: tuple[list[str], int, int]) -> list[tuple[np.ndarray | None, list[str] | str]]:
    """Worker: decode a chunk of files; per file (clip, repairs) or (None, why it was skipped)."""
    paths, sample_rate, clip_samples = task
    torch.set_num_threads(1)
    out: list[tuple[np.ndarray | None, list[str] | str]] = []
    for path in paths:
        try:
            out.append(load_clip(Path(path), sample_rate, clip_samples))
        except ValueError as err:
            out.append((None, str(err)))
    return out


def _write_split(
    out_dir: Path,
    split: str,
    records: Sequence[NoteRecord],
    class_index: dict[str, int],
    sample_rate: int,
    clip_samples: int,
    skipped: list[dict],
    repaired: Counter,
    pool: ProcessPoolExecutor | None,
) -> int:
    waves = np.lib.format.open_memmap(
        out_dir / f"{split}.npy", mode="w+", dtype=np.int16, shape=(len(records), clip_samples)
    )
    labels, ids = [], []
    chunks = [records[i : i + CHUNK] for i in range(0, len(records), CHUNK)]
    tasks = [([str(r.path) for r in chunk], sample_rate, clip_samples) for chunk in chunks]
    decoded = pool.map(_decode_chunk, tasks) if pool is not None else map(_decode_chunk, tasks)
    with tqdm(total=len(records), desc=f"decode {split}", unit="clip", delay=2.0) as progress:
        for chunk, results in zip(chunks, decoded):
            for r, (clip, info) in zip(chunk, results):
                if clip is None:
                    skipped.append({"split": split, "note_str": r.note_str, "path": str(r.path), "reason": info})
                    continue
                repaired.update(info)
                waves[len(labels)] = clip
                labels.append(class_index[r.family])
                ids.append(r.note_str)
            progress.update(len(chunk))
    waves.flush()
    del waves
    if len(labels) < len(records):  # shrink to the clips that decoded, copying block by block
        full = np.load(out_dir / f"{split}.npy", mmap_mode="r")
        kept = np.lib.format.open_memmap(
            out_dir / f"{split}.tmp.npy", mode="w+", dtype=np.int16, shape=(len(labels), clip_samples)
        )
        for start in range(0, len(labels), 4096):
            stop = min(start + 4096, len(labels))
            kept[start:stop] = full[start:stop]
        kept.flush()
        del full, kept
        os.replace(out_dir / f"{split}.tmp.npy", out_dir / f"{split}.npy")
    np.save(out_dir / f"{split}_labels.npy", np.asarray(labels, dtype=np.int64))
    (out_dir / f"{split}_ids.json").write_text(json.dumps(ids))
    return len(labels)


def _decode_all(
    final_dir: Path,
    split_records: dict[str, list[NoteRecord]],
    classes: list[str],
    clip_seconds: float,
    sample_rate: int,
    workers: int,
) -> None:
    """Decode every split into a temp folder next to `final_dir`, then rename it into place."""
    fp = final_dir.name
    clip_samples = int(round(clip_seconds * sample_rate))
    class_index = {c: i for i, c in enumerate(classes)}
    total = sum(len(v) for v in split_records.values())
    tmp_dir = Path(tempfile.mkdtemp(dir=final_dir.parent, prefix=f".{fp}."))
    workers = max(1, min(workers, -(-total // CHUNK)))
    log.info("Decoding %d clips into %s with %d worker process(es)", total, final_dir, workers)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers > 1 else None
    try:
        skipped: list[dict] = []
        repaired: Counter = Counter()
        counts = {
            s: _write_split(
                tmp_dir, s, split_records[s], class_index, sample_rate, clip_samples, skipped, repaired, pool
            )
            for s in SPLITS
        }
        report = {
            "kept": counts,
            "skipped": len(skipped),
            "skipped_by_reason": dict(Counter(s["reason"].split(" (")[0] for s in skipped)),
            "repaired": dict(repaired),
            "skipped_files": skipped,
        }
        for split, n in counts.items():
            if n == 0:
                raise ValueError(
                    f"No usable clips in the {split} split ({len(skipped)} files skipped; "
                    f"see the reasons above). Check the data under data.root or rebuild it."
                )
        (tmp_dir / "prep_report.json").write_text(json.dumps(report, indent=2))
        (tmp_dir / "classes.json").write_text(json.dumps(classes))
        meta = {
            "fingerprint": fp,
            "classes": classes,
            "sample_rate": sample_rate,
            "dtype": "int16",
            "clip_samples": clip_samples,
            "clip_seconds": clip_seconds,
            "counts": counts,
        }
        atomic_write_text(tmp_dir / "meta.json", json.dumps(meta, indent=2))
        os.rename(tmp_dir, final_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if skipped:
        log.warning(
            "Skipped %d unusable files (%s); listed in %s",
            len(skipped),
            report["skipped_by_reason"],
            final_dir / "prep_report.json",
        )
    if repaired:
        log.info("Repaired on load: %s", dict(repaired))


def build_waveform_cache(
    split_records: dict[str, list[NoteRecord]],
    classes: list[str],
    clip_seconds: float,
    sample_rate: int,
    cache_root: Path,
    root: Path | str,
    workers: int,
) -> WaveformData:
    """Return the cache for this selection, decoding the wavs only when its fingerprint is new."""
    fp = fingerprint(split_records, classes, clip_seconds, sample_rate, root)
    final_dir = Path(cache_root) / fp
    if final_dir.is_dir():
        log.info("Waveform cache hit: %s", final_dir)
    build_once(
        final_dir,
        lambda target: _decode_all(target, split_records, classes, clip_seconds, sample_rate, workers),
        what=f"the waveform cache {final_dir}",
    )
    return load_waveform_cache(final_dir)


def load_waveform_cache(cache_dir: Path | str) -> WaveformData:
    """Open a built cache read-only (arrays memory-mapped: nothing is read until used)."""
    cache_dir = Path(cache_dir)
    meta = json.loads((cache_dir / "meta.json").read_text())
    if meta.get("dtype") != "int16":
        raise ValueError(f"{cache_dir} is a waveform cache of an older version; delete it (it is rebuilt).")
    report_path = cache_dir / "prep_report.json"
    splits = {
        s: WaveformSplit(
            waveforms=np.load(cache_dir / f"{s}.npy", mmap_mode="r"),
            labels=np.load(cache_dir / f"{s}_labels.npy"),
            ids=json.loads((cache_dir / f"{s}_ids.json").read_text()),
        )
        for s in SPLITS
    }
    return WaveformData(
        fingerprint=meta["fingerprint"],
        classes=meta["classes"],
        sample_rate=meta["sample_rate"],
        clip_samples=meta["clip_samples"],
        splits=splits,
        cache_dir=cache_dir,
        report=json.loads(report_path.read_text()) if report_path.is_file() else {},
    )
