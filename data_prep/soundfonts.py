"""The General-MIDI SoundFonts a rendered dataset is made from (``data.soundfonts``), checked before rendering.

Each entry is ``default`` (or null: TimGM6mb.sf2, shipped inside ``pretty_midi``) or a path to a ``.sf2``
file. Every (SoundFont, GM program) pair is one *base instrument*, so a second SoundFont doubles the
base instruments of every family. A file that is missing, is not a SoundFont (RIFF ``sfbk`` form), holds
compressed SF3 samples (the renderer reads 16-bit PCM samples only), or lacks a bank-0 preset for a GM
program the plan needs, stops the build with a one-line error naming the file and the fix, before any
note is rendered.

The checks read only the file's chunk headers (``ifil`` version, ``phdr`` preset headers, ``shdr`` sample
types), never the sample data, so a 140 MB SoundFont is checked in milliseconds.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pretty_midi

DEFAULT_ENTRY = "default"
"""The ``data.soundfonts`` entry (like null) that stands for TimGM6mb.sf2 inside ``pretty_midi``."""

_PHDR_RECORD = struct.Struct("<20sHHHIII")  # name, preset (program), bank, bag index, library, genre, morphology
_SHDR_RECORD = struct.Struct("<20sIIIIIBbHH")  # name, start, end, loop start/end, rate, pitch, correction, link, type
_SF3_COMPRESSED = 0x10  # shdr sampleType bit MuseScore's SF3 sets on Ogg Vorbis samples


@dataclass(frozen=True)
class SoundFont:
    """One checked SoundFont: where it is, how the config named it, and the GM programs its bank 0 has."""

    index: int
    path: Path
    entry: str
    programs: frozenset[int]
    size: int

    @property
    def identity(self) -> str:
        """What a render's provenance records: a different file at the same index re-renders its notes."""
        return f"{self.path.name}:{self.size}"


def default_soundfont() -> Path:
    """The General-MIDI SoundFont shipped inside the ``pretty_midi`` package (TimGM6mb)."""
    return Path(pretty_midi.__file__).resolve().parent / "TimGM6mb.sf2"


def is_default_entry(entry: str | None) -> bool:
    return entry is None or str(entry).strip().lower() in (DEFAULT_ENTRY, "null", "none", "")


def _chunks(f: BinaryIO, end: int) -> Iterable[tuple[bytes, int, int]]:
    """(chunk id, data offset, data size) of the RIFF chunks between the file position and ``end``."""
    while f.tell() + 8 <= end:
        header = f.read(8)
        if len(header) < 8:
            return
        chunk_id, size = header[:4], struct.unpack("<I", header[4:])[0]
        start = f.tell()
        yield chunk_id, start, size
        f.seek(start + size + (size & 1))


