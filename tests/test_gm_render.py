"""Tests for the General-MIDI SoundFont renderer that builds the offline NSynth-style dataset."""

import collections
import json
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from common.config import run_defaults
from data_prep import gm_render, soundfonts
from data_prep.gm_render import (
    GM_PROGRAM_FAMILIES,
    NSYNTH_VELOCITIES,
    PROGRAM_PITCH_RANGE,
    SKIPPED_PROGRAMS,
    NoteSpec,
    family_programs,
    family_table_markdown,
    instrument_number,
    is_silent,
    plan_dataset,
    playable_range,
    render_note,
    render_notes,
)
from data_prep.layout import FAMILIES as NSYNTH_FAMILIES
from data_prep.layout import NOTE_STR_RE, SPLITS, split_dir
from data_prep.layout import SOURCES as NSYNTH_SOURCES
from data_prep.soundfonts import default_soundfont, load_soundfont, resolve_soundfonts
from data_prep.sources import render_gm
from data_prep.splits import quota_counts
from data_prep.variants import Timbre, draw_timbre

NOTE_STR_PATTERN = re.compile(r"^[a-z_]+_(acoustic|electronic|synthetic)_\d{3,}-\d{3}-\d{3}$")
FRACTIONS = {"train": 0.7, "valid": 0.15, "test": 0.15}
# render_gm's arguments for an organ-only build (tests add per_family)
ORGAN_BUILD = dict(
    families=["organ"],
    max_total_size_mb=None,
    fractions=FRACTIONS,
    seed=0,
    workers=1,
    variants=2,
    min_eval_instruments=2,
)
SHORT = {"seconds": 1.0, "hold_seconds": 0.5}
# TimGM6mb's alto sax has no sample zone at pitch 64: a real silent render.
SILENT_IN_TIMGM6MB = NoteSpec(program=65, pitch=64, velocity=100)


@pytest.fixture(scope="module")
def soundfont_bytes() -> bytes:
    return default_soundfont().read_bytes()


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


# One SoundFont, no derived instruments, no eval quota: the plain plan most tests here are about.
PLAIN = {"soundfonts": 1, "variants": 0, "min_eval_instruments": 0}


def plan_notes(families, notes_per_family, seed, **kwargs):
    return plan_dataset(families, notes_per_family, seed, FRACTIONS, **(PLAIN | kwargs)).specs


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
        assert NOTE_STR_PATTERN.match(spec.note_str) and NOTE_STR_RE.match(spec.note_str), spec.note_str
        assert spec.note_str.startswith(f"{spec.family}_{spec.source}_{spec.program:03d}-")
        assert spec.instrument_str == spec.base_instrument_str and spec.variant == 0
    full = plan_dataset(NSYNTH_FAMILIES, 40, 7, FRACTIONS, **PLAIN)
    for family in NSYNTH_FAMILIES:
        for split in SPLITS:  # within a split, notes are spread evenly over its base instruments
            per_program = collections.Counter(s.program for s in plan if s.family == family and full.split(s) == split)
            counts = [per_program[p] for p in family_programs(family) if full.split_of[(0, p)] == split]
            assert counts and max(counts) - min(counts) <= 1, f"{family} {split} notes are not spread evenly: {counts}"


def test_plan_notes_for_a_family_does_not_depend_on_the_others():
    full = plan_notes(NSYNTH_FAMILIES, notes_per_family=20, seed=3, variants=4, min_eval_instruments=2)
    alone = plan_notes(["vocal"], notes_per_family=20, seed=3, variants=4, min_eval_instruments=2)
    assert alone == [spec for spec in full if spec.family == "vocal"]


def test_plan_notes_rejects_bad_requests():
    with pytest.raises(ValueError, match=r"\['drums'\].*valid families.*'bass'"):
        plan_notes(["bass", "drums"], notes_per_family=5, seed=0)
    with pytest.raises(ValueError, match="twice"):
        plan_notes(["bass", "bass"], notes_per_family=5, seed=0)
    with pytest.raises(ValueError, match="lower notes_per_family"):
        plan_notes(["vocal"], notes_per_family=100_000, seed=0)
    with pytest.raises(ValueError, match="data.variants"):
        plan_notes(["vocal"], notes_per_family=10, seed=0, variants=1000)


