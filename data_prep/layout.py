"""NSynth "jsonwav" layout: the one on-disk format both data sources produce and one loader reads.

<root>/nsynth-<split>/examples.json     dict keyed by note_str, fields as in the official release
<root>/nsynth-<split>/audio/<note_str>.wav   16 kHz mono, 4 s
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import FAMILIES
from common.io import atomic_write_text

FAMILY_INDEX: dict[str, int] = {name: i for i, name in enumerate(FAMILIES)}
SOURCES: tuple[str, ...] = ("acoustic", "electronic", "synthetic")
SOURCE_INDEX: dict[str, int] = {name: i for i, name in enumerate(SOURCES)}
SPLITS: tuple[str, ...] = ("train", "valid", "test")
QUALITIES: tuple[str, ...] = (
    "bright",
    "dark",
    "distortion",
    "fast_decay",
    "long_release",
    "multiphonic",
    "nonlinear_env",
    "percussive",
    "reverb",
    "tempo-synced",
)
NSYNTH_SAMPLE_RATE = 16000
NSYNTH_SECONDS = 4.0
REQUIRED_FIELDS: tuple[str, ...] = (
    "note_str",
    "instrument",
    "instrument_str",
    "instrument_family",
    "instrument_family_str",
    "instrument_source",
    "instrument_source_str",
    "pitch",
    "velocity",
    "sample_rate",
    "qualities",
    "qualities_str",
)
NOTE_STR_RE = re.compile(r"^(?P<instrument_str>[a-z_]+_(acoustic|electronic|synthetic)_\d{3,})-(\d{3})-(\d{3})$")
"""NSynth's note_str; the instrument number has 3 digits in NSynth and at least 3 here (a rendered derived
instrument or a second SoundFont's has more, see ``gm_render.instrument_number``)."""


def split_dir(root: Path | str, split: str) -> Path:
    return Path(root) / f"nsynth-{split}"


def wav_path(root: Path | str, split: str, note_str: str) -> Path:
    return split_dir(root, split) / "audio" / f"{note_str}.wav"


def make_note_str(instrument_str: str, pitch: int, velocity: int) -> str:
    return f"{instrument_str}-{pitch:03d}-{velocity:03d}"


def make_example(
    family: str,
    source: str,
    instrument: int,
    instrument_str: str,
    pitch: int,
    velocity: int,
    note: int = 0,
    qualities_str: tuple[str, ...] = (),
    base_instrument_str: str | None = None,
) -> dict[str, Any]:
    """One examples.json entry: the official field names and types, plus ``base_instrument_str``.

    ``base_instrument_str`` names the base instrument a derived (rendered variant) instrument comes from;
    a base instrument, and every real NSynth instrument, names itself. Splits never separate notes that
    share it.
    """
    return {
        "base_instrument_str": base_instrument_str or instrument_str,
        "qualities": [int(q in qualities_str) for q in QUALITIES],
        "pitch": int(pitch),
        "note": int(note),
        "instrument_source_str": source,
        "velocity": int(velocity),
        "instrument_str": instrument_str,
        "instrument": int(instrument),
        "sample_rate": NSYNTH_SAMPLE_RATE,
        "qualities_str": list(qualities_str),
        "instrument_source": SOURCE_INDEX[source],
        "note_str": make_note_str(instrument_str, pitch, velocity),
        "instrument_family": FAMILY_INDEX[family],
        "instrument_family_str": family,
    }


@dataclass(frozen=True)
class NoteRecord:
    """One note found in a layout folder: its metadata and where its wav is."""

    split: str
    note_str: str
    family: str
    instrument: int
    instrument_str: str
    pitch: int
    velocity: int
    path: Path
    base_instrument_str: str = ""  # the base instrument a derived one comes from; "" = instrument_str itself

    def __post_init__(self) -> None:
        if not self.base_instrument_str:
            object.__setattr__(self, "base_instrument_str", self.instrument_str)

    @property
    def derived(self) -> bool:
        """Whether this is a derived instrument's note (a rendered variant of ``base_instrument_str``)."""
        return self.instrument_str != self.base_instrument_str


def write_examples(root: Path | str, split: str, examples: dict[str, dict[str, Any]]) -> Path:
    path = split_dir(root, split) / "examples.json"
    atomic_write_text(path, json.dumps(examples, indent=2, sort_keys=True))
    return path


def read_split(root: Path | str, split: str) -> list[NoteRecord]:
    """Read one split folder's examples.json into records (wav existence is checked later)."""
    path = split_dir(root, split) / "examples.json"
    try:
        examples = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); re-download or rebuild that split.") from err
    records = []
    for key, ex in examples.items():
        missing = [
            f for f in ("instrument", "instrument_str", "instrument_family_str", "pitch", "velocity") if f not in ex
        ]
        if missing:
            raise ValueError(
                f"{path}: entry {key!r} lacks fields {missing}; this is not NSynth's examples.json format."
            )
        note_str = ex.get("note_str", key)
        records.append(
            NoteRecord(
                split=split,
                note_str=note_str,
                family=ex["instrument_family_str"],
                instrument=int(ex["instrument"]),
                instrument_str=ex["instrument_str"],
                pitch=int(ex["pitch"]),
                velocity=int(ex["velocity"]),
                path=wav_path(root, split, note_str),
                base_instrument_str=ex.get("base_instrument_str") or ex["instrument_str"],
            )
        )
    return records


def available_splits(root: Path | str) -> list[str]:
    return [s for s in SPLITS if (split_dir(root, s) / "examples.json").is_file()]


def read_layout(root: Path | str) -> list[NoteRecord]:
    """All records of every split folder present under root."""
    splits = available_splits(root)
    if not splits:
        raise FileNotFoundError(
            f"No NSynth-layout data under {root}: expected {root}/nsynth-<train|valid|test>/examples.json. "
            "Build the default data with `python data_prep/build.py`, or point data.root at a folder "
            "holding the official nsynth-train/-valid/-test folders."
        )
    return [r for s in splits for r in read_split(root, s)]
