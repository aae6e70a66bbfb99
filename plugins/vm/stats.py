"""Per-VM statistics: one bulk getAllDomainStats per pass, served from memory.

A background task samples every ``stats_interval_seconds``: ONE
getAllDomainStats call asking only for the groups served (state, cpu total,
balloon, block, interface) with NOWAIT, so a VM whose monitor is busy (a job
holds it) is skipped for what needs the monitor instead of stalling every
other VM.  Right after a pass, its records are turned into figures in a
runner thread (a request arriving before that waits for it; a Prometheus
scrape, which runs on the loop, never parses and reads the last figures).
A VM whose block figures were skipped keeps its previous ones, and its
``ageSeconds`` says how old its oldest figure is.  A lifecycle change
(VmStateChanged) wakes the sampler, so a VM just defined, started or stopped is
in the figures within a fraction of a second, not at the next interval.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable

from agent import errors
from agent.models import iso

from .states import state_name

if TYPE_CHECKING:
    from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger("node_agent.vm.stats")

# libvirt's numbers (virDomainStatsTypes), so this module imports without the binding.
STATS_STATE, STATS_CPU_TOTAL, STATS_BALLOON, STATS_INTERFACE, STATS_BLOCK = 1, 2, 4, 16, 32
GROUPS = STATS_STATE | STATS_CPU_TOTAL | STATS_BALLOON | STATS_BLOCK | STATS_INTERFACE
RUNNING_STATES = frozenset((1, 2, 3, 7))  # running, blocked, paused, pmsuspended
_SKIPPABLE = ("blockReadBytes", "blockWriteBytes", "disks")
WAKE_COALESCE = 0.1   # seconds between a wake and its pass


def nowait_flag() -> int:
    from agent.libvirt_conn import libvirt
    return getattr(libvirt, "VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT", 0) if libvirt else 0


def entry_from(uuid: str, name: str, st: dict[str, Any]) -> dict[str, Any]:
    """One VM's figures from its getAllDomainStats record (sizes in bytes)."""
    get = st.get
    state_no = get("state.state", 0)
    cpu, cur, mx = get("cpu.time"), get("balloon.current"), get("balloon.maximum")
    e: dict[str, Any] = {
        "uuid": uuid, "name": name, "state": state_name(state_no, get("state.reason", 0))[0],
        "cpuTimeSeconds": None if cpu is None else cpu / 1e9,
        "balloonCurrent": None if cur is None else cur * 1024,
        "balloonMaximum": None if mx is None else mx * 1024,
        "blockReadBytes": None, "blockWriteBytes": None, "netRxBytes": None, "netTxBytes": None,
        "disks": [], "nics": [],
        "_active": state_no in RUNNING_STATES, "_complete": True,
    }
    n = get("block.count", 0)
    if n:
        disks, rd, wr = [], 0, 0
        for i in range(n):
            r, w = get(f"block.{i}.rd.bytes"), get(f"block.{i}.wr.bytes")
            disks.append({"name": get(f"block.{i}.name"), "path": get(f"block.{i}.path"),
                          "readBytes": r, "writeBytes": w})
            if r is None:
                # NOWAIT on a VM whose job is busy (a hung monitor) leaves out the
                # figures that need the monitor: the block counters.
                e["_complete"] = False
            else:
                rd += r
            wr += w or 0
        e.update(disks=disks, blockReadBytes=rd, blockWriteBytes=wr)
    n = get("net.count", 0)
    if n:
        nics, rx, tx = [], 0, 0
        for i in range(n):
            r, t = get(f"net.{i}.rx.bytes"), get(f"net.{i}.tx.bytes")
            nics.append({"name": get(f"net.{i}.name"), "rxBytes": r, "txBytes": t})
            rx += r or 0
            tx += t or 0
        e.update(nics=nics, netRxBytes=rx, netTxBytes=tx)
    return e


