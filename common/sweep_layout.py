"""Where a sweep keeps its own state next to Ray's: read by the sweep CLI (resume) and by analysis.

Storage is a local folder or any pyarrow filesystem URI Ray accepts (s3://, gs://, ...), so every
access goes through pyarrow.fs rather than pathlib.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

# The base run config and sweep settings, written when a sweep starts and reused by resume=true.
STATE_FILE = "sweep_config.json"


def normalize_storage(storage: str | Path) -> str:
    """Absolute local path, or the URI unchanged."""
    storage = str(storage)
    return storage.rstrip("/") if "://" in storage else str(Path(storage).resolve())


def sweep_uri(storage: str | Path, name: str) -> str:
    return f"{normalize_storage(storage)}/{name}"


def _fs(uri: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(uri)


def sweep_exists(storage: str | Path, name: str) -> bool:
    fs, path = _fs(sweep_uri(storage, name))
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def write_state(storage: str | Path, name: str, state: dict[str, Any]) -> None:
    fs, path = _fs(sweep_uri(storage, name))
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(f"{path}/{STATE_FILE}") as out:
        out.write(json.dumps(state, indent=2).encode())


def read_state(storage: str | Path, name: str) -> dict[str, Any]:
    fs, path = _fs(sweep_uri(storage, name))
    with fs.open_input_stream(f"{path}/{STATE_FILE}") as stream:
        return json.loads(stream.read().decode())


def list_sweeps(storage: str | Path) -> list[str]:
    """Names of the sweeps under a storage folder or URI."""
    fs, root = _fs(normalize_storage(storage))
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    folders = [info for info in fs.get_file_info(pafs.FileSelector(root)) if info.type == pafs.FileType.Directory]
    return sorted(info.base_name for info in folders
                  if fs.get_file_info(f"{info.path}/{STATE_FILE}").type == pafs.FileType.File)
