"""Fault injection for the tests (the hidden --fault-plan option): worker RANK is killed with SIGKILL at
STEP, at one POINT of the loop, once per run (a marker file in the run folder remembers what fired, across
the restarts it causes).

    python -m rso_ray.train --fault-plan 10:1:step     # worker 1 dies after step 10, once

The point ``error`` raises :class:`InjectedFault` in the training loop instead (after STEP, once): what a
bug or a transient I/O error does, the process alive. The point ``hold`` pauses instead: worker RANK waits
after STEP, each time it gets there (a relaunch or a resized worker group included), until the run folder
holds a file ``.release_STEP``. An autoscaling test uses it to keep a short run going until the autoscaler
has acted, instead of racing it.
"""

from __future__ import annotations

import os
import signal
import time

from ..training import storage


class InjectedFault(RuntimeError):
    """The exception of a planned ``error`` fault."""


class FaultPlan:
    """The planned faults of one worker."""

    def __init__(self, faults: tuple[tuple[int, int, str], ...], *, rank: int, run_dir: str):
        self.faults = list(faults)
        self.rank = rank
        self.run_dir = run_dir

    def due(self, step: int, point: str) -> bool:
        """Whether a fault of this worker fires at ``step`` and ``point`` now (and remember that it did)."""
        for i, (at, rank, where) in enumerate(self.faults):
            if (at, rank, where) == (step, self.rank, point):
                marker = storage.join(self.run_dir, f".fault_{i}_{at}_{rank}_{where}")
                if storage.read_json(marker) is None:
                    storage.write_json(marker, {"fired": time.time()})
                    return True
        return False

    def fire(self, step: int, point: str) -> None:
        print(f"[rso_ray] fault injection: worker {self.rank} is killed ({point}, step {step})", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    def maybe_fire(self, step: int, point: str) -> None:
        if self.due(step, point):
            self.fire(step, point)
        if point == "step":
            if self.due(step, "error"):
                print(f"[rso_ray] fault injection: worker {self.rank} raises an error (step {step})", flush=True)
                raise InjectedFault(f"planned error of worker {self.rank} after step {step}")
            self.hold(step)

    def hold(self, step: int) -> None:
        """Wait after ``step`` while a hold of this worker is planned there and not yet released."""
        if (step, self.rank, "hold") not in self.faults:
            return
        release = storage.join(self.run_dir, f".release_{step}")
        if storage.read_json(release) is not None:
            return
        print(f"[rso_ray] fault injection: worker {self.rank} holds at step {step} until {release} exists", flush=True)
        while storage.read_json(release) is None:
            time.sleep(0.5)
        print(f"[rso_ray] fault injection: worker {self.rank} released at step {step}", flush=True)
