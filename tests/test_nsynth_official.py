"""The official NSynth release as input: its splits as released, a family missing from valid/test reported,
visible caps, one-line errors before any decoding, and a hub stream that resumes where it stopped."""

from __future__ import annotations

import copy
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from data_prep.layout import REQUIRED_FIELDS, make_note_str, split_dir, wav_path
from tests.nsynth_fixtures import SAMPLE_EXAMPLES, synth_note

ROOT = Path(__file__).resolve().parent.parent
SIX = "[bass,keyboard,reed,string,vocal,synth_lead]"


def add_synth_lead_to_train(root: Path, notes: int = 4) -> None:
    """Like the official release: synth_lead notes in nsynth-train only."""
    examples_path = split_dir(root, "train") / "examples.json"
    examples = json.loads(examples_path.read_text())
    template = next(iter(json.loads(SAMPLE_EXAMPLES.read_text()).values()))
    for k in range(notes):
        ex = copy.deepcopy(template)
        ex |= {
            "instrument_family": 9,
            "instrument_family_str": "synth_lead",
            "instrument_str": f"synth_lead_synthetic_{900 + k:03d}",
            "instrument": 900 + k,
            "pitch": 60 + k,
        }
        ex["note_str"] = make_note_str(ex["instrument_str"], ex["pitch"], ex["velocity"])
        examples[ex["note_str"]] = ex
        sf.write(
            wav_path(root, "train", ex["note_str"]), synth_note(ex["pitch"], 100, timbre=2), 16000, subtype="PCM_16"
        )
    examples_path.write_text(json.dumps(examples))


def build(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "data_prep" / "build.py"),
            f"workdir={workdir}",
            "data.clip_seconds=0.5",
            "data.prep_workers=2",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


@pytest.mark.slow
def test_official_release_builds_with_its_own_splits_and_reports_the_missing_family(official_root, tmp_path):
    add_synth_lead_to_train(official_root)
    out = build(tmp_path / "work", "data=nsynth", f"data.root={official_root}", f"data.families={SIX}")
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout + out.stderr
    # every note, in the split it was released in
    for split in ("train", "valid", "test"):
        released = json.loads((split_dir(official_root, split) / "examples.json").read_text())
        ids = json.loads(next((tmp_path / "work" / "cache" / "waveforms").glob(f"*/{split}_ids.json")).read_text())
        assert sorted(ids) == sorted(released)
    assert "valid split has no notes of synth_lead" in text and "test split has no notes of synth_lead" in text
    assert "macro-F1 cover the other 5 families" in text


@pytest.mark.slow
def test_subset_preset_caps_each_split_and_family_and_says_what_it_dropped(official_root, tmp_path):
    out = build(
        tmp_path / "work",
        "data=nsynth_subset",
        f"data.root={official_root}",
        "data.families=[bass,keyboard,reed,string,vocal]",
        "data.split_caps.train=2",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    ids = json.loads(next((tmp_path / "work" / "cache" / "waveforms").glob("*/train_ids.json")).read_text())
    assert len(ids) == 2 * 5  # 3 notes per family in the fixture's train split, capped at 2
    assert "data.split_caps.train=2 binds for 5 families" in out.stdout + out.stderr
    assert "kept 10 of 15 train notes, dropped 5" in out.stdout + out.stderr


@pytest.mark.parametrize(
    "setup,args,message",
    [
        ("no_valid", [], "lacks nsynth-valid/examples.json"),
        ("bad_json", [], "is not valid JSON"),
        ("ok", ["data.split_caps.valid=0"], "data.split_caps has {'valid': 0}"),
        ("ok", ["data.prep_workers=0"], "data.prep_workers=0 must be > 0"),
    ],
)
@pytest.mark.slow
def test_bad_data_input_is_one_line_before_any_decoding(official_root, tmp_path, setup, args, message):
    if setup == "no_valid":
        (split_dir(official_root, "valid") / "examples.json").unlink()
    elif setup == "bad_json":
        (split_dir(official_root, "test") / "examples.json").write_text("{not json")
    out = build(
        tmp_path / "work",
        "data=nsynth",
        f"data.root={official_root}",
        "data.families=[bass,keyboard,reed,string,vocal]",
        *args,
    )
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], out.stderr[-2000:]
    assert not (tmp_path / "work" / "cache").exists()  # nothing decoded


