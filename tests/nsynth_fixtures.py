"""Official-format NSynth folders built from the released examples.json sample, with synthetic audio."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import soundfile as sf

from data_prep.layout import SPLITS, make_note_str, split_dir, wav_path

FIXTURES = Path(__file__).parent / "fixtures"
SAMPLE_EXAMPLES = FIXTURES / "nsynth_examples_sample.json"  # copied verbatim from ../shared/


def synth_note(pitch: int, velocity: int, seconds: float = 4.0, sr: int = 16000, timbre: int = 0) -> np.ndarray:
    """A decaying harmonic tone: cheap stand-in audio whose spectrum depends on pitch and timbre."""
    t = np.arange(int(seconds * sr)) / sr
    f0 = 440.0 * 2 ** ((pitch - 69) / 12)
    harmonics = sum(np.sin(2 * np.pi * f0 * k * t) / k ** (1 + 0.5 * timbre) for k in range(1, 6) if f0 * k < sr / 2)
    return (0.3 * velocity / 127 * np.exp(-t * (1 + timbre)) * harmonics).astype(np.float32)


def write_official_layout(root: Path, copies_per_split: int = 3) -> dict[str, dict]:
    """NSynth folders whose examples.json entries are the released sample's, with rendered audio.

    Each split gets `copies_per_split` variants of every sample entry (instrument ids offset per split,
    so train/valid/test stay instrument-disjoint like the official release).
    """
    sample = json.loads(SAMPLE_EXAMPLES.read_text())
    written = {}
    for s_idx, split in enumerate(SPLITS):
        examples = {}
        for entry in sample.values():
            for c in range(copies_per_split):
                ex = copy.deepcopy(entry)
                number = int(ex["instrument_str"][-3:]) + 100 * s_idx
                ex["instrument_str"] = f"{ex['instrument_str'][:-3]}{number:03d}"
                ex["instrument"] = ex["instrument"] + 1000 * s_idx
                ex["pitch"] = min(ex["pitch"] + c, 108)
                ex["note_str"] = make_note_str(ex["instrument_str"], ex["pitch"], ex["velocity"])
                examples[ex["note_str"]] = ex
                path = wav_path(root, split, ex["note_str"])
                path.parent.mkdir(parents=True, exist_ok=True)
                audio = synth_note(ex["pitch"], ex["velocity"], timbre=ex["instrument_family"] % 3)
                sf.write(path, audio, 16000, subtype="PCM_16")
        (split_dir(root, split) / "examples.json").write_text(json.dumps(examples, indent=2))
        written[split] = examples
    return written
