"""Where a sweep keeps its own state next to Ray's: read by the sweep CLI (resume) and by analysis.

Storage is a local folder or any pyarrow filesystem URI Ray accepts (s3://, gs://, ...), so every
access goes through pyarrow.fs rather than pathlib.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

# The base run config and sweep settings, written when a sweep starts and reused by resume=true.
STATE_FILE = "sweep_config.json"


def normalize_storage(storage: str | Path) -> str:
    """Absolute local path, or the URI unchanged."""
    storage = str(storage)
    return storage.rstrip("/") if "://" in storage else str(Path(storage).resolve())


# URI scheme -> the pyarrow.fs class Ray Tune writes through (absent from a pyarrow built without it).
PYARROW_FILESYSTEMS = {
    "file": "LocalFileSystem",
    "s3": "S3FileSystem",
    "gs": "GcsFileSystem",
    "gcs": "GcsFileSystem",
    "hdfs": "HadoopFileSystem",
    "viewfs": "HadoopFileSystem",
    "abfs": "AzureFileSystem",
    "abfss": "AzureFileSystem",
}


def check_storage(storage: str | Path) -> str:
    """storage_path, normalized, once it is known that pyarrow (through which Ray Tune and the sweep state write)
    can open it: a missing filesystem or an unreachable store is one line here, not a traceback deep in a run."""
    uri = normalize_storage(storage)
    if "://" not in uri:
        return uri
    scheme = uri.split("://", 1)[0].lower()
    needed = PYARROW_FILESYSTEMS.get(scheme)
    if needed is None:
        raise ValueError(
            f"storage_path={uri}: pyarrow, through which Ray Tune writes, has no {scheme}:// filesystem; "
            "use a folder (shared by every node on a cluster) or an s3://, gs://, hdfs:// or abfs:// URI."
        )
    if not hasattr(pafs, needed):
        raise ValueError(
            f"storage_path={uri} needs pyarrow.fs.{needed}, which this pyarrow {pa.__version__} was "
            "built without; install a pyarrow that has it (`pip install --force-reinstall pyarrow`: "
            "the PyPI wheels include S3, GCS, HDFS and Azure)."
        )
    try:
        pafs.FileSystem.from_uri(uri)
    except Exception as err:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ... for a store it cannot open
        reason = " ".join(str(err).split())[:300]
        raise ValueError(
            f"storage_path={uri} could not be opened ({type(err).__name__}: {reason}); fix what it "
            "names (credentials and endpoint come from the environment; hdfs:// also needs Java and "
            "libhdfs)."
        ) from None
    return uri


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
    return sorted(
        info.base_name for info in folders if fs.get_file_info(f"{info.path}/{STATE_FILE}").type == pafs.FileType.File
    )
