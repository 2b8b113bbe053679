"""Subset selection and train/valid/test splits over NSynth-layout records, deterministic under a seed."""

from __future__ import annotations

import logging
import math
import random
from collections import defaultdict
from collections.abc import Mapping, Sequence

from data_prep.layout import FAMILIES, SPLITS, NoteRecord

log = logging.getLogger(__name__)

WAV_BYTES_PER_SECOND = 16000 * 2  # 16 kHz, 16-bit mono


def size_cap_per_family(max_total_size_mb: float, n_families: int, file_seconds: float) -> int:
    """Notes per family that fit data.max_total_size_mb as 16-bit wavs of file_seconds each."""
    return int(max_total_size_mb * 2**20 / (file_seconds * WAV_BYTES_PER_SECOND) / n_families)


def check_families(families: Sequence[str]) -> list[str]:
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"data.families has unknown families {unknown}; valid names are {list(FAMILIES)}.")
    if not families:
        raise ValueError("data.families is empty; list at least two of " + ", ".join(FAMILIES) + ".")
    return list(dict.fromkeys(families))


def check_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
    if set(fractions) != set(SPLITS) or any(v <= 0 for v in fractions.values()):
        raise ValueError(
            f"data.split_fractions must give a positive fraction for each of {SPLITS}, got {dict(fractions)}."
        )
    total = sum(fractions.values())
    return {s: fractions[s] / total for s in SPLITS}