def parse(records: list[tuple[Any, dict[str, Any]]], taken: tuple[float, float],
          previous: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """uuid -> figures of one pass's records; blocking-free but CPU-bound (a thread)."""
    mono, wall = taken
    out: dict[str, dict[str, Any]] = {}
    for dom, st in records:
        uuid = dom.UUIDString().replace("-", "")
        e = entry_from(uuid, dom.name(), st)
        prev = previous.get(uuid)
        if not e["_complete"] and e["_active"] and prev is not None and prev["_active"]:
            for k in _SKIPPABLE:          # keep the last block figures, and their age
                e[k] = prev[k]
            e["_complete"] = prev["_complete"]
            e["_mono"], e["_wall"] = prev["_mono"], prev["_wall"]
        else:
            e["_mono"], e["_wall"] = mono, wall
        out[uuid] = e
    return out


class StatsSampler:
    def __init__(self, call: Callable[..., Any], run: Callable[..., Any], interval: float,
                 timeout: float) -> None:
        self._call = call              # plugin._call: conn.call on the plugin's runner
        self._run = run                # plugin.runner.call: a plain thread call
        self.interval = interval
        self.timeout = timeout
        self.flags: int | None = None   # NOWAIT when this libvirt has it; read with the binding
        # (records, monotonic time, wall time, pass number) of the last pass, set at once
        self._latest: tuple[list[tuple[Any, dict[str, Any]]], float, float, int] | None = None
        self.taken: float | None = None        # time.time() of the last pass
        self.duration: float | None = None     # seconds of the last pass (the call, kept)
        self.call_duration: float | None = None
        self.parse_duration: float | None = None
        self.passes = 0
        self.seconds = {"pass": 0.0, "call": 0.0, "parse": 0.0}   # totals since start
        self.failures = 0
        self.last_error: str | None = None
        self.entries: dict[str, dict[str, Any]] = {}   # the last parsed pass
        self._parsed_pass = -1
        self._parse_lock = threading.Lock()
        self._in_thread = threading.Event()    # a pass's thread is still running
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._parsing: set[asyncio.Future] = set()

    # -- in the runner thread
    def _bulk(self, conn: Any) -> tuple[list[tuple[Any, dict[str, Any]]], float]:
        self._in_thread.set()
        try:
            t0 = time.perf_counter()
            if self.flags is None:
                self.flags = nowait_flag()
            try:
                records = conn.getAllDomainStats(GROUPS, self.flags)
            except Exception as e:
                from agent.libvirt_conn import libvirt
                if self.flags and isinstance(e, libvirt.libvirtError) and e.get_error_code() in (
                        libvirt.VIR_ERR_INVALID_ARG, libvirt.VIR_ERR_NO_SUPPORT,
                        libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED):
                    log.warning("getAllDomainStats refuses NOWAIT here (%s); sampling without it",
                                e.get_error_message())
                    self.flags = 0
                    records = conn.getAllDomainStats(GROUPS, 0)
                else:
                    raise
            return records, time.perf_counter() - t0
        finally:
            self._in_thread.clear()

    def _parse_latest(self) -> dict[str, dict[str, Any]]:
        """The figures of the last pass, parsed once (any thread; callers share it)."""
        with self._parse_lock:
            latest = self._latest
            if latest is not None and latest[3] != self._parsed_pass:
                t0 = time.perf_counter()
                self.entries = parse(latest[0], (latest[1], latest[2]), self.entries)
                self._parsed_pass = latest[3]
                self.parse_duration = time.perf_counter() - t0
                self.seconds["parse"] += self.parse_duration
            return self.entries

    # -- on the loop
    async def sample(self) -> None:
        """One pass; concurrent callers share it."""
        async with self._lock:
            if self._in_thread.is_set():
                # The previous pass's thread is stuck in libvirt: don't pile up threads.
                raise errors.Timeout("the previous statistics pass is still waiting for libvirt",
                                     code="VM.1408")
            t0 = time.perf_counter()
            records, call = await self._call(self._bulk, timeout=self.timeout)
            self.passes += 1
            self.taken = time.time()
            self._latest = (records, time.monotonic(), self.taken, self.passes)
            self.call_duration = call
            self.duration = time.perf_counter() - t0
            self.seconds["pass"] += self.duration
            self.seconds["call"] += call
        # Figures for readers, off the loop and outside the pass.
        task = asyncio.ensure_future(self._run(self._parse_latest, timeout=self.timeout))
        self._parsing.add(task)
        task.add_done_callback(self._parsed)

    async def run(self, connected: Callable[[], bool]) -> None:
        while True:
            # Cleared before the pass: a wake during it (a VM started meanwhile) gets
            # the next pass, not the one after the interval.
            self._wake.clear()
            if connected():
                try:
                    await self.sample()
                    self.last_error = None
                except asyncio.CancelledError:
                    raise
                except Exception as e:
                    self.failures += 1
                    self.last_error = getattr(e, "description", None) or str(e)
                    log.warning("VM statistics pass failed: %s", self.last_error)
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval)
            except asyncio.TimeoutError:
                pass
            else:
                # Woken (a lifecycle change, a reconnection): let a burst of events
                # (a host starting its VMs) end in one pass rather than one each.
                await asyncio.sleep(WAKE_COALESCE)

    def _parsed(self, task: asyncio.Future) -> None:
        self._parsing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("parsing VM statistics failed: %s", task.exception())

    def wake(self) -> None:
        self._wake.set()

    async def served(self) -> list[dict[str, Any]]:
        if self._latest is not None and self._parsed_pass != self._latest[3]:
            await self._run(self._parse_latest, timeout=self.timeout)
        now = time.monotonic()
        out = []
        for e in self.entries.values():
            d = {k: v for k, v in e.items() if k[0] != "_"}
            d["ageSeconds"] = round(now - e["_mono"], 3)
            d["sampleDate"] = iso(e["_wall"])
            out.append(d)
        return out


