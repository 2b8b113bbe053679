"""Layout reading, selection/splits, waveform cache, bad input and the hub path (local data, no network)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from common.config import run_defaults
from data_prep.dataset import cached_records, instrument_table, prepare_data, summary_table
from data_prep.layout import FAMILIES, NOTE_STR_RE, REQUIRED_FIELDS, NoteRecord, read_layout, split_dir, wav_path
from data_prep.splits import select, split_counts
from tests.nsynth_fixtures import SAMPLE_EXAMPLES, synth_note, write_official_layout

FIVE = ["bass", "keyboard", "reed", "string", "vocal"]  # the families of the released sample
DATA = run_defaults()["data"]  # the schema's data.*
QUOTA_AND_CAPS = {"min_eval_instruments": DATA["min_eval_instruments"], "split_caps": DATA["split_caps"]}


def nsynth_cfg(root: Path, **over) -> dict:
    """A complete data config (every key at its schema default) for local NSynth-layout data at `root`."""
    cfg = run_defaults()["data"] | {
        "source": "nsynth",
        "root": str(root),
        "families": FIVE,
        "per_family": None,
        "max_total_size_mb": None,
        "clip_seconds": 0.5,
    }
    return cfg | over


def test_sample_fixture_has_official_fields():
    sample = json.loads(SAMPLE_EXAMPLES.read_text())
    for key, ex in sample.items():
        assert set(REQUIRED_FIELDS) <= set(ex)
        assert NOTE_STR_RE.match(key) and ex["note_str"] == key
        assert FAMILIES[ex["instrument_family"]] == ex["instrument_family_str"]


def test_official_layout_loads_through_the_same_loader(official_root, tmp_path):
    records = read_layout(official_root)
    assert len(records) == 3 * 5 * 3
    data = prepare_data(nsynth_cfg(official_root), tmp_path / "work")
    assert data.classes == FIVE
    for split in ("train", "valid", "test"):
        part = data.splits[split]
        assert part.waveforms.shape == (15, 8000) and part.waveforms.dtype == np.int16
        assert sorted(np.bincount(part.labels).tolist()) == [3] * 5
        assert all(NOTE_STR_RE.match(i) for i in part.ids)
    # the official split folders are kept as they are: instrument-disjoint
    train_instr = {i.rsplit("-", 2)[0] for i in data.splits["train"].ids}
    assert not train_instr & {i.rsplit("-", 2)[0] for i in data.splits["test"].ids}
    assert "bass" in summary_table(data)
    assert json.loads((data.cache_dir / "classes.json").read_text()) == FIVE


def test_clip_starts_at_onset(official_root, tmp_path):
    path = next((split_dir(official_root, "train") / "audio").glob("*.wav"))
    audio, sr = sf.read(path, dtype="float32")
    sf.write(path, np.concatenate([np.zeros(4000, np.float32), audio[:-4000]]), sr, subtype="PCM_16")
    data = prepare_data(nsynth_cfg(official_root), tmp_path / "work")
    row = data.splits["train"].ids.index(path.stem)
    waveform = data.splits["train"].waveforms[row]
    assert abs(waveform[0]) > 0 or np.abs(waveform[:50]).max() > 1e-3


def test_cache_fingerprint_reuse_and_invalidation(official_root, tmp_path):
    work = tmp_path / "work"
    first = prepare_data(nsynth_cfg(official_root), work)
    stamp = (first.cache_dir / "meta.json").stat().st_mtime_ns
    again = prepare_data(nsynth_cfg(official_root), work)
    assert again.cache_dir == first.cache_dir and (again.cache_dir / "meta.json").stat().st_mtime_ns == stamp
    longer = prepare_data(nsynth_cfg(official_root, clip_seconds=1.0), work)
    assert longer.fingerprint != first.fingerprint and longer.splits["train"].waveforms.shape[1] == 16000
    victim = wav_path(official_root, "valid", first.splits["valid"].ids[0])
    sf.write(victim, synth_note(40, 100, seconds=3.0, timbre=2), 16000, subtype="PCM_16")  # another recording
    changed = prepare_data(nsynth_cfg(official_root), work)
    assert changed.fingerprint != first.fingerprint
    examples = split_dir(official_root, "test") / "examples.json"
    meta = json.loads(examples.read_text())
    next(iter(meta.values()))["velocity"] = 1  # the metadata changed, no wav did
    examples.write_text(json.dumps(meta))
    assert prepare_data(nsynth_cfg(official_root), work).fingerprint != changed.fingerprint


def test_moved_data_folder_hits_every_cache(official_root, tmp_path):
    """The same data under another mount point (moved, re-mounted, copied with new mtimes) reuses the waveform
    and log-mel caches: the fingerprint holds relative paths, sizes and the metadata, not absolute paths."""
    import os
    import shutil

    import torch

    from common.config import FeatureConfig
    from trainable.evaluation import make_pipeline

    work = tmp_path / "work"
    first = prepare_data(nsynth_cfg(official_root), work)
    share = run_defaults()["train"]["device_data_share"]
    make_pipeline(first, "train", FeatureConfig(n_mels=32), torch.device("cpu"), work, share)._features_source()
    caches = sorted(p.name for p in (work / "cache").rglob("*") if p.is_file())
    moved = shutil.copytree(official_root, tmp_path / "elsewhere" / "nsynth")  # new paths, new mtimes
    for wav in moved.rglob("*.wav"):
        os.utime(wav, (1, 1))
    shutil.rmtree(official_root)
    again = prepare_data(nsynth_cfg(moved), work)
    assert again.cache_dir == first.cache_dir
    make_pipeline(again, "train", FeatureConfig(n_mels=32), torch.device("cpu"), work, share)._features_source()
    assert sorted(p.name for p in (work / "cache").rglob("*") if p.is_file()) == caches  # nothing new was built


def test_waveforms_are_int16_exactly_as_the_wavs_hold_them(official_root, tmp_path):
    from data_prep.waveform_cache import as_float

    data = prepare_data(nsynth_cfg(official_root, clip_seconds=4.0), tmp_path / "work")
    note = data.splits["test"].ids[0]
    pcm, _ = sf.read(wav_path(official_root, "test", note), dtype="int16")
    row = data.splits["test"].waveforms[0]
    onset = int(np.flatnonzero(pcm)[0]) if row[0] != pcm[0] else 0
    assert row.dtype == np.int16 and np.array_equal(row[: len(pcm) - onset], pcm[onset:])
    audio, _ = sf.read(wav_path(official_root, "test", note), dtype="float32")
    n = len(pcm) - onset
    assert np.array_equal(as_float(row[None]).numpy()[0][:n], audio[onset:])  # what soundfile reads, exactly


def test_waveform_data_pickles_as_its_path(official_root, tmp_path):
    """What Ray hands a task or a trial: a few hundred bytes, whatever the data set's size."""
    import pickle

    data = prepare_data(nsynth_cfg(official_root), tmp_path / "work")
    payload = pickle.dumps(data)
    assert len(payload) < 1000 and data.splits["train"].waveforms.nbytes > 100_000
    back = pickle.loads(payload)
    assert back.cache_dir == data.cache_dir and isinstance(back.splits["train"].waveforms, np.memmap)
    assert np.array_equal(back.splits["train"].waveforms, data.splits["train"].waveforms)


