"""Atomic file writes and build-once caches: readers never see a half-written file, whoever writes it (trials,
teacher tasks, the driver, analysis, on one node or several sharing a filesystem)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


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


def build_once(
    target: Path, build: Callable[[Path], None], *, poll_s: float = 0.5, stale_s: float = 300.0, what: str | None = None
) -> Path:
    """Make `target` (a file or a folder) exist, building it in exactly one process of all that share the disk.

    Every trial, teacher task and driver that needs the same cache calls this; one takes a lock folder next to
    the target (`os.mkdir` is atomic on local disks and on NFS, where `fcntl.flock` is not reliable), the others
    wait until the target appears. `build(target)` must put the target in place atomically (write elsewhere,
    then rename) so a reader never sees half of it. The builder keeps the lock's heartbeat fresh; a lock whose
    heartbeat is older than `stale_s` (its builder was killed) is taken over. A failed build releases the lock
    and raises in the builder; the waiters then try to build it themselves.
    """
    target = Path(target)
    lock = target.with_name(f".{target.name}.building")
    waited = False
    while not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(lock)
        except FileExistsError:
            try:
                age = time.time() - lock.stat().st_mtime
            except FileNotFoundError:
                continue  # released between the two calls
            if age > stale_s:
                log.warning("Taking over %s: its builder's last heartbeat was %.0f s ago", lock, age)
                shutil.rmtree(lock, ignore_errors=True)
                continue
            if not waited:
                log.info("Waiting for another process to build %s", what or target)
                waited = True
            time.sleep(poll_s)
            continue
        stop = threading.Event()

        def heartbeat() -> None:
            while not stop.wait(stale_s / 5):  # noqa: B023 - runs and is joined within this iteration
                try:
                    os.utime(lock)
                except OSError:
                    return

        beat = threading.Thread(target=heartbeat, daemon=True, name=f"build_once:{target.name}")
        beat.start()
        try:
            if not target.exists():
                build(target)
        finally:
            stop.set()
            beat.join()
            shutil.rmtree(lock, ignore_errors=True)
    return target


def check_workdir(workdir: Path | str) -> None:
    """A workdir this process cannot write to, refused in one line before any data or teacher work."""
    workdir = Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_probe.{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise PermissionError(
            f"workdir={workdir} is not writable ({err.strerror}); pass workdir=<a writable dir>."
        ) from None