def test_instrument_ids_are_distinct_per_soundfont_and_variant_and_nsynth_shaped():
    assert instrument_number(0, 56) == 56 and instrument_number(0, 56, 3) == 3056
    assert instrument_number(1, 56) == 1_000_056 and instrument_number(2, 56, 19) == 2_019_056
    plan = plan_dataset(["organ", "vocal"], 200, 0, FRACTIONS, soundfonts=2, variants=5, min_eval_instruments=2)
    by_instrument = {}
    for spec in plan.specs:
        key = (spec.soundfont, spec.program, spec.variant)
        assert by_instrument.setdefault(spec.instrument_str, key) == key, "two instruments share an id"
        assert NOTE_STR_RE.match(spec.note_str).group("instrument_str") == spec.instrument_str
        base = NoteSpec(spec.program, spec.pitch, spec.velocity, spec.soundfont)
        assert spec.base_instrument_str == base.instrument_str
    assert {s.soundfont for s in plan.specs} == {0, 1}
    assert len({(sf, p) for sf, p, _ in by_instrument.values()}) == 2 * (5 + 3)


def test_split_quotas_for_families_with_five_or_more_base_instruments():
    assert quota_counts(5, FRACTIONS, 2) == {"train": 1, "valid": 2, "test": 2}
    assert quota_counts(8, FRACTIONS, 2) == {"train": 4, "valid": 2, "test": 2}
    assert quota_counts(13, FRACTIONS, 2) == {"train": 9, "valid": 2, "test": 2}
    assert quota_counts(3, FRACTIONS, 2) == {"train": 1, "valid": 1, "test": 1}  # vocal: cannot be met
    assert quota_counts(4, FRACTIONS, 2) == {"train": 2, "valid": 1, "test": 1}
    assert quota_counts(5, FRACTIONS, 0) == {"train": 3, "valid": 1, "test": 1}
    # the defaults (180 notes per family, 19 variants, 2 eval instruments) on every family
    data = run_defaults()["data"]
    plan = plan_dataset(
        NSYNTH_FAMILIES, 180, 0, FRACTIONS, len(data["soundfonts"]), data["variants"], data["min_eval_instruments"]
    )
    assert (data["per_family"], data["variants"], data["min_eval_instruments"]) == (180, 19, 2)
    for family in NSYNTH_FAMILIES:
        bases = {
            split: {s.base for s in plan.specs if s.family == family and plan.split(s) == split} for split in SPLITS
        }
        n_bases = len(family_programs(family))
        assert sum(map(len, bases.values())) == n_bases and len(bases["train"]) >= 1
        if n_bases >= 5:
            assert len(bases["valid"]) >= 2 and len(bases["test"]) >= 2, family
        train_instruments = {s.instrument_str for s in plan.specs if s.family == family and plan.split(s) == "train"}
        assert len(train_instruments) >= 20, family
        assert sum(s.family == family for s in plan.specs) == 180
    # organ: 5 programs -> 1 train base instrument with its 19 variants
    organ_train = {s.instrument_str for s in plan.specs if s.family == "organ" and plan.split(s) == "train"}
    assert len(organ_train) == 20 and len({s.base for s in plan.specs if s.instrument_str in organ_train}) == 1


def test_variants_never_cross_splits_and_base_splits_do_not_depend_on_k():
    plans = {
        k: plan_dataset(NSYNTH_FAMILIES, 120, 5, FRACTIONS, soundfonts=2, variants=k, min_eval_instruments=2)
        for k in (0, 7)
    }
    assert plans[0].split_of == plans[7].split_of
    split_of_base = {}
    for spec in plans[7].specs:
        assert split_of_base.setdefault(spec.base_instrument_str, plans[7].split(spec)) == plans[7].split(spec)
    assert any(spec.variant for spec in plans[7].specs)


def test_variant_timbres_are_seeded_fixed_and_distinct():
    assert draw_timbre(0, 0, 16, 3) == draw_timbre(0, 0, 16, 3)
    timbres = {draw_timbre(0, sf, program, v) for sf in (0, 1) for program in (16, 40) for v in range(1, 20)}
    assert len(timbres) == 2 * 2 * 19
    assert draw_timbre(1, 0, 16, 3) != draw_timbre(0, 0, 16, 3)
    with pytest.raises(ValueError, match="variant index"):
        draw_timbre(0, 0, 16, 0)
    with pytest.raises(ValueError, match="timbre"):
        NoteSpec(16, 60, 100, variant=2)


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
    silent_variant = NoteSpec(65, 64, 100, variant=1, timbre=Timbre(tilt_db=3.0))  # no shift: the same hole
    specs = [NoteSpec(0, 60, 100), SILENT_IN_TIMGM6MB, silent_variant]
    results = list(render_notes(default_soundfont(), specs, workers=1, **SHORT))
    assert [spec for spec, _ in results] == specs
    assert results[0][1] is not None and results[1][1] is None and results[2][1] is None


