"""Render NSynth-style single notes offline from a General-MIDI SoundFont.

Why: NSynth cannot be downloaded here, so the default dataset is synthesised.
Every GM program that plausibly belongs to an NSynth instrument family is, in each
SoundFont of ``data.soundfonts``, one *base instrument* (instrument id = GM program number
for the first SoundFont, e.g. ``brass_acoustic_056``; see ``instrument_number``), and each
base instrument also yields ``data.variants`` *derived instruments* (``data_prep.variants``).
Each note is rendered like NSynth's: the key is held for 3 s, released, and the recording
stops at 4 s (16 kHz mono).

Family mapping (full table: ``family_table_markdown()``):

* keyboard: pianos 0-3, electric pianos 4-5, harpsichord 6, clavinet 7
  (acoustic unless the instrument is electric/electronic: 2, 4, 5, 7).
* mallet: chromatic percussion 8-15 (celesta ... dulcimer) and steel drums 114.
* organ: drawbar/percussive/rock organ 16-18 (electronic), church/reed organ 19-20.
* reed: saxes, oboe, English horn, bassoon, clarinet 64-71; free reeds (accordion 21,
  harmonica 22, tango accordion 23); bagpipe 109 and shanai 111 (double reeds).
* guitar: guitars 24-31 and banjo 105.
* bass: basses 32-39 (synth bass 38-39 = synthetic). The bowed contrabass 43 is a
  string: NSynth's bass family is the plucked/electric bass register instrument.
* string: violin .. contrabass 40-43, tremolo/pizzicato strings 44-45, orchestral harp
  46 (an orchestral string instrument; the guitar family stays guitars only),
  ensembles 48-49, synth strings 50-51 (synthetic), fiddle 110.
* brass: 56-61, synth brass 62-63 (synthetic).
* flute: pipes 72-79 (piccolo ... ocarina).
* synth_lead: leads 80-87.
* vocal: choir aahs 52, voice oohs 53 (acoustic), synth choir 54 (synthetic).

Skipped (no NSynth family fits, or not a pitched sustained note): timpani 47,
orchestra hit 55, pads 88-95 and synth FX 96-103 (textures, not instruments),
sitar/shamisen/koto/kalimba 104, 106-108 (ethnic plucked timbres outside NSynth's
families), percussive 112-113 and 115-119, sound effects 120-127. Reasons per program
are in ``SKIPPED_PROGRAMS``.

Level: the renderer's output is quiet (peak ~0.05 at velocity 100), so one fixed gain,
``OUTPUT_GAIN``, scales the whole dataset (never per-note normalisation, which would
erase velocity). It was chosen from the loudest render over all mapped programs at
velocity 127 across their pitch ranges; the result is clipped to [-1, 1] as a safety net.
A render whose peak stays below ``SILENCE_PEAK_DBFS`` (after the gain) counts as silent.

Known gaps in TimGM6mb: alto sax (65) is silent at pitch 64 (a hole in its key map;
such renders come back as None), and the whistle (78) is silent above pitch 78, so its
range is clamped to what sounds.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import midirenderer
import numpy as np
import pretty_midi
import soundfile
import torch
import torchaudio.functional

from data_prep import variants
from data_prep.layout import FAMILIES as NSYNTH_FAMILIES
from data_prep.layout import NSYNTH_SAMPLE_RATE, NSYNTH_SECONDS, SPLITS, make_note_str
from data_prep.splits import apportion, check_fractions, quota_counts, split_counts
from data_prep.variants import Timbre, draw_timbre

logger = logging.getLogger(__name__)

NSYNTH_VELOCITIES: tuple[int, ...] = (25, 50, 75, 100, 127)

OUTPUT_GAIN = 2.5
"""Fixed linear gain (+8 dB) for every note. Measured on TimGM6mb over every mapped
program and pitch at velocity 127: the loudest note (French horn, pitch 75) peaks at 0.37
raw, so it lands at 0.92; the median note at velocity 127 lands at ~0.34, and velocity-25
notes stay ~30 dB quieter, well above the silence threshold."""

SILENCE_PEAK_DBFS = -60.0
"""A note whose peak (after ``OUTPUT_GAIN``) is below this is treated as silent: at
-60 dBFS it is inaudible next to the dataset and would only teach the model noise."""

_MIDI_NOOP_CONTROLLER = 3
"""An undefined MIDI controller; an event on it at the end of the file makes the
renderer keep recording the release tail, which it otherwise cuts at the last note-off."""

# program: (family, source, lowest pitch, highest pitch). Pitch ranges are the
# instruments' usual sounding ranges (MIDI note numbers) so rendered notes are realistic.
_PROGRAM_TABLE: dict[int, tuple[str, str, int, int]] = {
    0: ("keyboard", "acoustic", 21, 108),  # Acoustic Grand Piano
    1: ("keyboard", "acoustic", 21, 108),  # Bright Acoustic Piano
    2: ("keyboard", "electronic", 28, 100),  # Electric Grand Piano
    3: ("keyboard", "acoustic", 21, 108),  # Honky-tonk Piano
    4: ("keyboard", "electronic", 28, 100),  # Electric Piano 1
    5: ("keyboard", "electronic", 28, 100),  # Electric Piano 2
    6: ("keyboard", "acoustic", 29, 89),  # Harpsichord
    7: ("keyboard", "electronic", 29, 88),  # Clavinet
    8: ("mallet", "acoustic", 60, 108),  # Celesta
    9: ("mallet", "acoustic", 79, 108),  # Glockenspiel
    10: ("mallet", "acoustic", 60, 96),  # Music Box
    11: ("mallet", "acoustic", 53, 89),  # Vibraphone
    12: ("mallet", "acoustic", 45, 96),  # Marimba
    13: ("mallet", "acoustic", 65, 108),  # Xylophone
    14: ("mallet", "acoustic", 60, 77),  # Tubular Bells
    15: ("mallet", "acoustic", 50, 88),  # Dulcimer
    16: ("organ", "electronic", 36, 96),  # Drawbar Organ
    17: ("organ", "electronic", 36, 96),  # Percussive Organ
    18: ("organ", "electronic", 36, 96),  # Rock Organ
    19: ("organ", "acoustic", 24, 96),  # Church Organ
    20: ("organ", "acoustic", 41, 89),  # Reed Organ
    21: ("reed", "acoustic", 41, 93),  # Accordion
    22: ("reed", "acoustic", 60, 96),  # Harmonica
    23: ("reed", "acoustic", 41, 93),  # Tango Accordion
    24: ("guitar", "acoustic", 40, 83),  # Acoustic Guitar (nylon)
    25: ("guitar", "acoustic", 40, 86),  # Acoustic Guitar (steel)
    26: ("guitar", "electronic", 40, 88),  # Electric Guitar (jazz)
    27: ("guitar", "electronic", 40, 88),  # Electric Guitar (clean)
    28: ("guitar", "electronic", 40, 76),  # Electric Guitar (muted)
    29: ("guitar", "electronic", 40, 88),  # Overdriven Guitar
    30: ("guitar", "electronic", 40, 88),  # Distortion Guitar
    31: ("guitar", "electronic", 52, 88),  # Guitar Harmonics
    32: ("bass", "acoustic", 28, 67),  # Acoustic Bass
    33: ("bass", "electronic", 28, 67),  # Electric Bass (finger)
    34: ("bass", "electronic", 28, 67),  # Electric Bass (pick)
    35: ("bass", "electronic", 28, 60),  # Fretless Bass
    36: ("bass", "electronic", 28, 60),  # Slap Bass 1
    37: ("bass", "electronic", 28, 60),  # Slap Bass 2
    38: ("bass", "synthetic", 24, 60),  # Synth Bass 1
    39: ("bass", "synthetic", 24, 60),  # Synth Bass 2
    40: ("string", "acoustic", 55, 100),  # Violin
    41: ("string", "acoustic", 48, 88),  # Viola
    42: ("string", "acoustic", 36, 76),  # Cello
    43: ("string", "acoustic", 28, 67),  # Contrabass
    44: ("string", "acoustic", 36, 96),  # Tremolo Strings
    45: ("string", "acoustic", 36, 96),  # Pizzicato Strings
    46: ("string", "acoustic", 24, 103),  # Orchestral Harp
    48: ("string", "acoustic", 36, 96),  # String Ensemble 1
    49: ("string", "acoustic", 36, 96),  # String Ensemble 2
    50: ("string", "synthetic", 36, 96),  # Synth Strings 1
    51: ("string", "synthetic", 36, 96),  # Synth Strings 2
    52: ("vocal", "acoustic", 40, 81),  # Choir Aahs
    53: ("vocal", "acoustic", 48, 79),  # Voice Oohs
    54: ("vocal", "synthetic", 48, 84),  # Synth Choir
    56: ("brass", "acoustic", 52, 82),  # Trumpet
    57: ("brass", "acoustic", 40, 72),  # Trombone
    58: ("brass", "acoustic", 28, 58),  # Tuba
    59: ("brass", "acoustic", 52, 82),  # Muted Trumpet
    60: ("brass", "acoustic", 34, 77),  # French Horn
    61: ("brass", "acoustic", 40, 82),  # Brass Section
    62: ("brass", "synthetic", 36, 84),  # Synth Brass 1
    63: ("brass", "synthetic", 36, 84),  # Synth Brass 2
    64: ("reed", "acoustic", 56, 87),  # Soprano Sax
    65: ("reed", "acoustic", 49, 81),  # Alto Sax
    66: ("reed", "acoustic", 44, 76),  # Tenor Sax
    67: ("reed", "acoustic", 37, 68),  # Baritone Sax
    68: ("reed", "acoustic", 58, 91),  # Oboe
    69: ("reed", "acoustic", 52, 84),  # English Horn
    70: ("reed", "acoustic", 34, 75),  # Bassoon
    71: ("reed", "acoustic", 50, 91),  # Clarinet
    72: ("flute", "acoustic", 74, 108),  # Piccolo
    73: ("flute", "acoustic", 60, 96),  # Flute
    74: ("flute", "acoustic", 65, 98),  # Recorder
    75: ("flute", "acoustic", 60, 96),  # Pan Flute
    76: ("flute", "acoustic", 60, 84),  # Blown bottle
    77: ("flute", "acoustic", 62, 86),  # Shakuhachi
    78: ("flute", "acoustic", 64, 78),  # Whistle: TimGM6mb's sample is silent above 78
    79: ("flute", "acoustic", 69, 89),  # Ocarina
    80: ("synth_lead", "synthetic", 36, 96),  # Lead 1 (square)
    81: ("synth_lead", "synthetic", 36, 96),  # Lead 2 (sawtooth)
    82: ("synth_lead", "synthetic", 48, 96),  # Lead 3 (calliope)
    83: ("synth_lead", "synthetic", 36, 96),  # Lead 4 (chiff)
    84: ("synth_lead", "synthetic", 36, 96),  # Lead 5 (charang)
    85: ("synth_lead", "synthetic", 48, 91),  # Lead 6 (voice)
    86: ("synth_lead", "synthetic", 36, 89),  # Lead 7 (fifths)
    87: ("synth_lead", "synthetic", 28, 84),  # Lead 8 (bass + lead)
    105: ("guitar", "acoustic", 48, 81),  # Banjo
    109: ("reed", "acoustic", 67, 81),  # Bagpipe
    110: ("string", "acoustic", 55, 93),  # Fiddle
    111: ("reed", "acoustic", 60, 84),  # Shanai
    114: ("mallet", "acoustic", 60, 86),  # Steel Drums
}

GM_PROGRAM_FAMILIES: dict[int, tuple[str, str]] = {
    program: (family, source) for program, (family, source, _, _) in _PROGRAM_TABLE.items()
}
"""GM program number (0-127) -> (NSynth family, NSynth source) for every rendered program."""

PROGRAM_PITCH_RANGE: dict[int, tuple[int, int]] = {
    program: (low, high) for program, (_, _, low, high) in _PROGRAM_TABLE.items()
}
"""GM program number -> inclusive (lowest, highest) MIDI pitch that the instrument plays."""

SKIPPED_PROGRAMS: dict[int, str] = {
    47: "pitched drum, no NSynth family",
    55: "a layered orchestral stab, not one instrument",
    **dict.fromkeys(range(88, 96), "synth pad: a texture, no NSynth family"),
    **dict.fromkeys(range(96, 104), "synth effect, no NSynth family"),
    **dict.fromkeys((104, 106, 107), "ethnic plucked timbre (sitar, shamisen, koto) outside NSynth's families"),
    108: "plucked lamellophone, no NSynth family",
    112: "bell percussion, no NSynth family",
    113: "unpitched percussion",
    **dict.fromkeys(range(115, 120), "percussion, no NSynth family"),
    **dict.fromkeys(range(120, 128), "sound effect, not a musical instrument"),
}
"""GM programs left out of the dataset, with the reason."""


def playable_range(program: int) -> tuple[int, int]:
    """Inclusive MIDI pitch range the program's instrument realistically plays."""
    if program not in PROGRAM_PITCH_RANGE:
        raise ValueError(
            f"GM program {program} is not rendered ({SKIPPED_PROGRAMS.get(program, 'not a GM program 0-127')}); "
            f"use one of GM_PROGRAM_FAMILIES' programs"
        )
    return PROGRAM_PITCH_RANGE[program]


