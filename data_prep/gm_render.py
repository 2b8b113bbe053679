"""Render NSynth-style single notes offline from a General-MIDI SoundFont.

Why: NSynth cannot be downloaded here, so the default dataset is synthesised.
Every GM program that plausibly belongs to an NSynth instrument family becomes one
NSynth *instrument* (instrument id = GM program number, e.g. ``brass_acoustic_056``),
and each note is rendered like NSynth's: the key is held for 3 s, released, and the
recording stops at 4 s (16 kHz mono).

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
from collections.abc import Iterable, Iterator, Sequence
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

from data_prep.layout import FAMILIES as NSYNTH_FAMILIES
from data_prep.layout import make_note_str

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


def default_soundfont() -> Path:
    """The General-MIDI SoundFont shipped inside the ``pretty_midi`` package (TimGM6mb)."""
    return Path(pretty_midi.__file__).resolve().parent / "TimGM6mb.sf2"


def resolve_soundfont(path: str | Path | None) -> Path:
    """The SoundFont to render with: ``path`` if given, else the default; must exist."""
    soundfont = default_soundfont() if path is None else Path(path).expanduser()
    if not soundfont.is_file():
        if path is None:
            fix = (
                "the default TimGM6mb.sf2 ships with pretty_midi: reinstall it "
                "(pip install --force-reinstall pretty_midi) or set data.soundfont=<path to .sf2/.sf3>"
            )
        else:
            fix = "set data.soundfont=<path to an existing .sf2/.sf3>, or leave it unset for TimGM6mb"
        raise FileNotFoundError(f"SoundFont not found: {soundfont}; {fix}")
    return soundfont


@dataclass(frozen=True)
class NoteSpec:
    """One NSynth-style note to render; family, source and the NSynth names follow from the program."""

    program: int
    pitch: int
    velocity: int
    family: str = field(init=False)
    source: str = field(init=False)
    instrument_str: str = field(init=False)
    note_str: str = field(init=False)

    def __post_init__(self) -> None:
        if self.program not in GM_PROGRAM_FAMILIES:
            raise ValueError(f"GM program {self.program} has no NSynth family; see SKIPPED_PROGRAMS")
        if not 0 <= self.pitch <= 127:
            raise ValueError(f"pitch {self.pitch} is not a MIDI note number (0-127)")
        if not 1 <= self.velocity <= 127:
            raise ValueError(f"velocity {self.velocity} is not a MIDI note-on velocity (1-127)")
        family, source = GM_PROGRAM_FAMILIES[self.program]
        instrument_str = f"{family}_{source}_{self.program:03d}"
        object.__setattr__(self, "family", family)
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "instrument_str", instrument_str)
        object.__setattr__(self, "note_str", make_note_str(instrument_str, self.pitch, self.velocity))


def _allocate_evenly(capacities: dict[int, int], total: int, rng: np.random.Generator) -> dict[int, int]:
    """Split ``total`` notes over programs as evenly as their (pitch x velocity) capacities allow.

    Programs are visited round-robin in a seeded order, so which programs get the
    remainder is random but reproducible, and a narrow-range program that is full
    hands its share to the others.
    """
    order = [int(program) for program in rng.permutation(sorted(capacities))]
    counts = dict.fromkeys(order, 0)
    remaining = total
    while remaining:
        for program in order:
            if remaining and counts[program] < capacities[program]:
                counts[program] += 1
                remaining -= 1
    return counts


def plan_notes(families: Sequence[str], notes_per_family: int, seed: int) -> list[NoteSpec]:
    """Choose ``notes_per_family`` distinct notes per family, spread evenly over its programs.

    Pitches are uniform within each program's playable range and velocities uniform over
    NSynth's set; (pitch, velocity) pairs are drawn without replacement, which equals
    resampling on collision. Each family draws from its own stream seeded by
    (seed, family index), so a family's notes do not depend on which others are requested.
    """
    if notes_per_family < 1:
        raise ValueError(f"notes_per_family must be >= 1, got {notes_per_family}")
    valid = [family for family in NSYNTH_FAMILIES if family_programs(family)]
    unknown = [family for family in families if family not in valid]
    if unknown:
        raise ValueError(f"no GM program maps to families {unknown}; valid families: {valid}")
    if len(set(families)) != len(families):
        raise ValueError(f"families {list(families)} lists a family twice; list each once")

    specs: list[NoteSpec] = []
    for family in families:
        ranges = {program: playable_range(program) for program in family_programs(family)}
        capacities = {program: (high - low + 1) * len(NSYNTH_VELOCITIES) for program, (low, high) in ranges.items()}
        if notes_per_family > sum(capacities.values()):
            raise ValueError(
                f"family {family!r} has only {sum(capacities.values())} distinct (program, pitch, velocity) "
                f"notes; lower notes_per_family (got {notes_per_family})"
            )
        rng = np.random.default_rng([seed, NSYNTH_FAMILIES.index(family)])
        family_specs = []
        for program, count in _allocate_evenly(capacities, notes_per_family, rng).items():
            for combo in rng.choice(capacities[program], size=count, replace=False):
                pitch_offset, velocity_index = divmod(int(combo), len(NSYNTH_VELOCITIES))
                pitch = ranges[program][0] + pitch_offset
                family_specs.append(NoteSpec(program, pitch, NSYNTH_VELOCITIES[velocity_index]))
        specs += sorted(family_specs, key=lambda spec: spec.note_str)
    return specs


def _note_midi_bytes(spec: NoteSpec, seconds: float, hold_seconds: float) -> bytes:
    """A one-note MIDI file that lasts ``seconds`` so the renderer keeps the release tail."""
    instrument = pretty_midi.Instrument(program=spec.program)
    instrument.notes.append(pretty_midi.Note(velocity=spec.velocity, pitch=spec.pitch, start=0.0, end=hold_seconds))
    instrument.control_changes.append(pretty_midi.ControlChange(_MIDI_NOOP_CONTROLLER, 0, seconds))
    midi = pretty_midi.PrettyMIDI()
    midi.instruments.append(instrument)
    buffer = io.BytesIO()
    midi.write(buffer)
    return buffer.getvalue()


def render_note(
    soundfont_bytes: bytes,
    spec: NoteSpec,
    sample_rate: int = 16000,
    seconds: float = 4.0,
    hold_seconds: float = 3.0,
) -> np.ndarray:
    """Render one note alone: float32 mono, exactly ``round(seconds * sample_rate)`` samples.

    The key is held for ``hold_seconds`` and released; the output includes ``OUTPUT_GAIN``.
    """
    if sample_rate < 1 or seconds <= 0:
        raise ValueError(f"need sample_rate >= 1 and seconds > 0, got {sample_rate} and {seconds}")
    if not 0 <= hold_seconds <= seconds:
        raise ValueError(f"hold_seconds must lie in [0, seconds={seconds}], got {hold_seconds}")
    wav = midirenderer.render_wave_from(soundfont_bytes, _note_midi_bytes(spec, seconds, hold_seconds))
    stereo, native_rate = soundfile.read(io.BytesIO(wav), dtype="float32", always_2d=True)
    mono = torch.from_numpy(stereo[: round(seconds * native_rate)].mean(axis=1))
    if native_rate != sample_rate:
        mono = torchaudio.functional.resample(mono, native_rate, sample_rate)
    num_samples = round(seconds * sample_rate)
    audio = np.zeros(num_samples, dtype=np.float32)
    audio[: min(num_samples, len(mono))] = mono[:num_samples].numpy()
    return np.clip(audio * OUTPUT_GAIN, -1.0, 1.0)


def is_silent(audio: np.ndarray) -> bool:
    """True when the note's peak is below ``SILENCE_PEAK_DBFS``."""
    return audio.size == 0 or float(np.abs(audio).max()) < 10 ** (SILENCE_PEAK_DBFS / 20)


