"""An exclusive lock on a store, so two extract processes never write one store at once."""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

from extract.errors import StoreError
from extract.store.manifest import LOCK_NAME, utc_now

logger = logging.getLogger(__name__)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreLock:
    """A lock file created with O_EXCL that names its holder (pid, host, start time).

    A lock left by a dead process on this host is detected and replaced. A lock from
    another host cannot be checked, so it is reported with the way to remove it.
    """

    def __init__(self, store_dir: Path) -> None:
        self.path = Path(store_dir) / LOCK_NAME
        self._held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": utc_now()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._handle_existing()
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(holder, handle)
                handle.flush()
                os.fsync(handle.fileno())
            self._held = True
            return
        raise StoreError(f"could not lock {self.path}: another process keeps creating it")

    def _handle_existing(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
            pid, host, started = int(holder["pid"]), str(holder["host"]), str(holder.get("started", "?"))
        except FileNotFoundError:
            return
        except (ValueError, KeyError, TypeError):
            # A lock file cut short by a crash between create and write: nobody holds it.
            logger.warning("removing unreadable lock file %s", self.path)
            self.path.unlink(missing_ok=True)
            return
        if host == socket.gethostname() and not _process_alive(pid):
            logger.warning("removing stale lock of dead process %d (started %s) on %s", pid, started, self.path)
            self.path.unlink(missing_ok=True)
            return
        raise StoreError(
            f"store {self.path.parent} is locked by process {pid} on host {host} since {started}; "
            f"wait for it to finish, or delete {self.path} if that process is gone"
        )

    def release(self) -> None:
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False

    def __enter__(self) -> "StoreLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
