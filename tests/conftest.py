"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.nsynth_fixtures import write_official_layout

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@pytest.fixture
def official_root(tmp_path: Path) -> Path:
    root = tmp_path / "nsynth"
    write_official_layout(root)
    return root


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory) -> dict:
    """The real composed Hydra config, shrunk: 3 families rendered from the GM SoundFont, 0.5 s clips."""
    from common.cli import compose

    workdir = tmp_path_factory.mktemp("work")
    return compose(
        "config",
        [
            f"workdir={workdir}",
            "data.families=[bass,keyboard,organ]",
            "data.per_family=15",
            "data.clip_seconds=0.5",
            "data.render_workers=1",
            "features.n_mels=32",
            "train.epochs=3",
            "train.batch_size=16",
            "train.warmup_epochs=0",
            "train.num_threads=1",
            "teacher.epochs=3",
            "teacher.features.n_mels=32",
            "pruning.at_epoch=2",
        ],
    )


@pytest.fixture(scope="session")
def tiny_data(tiny_config):
    from data_prep.dataset import prepare_data

    return prepare_data(tiny_config["data"], tiny_config["workdir"])