def family_programs(family: str) -> list[int]:
    """GM programs mapped to an NSynth family, ascending."""
    return sorted(program for program, (fam, _) in GM_PROGRAM_FAMILIES.items() if fam == family)


def family_table_markdown() -> str:
    """Markdown tables of the GM program -> NSynth family mapping and the skipped programs (for the README)."""
    lines = [
        "| NSynth family (index) | GM programs (source, MIDI pitch range) |",
        "|---|---|",
    ]
    for family_index, family in enumerate(NSYNTH_FAMILIES):
        programs = ", ".join(
            f"{program} {pretty_midi.program_to_instrument_name(program)} "
            f"({GM_PROGRAM_FAMILIES[program][1]}, pitch {low}-{high})"
            for program in family_programs(family)
            for low, high in [playable_range(program)]
        )
        lines.append(f"| {family} ({family_index}) | {programs} |")
    lines += ["", "| Skipped GM program | Reason |", "|---|---|"]
    lines += [
        f"| {program} {pretty_midi.program_to_instrument_name(program)} | {reason} |"
        for program, reason in sorted(SKIPPED_PROGRAMS.items())
    ]
    return "\n".join(lines) + "\n"


INSTRUMENT_PROGRAM_SPAN = 1000
"""Instrument numbers are ``(soundfont * 1000 + variant) * 1000 + program``: the last three digits are the
GM program, the next three the variant (0 = the base instrument), the rest the SoundFont's index in
``data.soundfonts``. A base instrument of the first SoundFont keeps its GM program number, so
``brass_acoustic_056`` is TimGM6mb's trumpet and ``brass_acoustic_3056`` its third variant."""

