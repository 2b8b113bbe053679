"""Tests for the General-MIDI SoundFont renderer that builds the offline NSynth-style dataset."""

import collections
import re
from pathlib import Path

import numpy as np
import pytest

from data_prep import gm_render
from data_prep.layout import FAMILIES as NSYNTH_FAMILIES
from data_prep.layout import SOURCES as NSYNTH_SOURCES
from data_prep.gm_render import (
    GM_PROGRAM_FAMILIES,
    NSYNTH_VELOCITIES,
    PROGRAM_PITCH_RANGE,
    SKIPPED_PROGRAMS,
    NoteSpec,
    family_programs,
    family_table_markdown,
    is_silent,
    plan_notes,
    playable_range,
    render_note,
    render_notes,
    resolve_soundfont,
)

NOTE_STR_PATTERN = re.compile(r"^[a-z_]+_(acoustic|electronic|synthetic)_\d{3}-\d{3}-\d{3}$")
SHORT = {"seconds": 1.0, "hold_seconds": 0.5}
# TimGM6mb's alto sax has no sample zone at pitch 64: a real silent render.
SILENT_IN_TIMGM6MB = NoteSpec(program=65, pitch=64, velocity=100)


@pytest.fixture(scope="module")
def soundfont_bytes() -> bytes:
    return resolve_soundfont(None).read_bytes()


def test_table_maps_every_family_and_accounts_for_every_program():
    assert {family for family, _ in GM_PROGRAM_FAMILIES.values()} == set(NSYNTH_FAMILIES)
    assert {source for _, source in GM_PROGRAM_FAMILIES.values()} <= set(NSYNTH_SOURCES)
    mapped, skipped = set(GM_PROGRAM_FAMILIES), set(SKIPPED_PROGRAMS)
    assert not mapped & skipped
    assert mapped | skipped == set(range(128))
    assert all(reason.strip() for reason in SKIPPED_PROGRAMS.values())
    assert set(PROGRAM_PITCH_RANGE) == mapped
    for low, high in PROGRAM_PITCH_RANGE.values():
        assert 0 <= low < high <= 127


def test_instrument_ranges_are_instrument_typical():
    assert playable_range(72)[0] > playable_range(33)[1], "piccolo should sit above the electric bass"
    assert playable_range(58)[0] < 40, "tuba should reach the low register"
    with pytest.raises(ValueError, match="program 125"):
        playable_range(125)


def test_family_table_markdown_lists_every_family_and_program():
    table = family_table_markdown()
    for index, family in enumerate(NSYNTH_FAMILIES):
        assert f"| {family} ({index}) |" in table
    for program in list(GM_PROGRAM_FAMILIES) + list(SKIPPED_PROGRAMS):
        assert re.search(rf"(\| |, ){program} ", table), f"program {program} missing from the table"


def test_plan_notes_is_deterministic_balanced_and_valid():
    plan = plan_notes(NSYNTH_FAMILIES, notes_per_family=40, seed=7)

    assert plan == plan_notes(NSYNTH_FAMILIES, notes_per_family=40, seed=7)
    assert plan != plan_notes(NSYNTH_FAMILIES, notes_per_family=40, seed=8)
    assert collections.Counter(spec.family for spec in plan) == dict.fromkeys(NSYNTH_FAMILIES, 40)
    assert len({spec.note_str for spec in plan}) == len(plan)
    for spec in plan:
        low, high = playable_range(spec.program)
        assert low <= spec.pitch <= high
        assert spec.velocity in NSYNTH_VELOCITIES
        assert NOTE_STR_PATTERN.match(spec.note_str), spec.note_str
        assert spec.note_str.startswith(f"{spec.family}_{spec.source}_{spec.program:03d}-")
    for family in NSYNTH_FAMILIES:
        per_program = collections.Counter(spec.program for spec in plan if spec.family == family)
        counts = [per_program[program] for program in family_programs(family)]
        assert max(counts) - min(counts) <= 1, f"{family} notes are not spread evenly: {counts}"