def _records(layout: struct.Struct, data: bytes) -> list[tuple]:
    """The whole fixed-size records in ``data`` (a trailing partial record is ignored)."""
    return list(layout.iter_unpack(data[: len(data) // layout.size * layout.size]))


def read_bank0_programs(path: Path) -> tuple[frozenset[int], tuple[int, int], bool]:
    """(GM programs with a bank-0 preset, ``ifil`` version, whether samples are SF3-compressed).

    Raises ValueError (one line, naming the file) when the file is not a RIFF ``sfbk`` SoundFont or its
    ``pdta`` list lacks preset headers.
    """
    fix = "point data.soundfonts at a General-MIDI .sf2 file, or use data.soundfonts=[default]"
    file_size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"sfbk":
            raise ValueError(f"SoundFont {path} is not a SoundFont 2 file (no RIFF 'sfbk' header); {fix}")
        end = min(file_size, 8 + struct.unpack("<I", head[4:8])[0])
        version, phdr, compressed = (0, 0), None, False
        for chunk_id, start, size in _chunks(f, end):
            if chunk_id != b"LIST":
                continue
            form = f.read(4)
            for sub_id, _sub_start, sub_size in _chunks(f, start + size):
                if form == b"INFO" and sub_id == b"ifil" and sub_size >= 4:
                    version = struct.unpack("<HH", f.read(4))
                elif form == b"pdta" and sub_id == b"phdr":
                    phdr = f.read(sub_size)
                elif form == b"pdta" and sub_id == b"shdr":
                    compressed = any(
                        record[-1] & _SF3_COMPRESSED for record in _records(_SHDR_RECORD, f.read(sub_size))
                    )
    if phdr is None or len(phdr) < 2 * _PHDR_RECORD.size:
        raise ValueError(f"SoundFont {path} has no preset headers (pdta/phdr); the file is truncated or corrupt; {fix}")
    records = _records(_PHDR_RECORD, phdr)[:-1]  # the last record is the terminal "EOP"
    programs = frozenset(preset for _, preset, bank, *_ in records if bank == 0 and preset < 128)
    return programs, version, compressed or version[0] >= 3


def load_soundfont(entry: str | None, index: int = 0) -> SoundFont:
    """Resolve and check one ``data.soundfonts`` entry; FileNotFoundError/ValueError in one line otherwise."""
    default = is_default_entry(entry)
    path = default_soundfont() if default else Path(str(entry)).expanduser()
    if not path.is_file():
        if default:
            fix = (
                "the default TimGM6mb.sf2 ships with pretty_midi: reinstall it (pip install --force-reinstall "
                "pretty_midi) or list another file in data.soundfonts=[<path to .sf2>]"
            )
        else:
            fix = "fix the path in data.soundfonts=[...] (an existing .sf2 file), or use data.soundfonts=[default]"
        raise FileNotFoundError(f"SoundFont not found: {path}; {fix}")
    try:
        programs, _, compressed = read_bank0_programs(path)
    except (OSError, struct.error) as err:
        raise ValueError(
            f"SoundFont {path} is unreadable ({type(err).__name__}: {err}); fix or replace the file "
            "listed in data.soundfonts"
        ) from err
    if compressed:
        raise ValueError(
            f"SoundFont {path} is an SF3 (Ogg Vorbis-compressed samples), which the renderer "
            "(midirenderer/RustySynth) cannot play; convert it to .sf2 (e.g. with Polyphone) and list "
            "the .sf2 in data.soundfonts"
        )
    return SoundFont(
        index=index,
        path=path.resolve(),
        entry=DEFAULT_ENTRY if default else str(entry),
        programs=programs,
        size=path.stat().st_size,
    )


def resolve_soundfonts(entries: Sequence[str | None] | str | None) -> list[SoundFont]:
    """Check every ``data.soundfonts`` entry, in order (the order fixes their instrument ids)."""
    if entries is None or isinstance(entries, str):
        entries = [entries]
    entries = list(entries)
    if not entries:
        raise ValueError("data.soundfonts is empty; list at least one SoundFont, e.g. data.soundfonts=[default]")
    soundfonts = [load_soundfont(entry, index) for index, entry in enumerate(entries)]
    seen: dict[Path, int] = {}
    for sf in soundfonts:
        if sf.path in seen:
            raise ValueError(
                f"SoundFont {sf.path} is listed twice in data.soundfonts (entries {seen[sf.path]} and "
                f"{sf.index}); list each file once"
            )
        seen[sf.path] = sf.index
    return soundfonts


def check_programs(soundfonts: Sequence[SoundFont], programs: Iterable[int]) -> None:
    """ValueError (one line) naming the first SoundFont that lacks a bank-0 preset for a needed GM program."""
    needed = sorted(set(programs))
    for sf in soundfonts:
        missing = [p for p in needed if p not in sf.programs]
        if missing:
            names = ", ".join(f"{p} {pretty_midi.program_to_instrument_name(p)}" for p in missing[:6])
            more = f" and {len(missing) - 6} more" if len(missing) > 6 else ""
            raise ValueError(
                f"SoundFont {sf.path} lacks bank-0 presets for GM programs {names}{more} that data.families "
                f"needs; use a full General-MIDI SoundFont, remove it from data.soundfonts, or drop those "
                f"families from data.families"
            )