def apportion(n: int, weights: Mapping[str, float]) -> dict[str, int]:
    """Largest-remainder apportionment of n items over the keys of ``weights`` (in their order)."""
    total = sum(weights.values())
    raw = {k: n * w / total for k, w in weights.items()}
    counts = {k: int(math.floor(v)) for k, v in raw.items()}
    for k in sorted(weights, key=lambda k: raw[k] - counts[k], reverse=True)[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def split_counts(n: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """Largest-remainder apportionment of n items; each split gets one item when n >= 3."""
    counts = apportion(n, {s: fractions[s] for s in SPLITS})
    if n >= len(SPLITS):
        for s in SPLITS:
            if counts[s] == 0:
                donor = max(SPLITS, key=lambda d: counts[d])
                counts[donor] -= 1
                counts[s] = 1
    return counts


def quota_counts(n: int, fractions: Mapping[str, float], min_eval_instruments: int) -> dict[str, int]:
    """Instruments per split: ``split_counts``, then valid and test raised to ``min_eval_instruments`` each (taken
    from train) when there are enough instruments for that and one in train (n >= 2 * min_eval_instruments + 1).

    With fewer instruments the quota is not applied (it cannot be met without emptying train), and the
    plain counts stand: e.g. 3 instruments -> 1/1/1 whatever ``min_eval_instruments`` is.
    """
    if min_eval_instruments < 0:
        raise ValueError(f"data.min_eval_instruments must be >= 0, got {min_eval_instruments}")
    counts = split_counts(n, fractions)
    if min_eval_instruments and n >= 2 * min_eval_instruments + 1:
        for s in ("valid", "test"):
            while counts[s] < min_eval_instruments:
                counts[s] += 1
                counts["train"] -= 1
    return counts


def assign_groups(
    keys: Sequence, fractions: Mapping[str, float], rng: random.Random, min_eval_instruments: int
) -> dict:
    """Shuffle keys (instruments or notes) and deal them to splits by fraction (``quota_counts``)."""
    keys = sorted(keys)
    rng.shuffle(keys)
    counts = quota_counts(len(keys), fractions, min_eval_instruments)
    assignment, start = {}, 0
    for split in SPLITS:
        for key in keys[start : start + counts[split]]:
            assignment[key] = split
        start += counts[split]
    return assignment


def _resplit(
    records: list[NoteRecord],
    split_by: str,
    fractions: Mapping[str, float],
    rng: random.Random,
    min_eval_instruments: int,
) -> dict[str, list[NoteRecord]]:
    """Pool and re-split per family: by base instrument (a base and its derived instruments stay together)
    with the eval quota, or by note."""
    by_family: dict[str, list[NoteRecord]] = defaultdict(list)
    for r in records:
        by_family[r.family].append(r)
    out: dict[str, list[NoteRecord]] = {s: [] for s in SPLITS}
    for family in sorted(by_family):
        group = by_family[family]
        if split_by == "instrument":
            key, quota = (lambda r: r.base_instrument_str), min_eval_instruments
        else:
            key, quota = (lambda r: r.note_str), 0
        assignment = assign_groups({key(r) for r in group}, fractions, rng, quota)
        for r in group:
            out[assignment[key(r)]].append(r)
    return out


def _cap(records: list[NoteRecord], cap: int, rng: random.Random) -> list[NoteRecord]:
    """Keep `cap` records, drawn proportionally from each split so split sizes keep their ratio."""
    if len(records) <= cap:
        return records
    by_split: dict[str, list[NoteRecord]] = defaultdict(list)
    for r in sorted(records, key=lambda r: r.note_str):
        by_split[r.split].append(r)
    kept = []
    for split in SPLITS:
        group = by_split.get(split, [])
        rng.shuffle(group)
        kept.extend(group[: max(1, round(cap * len(group) / len(records)))] if group else [])
    return kept


def check_split_caps(split_caps: Mapping[str, int | None] | None) -> None:
    if not split_caps:
        return
    bad = {
        k: v
        for k, v in split_caps.items()
        if k not in SPLITS or (v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1))
    }
    if bad:
        raise ValueError(
            f"data.split_caps has {bad}: each of data.split_caps.{{{','.join(SPLITS)}}} is a whole "
            "number >= 1 of notes per family in that split, or null for no cap."
        )


def cap_per_split(
    out: dict[str, list[NoteRecord]], split_caps: Mapping[str, int | None], rng: random.Random
) -> dict[str, list[NoteRecord]]:
    """At most split_caps[split] notes per family in each split, drawn with `rng`; binding caps are logged with
    what they dropped."""
    capped: dict[str, list[NoteRecord]] = {}
    for split in SPLITS:
        if split_caps.get(split) is None:
            capped[split] = out[split]
            continue
        by_family: dict[str, list[NoteRecord]] = defaultdict(list)
        for r in sorted(out[split], key=lambda r: r.note_str):
            by_family[r.family].append(r)
        kept = []
        for group in by_family.values():
            rng.shuffle(group)
            kept.extend(group[: split_caps[split]])
        bound = sorted(f for f, g in by_family.items() if len(g) > split_caps[split])
        if bound:
            log.warning(
                "data.split_caps.%s=%d binds for %d famil%s (%s): kept %d of %d %s notes, dropped %d",
                split,
                split_caps[split],
                len(bound),
                "y" if len(bound) == 1 else "ies",
                ", ".join(bound),
                len(kept),
                len(out[split]),
                split,
                len(out[split]) - len(kept),
            )
        capped[split] = kept
    return capped


def missing_families(out: Mapping[str, Sequence[NoteRecord]], families: Sequence[str]) -> dict[str, list[str]]:
    """{split: the requested families with no note there} (NSynth's official valid/test have no synth_lead)."""
    present = {split: {r.family for r in recs} for split, recs in out.items()}
    return {
        split: [f for f in families if f not in present[split]]
        for split in out
        if any(f not in present[split] for f in families)
    }


def select(
    records: Sequence[NoteRecord],
    families: Sequence[str],
    per_family: int | None,
    max_total_size_mb: float | None,
    split_by: str,
    fractions: Mapping[str, float],
    clip_file_seconds: float,
    seed: int,
    min_eval_instruments: int,
    split_caps: Mapping[str, int | None],
) -> dict[str, list[NoteRecord]]:
    """Filter to families, cap per family and total size, and split (instrument-disjoint by default).

    With split_by=instrument and all three split folders present, the folders' own splits are kept
    (NSynth's official splits, and the rendered source's, are disjoint by base instrument by construction).
    Otherwise records are pooled and re-split per family by base instrument (``base_instrument_str``: a
    derived instrument goes where its base goes; valid and test get ``min_eval_instruments`` base
    instruments each where the family has enough) or by note.
    """
    families = check_families(families)
    fractions = check_fractions(fractions)
    if split_by not in ("instrument", "note"):
        raise ValueError(f"data.split_by must be 'instrument' or 'note', got {split_by!r}.")
    rng = random.Random(seed)
    wanted = [r for r in records if r.family in families]
    present = {r.family for r in wanted}
    empty = [f for f in families if f not in present]
    if empty:
        raise ValueError(
            f"Requested families {empty} have no clips in the data. Remove them from data.families "
            f"(e.g. data.families=[{','.join(sorted(present))}]) or add their notes to the dataset."
        )
    if max_total_size_mb is not None:
        size_cap = size_cap_per_family(max_total_size_mb, len(families), clip_file_seconds)
        if (per_family is None or size_cap < per_family) and any(
            sum(r.family == f for r in wanted) > size_cap for f in families
        ):
            log.warning(
                "data.max_total_size_mb=%s limits each family to %d notes (of %d notes in all)",
                max_total_size_mb,
                size_cap,
                len(wanted),
            )
        if per_family is None or size_cap < per_family:
            per_family = size_cap
    if per_family is not None and per_family < len(SPLITS):
        raise ValueError(f"data.per_family={per_family} is too small to fill train/valid/test; use at least 3.")
    by_family: dict[str, list[NoteRecord]] = defaultdict(list)
    for r in sorted(wanted, key=lambda r: (r.split, r.note_str)):
        by_family[r.family].append(r)
    capped = [r for f in families for r in (_cap(by_family[f], per_family, rng) if per_family else by_family[f])]
    folder_splits = {r.split for r in capped}
    if split_by == "instrument" and folder_splits == set(SPLITS):
        out: dict[str, list[NoteRecord]] = {s: [r for r in capped if r.split == s] for s in SPLITS}
        train_instruments = {r.base_instrument_str for r in out["train"]}
        shared = {r.base_instrument_str for s in ("valid", "test") for r in out[s]} & train_instruments
        if shared:
            log.warning(
                "%d base instruments appear in train and valid/test folders: %s", len(shared), sorted(shared)[:5]
            )
    else:
        out = _resplit(capped, split_by, fractions, rng, min_eval_instruments)
    if split_caps and any(v is not None for v in split_caps.values()):
        out = cap_per_split(out, split_caps, rng)
    for split, absent in missing_families(out, families).items():
        log.warning(
            "The %s split has no notes of %s: its accuracy and macro-F1 cover the other %d famil%s "
            "(NSynth's official valid and test splits hold no synth_lead)",
            split,
            ", ".join(absent),
            len(families) - len(absent),
            "y" if len(families) - len(absent) == 1 else "ies",
        )
    for split, recs in out.items():
        if not recs:
            raise ValueError(f"The {split} split is empty after selection; add data or raise data.per_family.")
    return out
