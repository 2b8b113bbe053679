"""Derived instruments: fixed, seeded timbre transforms that turn one rendered instrument into K others.

A SoundFont gives one timbre per GM program, so a family has only a handful of instruments. Each base
instrument (SoundFont, program) is therefore also rendered as ``data.variants`` derived instruments; each
variant is one ``Timbre``, drawn once from a generator seeded by (seed, SoundFont index, program, variant
index) and applied identically to every note of that variant, the way one physical instrument colours
every note it plays. All transforms are gentle, so a variant stays recognisably in its family:

* body size: the note is rendered ``shift`` semitones (1-4, up or down) away and resampled back to its
  pitch, so formants, sample zone and envelope timing move like a bigger or smaller instrument's
  (rendered for ``seconds / ratio`` so the result is exactly ``seconds`` long with the key still held
  for ``hold_seconds``);
* tone: a spectral tilt (low shelf and high shelf of opposite gain, +-6 dB at most) and often one
  peaking-EQ band (+-8 dB, 250 Hz - 5 kHz) (torchaudio biquads);
* envelope: a slower attack (a 10-40 ms fade-in) and/or an extra exponential decay (time constant 1.5-6 s);
* modulation: tremolo (3-7 Hz, depth 10-35 %) or vibrato (4.5-6.5 Hz, 8-20 cents);
* detuned doubling: a copy 4-12 cents away mixed in at 30-60 %, normalised so the peak does not grow;
* drive: mild tanh saturation after the output gain, ``tanh(g x) / g`` with g in 1.5-3 (quiet notes
  unchanged, loud ones compressed).

The output gain (``gm_render.OUTPUT_GAIN``), the clip to [-1, 1] and the silence check are the base
instruments' own: a variant is rendered, transformed, scaled, clipped and checked like any note.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from fractions import Fraction

import numpy as np
import torch
import torchaudio.functional as AF

MAX_SHIFT = 4  # semitones of "body size"
_SEED_TAG = 0x7A1B  # separates these draws from the note plans' streams under the same seed


@dataclass(frozen=True)
class Timbre:
    """One derived instrument's transform; every field at its neutral value is the identity."""

    shift: int = 0  # body size: render this many semitones away and resample back
    tilt_db: float = 0.0  # low shelf +tilt/2, high shelf -tilt/2 (positive = darker)
    peak_hz: float = 1000.0  # peaking EQ band centre
    peak_db: float = 0.0  # its gain (0 = no band)
    peak_q: float = 1.0
    attack_s: float = 0.0  # linear fade-in over this long (0 = untouched attack)
    decay_s: float = 0.0  # extra exp(-t / decay_s) (0 = none)
    tremolo_hz: float = 0.0
    tremolo_depth: float = 0.0  # fraction of amplitude removed at the trough (0 = none)
    vibrato_hz: float = 0.0
    vibrato_cents: float = 0.0  # peak pitch deviation (0 = none)
    double_cents: float = 0.0  # detune of the doubled copy (0 = no doubling)
    double_mix: float = 0.0
    drive: float = 0.0  # tanh saturation gain after OUTPUT_GAIN (0 = none)

    def describe(self) -> str:
        """Compact JSON of the non-neutral parameters (instruments.json lists one per variant)."""
        neutral = asdict(Timbre())
        return json.dumps({k: v for k, v in asdict(self).items() if v != neutral[k]}, sort_keys=True)


def draw_timbre(seed: int, soundfont: int, program: int, variant: int) -> Timbre:
    """The fixed timbre of variant ``variant`` (>= 1) of base instrument (soundfont, program) under ``seed``."""
    if variant < 1:
        raise ValueError(f"variant index must be >= 1 (0 is the base instrument itself), got {variant}")
    rng = np.random.default_rng([int(seed) % 2**32, _SEED_TAG, soundfont, program, variant])
    u = rng.uniform
    params: dict[str, float | int] = {"tilt_db": float(u(-6, 6))}
    if u() < 0.6:
        params["shift"] = int(rng.choice([-1, 1])) * int(rng.integers(1, MAX_SHIFT + 1))
    if u() < 0.7:
        params |= {
            "peak_hz": float(np.exp(u(np.log(250), np.log(5000)))),
            "peak_db": float(rng.choice([-1, 1]) * u(2, 8)),
            "peak_q": float(u(0.7, 2.5)),
        }
    if u() < 0.35:
        params["attack_s"] = float(u(0.01, 0.04))
    if u() < 0.35:
        params["decay_s"] = float(u(1.5, 6.0))
    modulation = u()
    if modulation < 0.3:
        params |= {"tremolo_hz": float(u(3, 7)), "tremolo_depth": float(u(0.1, 0.35))}
    elif modulation < 0.6:
        params |= {"vibrato_hz": float(u(4.5, 6.5)), "vibrato_cents": float(u(8, 20))}
    if u() < 0.3:
        params |= {"double_cents": float(rng.choice([-1, 1]) * u(4, 12)), "double_mix": float(u(0.3, 0.6))}
    if u() < 0.25:
        params["drive"] = float(u(1.5, 3.0))
    return Timbre(**params)


