"""One writer per run: a lease file in the run folder, held by the driver for the whole launch.

A second launch with the same --run-name (and --storage-path) while the first is alive is refused before
Ray starts, naming the holder. The holder refreshes the lease every ``HEARTBEAT_S``; a lease is stale, and
is taken over, when its process is gone (same host) or its heartbeat is older than ``STALE_S`` (another
host, or a frozen one). On a local or NFS folder the lease is created with O_EXCL (atomic); on object
stores (s3://, gs://) it is written, then read back after a pause to see who won: good enough between
humans relaunching jobs, not a consensus protocol.

    python -c "from rso_ray.cluster.runlock import RunLock; print(RunLock('rso_runs/demo').describe())"
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from ..training import storage

LOCK_FILE = "rso_run.lock"
HEARTBEAT_S = 15.0
STALE_S = 120.0


class RunLocked(RuntimeError):
    """Another live launch holds the run."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    def __init__(self, run_dir: str, *, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S):
        self.uri = storage.join(run_dir, LOCK_FILE)
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict[str, Any]:
        return {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time(),
                "since": getattr(self, "_since", time.time())}

    def describe(self) -> str:
        held = storage.read_json(self.uri)
        return "free" if not held else f"held by pid {held.get('pid')} on {held.get('host')}"

    def stale(self, held: dict[str, Any]) -> bool:
        if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int):
            return not _pid_alive(held["pid"])
        return time.time() - float(held.get("heartbeat", 0)) > self.stale_s

    def acquire(self) -> RunLock:
        """Take the run or raise RunLocked naming the live holder."""
        self._since = time.time()
        if not storage.is_remote(self.uri):
            path = Path(self.uri)
            path.parent.mkdir(parents=True, exist_ok=True)
            for _ in range(3):
                try:
                    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    held = storage.read_json(self.uri)
                    if held is None:  # a holder is between create and write, or the file is garbage
                        time.sleep(0.2)
                        held = storage.read_json(self.uri)
                        if held is None:
                            path.unlink(missing_ok=True)
                            continue
                    self._refuse_unless_stale(held)
                    path.unlink(missing_ok=True)  # stale: remove and race again for the O_EXCL create
                    continue
                with os.fdopen(fd, "w") as fh:
                    json.dump(self._record(), fh)
                break
            else:
                raise RunLocked(f"could not take the lock {self.uri}: another launch keeps taking it")
        else:
            held = storage.read_json(self.uri)
            if held is not None:
                self._refuse_unless_stale(held)
            storage.write_json(self.uri, self._record())
            time.sleep(1.0)
            now = storage.read_json(self.uri)
            if not now or now.get("token") != self.token:
                raise RunLocked(f"run at {self.uri.rsplit('/', 1)[0]} was taken by another launch at the same time")
        self._thread = threading.Thread(target=self._beat, name="rso-run-lock", daemon=True)
        self._thread.start()
        return self

    def _refuse_unless_stale(self, held: dict[str, Any]) -> None:
        if self.stale(held):
            return
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(held.get("since", 0))))
        raise RunLocked(
            f"run {self.uri.rsplit('/', 2)[-2]!r} is being trained by another launch (pid {held.get('pid')} on "
            f"{held.get('host')}, since {since}): wait for it to end, or use another --run-name. A crashed "
            f"launch's lock is taken over once its process is gone (or {self.stale_s:.0f}s without a heartbeat)"
        )

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            held = storage.read_json(self.uri)
            if held is not None and held.get("token") != self.token:
                return  # taken over (we were frozen past the stale limit): stop claiming it
            storage.write_json(self.uri, self._record())

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        held = storage.read_json(self.uri)
        if held is not None and held.get("token") == self.token:
            storage.remove_file(self.uri)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