def hub_dataset(folder: Path, per_split: int) -> None:
    """A local parquet dataset with the hub's NSynth columns (the real `datasets` streaming path, no network)."""
    datasets = pytest.importorskip("datasets")
    sample = list(json.loads(SAMPLE_EXAMPLES.read_text()).values())
    folder.mkdir()
    for offset, split in enumerate(("train", "validation", "test")):
        rows = []
        for k in range(per_split):
            ex = sample[k % len(sample)]
            buf = io.BytesIO()
            sf.write(buf, synth_note(ex["pitch"], ex["velocity"], seconds=0.5), 16000, format="WAV")
            instrument = ex["instrument"] + 1000 * offset + k
            rows.append(
                {
                    **{f: ex[f] for f in REQUIRED_FIELDS if f not in ("note_str", "instrument_str")},
                    "instrument": instrument,
                    "instrument_str": f"{ex['instrument_family_str']}_"
                    f"{ex['instrument_source_str']}_{instrument % 1000:03d}",
                    "audio": {"bytes": buf.getvalue(), "path": None},
                }
            )
        datasets.Dataset.from_list(rows).cast_column("audio", datasets.Audio()).to_parquet(
            str(folder / f"{split}-00000.parquet")
        )


def test_interrupted_hub_stream_resumes_without_fetching_finished_notes(tmp_path, monkeypatch):
    from common.config import run_defaults
    from data_prep import sources

    hub = tmp_path / "hub"
    hub_dataset(hub, per_split=40)
    root = tmp_path / "materialised"
    monkeypatch.setattr(sources, "SAVE_EVERY", 8)
    args = (
        root,
        str(hub),
        {"train": "train", "valid": "validation", "test": "test"},
        ["bass", "keyboard", "reed", "string", "vocal"],
        None,
        None,
        0,
        {"train": 0.8, "valid": 0.1, "test": 0.1},
        run_defaults()["data"]["split_caps"],
    )
    decoded: list[str] = []
    real_decode = sources._decode_hub_audio

    def decode(audio):
        if len(decoded) == 25:
            raise KeyboardInterrupt  # the user's Ctrl-C, mid-split
        decoded.append("x")
        return real_decode(audio)

    monkeypatch.setattr(sources, "_decode_hub_audio", decode)
    with pytest.raises(KeyboardInterrupt):
        sources.stream_hub_nsynth(*args)
    first = json.loads((split_dir(root, "train") / "examples.json").read_text())
    assert len(first) == 25  # the index was written when interrupted, not only at the split's end
    state = json.loads((root / sources.HUB_STATE).read_text())
    assert state["train"]["done"] is False
    wrote = {p: p.stat().st_mtime_ns for p in root.rglob("*.wav")}

    fetched: list[dict] = []

    def count(audio):
        fetched.append(audio)
        return real_decode(audio)

    monkeypatch.setattr(sources, "_decode_hub_audio", count)
    stats = sources.stream_hub_nsynth(*args)
    train = json.loads((split_dir(root, "train") / "examples.json").read_text())
    assert len(train) == 40 and set(first) <= set(train)
    assert stats["train streamed"] == 15  # only the notes it had not written: the stream resumed past the others
    assert all(p.stat().st_mtime_ns == t for p, t in wrote.items())
    assert len(json.loads((split_dir(root, "test") / "examples.json").read_text())) == 40
    assert json.loads((root / sources.HUB_STATE).read_text())["train"]["done"] is True
    fetched.clear()
    assert sources.stream_hub_nsynth(*args) == {"train reused": 40, "valid reused": 40, "test reused": 40}
    assert not fetched
    assert np.isfinite(sf.read(next(root.rglob("*.wav")))[0]).all()
