"""What the core shares with every plugin: state, jobs, events, runners."""

from __future__ import annotations

import secrets
import time
import uuid as uuidlib
from pathlib import Path

from . import __version__
from .config import Config
from .db import Database
from .events import EventBus
from .jobs import JobManager
from .metrics import Metrics
from .outbox import Outbox
from .runner import LEDGER, Runner
from .storage_kinds import StorageKinds


class AgentContext:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.version = __version__
        self.state_dir: Path = config.state_dir
        self.started = time.time()
        self.db = Database(self.state_dir / "state.db")
        self.outbox = Outbox(self.db)
        ttl = config.state.result_ttl_seconds
        self.events = EventBus(self.db, self.outbox, delivery_ttl=ttl)
        self.jobs = JobManager(self.db, self.outbox, ttl=ttl)
        self.runners: dict[str, Runner] = {}
        # Plugins add their own collectors to metrics.registry (served at /metrics).
        self.metrics = Metrics()
        self.node_uuid = ""
        self.fingerprint_key = b""
        self._libvirt = None
        # the storage kinds of every plugin, served as one collection per category
        self.storage_kinds = StorageKinds()

    def libvirt(self):
        """The libvirt connection shared by the plugins that need one (see libvirt_conn)."""
        if self._libvirt is None:
            from .libvirt_conn import LibvirtConnection
            lv = self.config.libvirt
            self._libvirt = LibvirtConnection(
                lv.uri, self.runner("libvirt", max_threads=8),
                call_timeout=lv.call_timeout_seconds)
        return self._libvirt

    def runner(self, name: str, *, max_threads: int = 4, max_processes: int = 8) -> Runner:
        """The bounded pool of one plugin; one plugin's stuck calls never starve another's."""
        if name not in self.runners:
            self.runners[name] = Runner(name, max_threads=max_threads, max_processes=max_processes)
        return self.runners[name]

    async def open(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        await self.db.open()
        # Before anything can start a job: end what a killed predecessor left running.
        await LEDGER.open(self.db, self.started)
        self.node_uuid = await self.db.kv_get("node.uuid") or ""
        if not self.node_uuid:
            self.node_uuid = uuidlib.uuid4().hex
            await self.db.kv_set("node.uuid", self.node_uuid)
        key = await self.db.kv_get("jobs.fingerprint_key")
        if not key:
            key = secrets.token_hex(32)
            await self.db.kv_set("jobs.fingerprint_key", key)
        self.fingerprint_key = bytes.fromhex(key)
        await self.events.load()
        await self.jobs.recover()
        await self.jobs.load_counts()
        await self.outbox.start()

    async def close(self) -> None:
        await self.jobs.shutdown()
        await self.outbox.stop()
        for r in self.runners.values():
            r.close()
        LEDGER.close()
        await self.db.close()