def test_plan_notes_for_a_family_does_not_depend_on_the_others():
    full = plan_notes(NSYNTH_FAMILIES, notes_per_family=20, seed=3)
    assert plan_notes(["vocal"], notes_per_family=20, seed=3) == [spec for spec in full if spec.family == "vocal"]


def test_plan_notes_rejects_bad_requests():
    with pytest.raises(ValueError, match=r"\['drums'\].*valid families.*'bass'"):
        plan_notes(["bass", "drums"], notes_per_family=5, seed=0)
    with pytest.raises(ValueError, match="twice"):
        plan_notes(["bass", "bass"], notes_per_family=5, seed=0)
    with pytest.raises(ValueError, match="lower notes_per_family"):
        plan_notes(["vocal"], notes_per_family=100_000, seed=0)


def test_render_note_shape_dtype_and_pitch(soundfont_bytes):
    audio = render_note(soundfont_bytes, NoteSpec(program=80, pitch=69, velocity=100), sample_rate=16000, **SHORT)

    assert audio.dtype == np.float32 and audio.shape == (16000,)
    assert not is_silent(audio)
    assert np.abs(audio).max() <= 1.0
    # A4 must come out at 440 Hz: a wrong resampling ratio would shift it by a factor of 3.
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    assert np.fft.rfftfreq(len(audio), 1 / 16000)[spectrum.argmax()] == pytest.approx(440, rel=0.02)


def test_render_note_keeps_velocity_audible(soundfont_bytes):
    loud, soft = (render_note(soundfont_bytes, NoteSpec(0, 60, velocity), **SHORT) for velocity in (127, 25))
    assert np.sqrt(np.mean(loud**2)) > 4 * np.sqrt(np.mean(soft**2))


def test_render_note_records_the_release_tail_after_note_off(soundfont_bytes):
    audio = render_note(soundfont_bytes, NoteSpec(73, 72, 100), sample_rate=16000, seconds=2.0, hold_seconds=0.5)
    held, release, end = audio[:8000], audio[9600:11200], audio[-4000:]
    assert not is_silent(release), "the renderer stopped at note-off instead of recording the release"
    assert np.abs(end).max() < 0.01 * np.abs(held).max(), "the note should have died away by the end"


def test_render_note_rejects_a_hold_longer_than_the_note(soundfont_bytes):
    with pytest.raises(ValueError, match="hold_seconds"):
        render_note(soundfont_bytes, NoteSpec(0, 60, 100), seconds=1.0, hold_seconds=2.0)


def test_is_silent_uses_the_documented_threshold():
    threshold = 10 ** (gm_render.SILENCE_PEAK_DBFS / 20)
    assert is_silent(np.full(10, 0.9 * threshold, dtype=np.float32))
    assert not is_silent(np.full(10, 1.1 * threshold, dtype=np.float32))


def test_render_notes_in_process_marks_silent_renders():
    specs = [NoteSpec(0, 60, 100), SILENT_IN_TIMGM6MB]
    results = list(render_notes(resolve_soundfont(None), specs, workers=1, **SHORT))
    assert [spec for spec, _ in results] == specs
    assert results[0][1] is not None and results[1][1] is None


def test_render_notes_pool_matches_in_process_render(soundfont_bytes):
    specs = [NoteSpec(33, 40, 75), SILENT_IN_TIMGM6MB, NoteSpec(56, 67, 127)]
    results = list(render_notes(resolve_soundfont(None), specs, workers=2, **SHORT))

    assert [spec for spec, _ in results] == specs
    assert results[1][1] is None
    for spec, audio in (results[0], results[2]):
        np.testing.assert_allclose(audio, render_note(soundfont_bytes, spec, **SHORT), atol=1e-6)


def test_missing_soundfont_errors_say_how_to_fix(tmp_path: Path, monkeypatch):
    missing = tmp_path / "nope.sf2"
    with pytest.raises(FileNotFoundError, match=r"nope\.sf2.*data\.soundfont="):
        resolve_soundfont(str(missing))
    monkeypatch.setattr(gm_render, "default_soundfont", lambda: missing)
    with pytest.raises(FileNotFoundError, match="reinstall.*pretty_midi"):
        resolve_soundfont(None)
