"""What is wrong right now, and why: the one place faults are reported.

Every long-running part of the reactor (listener, drainers, periodic tasks)
reports a fault here instead of raising it: the first report of a fault is
logged once (not once per retry) and published as a `health.degraded` event;
its end is logged and published as `health.recovered`. `/healthz` reads the
current state: a short reason class for anyone, the detail for the logs and
for authorised callers.

Reason classes (stable names, for alerts): `database_unreachable`,
`database_read_only`, `database_error`, `pooler` (notifications do not
arrive: running on the poll), `listener_down`, `dependency_down`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from reactor.engine.logs import mask_emails_in

__all__ = ["Fault", "Health"]

log = structlog.get_logger("reactor.health")

# Reason classes that make /healthz answer 503. `pooler` is degraded but healthy:
# the reactor works on the poll alone.
UNHEALTHY = frozenset({"database_unreachable", "database_read_only", "database_error",
                       "listener_down"})


@dataclass(frozen=True)
class Fault:
    """One current fault of one part of the reactor."""

    source: str          # e.g. "drainer:email_queue", "listener"
    reason: str          # a reason class (see the module docstring)
    detail: str          # one line for the operator (already scrubbed of secrets)
    since: float         # time.time() of the first report

    @property
    def unhealthy(self) -> bool:
        return self.reason in UNHEALTHY


class Health:
    """Current faults by source. Cheap to call on every retry: only changes are logged.

    Args:
        publish: called as publish(event_type, **fields) on each change (the event bus).
    """

    def __init__(self, publish: Callable[..., object] | None = None) -> None:
        self._faults: dict[str, Fault] = {}
        self._publish = publish

    def report(self, source: str, reason: str, detail: str) -> None:
        """`source` has a fault now; logged and published only when it is new or changed."""
        detail = mask_emails_in(detail)
        current = self._faults.get(source)
        if current is not None and current.reason == reason:
            return
        self._faults[source] = Fault(source, reason, detail, time.time())
        log.warning("degraded", source=source, reason=reason, detail=detail)
        if self._publish is not None:
            self._publish("health.degraded", source=source, reason=reason, error=detail)

    def clear(self, source: str) -> None:
        """`source` works again."""
        fault = self._faults.pop(source, None)
        if fault is None:
            return
        down_s = round(time.time() - fault.since, 1)
        log.info("recovered", source=source, reason=fault.reason, after_s=down_s)
        if self._publish is not None:
            self._publish("health.recovered", source=source, reason=fault.reason,
                          after_s=down_s)

    @property
    def faults(self) -> list[Fault]:
        return sorted(self._faults.values(), key=lambda f: f.since)

    @property
    def healthy(self) -> bool:
        return not any(f.unhealthy for f in self._faults.values())

    def reasons(self) -> list[str]:
        """The distinct reason classes in force (safe to show to anyone)."""
        return sorted({f.reason for f in self._faults.values()})