@pytest.mark.slow
def test_render_notes_pool_matches_in_process_render(soundfont_bytes):
    variant = NoteSpec(33, 40, 75, variant=2, timbre=draw_timbre(0, 0, 33, 2))
    specs = [NoteSpec(33, 40, 75), SILENT_IN_TIMGM6MB, NoteSpec(56, 67, 127), variant]
    results = list(render_notes([default_soundfont()], specs, workers=2, **SHORT))

    assert [spec for spec, _ in results] == specs
    assert results[1][1] is None
    for spec, audio in (results[0], results[2], results[3]):
        np.testing.assert_allclose(audio, render_note(soundfont_bytes, spec, **SHORT), atol=1e-6)


def test_variant_renders_are_deterministic_distinct_and_keep_pitch_and_level(soundfont_bytes):
    def render(variant: int, seed: int = 0, pitch: int = 69) -> np.ndarray:
        spec = NoteSpec(80, pitch, 100, variant=variant, timbre=draw_timbre(seed, 0, 80, variant))
        return render_note(soundfont_bytes, spec, **SHORT)

    first = render(1)
    np.testing.assert_array_equal(first, render(1))  # same seed, same variant: same audio
    base = render_note(soundfont_bytes, NoteSpec(80, 69, 100), **SHORT)
    others = [render(v) for v in (2, 3)] + [render(1, seed=1), base]
    for other in others:
        assert np.abs(first - other).max() > 1e-3  # another variant/seed/the base: differs
    for audio in [first, *others]:
        assert audio.dtype == np.float32 and audio.shape == (16000,) and np.abs(audio).max() <= 1.0
        assert not is_silent(audio)
        spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
        assert np.fft.rfftfreq(len(audio), 1 / 16000)[spectrum.argmax()] == pytest.approx(440, rel=0.03)


@pytest.mark.parametrize("shift", [-4, -1, 2, 4])
def test_body_size_shift_keeps_pitch_length_and_note_off_time(soundfont_bytes, shift):
    spec = NoteSpec(80, 69, 100, variant=1, timbre=Timbre(shift=shift))
    audio = render_note(soundfont_bytes, spec, seconds=2.0, hold_seconds=1.0)
    assert audio.shape == (32000,)
    held = audio[:16000]
    spectrum = np.abs(np.fft.rfft(held * np.hanning(len(held))))
    assert np.fft.rfftfreq(len(held), 1 / 16000)[spectrum.argmax()] == pytest.approx(440, rel=0.02)
    assert not is_silent(audio[16800:17600]) and np.abs(audio[-3000:]).max() < 0.2 * np.abs(held).max()
    # a shift beyond the MIDI range flips direction instead of failing
    top = NoteSpec(80, 125, 100, variant=1, timbre=Timbre(shift=4))
    assert render_note(soundfont_bytes, top, **SHORT).shape == (16000,)


def fake_sf2(path: Path, programs, version=(2, 1), compressed: bool = False) -> Path:
    """A minimal RIFF sfbk file: INFO/ifil, an empty sdta, pdta with phdr (bank 0 presets) and shdr."""

    def chunk(cid: bytes, data: bytes) -> bytes:
        return cid + struct.pack("<I", len(data)) + data + (b"\0" if len(data) % 2 else b"")

    phdr = b"".join(struct.pack("<20sHHHIII", b"p", p, 0, i, 0, 0, 0) for i, p in enumerate(programs))
    phdr += struct.pack("<20sHHHIII", b"EOP", 0, 0, len(programs), 0, 0, 0)
    shdr = struct.pack("<20sIIIIIBbHH", b"s", 0, 1, 0, 1, 16000, 60, 0, 0, 0x11 if compressed else 1)
    shdr += struct.pack("<20sIIIIIBbHH", b"EOS", 0, 0, 0, 0, 0, 0, 0, 0, 0)
    body = (
        b"sfbk"
        + chunk(b"LIST", b"INFO" + chunk(b"ifil", struct.pack("<HH", *version)))
        + chunk(b"LIST", b"sdta" + chunk(b"smpl", b"\0" * 4))
        + chunk(b"LIST", b"pdta" + chunk(b"phdr", phdr) + chunk(b"shdr", shdr))
    )
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


