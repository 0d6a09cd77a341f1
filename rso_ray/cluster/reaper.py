"""Clean up a local Ray instance whose driver was killed (kill -9 leaves Ray's node agents running).

When ``python -m rso_ray.train`` starts a local Ray instance, it also starts this watcher in a session of
its own. The watcher notes the driver's process tree (Ray's GCS, raylet, agents, workers) every second;
when the driver is gone, it gives Ray's own shutdown a moment, then terminates (and, if need be, kills)
every noted process still alive. A process is matched by pid and start time, so a reused pid is never
touched. A driver that exits normally shuts Ray down itself; the watcher then finds little or nothing.

    python -m rso_ray.cluster.reaper <driver pid>
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

POLL_S = 1.0
GRACE_S = 3.0


def watch(driver_pid: int) -> int:
    import psutil

    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        return 0
    seen: dict[int, float] = {}
    while driver.is_running() and driver.status() != psutil.STATUS_ZOMBIE:
        try:
            for child in driver.children(recursive=True):
                if child.pid != os.getpid():  # this watcher is the driver's child too
                    seen[child.pid] = child.create_time()
        except psutil.NoSuchProcess:
            break
        time.sleep(POLL_S)
    time.sleep(GRACE_S)
    left = []
    for pid, created in seen.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == created:
                left.append(proc)
        except psutil.NoSuchProcess:
            continue
    for proc in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(left, timeout=GRACE_S)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    return 0


_WATCHERS: list[int] = []  # pids of the watchers this process started


def start_watcher() -> None:
    """Watch this process (the driver that just started a local Ray instance)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "rso_ray.cluster.reaper", str(os.getpid())],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    _WATCHERS.append(proc.pid)


def kill_local_instance() -> None:
    """SIGKILL every process this driver started, its watcher aside (Ray's GCS, raylet, agents and workers), without
    waiting: for a driver whose run is over and which is about to exit."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        if child.pid not in _WATCHERS:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()


if __name__ == "__main__":
    raise SystemExit(watch(int(sys.argv[1])))