def test_bad_files_are_skipped_counted_and_repaired(official_root, tmp_path):
    train = split_dir(official_root, "train") / "audio"
    wavs = sorted(train.glob("*.wav"))
    wavs[0].write_bytes(b"RIFF\x00\x00garbage")  # corrupt
    wavs[1].unlink()  # missing
    audio, _ = sf.read(wavs[2], dtype="float32")
    sf.write(wavs[2], audio[::2], 8000, subtype="PCM_16")  # wrong sample rate -> resampled
    sf.write(wavs[3], np.stack([audio, audio], axis=1), 16000, subtype="PCM_16")  # stereo -> downmixed
    sf.write(wavs[4], np.zeros(64000, np.float32), 16000, subtype="PCM_16")  # silent
    data = prepare_data(nsynth_cfg(official_root), tmp_path / "work")
    report = data.report
    assert report["skipped"] == 3 and len(data.splits["train"]) == 12
    reasons = " ".join(s["reason"] for s in report["skipped_files"])
    assert "missing" in reasons and "unreadable" in reasons and "silent" in reasons
    assert report["repaired"] == {"resampled": 1, "downmixed": 1}
    assert json.loads((data.cache_dir / "prep_report.json").read_text())["skipped"] == 3


def test_clear_errors(official_root, tmp_path):
    with pytest.raises(ValueError, match="have no clips"):
        prepare_data(nsynth_cfg(official_root, families=["bass", "flute"]), tmp_path / "w")
    with pytest.raises(ValueError, match="unknown families"):
        prepare_data(nsynth_cfg(official_root, families=["bass", "kazoo"]), tmp_path / "w")
    with pytest.raises(FileNotFoundError, match="nsynth-train"):
        prepare_data(nsynth_cfg(tmp_path / "empty"), tmp_path / "w")
    for wav in (split_dir(official_root, "test") / "audio").glob("*.wav"):
        wav.write_bytes(b"not audio")
    with pytest.raises(ValueError, match="No usable clips in the test split"):
        prepare_data(nsynth_cfg(official_root), tmp_path / "w")


