"""From config to the cached waveforms every trial reads: materialise, select/split, decode once."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.layout import NSYNTH_SECONDS, SPLITS, read_layout
from data_prep.sources import materialize
from data_prep.splits import check_families, select
from data_prep.waveform_cache import WaveformData, build_waveform_cache

log = logging.getLogger(__name__)


def prepare_data(data_cfg: Mapping[str, Any], workdir: str | Path) -> WaveformData:
    """Materialise the source into the NSynth layout (only what is missing) and return its waveform cache.

    Class indices follow the order of data.families; the mapping is saved as classes.json in the cache.
    """
    families = check_families(data_cfg["families"])
    materialize(data_cfg)
    records = read_layout(data_cfg["root"])
    split_records = select(records, families, data_cfg["per_family"], data_cfg["max_total_size_mb"],
                           data_cfg["split_by"], data_cfg["split_fractions"], NSYNTH_SECONDS, data_cfg["seed"])
    data = build_waveform_cache(split_records, families, data_cfg["clip_seconds"], data_cfg["sample_rate"],
                                Path(workdir) / "cache" / "waveforms")
    return data


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