MAX_VARIANTS = INSTRUMENT_PROGRAM_SPAN - 1


def instrument_number(soundfont: int, program: int, variant: int = 0) -> int:
    """The NSynth ``instrument`` id of (SoundFont index, GM program, variant index)."""
    return (soundfont * INSTRUMENT_PROGRAM_SPAN + variant) * INSTRUMENT_PROGRAM_SPAN + program


@dataclass(frozen=True)
class NoteSpec:
    """One NSynth-style note to render; family, source and the NSynth names follow from the program.

    ``soundfont`` is the index into ``data.soundfonts``; ``variant`` > 0 with its ``timbre`` makes it a
    note of a derived instrument of base instrument (soundfont, program).
    """

    program: int
    pitch: int
    velocity: int
    soundfont: int = 0
    variant: int = 0
    timbre: Timbre | None = None
    family: str = field(init=False)
    source: str = field(init=False)
    instrument: int = field(init=False)
    instrument_str: str = field(init=False)
    base_instrument_str: str = field(init=False)
    note_str: str = field(init=False)

    def __post_init__(self) -> None:
        if self.program not in GM_PROGRAM_FAMILIES:
            raise ValueError(f"GM program {self.program} has no NSynth family; see SKIPPED_PROGRAMS")
        if not 0 <= self.pitch <= 127:
            raise ValueError(f"pitch {self.pitch} is not a MIDI note number (0-127)")
        if not 1 <= self.velocity <= 127:
            raise ValueError(f"velocity {self.velocity} is not a MIDI note-on velocity (1-127)")
        if self.soundfont < 0 or not 0 <= self.variant <= MAX_VARIANTS:
            raise ValueError(
                f"soundfont index must be >= 0 and variant in 0..{MAX_VARIANTS}, "
                f"got {self.soundfont} and {self.variant}"
            )
        if (self.variant == 0) != (self.timbre is None):
            raise ValueError("a variant > 0 needs its timbre (variants.draw_timbre), the base instrument none")
        family, source = GM_PROGRAM_FAMILIES[self.program]
        number = instrument_number(self.soundfont, self.program, self.variant)
        instrument_str = f"{family}_{source}_{number:03d}"
        base_number = instrument_number(self.soundfont, self.program)
        object.__setattr__(self, "family", family)
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "instrument", number)
        object.__setattr__(self, "instrument_str", instrument_str)
        object.__setattr__(self, "base_instrument_str", f"{family}_{source}_{base_number:03d}")
        object.__setattr__(self, "note_str", make_note_str(instrument_str, self.pitch, self.velocity))

    @property
    def base(self) -> tuple[int, int]:
        """The base instrument: (SoundFont index, GM program)."""
        return self.soundfont, self.program


