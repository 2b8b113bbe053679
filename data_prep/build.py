"""Build the dataset and its waveform cache: `python data_prep/build.py [data=nsynth data.root=...]`."""

from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig

from common.cli import entry_point, plain
from data_prep.dataset import cached_records, instrument_table, prepare_data, summary_table
from data_prep.layout import read_layout


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
@entry_point
def main(cfg: DictConfig) -> None:
    config = plain(cfg)
    data = prepare_data(config["data"], config["workdir"])
    print(f"\nDataset: data.source={config['data']['source']}  root={config['data']['root']}")
    print(
        f"Waveform cache: {data.cache_dir}  ({data.clip_samples / data.sample_rate:.2f} s clips "
        f"@ {data.sample_rate} Hz, fingerprint {data.fingerprint})"
    )
    print(summary_table(data))
    print(
        "\nInstruments per split (base+derived: base instruments, i.e. SoundFont programs or real NSynth "
        "instruments, + derived variants):"
    )
    print(
        instrument_table(
            cached_records(data, read_layout(config["data"]["root"])), config["data"]["min_eval_instruments"]
        )
    )
    report = data.report
    if report.get("skipped") or report.get("repaired"):
        print(
            f"Prep report: {report['skipped']} skipped {json.dumps(report['skipped_by_reason'])}, "
            f"repaired {json.dumps(report['repaired'])} -> {data.cache_dir / 'prep_report.json'}"
        )
    print(f"Classes (index order): {data.classes}")


if __name__ == "__main__":
    main()