def shift_ratio(semitones: int) -> Fraction:
    """2 ** (semitones / 12) as a small fraction (within 0.2 cent), so resampling uses a short kernel."""
    return Fraction(2 ** (semitones / 12)).limit_denominator(100)


def feasible_shift(shift: int, pitch: int) -> int:
    """``shift`` if the shifted key is a MIDI note, else the opposite shift if that is, else 0."""
    for candidate in (shift, -shift):
        if 0 <= pitch + candidate <= 127:
            return candidate
    return 0


def unshift(audio: np.ndarray, semitones: int, num_samples: int) -> np.ndarray:
    """Bring a note rendered ``semitones`` higher back to its pitch (stretching it by the same ratio).

    ``audio`` should be ``num_samples / ratio`` long; the result is exactly ``num_samples`` long.
    """
    if semitones == 0:
        return _fit(audio, num_samples)
    ratio = shift_ratio(semitones)
    stretched = AF.resample(
        torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)),
        orig_freq=ratio.denominator,
        new_freq=ratio.numerator,
    )
    return _fit(stretched.numpy(), num_samples)


def _fit(audio: np.ndarray, num_samples: int) -> np.ndarray:
    out = np.zeros(num_samples, dtype=np.float32)
    out[: min(num_samples, len(audio))] = audio[:num_samples]
    return out


def _warp(audio: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """``audio`` read at fractional sample positions (linear interpolation, zero outside)."""
    return np.interp(positions, np.arange(len(audio)), audio, left=0.0, right=0.0).astype(np.float32)


def apply_linear(audio: np.ndarray, timbre: Timbre, sample_rate: int) -> np.ndarray:
    """The level-independent part of a timbre (everything but ``shift`` and ``drive``), before the output gain."""
    n = len(audio)
    t = np.arange(n, dtype=np.float64) / sample_rate
    out = audio.astype(np.float32)
    if timbre.double_cents:
        copy = _warp(out, np.arange(n) * 2 ** (timbre.double_cents / 1200))
        out = (out + timbre.double_mix * copy) / (1 + timbre.double_mix)
    if timbre.vibrato_cents:
        # delay d(t) = D sin(2 pi f t) gives a pitch deviation of D * 2 pi f / sr (as a frequency ratio - 1)
        depth = (2 ** (timbre.vibrato_cents / 1200) - 1) * sample_rate / (2 * np.pi * timbre.vibrato_hz)
        out = _warp(out, np.arange(n) - depth * np.sin(2 * np.pi * timbre.vibrato_hz * t))
    wave = torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))
    if timbre.tilt_db:
        wave = AF.bass_biquad(wave, sample_rate, timbre.tilt_db / 2, central_freq=300.0)
        wave = AF.treble_biquad(wave, sample_rate, -timbre.tilt_db / 2, central_freq=2500.0)
    if timbre.peak_db:
        wave = AF.equalizer_biquad(wave, sample_rate, timbre.peak_hz, timbre.peak_db, timbre.peak_q)
    out = wave.numpy().astype(np.float32)
    envelope = np.ones(n)
    if timbre.attack_s:
        envelope *= np.clip(t / timbre.attack_s, 0.0, 1.0)
    if timbre.decay_s:
        envelope *= np.exp(-t / timbre.decay_s)
    if timbre.tremolo_depth:
        envelope *= 1 - timbre.tremolo_depth * 0.5 * (1 - np.cos(2 * np.pi * timbre.tremolo_hz * t))
    return (out * envelope).astype(np.float32)


def apply_drive(audio: np.ndarray, timbre: Timbre) -> np.ndarray:
    """Mild saturation of the scaled note: ``tanh(g x) / g`` (identity for quiet samples)."""
    if not timbre.drive:
        return audio
    return (np.tanh(timbre.drive * audio) / timbre.drive).astype(np.float32)
