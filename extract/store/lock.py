"""An exclusive lock on a store, so two extract processes never write one store at once."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from extract.errors import StoreError
from extract.store.manifest import LOCK_NAME, utc_now

logger = logging.getLogger(__name__)

# Attempts to lock the file at the lock path before giving up. A retry happens only when
# a releasing holder deleted the file between our open() and flock().
_ATTEMPTS = 5
_MAX_HOLDER_BYTES = 4096


class StoreLock:
    """An advisory ``flock`` on ``extract.lock``, whose content names the holder (pid, host, start time).

    The kernel drops the lock when its holder exits, however it exits, so a lock file
    left by a killed process is taken over (and the takeover logged) instead of blocking
    the store. A live holder makes ``acquire`` raise a ``StoreError`` that names it.
    ``flock`` is not reliable on every network filesystem; keep a store on a filesystem
    where it is (local disks, NFSv4) when two hosts could write it.
    """

    def __init__(self, store_dir: Path) -> None:
        self.path = Path(store_dir) / LOCK_NAME
        self._fd = -1

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(_ATTEMPTS):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise StoreError(f"store {self.path.parent} is locked by {_describe(holder)}; wait for it to finish") from None
            if not _same_file(fd, self.path):
                # The previous holder deleted the file while releasing it: lock the new one.
                os.close(fd)
                continue
            previous = _read_holder(fd)
            if previous:
                logger.warning("taking over the lock on %s left by %s, which no longer runs", self.path.parent, _describe(previous))
            _write_holder(fd)
            self._fd = fd
            return
        raise StoreError(f"could not lock {self.path}: other processes keep replacing it; try again")

    def release(self) -> None:
        if self._fd >= 0:
            # Delete while still holding the lock, so no one locks the old file after us.
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "StoreLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (opened.st_dev, opened.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _read_holder(fd: int) -> dict[str, Any]:
    """Return the holder recorded in the lock file; empty when it records none (or garbage)."""
    try:
        holder = json.loads(os.pread(fd, _MAX_HOLDER_BYTES, 0).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _write_holder(fd: int) -> None:
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": utc_now()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode("utf-8"), 0)
    os.fsync(fd)


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process that has not yet recorded its pid"
    return f"process {holder.get('pid', '?')} on host {holder.get('host', '?')} (started {holder.get('started', '?')})"