def test_soundfont_headers_are_read_without_the_samples(tmp_path: Path):
    default = load_soundfont("default")
    assert default.programs == frozenset(range(128)) and default.path.name == "TimGM6mb.sf2"
    assert load_soundfont(None).path == default.path
    partial = load_soundfont(str(fake_sf2(tmp_path / "part.sf2", [0, 1, 16])), index=1)
    assert partial.programs == {0, 1, 16} and partial.index == 1


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_missing_or_unreadable_soundfont_is_a_one_line_error_naming_file_and_fix(tmp_path: Path, monkeypatch):
    missing = tmp_path / "nope.sf2"
    with pytest.raises(FileNotFoundError, match=r"nope\.sf2.*data\.soundfonts=") as excinfo:
        resolve_soundfonts(["default", str(missing)])
    one_line_error(excinfo)
    garbage = tmp_path / "garbage.sf2"
    garbage.write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt not a soundfont")
    with pytest.raises(ValueError, match=r"garbage\.sf2 is not a SoundFont.*data\.soundfonts") as excinfo:
        resolve_soundfonts([str(garbage)])
    one_line_error(excinfo)
    truncated = tmp_path / "truncated.sf2"
    truncated.write_bytes(default_soundfont().read_bytes()[:50_000])
    with pytest.raises(ValueError, match=r"truncated\.sf2 has no preset headers") as excinfo:
        resolve_soundfonts([str(truncated)])
    one_line_error(excinfo)
    with pytest.raises(ValueError, match=r"SF3.*convert it to \.sf2") as excinfo:
        resolve_soundfonts([str(fake_sf2(tmp_path / "x.sf3", range(128), version=(3, 1), compressed=True))])
    one_line_error(excinfo)
    with pytest.raises(ValueError, match="listed twice"):
        resolve_soundfonts(["default", str(default_soundfont())])
    with pytest.raises(ValueError, match="empty"):
        resolve_soundfonts([])
    monkeypatch.setattr(soundfonts, "default_soundfont", lambda: missing)
    with pytest.raises(FileNotFoundError, match="reinstall.*pretty_midi"):
        resolve_soundfonts(["default"])


@pytest.fixture
def no_rendering(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("rendering started before the SoundFonts were checked")

    monkeypatch.setattr(gm_render, "render_notes", fail)


def test_bad_soundfonts_stop_the_build_before_any_rendering(tmp_path: Path, no_rendering):
    lacking = fake_sf2(tmp_path / "no_organs.sf2", [p for p in range(128) if p not in (16, 19)])
    build = ORGAN_BUILD | {"per_family": 10}
    with pytest.raises(
        ValueError,
        match=r"no_organs\.sf2 lacks bank-0 presets for GM programs 16 Drawbar Organ, "
        r"19 Church Organ.*data\.soundfonts",
    ) as excinfo:
        render_gm(tmp_path / "root", ["default", str(lacking)], **build)
    one_line_error(excinfo)
    with pytest.raises(FileNotFoundError, match="missing.sf2"):
        render_gm(tmp_path / "root", ["default", str(tmp_path / "missing.sf2")], **build)
    with pytest.raises(ValueError, match="data.variants must be an integer"):
        render_gm(tmp_path / "root", ["default"], **(build | {"variants": -1}))
    assert not (tmp_path / "root").exists()


@pytest.mark.slow
def test_rendered_examples_keep_variants_with_their_base_and_name_it(tmp_path: Path):
    root = tmp_path / "root"
    copy = shutil.copy(default_soundfont(), tmp_path / "copy.sf2")  # a second SoundFont: distinct instrument ids
    stats = render_gm(root, ["default", str(copy)], **ORGAN_BUILD | {"per_family": 24})
    assert stats == {"rendered": 24}
    examples = {s: json.loads((split_dir(root, s) / "examples.json").read_text()) for s in SPLITS}
    split_of_base: dict[str, str] = {}
    for split, entries in examples.items():
        bases = set()
        for note_str, ex in entries.items():
            assert ex["base_instrument_str"]
            assert split_of_base.setdefault(ex["base_instrument_str"], split) == split, "a variant crossed splits"
            assert NOTE_STR_RE.match(note_str)
            bases.add(ex["base_instrument_str"])
        assert len(bases) >= 2, f"{split} holds fewer than 2 of the 10 organ base instruments"
    derived = [
        ex
        for entries in examples.values()
        for ex in entries.values()
        if ex["instrument_str"] != ex["base_instrument_str"]
    ]
    assert derived and all(ex["base_instrument_str"] != ex["instrument_str"] for ex in derived)
    assert {ex["instrument"] // 1_000_000 for e in examples.values() for ex in e.values()} == {0, 1}
    instruments = json.loads((root / "instruments.json").read_text())
    assert all(
        instruments[ex["instrument_str"]]["split"] == split
        for split, entries in examples.items()
        for ex in entries.values()
    )
    # a rerun reuses every render; another file listed second re-renders that SoundFont's notes only
    again = ORGAN_BUILD | {"per_family": 24}
    assert render_gm(root, ["default", str(copy)], **again) == {"reused": 24}
    other = shutil.copy(default_soundfont(), tmp_path / "other.sf2")
    second = sum(ex["instrument"] >= 1_000_000 for e in examples.values() for ex in e.values())
    assert render_gm(root, ["default", str(other)], **again) == {"reused": 24 - second, "rendered": second}
