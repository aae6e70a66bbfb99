"""libvirt's domain states and lifecycle events in the manual's VM state words.

The numbers are libvirt's stable ABI (virDomainState, virDomainEventType and
their detail enums), written out so this module needs no binding.
"""

from __future__ import annotations

RUNNING, STOPPED, PAUSED, STOPPING = "Running", "Stopped", "Paused", "Stopping"
CRASHED, SUSPENDED, UNKNOWN = "Crashed", "Suspended", "Unknown"
MIGRATING, MIGRATED, DESTROYED = "Migrating", "Migrated", "Destroyed"
ACTIVE = frozenset({RUNNING, PAUSED, STOPPING, SUSPENDED, MIGRATING})

# virDomainState -> (name, {reason number: reason word})
_STATES = {
    0: (UNKNOWN, {}),
    1: (RUNNING, {0: "unknown", 1: "booted", 2: "migrated", 3: "restored", 4: "from-snapshot",
                  5: "unpaused", 6: "migration-canceled", 7: "save-canceled", 8: "wakeup",
                  9: "crashed", 10: "postcopy", 11: "postcopy-failed"}),
    2: (RUNNING, {0: "blocked"}),
    3: (PAUSED, {0: "unknown", 1: "user", 2: "migration", 3: "save", 4: "dump", 5: "ioerror",
                 6: "watchdog", 7: "from-snapshot", 8: "shutting-down", 9: "snapshot",
                 10: "crashed", 11: "starting-up", 12: "postcopy", 13: "postcopy-failed",
                 14: "api-error"}),
    4: (STOPPING, {0: "unknown", 1: "user"}),
    5: (STOPPED, {0: "unknown", 1: "shutdown", 2: "destroyed", 3: "crashed", 4: "migrated",
                  5: "saved", 6: "failed", 7: "from-snapshot", 8: "daemon"}),
    6: (CRASHED, {0: "unknown", 1: "panicked"}),
    7: (SUSPENDED, {0: "unknown"}),
}
SHUTOFF_CRASHED = 3


def state_name(state: int, reason: int) -> tuple[str, str | None]:
    """(state word, reason word) of libvirt's (state, reason)."""
    name, reasons = _STATES.get(state, (UNKNOWN, {}))
    if state == 5 and reason == SHUTOFF_CRASHED:
        name = CRASHED                    # shut off because it crashed: the controller wants to know
    return name, reasons.get(reason)


# virDomainEventType
DEFINED, UNDEFINED, STARTED, EV_SUSPENDED, RESUMED, EV_STOPPED, SHUTDOWN, PMSUSPENDED, EV_CRASHED = range(9)
_DETAILS = {
    DEFINED: {0: "defined", 1: "updated", 2: "renamed", 3: "from-snapshot"},
    UNDEFINED: {0: "undefined", 1: "renamed"},
    STARTED: {0: "booted", 1: "migrated", 2: "restored", 3: "from-snapshot", 4: "wakeup"},
    EV_SUSPENDED: {0: "paused", 1: "migrated", 2: "ioerror", 3: "watchdog", 4: "restored",
                   5: "from-snapshot", 6: "api-error", 7: "postcopy", 8: "postcopy-failed"},
    RESUMED: {0: "unpaused", 1: "migrated", 2: "from-snapshot", 3: "postcopy", 4: "postcopy-failed"},
    EV_STOPPED: {0: "shutdown", 1: "destroyed", 2: "crashed", 3: "migrated", 4: "saved",
                 5: "failed", 6: "from-snapshot"},
    SHUTDOWN: {0: "finished", 1: "guest", 2: "host"},
    PMSUSPENDED: {0: "memory", 1: "disk"},
    EV_CRASHED: {0: "panicked", 1: "crashloaded"},
}
STOPPED_MIGRATED = 3
STOPPED_CRASHED = 2


def event_state(event: int, detail: int) -> tuple[str | None, str]:
    """(new state or None when the event is no state change, reason word).

    DEFINED and UNDEFINED are resolved by the tracker (they depend on what it
    knows); transitional migration events (the source pausing at switch-over,
    resuming after a failed migration) are no state change for the controller.
    """
    reason = _DETAILS.get(event, {}).get(detail, "unknown")
    if event == STARTED:
        return RUNNING, reason
    if event == EV_SUSPENDED:
        return (None if detail in (1, 7) else PAUSED), reason
    if event == RESUMED:
        return (None if detail == 1 else RUNNING), reason
    if event == EV_STOPPED:
        if detail == STOPPED_MIGRATED:
            return MIGRATED, reason
        return (CRASHED if detail == STOPPED_CRASHED else STOPPED), reason
    if event == PMSUSPENDED:
        return SUSPENDED, reason
    if event == EV_CRASHED:
        return CRASHED, reason
    return None, reason       # SHUTDOWN (a STOPPED follows), DEFINED/UNDEFINED (see tracker)