def _allocate_evenly(capacities: dict[Hashable, int], total: int, order: Sequence[Hashable]) -> dict[Hashable, int]:
    """Split ``total`` notes over keys as evenly as their capacities allow, dealt round-robin in ``order``.

    The caller passes a seeded order, so which keys get the remainder is random but reproducible, and a
    key that is full hands its share to the others.
    """
    if total > sum(capacities.values()):
        raise ValueError(f"cannot place {total} notes in a capacity of {sum(capacities.values())}")
    counts = dict.fromkeys(order, 0)
    remaining = total
    while remaining:
        for key in order:
            if remaining and counts[key] < capacities[key]:
                counts[key] += 1
                remaining -= 1
    return counts


def _note_capacity(program: int) -> int:
    low, high = playable_range(program)
    return (high - low + 1) * len(NSYNTH_VELOCITIES)


@dataclass(frozen=True)
class RenderPlan:
    """The notes to render and the split of every base instrument (its variants share it)."""

    specs: list[NoteSpec]
    split_of: dict[tuple[int, int], str]  # (SoundFont index, GM program) -> train | valid | test

    def split(self, spec: NoteSpec) -> str:
        return self.split_of[spec.base]


def plan_dataset(
    families: Sequence[str],
    notes_per_family: int,
    seed: int,
    fractions: Mapping[str, float],
    soundfonts: int,
    variants: int,
    min_eval_instruments: int,
) -> RenderPlan:
    """Choose ``notes_per_family`` distinct notes per family over its base and derived instruments.

    Base instruments are every (SoundFont index < ``soundfonts``, mapped GM program) of the family; they
    are dealt to train/valid/test by ``fractions`` (``splits.quota_counts``: valid and test get at least
    ``min_eval_instruments`` each when the family has ``2 * min_eval_instruments + 1`` or more, train
    always at least one), independently of ``variants``. Each split of a family then gets its share of
    the notes by ``fractions``, spread evenly over its base instruments, and within each base instrument
    evenly over its ``variants + 1`` timbres (the base timbre first, then the variants in a seeded order).
    Pitches are uniform within the program's playable range and velocities uniform over NSynth's set;
    (pitch, velocity) pairs are drawn without replacement per instrument. Each family draws from its own
    streams seeded by (seed, family index), so a family's notes do not depend on which others are requested.
    """
    if notes_per_family < 1:
        raise ValueError(f"notes_per_family must be >= 1, got {notes_per_family}")
    if soundfonts < 1:
        raise ValueError(f"need at least one SoundFont, got {soundfonts}")
    if not 0 <= variants <= MAX_VARIANTS:
        raise ValueError(f"data.variants must be an integer in 0..{MAX_VARIANTS}, got {variants}")
    valid = [family for family in NSYNTH_FAMILIES if family_programs(family)]
    unknown = [family for family in families if family not in valid]
    if unknown:
        raise ValueError(f"no GM program maps to families {unknown}; valid families: {valid}")
    if len(set(families)) != len(families):
        raise ValueError(f"families {list(families)} lists a family twice; list each once")
    fractions = check_fractions(fractions)
    seed32 = int(seed) % 2**32

    specs: list[NoteSpec] = []
    split_of: dict[tuple[int, int], str] = {}
    for family in families:
        family_index = NSYNTH_FAMILIES.index(family)
        bases = [(sf, program) for sf in range(soundfonts) for program in family_programs(family)]
        capacity = {base: _note_capacity(base[1]) for base in bases}
        if notes_per_family > (variants + 1) * sum(capacity.values()):
            raise ValueError(
                f"family {family!r} has only {(variants + 1) * sum(capacity.values())} distinct (instrument, pitch, "
                f"velocity) notes; lower notes_per_family (got {notes_per_family})"
            )
        split_rng = np.random.default_rng([seed32, family_index, 1])
        order = [bases[i] for i in split_rng.permutation(len(bases))]
        counts = quota_counts(len(bases), fractions, min_eval_instruments)
        family_split, start = {}, 0
        for split in SPLITS:
            family_split.update(dict.fromkeys(order[start : start + counts[split]], split))
            start += counts[split]
        split_of.update(family_split)
        used = [s for s in SPLITS if counts[s]]
        # a family with fewer than three base instruments leaves a split without any: the others share its notes
        note_counts = (
            split_counts(notes_per_family, fractions)
            if len(used) == len(SPLITS)
            else apportion(notes_per_family, {s: fractions[s] for s in used})
        )

        rng = np.random.default_rng([seed32, family_index])
        family_specs = []
        for split in used:
            split_bases = sorted(b for b in bases if family_split[b] == split)
            base_order = [split_bases[i] for i in rng.permutation(len(split_bases))]
            per_base = _allocate_evenly(
                {b: (variants + 1) * capacity[b] for b in split_bases}, note_counts[split], base_order
            )
            for (sf, program), base_count in per_base.items():
                low = playable_range(program)[0]
                timbre_order = [0] + [int(v) + 1 for v in rng.permutation(variants)]
                per_timbre = _allocate_evenly(
                    dict.fromkeys(timbre_order, capacity[(sf, program)]), base_count, timbre_order
                )
                for variant, count in per_timbre.items():
                    if not count:
                        continue
                    timbre = draw_timbre(seed, sf, program, variant) if variant else None
                    for combo in rng.choice(capacity[(sf, program)], size=count, replace=False):
                        pitch_offset, velocity_index = divmod(int(combo), len(NSYNTH_VELOCITIES))
                        family_specs.append(
                            NoteSpec(
                                program,
                                low + pitch_offset,
                                NSYNTH_VELOCITIES[velocity_index],
                                soundfont=sf,
                                variant=variant,
                                timbre=timbre,
                            )
                        )
        specs += sorted(family_specs, key=lambda spec: spec.note_str)
    return RenderPlan(specs=specs, split_of=split_of)