class VmCollector:
    """Prometheus gauges per VM (labels uuid, name) over the sampler's last pass."""

    _GAUGES = (
        ("node_agent_vm_cpu_seconds", "CPU time used by the VM", "cpuTimeSeconds"),
        ("node_agent_vm_balloon_current_bytes", "Memory the balloon gives the VM", "balloonCurrent"),
        ("node_agent_vm_balloon_maximum_bytes", "Maximum memory of the VM", "balloonMaximum"),
        ("node_agent_vm_block_read_bytes", "Bytes read from the VM's disks", "blockReadBytes"),
        ("node_agent_vm_block_write_bytes", "Bytes written to the VM's disks", "blockWriteBytes"),
        ("node_agent_vm_net_rx_bytes", "Bytes received by the VM's nics", "netRxBytes"),
        ("node_agent_vm_net_tx_bytes", "Bytes sent by the VM's nics", "netTxBytes"),
    )

    def __init__(self, sampler: StatsSampler) -> None:
        self.sampler = sampler

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return self._families(sample=False)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        return self._families(sample=True)

    def _families(self, sample: bool) -> list[GaugeMetricFamily]:
        # Imported on the first scrape (the agent's metrics registry is built then): memory at idle.
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        s = self.sampler
        fams = [GaugeMetricFamily(n, h, labels=["uuid", "name"]) for n, h, _ in self._GAUGES]
        running = GaugeMetricFamily("node_agent_vm_running", "1 if the VM runs (or is paused)",
                                    labels=["uuid", "name"])
        age = GaugeMetricFamily("node_agent_vm_stats_age_seconds", "Age of the VM's figures",
                                labels=["uuid", "name"])
        sample_s = GaugeMetricFamily("node_agent_vm_stats_sample_seconds",
                                     "Duration of the last statistics pass (the bulk call)")
        call_s = GaugeMetricFamily("node_agent_vm_stats_call_seconds",
                                   "Duration of the last getAllDomainStats call")
        parse_s = GaugeMetricFamily("node_agent_vm_stats_parse_seconds",
                                    "Duration of the last parsing of a pass into figures")
        count = GaugeMetricFamily("node_agent_vm_count", "VMs defined on this node")
        passes = CounterMetricFamily("node_agent_vm_stats_passes", "Statistics passes since start")
        totals = [CounterMetricFamily(f"node_agent_vm_stats_{k}_seconds_spent",
                                      f"Seconds spent in statistics ({what}) since start")
                  for k, what in (("pass", "passes, as the loop sees them"),
                                  ("call", "getAllDomainStats calls"),
                                  ("parse", "parsing passes into figures"))]
        if sample:
            entries = s.entries             # parsed in a thread after each pass: no work here
            now = time.monotonic()
            for e in list(entries.values()):
                labels = [e["uuid"], e["name"]]
                for fam, (_, _, key) in zip(fams, self._GAUGES):
                    if e.get(key) is not None:
                        fam.add_metric(labels, float(e[key]))
                running.add_metric(labels, 1.0 if e["_active"] else 0.0)
                age.add_metric(labels, now - e["_mono"])
            if s.duration is not None:
                sample_s.add_metric([], s.duration)
                call_s.add_metric([], s.call_duration)
            if s.parse_duration is not None:
                parse_s.add_metric([], s.parse_duration)
            count.add_metric([], float(len(s.entries)))
            passes.add_metric([], float(s.passes))
            for fam, key in zip(totals, ("pass", "call", "parse")):
                fam.add_metric([], s.seconds[key])
        return fams + [running, age, sample_s, call_s, parse_s, count, passes] + totals