def test_resplit_by_instrument_and_by_note_is_disjoint_and_seeded(tmp_path):
    root = tmp_path / "nsynth"
    write_official_layout(root, copies_per_split=4)
    # one pooled folder (3 instruments per family): must be re-split
    pooled = [dataclasses.replace(r, split="train") for r in read_layout(root)]
    for split_by in ("instrument", "note"):
        out = select(
            pooled, FIVE, None, None, split_by, {"train": 0.6, "valid": 0.2, "test": 0.2}, 4.0, seed=3, **QUOTA_AND_CAPS
        )
        again = select(
            pooled, FIVE, None, None, split_by, {"train": 0.6, "valid": 0.2, "test": 0.2}, 4.0, seed=3, **QUOTA_AND_CAPS
        )
        assert {s: [r.note_str for r in v] for s, v in out.items()} == {
            s: [r.note_str for r in v] for s, v in again.items()
        }
        assert sum(len(v) for v in out.values()) == len(pooled)
        key = (lambda r: r.instrument) if split_by == "instrument" else (lambda r: r.note_str)
        seen = [{key(r) for r in out[s]} for s in out]
        assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])


def test_per_family_cap_and_size_cap(official_root):
    records = read_layout(official_root)
    out = select(
        records, FIVE, 6, None, "instrument", {"train": 0.7, "valid": 0.15, "test": 0.15}, 4.0, 0, **QUOTA_AND_CAPS
    )
    per_family = {f: sum(r.family == f for v in out.values() for r in v) for f in FIVE}
    assert set(per_family.values()) == {6}
    tiny = select(
        records,
        FIVE,
        None,
        5 * 3 * 128_000 / 2**20,
        "instrument",
        {"train": 0.7, "valid": 0.15, "test": 0.15},
        4.0,
        0,
        **QUOTA_AND_CAPS,
    )
    assert sum(len(v) for v in tiny.values()) == 15


def record(split: str, family: str, instrument_str: str, pitch: int, base: str = "") -> NoteRecord:
    return NoteRecord(
        split=split,
        note_str=f"{instrument_str}-{pitch:03d}-100",
        family=family,
        instrument=0,
        instrument_str=instrument_str,
        pitch=pitch,
        velocity=100,
        path=Path("x.wav"),
        base_instrument_str=base,
    )


def test_records_default_their_base_instrument_to_themselves(official_root):
    records = read_layout(official_root)  # official examples.json: no base_instrument_str field
    assert all(r.base_instrument_str == r.instrument_str and not r.derived for r in records)
    assert record("train", "organ", "organ_electronic_3016", 60, "organ_electronic_016").derived
    assert NOTE_STR_RE.match("organ_electronic_1019016-060-100").group("instrument_str") == "organ_electronic_1019016"
    assert not NOTE_STR_RE.match("organ_electronic_16-060-100")


def test_instrument_table_counts_base_and_derived_instruments_per_split():
    records = [
        record("train", "organ", "organ_electronic_016", 40),
        record("train", "organ", "organ_electronic_016", 41),
        record("train", "organ", "organ_electronic_1016", 42, "organ_electronic_016"),
        record("train", "organ", "organ_electronic_2016", 43, "organ_electronic_016"),
        record("train", "organ", "organ_electronic_3017", 44, "organ_electronic_017"),  # base 017 only via a variant
        record("valid", "organ", "organ_electronic_018", 45),
        record("valid", "organ", "organ_electronic_019", 46),
        record("test", "organ", "organ_electronic_1020", 47, "organ_electronic_020"),
        record("train", "bass", "bass_electronic_033", 30),
        record("valid", "bass", "bass_electronic_034", 30),
        record("test", "bass", "bass_electronic_035", 30),
        record("test", "bass", "bass_electronic_1035", 31, "bass_electronic_035"),
    ]
    table = instrument_table(records, min_eval_instruments=2)
    rows = {line.split()[0]: line.split() for line in table.splitlines()[2:]}
    #                       train        valid        test         all
    assert rows["bass"][:9] == ["bass", "1+0", "1", "1+0", "1", "1+1", "2", "3+1", "4"]
    assert rows["organ"][:9] == ["organ", "2+3", "5", "2+0", "2", "1+1", "1", "5+4", "8"]
    assert rows["total"] == ["total", "3+3", "6", "3+0", "3", "2+2", "3", "8+5", "12"]
    assert "valid/test < 2 base" in " ".join(rows["bass"]) and "test < 2 base" in " ".join(rows["organ"])
    assert "valid" not in " ".join(rows["organ"][9:])
    unflagged = instrument_table(records, min_eval_instruments=0)  # no quota: nothing to flag
    assert [line.split()[0] for line in unflagged.splitlines()[2:]] == ["bass", "organ", "total"]
    assert "<" not in unflagged