def _note_midi_bytes(program: int, pitch: int, velocity: int, seconds: float, hold_seconds: float) -> bytes:
    """A one-note MIDI file that lasts ``seconds`` so the renderer keeps the release tail."""
    instrument = pretty_midi.Instrument(program=program)
    instrument.notes.append(pretty_midi.Note(velocity=velocity, pitch=pitch, start=0.0, end=hold_seconds))
    instrument.control_changes.append(pretty_midi.ControlChange(_MIDI_NOOP_CONTROLLER, 0, seconds))
    midi = pretty_midi.PrettyMIDI()
    midi.instruments.append(instrument)
    buffer = io.BytesIO()
    midi.write(buffer)
    return buffer.getvalue()


def _render_raw(
    soundfont_bytes: bytes,
    program: int,
    pitch: int,
    velocity: int,
    sample_rate: int,
    seconds: float,
    hold_seconds: float,
) -> np.ndarray:
    """The renderer's mono output at ``sample_rate``, ``round(seconds * sample_rate)`` samples, no gain."""
    wav = midirenderer.render_wave_from(
        soundfont_bytes, _note_midi_bytes(program, pitch, velocity, seconds, hold_seconds)
    )
    stereo, native_rate = soundfile.read(io.BytesIO(wav), dtype="float32", always_2d=True)
    mono = torch.from_numpy(stereo[: round(seconds * native_rate)].mean(axis=1))
    if native_rate != sample_rate:
        mono = torchaudio.functional.resample(mono, native_rate, sample_rate)
    num_samples = round(seconds * sample_rate)
    audio = np.zeros(num_samples, dtype=np.float32)
    audio[: min(num_samples, len(mono))] = mono[:num_samples].numpy()
    return audio


