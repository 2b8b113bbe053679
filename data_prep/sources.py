"""The two data sources, both materialised into the NSynth layout so one loader serves them.

- gm_render: notes rendered offline from a General-MIDI SoundFont (default, works with no network).
- nsynth: the official jsonwav folders, or a Hugging Face hub dataset streamed into the same layout.
Both only add what is missing: nothing already on disk is re-rendered, re-downloaded or deleted.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pretty_midi
import soundfile as sf
from tqdm import tqdm

from common.io import atomic_path, atomic_write_text
from data_prep import gm_render
from data_prep.layout import (
    FAMILIES,
    FAMILY_INDEX,
    NSYNTH_SAMPLE_RATE,
    NSYNTH_SECONDS,
    SOURCES,
    SPLITS,
    make_example,
    split_dir,
    wav_path,
    write_examples,
)
from data_prep.soundfonts import SoundFont, check_programs, resolve_soundfonts
from data_prep.splits import check_families, check_fractions, size_cap_per_family, split_counts

log = logging.getLogger(__name__)


def write_wav(path: Path, audio: np.ndarray, sample_rate: int = NSYNTH_SAMPLE_RATE) -> None:
    """16-bit PCM wav written atomically: an interrupted build leaves no half file."""
    with atomic_path(path) as tmp:
        sf.write(tmp, audio, sample_rate, subtype="PCM_16")


def notes_per_family(per_family: int | None, max_total_size_mb: float | None, n_families: int) -> int:
    size_cap = None
    if max_total_size_mb is not None:
        size_cap = size_cap_per_family(max_total_size_mb, n_families, NSYNTH_SECONDS)
    caps = [c for c in (per_family, size_cap) if c is not None]
    if not caps:
        raise ValueError("Set data.per_family or data.max_total_size_mb: rendering needs a bound.")
    return min(caps)


RENDER_INDEX = "render_index.json"
"""<root>/render_index.json: note_str -> provenance tag of the wav on disk (SoundFont file and size, the
variant's timbre). A wav is reused only when its tag matches the plan's, so listing another SoundFont at
the same position of data.soundfonts, or another seed (other variant timbres), re-renders those notes."""
RENDER_REJECTED = "render_rejected.json"
"""<root>/render_rejected.json: note_str -> provenance tag of renders that came back silent."""
INSTRUMENTS = "instruments.json"
"""<root>/instruments.json: every planned instrument: SoundFont, GM program, variant, timbre, base, split."""


def _provenance(spec: gm_render.NoteSpec, soundfonts: Sequence[SoundFont]) -> str:
    key = [soundfonts[spec.soundfont].identity, spec.timbre.describe() if spec.timbre else ""]
    return hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16]


def _read_tags(path: Path) -> dict[str, str]:
    """A note_str -> tag file; an older list-only file (no tags) counts as empty, so those notes re-render."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def check_variant_settings(variants: Any, min_eval_instruments: Any) -> tuple[int, int]:
    """data.variants and data.min_eval_instruments as ints, or a ValueError naming the key and the fix."""
    for key, value, high in (
        ("variants", variants, gm_render.MAX_VARIANTS),
        ("min_eval_instruments", min_eval_instruments, None),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (high is not None and value > high):
            bound = f"0..{high}" if high is not None else ">= 0"
            raise ValueError(f"data.{key} must be an integer {bound}, got {value!r}")
    return variants, min_eval_instruments


def render_gm(
    root: Path,
    soundfonts: Sequence[str | None] | str | None,
    families: Sequence[str],
    per_family: int | None,
    max_total_size_mb: float | None,
    fractions: Mapping[str, float],
    seed: int,
    workers: int,
    variants: int,
    min_eval_instruments: int,
) -> dict[str, int]:
    """Render the planned notes into <root>/nsynth-<split>/, disjoint by base instrument.

    Every (SoundFont, GM program) is a base instrument and goes to one split with its ``variants``
    derived instruments (``gm_render.plan_dataset``). Every SoundFont is checked (readable, a SoundFont,
    bank-0 presets for every GM program the plan uses) before anything is rendered.
    """
    families = check_families(families)
    fractions = check_fractions(fractions)
    variants, min_eval_instruments = check_variant_settings(variants, min_eval_instruments)
    sfs = resolve_soundfonts(soundfonts)
    plan = gm_render.plan_dataset(
        families,
        notes_per_family(per_family, max_total_size_mb, len(families)),
        seed,
        fractions,
        soundfonts=len(sfs),
        variants=variants,
        min_eval_instruments=min_eval_instruments,
    )
    check_programs(sfs, {spec.program for spec in plan.specs})

    index_path, rejected_path = root / RENDER_INDEX, root / RENDER_REJECTED
    index, rejected = _read_tags(index_path), _read_tags(rejected_path)
    existing = {p.stem: p for s in SPLITS for p in (split_dir(root, s) / "audio").glob("*.wav")}
    todo, stats = [], Counter()
    tags = {spec.note_str: _provenance(spec, sfs) for spec in plan.specs}
    for spec in plan.specs:
        target, tag = wav_path(root, plan.split(spec), spec.note_str), tags[spec.note_str]
        if rejected.get(spec.note_str) == tag:
            stats["silent (earlier run)"] += 1
        elif index.get(spec.note_str) == tag and target.is_file():
            stats["reused"] += 1
        elif index.get(spec.note_str) == tag and spec.note_str in existing:
            # rendered before into another split: move, don't re-render
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(existing[spec.note_str], target)
            stats["reused"] += 1
        else:
            todo.append(spec)
    if todo:
        log.info(
            "Rendering %d notes from %s with %d workers", len(todo), ", ".join(sf.path.name for sf in sfs), workers
        )
        root.mkdir(parents=True, exist_ok=True)
        try:
            for spec, audio in tqdm(
                gm_render.render_notes([sf.path for sf in sfs], todo, workers=workers),
                total=len(todo),
                desc="render",
                unit="note",
            ):
                index.pop(spec.note_str, None)
                if audio is None:
                    rejected[spec.note_str] = tags[spec.note_str]
                    stats["silent (rejected)"] += 1
                    continue
                rejected.pop(spec.note_str, None)
                stale = existing.get(spec.note_str)
                target = wav_path(root, plan.split(spec), spec.note_str)
                if stale is not None and stale != target:
                    stale.unlink(missing_ok=True)  # an outdated render in another split folder
                write_wav(target, audio)
                index[spec.note_str] = tags[spec.note_str]
                stats["rendered"] += 1
        finally:  # an interrupted build keeps what it rendered
            atomic_write_text(index_path, json.dumps(index, sort_keys=True))
            atomic_write_text(rejected_path, json.dumps(rejected, indent=0, sort_keys=True))

    examples: dict[str, dict[str, dict[str, Any]]] = {s: {} for s in SPLITS}
    instruments: dict[str, dict[str, Any]] = {}
    for i, spec in enumerate(plan.specs):
        split = plan.split(spec)
        if spec.instrument_str not in instruments:
            instruments[spec.instrument_str] = {
                "base_instrument_str": spec.base_instrument_str,
                "split": split,
                "family": spec.family,
                "soundfont": sfs[spec.soundfont].entry,
                "soundfont_file": sfs[spec.soundfont].path.name,
                "program": spec.program,
                "program_name": pretty_midi.program_to_instrument_name(spec.program),
                "variant": spec.variant,
                "timbre": json.loads(spec.timbre.describe()) if spec.timbre else {},
            }
        if wav_path(root, split, spec.note_str).is_file():
            examples[split][spec.note_str] = make_example(
                spec.family,
                spec.source,
                spec.instrument,
                spec.instrument_str,
                spec.pitch,
                spec.velocity,
                note=i,
                base_instrument_str=spec.base_instrument_str,
            )
    for split in SPLITS:
        write_examples(root, split, examples[split])
    atomic_write_text(root / INSTRUMENTS, json.dumps(instruments, indent=1, sort_keys=True))
    log.info("Rendered dataset at %s: %s", root, dict(stats))
    return dict(stats)


def check_local_nsynth(root: Path) -> None:
    """The official release's three split folders, each with a readable examples.json, before any decoding."""
    missing = [s for s in SPLITS if not (split_dir(root, s) / "examples.json").is_file()]
    if missing:
        raise FileNotFoundError(
            f"data=nsynth: data.root={root} lacks {', '.join(f'nsynth-{s}/examples.json' for s in missing)}. Extract "
            "the official nsynth-train.jsonwav.tar.gz, nsynth-valid and nsynth-test there (so that "
            f"{root}/nsynth-train/examples.json exists), or set data.hf_id=<hub dataset> to stream it."
        )


def _example_from_hub(row: Mapping[str, Any]) -> dict[str, Any]:
    """NSynth metadata from a hub row: official field names; *_str fields derived from ints if absent."""
    family = row.get("instrument_family_str")
    if family is None and "instrument_family" in row:
        family = FAMILIES[int(row["instrument_family"])]
    if family not in FAMILY_INDEX:
        raise ValueError(f"hub row has no usable instrument family ({row.get('instrument_family')!r})")
    source = row.get("instrument_source_str") or SOURCES[int(row["instrument_source"])]
    pitch, velocity = int(row["pitch"]), int(row["velocity"])
    instrument_str = row.get("instrument_str") or f"{family}_{source}_{int(row['instrument']) % 1000:03d}"
    qualities = tuple(row.get("qualities_str") or ())
    return make_example(
        family,
        source,
        int(row["instrument"]),
        instrument_str,
        pitch,
        velocity,
        note=int(row.get("note", 0)),
        qualities_str=qualities,
    )


def _decode_hub_audio(audio: Mapping[str, Any]) -> tuple[np.ndarray, int]:
    if audio.get("bytes"):
        data, sr = sf.read(io.BytesIO(audio["bytes"]), dtype="float32", always_2d=True)
    else:
        data, sr = sf.read(audio["path"], dtype="float32", always_2d=True)
    return data.mean(axis=1), sr


HUB_STATE = "hub_stream_state.json"
"""<root>/hub_stream_state.json: per split, the hub stream's position (`IterableDataset.state_dict()`) at the last
examples.json written, so an interrupted download resumes there instead of streaming the split again."""
SAVE_EVERY = 256  # notes between index writes while streaming


def hub_caps(
    split: str,
    families: Sequence[str],
    per_family: int | None,
    max_total_size_mb: float | None,
    split_caps: Mapping[str, int] | None,
    fractions: Mapping[str, float],
) -> dict[str, int] | None:
    """Notes per family to take from one hub split: data.split_caps, else per_family/max_total_size_mb dealt by
    data.split_fractions, else None (every note)."""
    if split_caps and split_caps.get(split) is not None:
        return {f: split_caps[split] for f in families}
    if per_family is None and max_total_size_mb is None:
        return None
    cap = notes_per_family(per_family, max_total_size_mb, len(families))
    return {f: split_counts(cap, check_fractions(fractions))[split] for f in families}


def stream_hub_nsynth(
    root: Path,
    hf_id: str,
    hf_splits: Mapping[str, str],
    families: Sequence[str],
    per_family: int | None,
    max_total_size_mb: float | None,
    seed: int,
    fractions: Mapping[str, float],
    split_caps: Mapping[str, int | None],
) -> dict[str, int]:
    """Stream a hub dataset with NSynth's fields into the layout, keeping the hub's own splits.

    Audio is read undecoded (`Audio(decode=False)`) and decoded with soundfile, so no extra audio backend is
    needed. The split's examples.json and the stream's position are written every SAVE_EVERY notes and when
    interrupted: a rerun resumes the stream where it stopped (`IterableDataset.load_state_dict`), and notes
    already on disk are never fetched again.
    """
    import datasets  # heavy import, only on this path

    families = check_families(families)
    state_path = root / HUB_STATE
    positions = json.loads(state_path.read_text()) if state_path.is_file() else {}
    stats: Counter = Counter()
    for split in SPLITS:
        if split not in hf_splits:
            continue
        examples = (
            json.loads((split_dir(root, split) / "examples.json").read_text())
            if (split_dir(root, split) / "examples.json").is_file()
            else {}
        )
        counts = Counter(ex["instrument_family_str"] for ex in examples.values())
        want = hub_caps(split, families, per_family, max_total_size_mb, split_caps, fractions)
        position = positions.get(split, {})
        if position.get("done") or (want and all(counts[f] >= want[f] for f in families)):
            stats[f"{split} reused"] += len(examples)
            continue
        stream = datasets.load_dataset(hf_id, split=hf_splits[split], streaming=True)
        stream = stream.cast_column("audio", datasets.Audio(decode=False))
        if want:  # a capped subset is a random one; every note needs no shuffle (whose buffer a resume would lose)
            stream = stream.shuffle(seed=seed, buffer_size=1000)
        if position.get("stream"):
            stream.load_state_dict(position["stream"])
            log.info(
                "Resuming the hub stream of %s at its last saved position (%d notes on disk)", split, len(examples)
            )

        after_last_note = position.get("stream")  # the stream's position just after the last note written

        def save(done: bool = False) -> None:
            write_examples(root, split, examples)  # noqa: B023 - called within this iteration only
            positions[split] = {"stream": after_last_note, "done": done}  # noqa: B023 - the same
            atomic_write_text(state_path, json.dumps(positions))

        progress = tqdm(
            total=sum(want.values()) if want else None,
            desc=f"hub {split}",
            unit="note",
            initial=sum(min(counts[f], want[f]) for f in families) if want else len(examples),
        )
        finished, unsaved = True, 0
        try:
            for row in stream:
                try:
                    ex = _example_from_hub(row)
                except (KeyError, ValueError, IndexError) as err:
                    stats["bad rows"] += 1
                    log.debug("skipping hub row: %s", err)
                    continue
                family = ex["instrument_family_str"]
                if family not in families or (want and counts[family] >= want[family]) or ex["note_str"] in examples:
                    continue
                audio, sr = _decode_hub_audio(row["audio"])
                write_wav(wav_path(root, split, ex["note_str"]), audio, sr)
                examples[ex["note_str"]] = ex | {"sample_rate": sr}
                counts[family] += 1
                after_last_note = stream.state_dict()
                stats[f"{split} streamed"] += 1
                progress.update()
                unsaved += 1
                if unsaved >= SAVE_EVERY:
                    save()
                    unsaved = 0
                if want and all(counts[f] >= want[f] for f in families):
                    break
        except BaseException:
            finished = False
            raise
        finally:  # an interrupted stream keeps what it wrote and where it was
            progress.close()
            save(done=finished and not want)
    return dict(stats)


def materialize(data_cfg: Mapping[str, Any]) -> dict[str, int]:
    """Make sure data.root holds NSynth-layout folders for the configured source."""
    root = Path(data_cfg["root"])
    source = data_cfg["source"]
    if source == "gm_render":
        return render_gm(
            root,
            data_cfg["soundfonts"],
            data_cfg["families"],
            data_cfg["per_family"],
            data_cfg["max_total_size_mb"],
            data_cfg["split_fractions"],
            data_cfg["seed"],
            data_cfg["render_workers"],
            data_cfg["variants"],
            data_cfg["min_eval_instruments"],
        )
    if source == "nsynth":
        stats = {}
        if data_cfg["hf_id"]:
            stats = stream_hub_nsynth(
                root,
                data_cfg["hf_id"],
                data_cfg["hf_splits"],
                data_cfg["families"],
                data_cfg["per_family"],
                data_cfg["max_total_size_mb"],
                data_cfg["seed"],
                data_cfg["split_fractions"],
                data_cfg["split_caps"],
            )
        check_local_nsynth(root)
        return stats
    raise ValueError(f"Unknown data.source {source!r}; use data=gm_render or data=nsynth.")