_worker_soundfont_bytes: bytes = b""


def _init_worker(soundfont: Path) -> None:
    """Read the SoundFont once per worker, and keep each worker on one thread (the pool is the parallelism)."""
    global _worker_soundfont_bytes
    _worker_soundfont_bytes = soundfont.read_bytes()
    torch.set_num_threads(1)


def _render_in_worker(spec: NoteSpec, sample_rate: int, seconds: float, hold_seconds: float) -> np.ndarray:
    return render_note(_worker_soundfont_bytes, spec, sample_rate, seconds, hold_seconds)


def render_notes(
    soundfont: Path,
    specs: Iterable[NoteSpec],
    workers: int = 2,
    sample_rate: int = 16000,
    seconds: float = 4.0,
    hold_seconds: float = 3.0,
) -> Iterator[tuple[NoteSpec, np.ndarray | None]]:
    """Render notes in ``workers`` processes, yielding ``(spec, audio)`` in input order.

    ``audio`` is None for a silent render (see ``is_silent``) so the caller can skip and
    count it. ``workers=1`` renders in this process, avoiding the pool's start-up cost.
    The pool uses the "spawn" start method (forking a parent that already runs torch or
    Ray threads can deadlock the children), so a calling script needs the usual
    ``if __name__ == "__main__":`` guard.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    specs = list(specs)
    if workers == 1:
        render = partial(
            render_note, soundfont.read_bytes(), sample_rate=sample_rate, seconds=seconds, hold_seconds=hold_seconds
        )
        yield from _mark_silent(specs, map(render, specs))
        return
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(soundfont,),
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
