"""Where a sweep keeps its own state next to Ray's: read by the sweep CLI (resume) and by analysis."""

from __future__ import annotations

from pathlib import Path

# The base run config and sweep settings, written when a sweep starts and reused by resume=true.
STATE_FILE = "sweep_config.json"


def list_sweeps(storage: str | Path) -> list[str]:
    """Names of the sweeps under a storage folder."""
    path = Path(storage)
    return sorted(p.name for p in path.iterdir() if (p / STATE_FILE).is_file()) if path.is_dir() else []
