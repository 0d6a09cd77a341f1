"""What the user's console shows of Ray: rso_ray's own lines and Ray's real warnings, not Ray's chatter.

Ray forwards every worker's stdout and stderr to the driver through a dispatcher with named handlers.
:func:`install_log_filter` wraps Ray's printing handler: known noise (per-report INFO lines, Ray Data
execution plans, a progress-bar notice, a core-worker ERROR about actor constructor arguments that Ray
Train and Ray Data trigger themselves) is dropped, and the Train controller's ~30-line traceback of a
dead worker becomes one rso_ray line saying what happens next. Everything still goes to Ray's log files
(/tmp/ray/session_latest/logs).

    python -c "from rso_ray.cluster.ray_console import is_noise; print(is_noise('Progress bars disabled. To enable, ...'))"
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

NOISE = [re.compile(p) for p in (
    r"has constructor arguments in the object store and max_restarts > 0",
    r"^Progress bars disabled\.",
    r"Reporting training result \d+: TrainingReport\(",
    r"^(Registered dataset logger|Starting execution of Dataset|Execution plan of Dataset|Dataset .* execution finished)",
    r"^Execution (plan|finished)",
    r"^\s*(->|\+-) ",  # the indented operator tree of an execution plan
    r"Graceful shutdown of backend failed\. This is expected if one of the workers has crashed\.",
)]
_CONTROLLER = "TrainController"


def is_noise(line: str) -> bool:
    return any(p.search(line) for p in NOISE)


class LogFilter:
    """Wraps Ray's ``ray_print_logs`` handler (``data``: a batch of lines from one process)."""

    def __init__(self, inner: Callable[[dict[str, Any]], None], say: Callable[[str], None], max_failures: int | None):
        self.inner, self.say, self.max_failures = inner, say, max_failures
        self.in_traceback: set[Any] = set()  # processes whose traceback is being dropped

    def __call__(self, data: dict[str, Any]) -> None:
        source = f"{data.get('actor_name') or ''} {data.get('task_name') or ''}"
        key = data.get("pid")
        kept = []
        for line in data.get("lines", []):
            if _CONTROLLER in source and self._controller_traceback(key, line):
                continue
            if not is_noise(line):
                kept.append(line)
        if kept:
            self.inner(dict(data, lines=kept))

    def _controller_traceback(self, key: Any, line: str) -> bool:
        """True for lines of a worker-failure traceback printed by the Train controller."""
        if line.startswith("Traceback (most recent call last)") or "ActorDiedError" in line or "WorkerGroupError" in line:
            if key not in self.in_traceback:
                self.in_traceback.add(key)
                limit = "" if self.max_failures is None else f" (at most --max-failures {self.max_failures} times)"
                self.say("a training worker died; Ray Train restarts the worker group from the newest complete "
                         f"checkpoint{limit}. Details: Ray's logs (/tmp/ray/session_latest/logs)")
            return True
        if key in self.in_traceback:
            if line.startswith((" ", "\t")) or not line.strip() or line.startswith(("The actor", "ray.", "During handling")):
                return True
            self.in_traceback.discard(key)
        return False


def install_log_filter(say: Callable[[str], None], *, max_failures: int | None = None, dispatcher: Any = None) -> bool:
    """Wrap Ray's log printer of this driver; returns False when there is none (log_to_driver off)."""
    if dispatcher is None:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    with dispatcher._lock:
        for i, (name, handler) in enumerate(dispatcher.handlers):
            if name == "ray_print_logs" and not isinstance(handler, LogFilter):
                dispatcher.handlers[i] = (name, LogFilter(handler, say, max_failures))
                return True
    return False