def test_resplit_keeps_derived_instruments_with_their_base_and_applies_the_quota():
    records = [
        record("train", "organ", f"organ_electronic_{v * 1000 + p:03d}", pitch, f"organ_electronic_{p:03d}")
        for p in range(16, 21)
        for v in range(4)
        for pitch in (60, 61)
    ]
    out = select(
        records,
        ["organ"],
        None,
        None,
        "instrument",
        {"train": 0.7, "valid": 0.15, "test": 0.15},
        4.0,
        seed=1,
        min_eval_instruments=2,
        split_caps=DATA["split_caps"],
    )
    split_of = {}
    for split, recs in out.items():
        for r in recs:
            assert split_of.setdefault(r.base_instrument_str, split) == split
    assert sorted(sum(s == split for s in split_of.values()) for split in out) == [1, 2, 2]
    assert len({r.base_instrument_str for r in out["train"]}) == 1 and len(out["train"]) == 8


def test_cached_records_follow_the_cache(official_root, tmp_path):
    data = prepare_data(nsynth_cfg(official_root), tmp_path / "work")
    records = cached_records(data, read_layout(official_root))
    assert [r.note_str for r in records if r.split == "valid"] == data.splits["valid"].ids
    table = instrument_table(records, DATA["min_eval_instruments"])
    assert table.splitlines()[-1].split()[1:3] == ["5+0", "15"]  # 5 families x 1 instrument x 3 notes in train


def test_split_counts():
    assert split_counts(10, {"train": 0.7, "valid": 0.15, "test": 0.15}) == {"train": 7, "valid": 2, "test": 1}
    assert split_counts(3, {"train": 0.9, "valid": 0.05, "test": 0.05}) == {"train": 1, "valid": 1, "test": 1}


@pytest.mark.slow
def test_hub_streaming_materialises_layout_from_local_dataset(tmp_path):
    """The real hub code path, pointed at a local parquet dataset of the same form (no network)."""
    datasets = pytest.importorskip("datasets")
    import io

    sample = list(json.loads(SAMPLE_EXAMPLES.read_text()).values())
    hub = tmp_path / "hub"
    hub.mkdir()
    for split in ("train", "validation", "test"):
        rows = []
        for k in range(4):
            for ex in sample:
                buf = io.BytesIO()
                sf.write(buf, synth_note(ex["pitch"], ex["velocity"], seconds=1.0), 16000, format="WAV")
                rows.append(
                    {
                        **{f: ex[f] for f in REQUIRED_FIELDS if f != "note_str"},
                        "instrument": ex["instrument"] + k + {"train": 0, "validation": 10, "test": 20}[split],
                        "note_str": ex["note_str"],
                        "audio": {"bytes": buf.getvalue(), "path": None},
                    }
                )
        ds = datasets.Dataset.from_list(rows).cast_column("audio", datasets.Audio())
        ds.to_parquet(str(hub / f"{split}-00000.parquet"))
    root = tmp_path / "materialised"
    cfg = nsynth_cfg(
        root,
        hf_id=str(hub),
        hf_splits={"train": "train", "valid": "validation", "test": "test"},
        per_family=4,
        families=["bass", "reed", "vocal"],
    )
    data = prepare_data(cfg, tmp_path / "work")
    assert (split_dir(root, "train") / "examples.json").is_file()
    examples = json.loads((split_dir(root, "train") / "examples.json").read_text())
    assert all(set(REQUIRED_FIELDS) <= set(ex) for ex in examples.values())
    assert data.classes == ["bass", "reed", "vocal"] and len(data.splits["train"]) >= 3
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*.wav")}
    prepare_data(cfg, tmp_path / "work")  # rerun: nothing re-downloaded or rewritten
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.wav")} == mtimes
