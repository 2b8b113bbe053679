"""From config to the cached waveforms every trial reads: materialise, select/split, decode once."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.io import check_workdir
from data_prep.layout import FAMILIES, NSYNTH_SECONDS, SPLITS, NoteRecord, read_layout, read_split
from data_prep.sources import check_local_nsynth, materialize
from data_prep.splits import check_families, check_split_caps, select
from data_prep.waveform_cache import WaveformData, build_waveform_cache

log = logging.getLogger(__name__)


def check_data(data_cfg: Mapping[str, Any], read_metadata: bool = True) -> None:
    """Every data setting that can be refused, refused before any rendering, download or decoding.

    `read_metadata` parses every split's examples.json (the sweep's early check); `prepare_data` skips it, since the
    layout it reads next parses them anyway, before any decoding (a 305 k-note examples.json is ~100 MB)."""
    check_families(data_cfg["families"])
    check_split_caps(data_cfg["split_caps"])
    for key in ("per_family", "max_total_size_mb", "prep_workers"):
        value = data_cfg[key]
        if value is not None and value <= 0:
            raise ValueError(
                f"data.{key}={value} must be > 0, or null for no limit"
                + (" (all CPUs)." if key == "prep_workers" else ".")
            )
    if data_cfg["source"] == "nsynth" and not data_cfg["hf_id"]:
        check_local_nsynth(Path(data_cfg["root"]))
        for split in SPLITS if read_metadata else ():
            read_split(data_cfg["root"], split)  # an examples.json that does not parse: one line, now


def prepare_data(
    data_cfg: Mapping[str, Any],
    workdir: str | Path,
    *,
    sample_rate: int | None = None,
    clip_seconds: float | None = None,
) -> WaveformData:
    """Materialise the source into the NSynth layout (only what is missing) and return its waveform cache.

    Class indices follow the order of data.families; the mapping is saved as classes.json in the cache.
    `sample_rate` / `clip_seconds` override data.* for a consumer with its own front-end (a teacher at 32 kHz):
    the same notes decoded again from the original wavs, cached separately.
    """
    check_data(data_cfg, read_metadata=False)
    check_workdir(workdir)
    families = check_families(data_cfg["families"])
    materialize(data_cfg)
    records = read_layout(data_cfg["root"])
    split_records = select(
        records,
        families,
        data_cfg["per_family"],
        data_cfg["max_total_size_mb"],
        data_cfg["split_by"],
        data_cfg["split_fractions"],
        NSYNTH_SECONDS,
        data_cfg["seed"],
        data_cfg["min_eval_instruments"],
        data_cfg["split_caps"],
    )
    workers = data_cfg["prep_workers"] or len(os.sched_getaffinity(0))
    return build_waveform_cache(
        split_records,
        families,
        clip_seconds or data_cfg["clip_seconds"],
        sample_rate or data_cfg["sample_rate"],
        Path(workdir) / "cache" / "waveforms",
        data_cfg["root"],
        workers,
    )


def summary_table(data: WaveformData) -> str:
    """Per-family/per-split clip counts of the cache, as a fixed-width table."""
    counts = {s: np.bincount(data.splits[s].labels, minlength=data.num_classes) for s in SPLITS}
    lines = [f"{'family':<12}" + "".join(f"{s:>8}" for s in SPLITS) + f"{'total':>8}"]
    for i, family in enumerate(data.classes):
        row = [int(counts[s][i]) for s in SPLITS]
        lines.append(f"{family:<12}" + "".join(f"{n:>8}" for n in row) + f"{sum(row):>8}")
    totals = [len(data.splits[s]) for s in SPLITS]
    lines.append(f"{'total':<12}" + "".join(f"{n:>8}" for n in totals) + f"{sum(totals):>8}")
    return "\n".join(lines)


def cached_records(data: WaveformData, records: Sequence[NoteRecord]) -> list[NoteRecord]:
    """The records of the clips the cache holds, each with the split the cache put it in."""
    by_note = {r.note_str: r for r in records}
    return [
        dataclasses.replace(by_note[note_str], split=split)
        for split in SPLITS
        for note_str in data.splits[split].ids
        if note_str in by_note
    ]


def instrument_table(records: Sequence[NoteRecord], min_eval_instruments: int) -> str:
    """Per-family, per-split instruments and notes, as a fixed-width table.

    For each split: ``base+derived`` = distinct base instruments (a SoundFont's GM program, or a real
    NSynth instrument) with notes there, themselves or through their variants, + distinct derived
    instruments (rendered variants) with notes there; then the split's notes. The ``all`` columns count
    the family over every split. With ``min_eval_instruments`` > 0, a family whose valid or test split
    holds fewer base instruments than that is flagged at the end of its row.
    """
    columns = (*SPLITS, "all")
    base: dict[tuple[str, str], set[str]] = defaultdict(set)
    derived: dict[tuple[str, str], set[str]] = defaultdict(set)
    notes: dict[tuple[str, str], int] = defaultdict(int)
    for r in records:
        for column in (r.split, "all"):
            base[r.family, column].add(r.base_instrument_str)
            if r.derived:
                derived[r.family, column].add(r.instrument_str)
            notes[r.family, column] += 1
    present = {r.family for r in records}
    families = [f for f in FAMILIES if f in present] + sorted(present - set(FAMILIES))

    def cells(b: set[str], d: set[str], n: int) -> str:
        return f"{f'{len(b)}+{len(d)}':>13}{n:>6}"

    lines = [
        f"{'':<12}" + "".join(f"{c:>19}" for c in columns),
        f"{'family':<12}" + "".join(f"{'base+derived':>13}{'notes':>6}" for _ in columns),
    ]
    for family in families:
        row = f"{family:<12}" + "".join(cells(base[family, c], derived[family, c], notes[family, c]) for c in columns)
        short = [s for s in SPLITS[1:] if len(base[family, s]) < min_eval_instruments]
        if min_eval_instruments and short:
            row += f"  {'/'.join(short)} < {min_eval_instruments} base instruments"
        lines.append(row)
    lines.append(
        f"{'total':<12}"
        + "".join(
            cells(
                set().union(*(base[f, c] for f in families)),
                set().union(*(derived[f, c] for f in families)),
                sum(notes[f, c] for f in families),
            )
            for c in columns
        )
    )
    return "\n".join(lines)
