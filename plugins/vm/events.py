"""libvirt lifecycle events -> VmStateChanged, in order, with reboots folded.

The tracker remembers the last state it reported for each VM and reports
only changes.  A plain stop is held for a short window: if the same VM is
started again within it (a reboot is a stop and a start), the stop is dropped
and, the VM being Running as reported before, nothing is reported at all.
Any other event for that VM flushes the held stop first, so the order of one
VM's events is kept.  Publishing goes through one queue and one task, in the
order the events arrived.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

from . import states as S

log = logging.getLogger("node_agent.vm.events")
EVENT_TYPE = "VmStateChanged"


class LifecycleTracker:
    def __init__(self, publish: Callable[[str, dict[str, Any]], Awaitable[Any]], *,
                 hold_seconds: float = 2.0, on_change: Callable[[], None] | None = None) -> None:
        self._publish = publish
        self._on_change = on_change            # told of every VmStateChanged (the sampler)
        self.hold = hold_seconds
        self.known: dict[str, str] = {}        # uuid -> last reported (or seeded) state
        self._pending: dict[str, tuple[asyncio.TimerHandle, dict[str, Any]]] = {}
        self._queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self.seeded = False

    # -- lifecycle
    def start(self) -> None:
        self._task = asyncio.create_task(self._drain(), name="vm-events")

    async def stop(self) -> None:
        for uuid in list(self._pending):
            self._flush(uuid)                  # a held stop is still a stop: report it
        self._queue.put_nowait(None)
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 5)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._task.cancel()

    async def _drain(self) -> None:
        while True:
            data = await self._queue.get()
            if data is None:
                return
            try:
                await self._publish(EVENT_TYPE, data)
            except Exception:
                log.exception("could not publish %s for VM %s", EVENT_TYPE, data.get("vmInstanceUuid"))

    # -- input
    def seed(self, current: dict[str, tuple[str, str]]) -> None:
        """The states found at the first connection: known, not reported."""
        for uuid, (_name, state) in current.items():
            self.known.setdefault(uuid, state)
        self.seeded = True

    def reconcile(self, current: dict[str, tuple[str, str]]) -> None:
        """After a reconnection: report what changed while libvirt was out of reach."""
        if not self.seeded:
            self.seed(current)
            return
        for uuid, (name, state) in current.items():
            self._change(uuid, name, state, "reconciled")
        for uuid in [u for u in self.known if u not in current and u not in self._pending]:
            if self.known[uuid] not in (S.MIGRATED, S.DESTROYED):
                self._change(uuid, None, S.DESTROYED, "reconciled")
            self.known.pop(uuid, None)

    def on_event(self, uuid: str, name: str, event: int, detail: int) -> None:
        state, reason = S.event_state(event, detail)
        if event == S.RESUMED and self.known.get(uuid) not in (S.PAUSED, S.SUSPENDED):
            return     # QEMU starts paused: libvirt's resume at boot comes with STARTED
        if state is None and not (event in (S.DEFINED, S.UNDEFINED) and detail == 0):
            return     # no state change (SHUTDOWN before STOPPED, an update, a rename)
        if event == S.STARTED and uuid in self._pending:
            handle, _ = self._pending.pop(uuid)   # stopped and started again: a reboot
            handle.cancel()
        elif uuid in self._pending:
            self._flush(uuid)
        if event == S.DEFINED:
            # A new persistent VM is Stopped; a running one made persistent is no change.
            if uuid not in self.known:
                self._change(uuid, name, S.STOPPED, reason)
            return
        if event == S.UNDEFINED:
            previous = self.known.get(uuid)
            if previous in S.ACTIVE:
                return     # a running VM made transient: it still runs
            if previous != S.MIGRATED:
                self._change(uuid, name, S.DESTROYED, reason)
            self.known.pop(uuid, None)
            return
        if state == S.STOPPED and self.hold > 0:
            data = self._data(uuid, name, state, reason)
            if data is None:
                return
            handle = asyncio.get_running_loop().call_later(self.hold, self._flush, uuid)
            self._pending[uuid] = (handle, data)
            return
        self._change(uuid, name, state, reason)

    # -- internals
    def _data(self, uuid: str, name: str | None, state: str, reason: str) -> dict[str, Any] | None:
        previous = self.known.get(uuid)
        if previous == state:
            return None
        data: dict[str, Any] = {"vmInstanceUuid": uuid, "name": name, "state": state}
        if previous is not None:
            data["previousState"] = previous
        data["reason"] = reason
        return data

    def _change(self, uuid: str, name: str | None, state: str, reason: str) -> None:
        data = self._data(uuid, name, state, reason)
        if data is None:
            return
        self.known[uuid] = state
        self._queue.put_nowait(data)
        self._changed()

    def _flush(self, uuid: str) -> None:
        entry = self._pending.pop(uuid, None)
        if entry is None:
            return
        handle, data = entry
        handle.cancel()
        # Nothing else happened to this VM meanwhile: any event for it flushes first.
        self.known[uuid] = data["state"]
        self._queue.put_nowait(data)
        self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            try:
                self._on_change()
            except Exception:
                log.exception("a VmStateChanged listener failed")