def render_note(
    soundfont_bytes: bytes,
    spec: NoteSpec,
    sample_rate: int = NSYNTH_SAMPLE_RATE,
    seconds: float = NSYNTH_SECONDS,
    hold_seconds: float = 3.0,
) -> np.ndarray:
    """Render one note alone: float32 mono, exactly ``round(seconds * sample_rate)`` samples.

    The key is held for ``hold_seconds`` and released; the output includes ``OUTPUT_GAIN`` and is
    clipped to [-1, 1]. A variant's note is rendered through its timbre (``data_prep.variants``).
    """
    if sample_rate < 1 or seconds <= 0:
        raise ValueError(f"need sample_rate >= 1 and seconds > 0, got {sample_rate} and {seconds}")
    if not 0 <= hold_seconds <= seconds:
        raise ValueError(f"hold_seconds must lie in [0, seconds={seconds}], got {hold_seconds}")
    timbre = spec.timbre
    if timbre is None:
        audio = _render_raw(
            soundfont_bytes, spec.program, spec.pitch, spec.velocity, sample_rate, seconds, hold_seconds
        )
        return np.clip(audio * OUTPUT_GAIN, -1.0, 1.0)
    shift = variants.feasible_shift(timbre.shift, spec.pitch)
    ratio = float(variants.shift_ratio(shift))  # render shorter (higher) by this much, stretch back below
    raw = _render_raw(
        soundfont_bytes,
        spec.program,
        spec.pitch + shift,
        spec.velocity,
        sample_rate,
        seconds / ratio,
        hold_seconds / ratio,
    )
    audio = variants.apply_linear(variants.unshift(raw, shift, round(seconds * sample_rate)), timbre, sample_rate)
    return np.clip(variants.apply_drive(audio * OUTPUT_GAIN, timbre), -1.0, 1.0).astype(np.float32)


