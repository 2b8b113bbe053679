"""One training run without Ray: `python trainable/train.py scenario=kd_single [key=value ...]`.

Prints the epoch table and writes history.json + the final checkpoint under <workdir>/train/. The loop itself
is trainable/loop.py, shared with the sweep's trials and the teacher.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from common.cli import entry_point, plain
from trainable.checkpoints import CHECKPOINT_NAME, load_checkpoint
from trainable.loop import train
from trainable.run_config import validate_config, validate_teacher


def format_epoch_table(history: list[dict[str, Any]]) -> str:
    cols = [
        ("epoch", "d"),
        ("train_loss", ".3f"),
        ("kd_loss", ".3f"),
        ("ce_loss", ".3f"),
        ("val_loss", ".3f"),
        ("val_acc", ".3f"),
        ("val_macro_f1", ".3f"),
        ("macs", ",d"),
        ("params", ",d"),
        ("pruning_step", "d"),
    ]
    width = {name: max(len(name), 11) for name, _ in cols}
    lines = [" ".join(f"{name:>{width[name]}}" for name, _ in cols)]
    lines += [" ".join(f"{h[name]:>{width[name]}{fmt}}" for name, fmt in cols) for h in history]
    return "\n".join(lines)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
@entry_point
def main(cfg: DictConfig) -> None:
    from data_prep.dataset import prepare_data
    from trainable.teacher import kd_inputs

    config = plain(cfg)
    validate_config(config)
    if config["kd"]["enabled"]:
        validate_teacher(config)
    data = prepare_data(config["data"], config["workdir"])
    label = config["scenario"] or "run"
    run_dir = Path(config["workdir"]) / "train" / f"{label}-{time.strftime('%Y%m%d-%H%M%S')}"
    final = train(config, data, run_dir, resume_from=config["resume_from"], **kd_inputs(config, data))
    # A resume_from that had already finished trains no epoch here: its history is in its checkpoint.
    history_file = run_dir / "history.json"
    history = (
        json.loads(history_file.read_text())
        if history_file.is_file()
        else load_checkpoint(config["resume_from"])["history"]
    )
    print(f"\n{label}: KD {'on' if config['kd']['enabled'] else 'off'}, pruning {config['pruning']['mode']}")
    print(format_epoch_table(history))
    print(
        f"final: val_acc {final['val_acc']:.4f}  val_macro_f1 {final['val_macro_f1']:.4f}  "
        f"params {final['params']:,}  MACs {final['macs']:,} ({final['macs'] / final['base_macs']:.1%} of unpruned)"
    )
    print(f"history: {run_dir / 'history.json'}\ncheckpoint: {run_dir / 'checkpoint' / CHECKPOINT_NAME}")


if __name__ == "__main__":
    main()
