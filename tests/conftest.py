"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.nsynth_fixtures import write_official_layout


@pytest.fixture
def official_root(tmp_path: Path) -> Path:
    root = tmp_path / "nsynth"
    write_official_layout(root)
    return root
