"""Atomic file writes: readers never see a half-written file, whoever writes it (trials, the driver, analysis)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temp path next to `path` that replaces it once the block succeeds (removed if it fails).

    Readers never see a half-written file, and concurrent writers (trials sharing a cache) each rename a
    complete file into place. The temp name keeps the suffix, so np.save/sf.write/torch.save behave as usual.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; results should be readable like any other
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