def is_silent(audio: np.ndarray) -> bool:
    """True when the note's peak is below ``SILENCE_PEAK_DBFS`` (or it is not finite)."""
    if audio.size == 0:
        return True
    peak = float(np.abs(audio).max())
    return not np.isfinite(peak) or peak < 10 ** (SILENCE_PEAK_DBFS / 20)


_worker_soundfont_bytes: list[bytes] = []


def _init_worker(soundfonts: Sequence[Path]) -> None:
    """Read the SoundFonts once per worker, and keep each worker on one thread (the pool is the parallelism)."""
    global _worker_soundfont_bytes
    _worker_soundfont_bytes = [path.read_bytes() for path in soundfonts]
    torch.set_num_threads(1)


def _render_in_worker(spec: NoteSpec, sample_rate: int, seconds: float, hold_seconds: float) -> np.ndarray:
    return render_note(_worker_soundfont_bytes[spec.soundfont], spec, sample_rate, seconds, hold_seconds)


def _render_with(
    soundfont_bytes: Sequence[bytes], spec: NoteSpec, sample_rate: int, seconds: float, hold_seconds: float
) -> np.ndarray:
    return render_note(soundfont_bytes[spec.soundfont], spec, sample_rate, seconds, hold_seconds)


def render_notes(
    soundfonts: Path | Sequence[Path],
    specs: Iterable[NoteSpec],
    workers: int,
    sample_rate: int = NSYNTH_SAMPLE_RATE,
    seconds: float = NSYNTH_SECONDS,
    hold_seconds: float = 3.0,
) -> Iterator[tuple[NoteSpec, np.ndarray | None]]:
    """Render notes in ``workers`` processes, yielding ``(spec, audio)`` in input order.

    ``soundfonts`` are the files of ``data.soundfonts`` in order (``spec.soundfont`` indexes them; one
    path stands for a list of one). ``audio`` is None for a silent render (see ``is_silent``) so the
    caller can skip and count it. ``workers=1`` renders in this process, avoiding the pool's start-up
    cost. The pool uses the "spawn" start method (forking a parent that already runs torch or Ray
    threads can deadlock the children), so a calling script needs the usual
    ``if __name__ == "__main__":`` guard.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    paths = [soundfonts] if isinstance(soundfonts, (str, Path)) else list(soundfonts)
    paths = [Path(p) for p in paths]
    specs = list(specs)
    out_of_range = sorted({spec.soundfont for spec in specs if spec.soundfont >= len(paths)})
    if out_of_range:
        raise ValueError(f"notes ask for SoundFont indices {out_of_range} but only {len(paths)} SoundFont(s) given")
    if workers == 1:
        render = partial(
            _render_with,
            [path.read_bytes() for path in paths],
            sample_rate=sample_rate,
            seconds=seconds,
            hold_seconds=hold_seconds,
        )
        yield from _mark_silent(specs, map(render, specs))
        return
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(paths,),
    )
    try:
        render = partial(_render_in_worker, sample_rate=sample_rate, seconds=seconds, hold_seconds=hold_seconds)
        # Chunks amortise inter-process overhead while keeping every worker busy to the end.
        chunksize = max(1, min(32, len(specs) // (4 * workers)))
        yield from _mark_silent(specs, pool.map(render, specs, chunksize=chunksize))
    finally:
        # A caller that stops iterating early should not wait for the remaining renders.
        pool.shutdown(wait=True, cancel_futures=True)


def _mark_silent(
    specs: Sequence[NoteSpec], rendered: Iterable[np.ndarray]
) -> Iterator[tuple[NoteSpec, np.ndarray | None]]:
    """Pair each spec with its audio, or with None when the render is silent."""
    for spec, audio in zip(specs, rendered):
        if is_silent(audio):
            logger.debug("silent render: %s", spec.note_str)
            yield spec, None
        else:
            yield spec, audio
