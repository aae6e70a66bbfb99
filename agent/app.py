"""Assembling and running the agent: plugins, the aiohttp app, the listener."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import secrets
import signal
import ssl
import stat
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from aiohttp import web

from . import logs, sdnotify, server
from .config import Config, ConfigError, validate_section
from .context import AgentContext
from .core_routes import CorePlugin
from .plugin import Plugin

log = logging.getLogger("node_agent")
ENTRY_POINT_GROUP = "node_agent.plugins"


def discover() -> tuple[dict[str, type[Plugin]], list[dict[str, Any]]]:
    """Plugin classes from the entry points; a broken one is reported, not fatal."""
    found: dict[str, type[Plugin]] = {}
    failures: list[dict[str, Any]] = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, Plugin)):
                raise TypeError(f"{ep.value} is not a Plugin subclass")
        except Exception as e:
            log.error("plugin %s cannot be loaded: %s", ep.name, e)
            failures.append({"name": ep.name, "available": False,
                             "reason": f"cannot be loaded: {type(e).__name__}: {e}"})
            continue
        found[cls.name or ep.name] = cls
    return found, failures


def check_sections(config: Config, classes: dict[str, type[Plugin]]) -> dict[str, dict[str, Any]]:
    """Validate every plugin section now, so a bad config is refused at start."""
    owners = {s: name for name, cls in classes.items() for s in cls.config_sections}
    unknown = sorted(set(config.plugins) - set(owners))
    if unknown:
        raise ConfigError(f"unknown config section(s): {', '.join(unknown)}; known: "
                          f"server, auth, state, log, libvirt, {', '.join(sorted(owners))}")
    settings: dict[str, dict[str, Any]] = {name: {} for name in classes}
    for section, name in owners.items():
        model = classes[name].config_sections[section]
        settings[name][section] = validate_section(section, model, config.plugins.get(section, {}))
    return settings


def ensure_token(path: Path) -> str:
    """Read the token, or create one (0600) on first start.

    An existing token file that others can read (any group or other bit) or that
    another user owns is refused: the token may already have been read, so
    quietly fixing the mode would keep a leaked credential in use.  The operator
    chmods it (and replaces the token if it could have been read)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        fd = None
    except OSError as e:
        raise ConfigError(f"cannot read the token file {path}: {e.strerror}") from None
    if fd is not None:
        with os.fdopen(fd) as f:
            st = os.fstat(f.fileno())
            mode = stat.S_IMODE(st.st_mode)
            if st.st_uid != os.geteuid():
                raise ConfigError(f"the token file {path} is owned by uid {st.st_uid}, not by the "
                                  f"agent's user (uid {os.geteuid()}): refusing to use it")
            if mode & 0o077:
                raise ConfigError(f"the token file {path} can be read by others (mode {mode:04o}): "
                                  f"refusing to use it; run 'chmod 600 {path}' (and write a new "
                                  "token there if it may have been read)")
            token = f.read().strip()
        if token:
            return token
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.chmod(path, 0o600)
    print(f"node-agent: generated a new API token in {path}", file=sys.stderr)
    return token


def _plugin_ctx(plugin: Plugin):
    """An aiohttp cleanup_ctx that never lets one plugin's start-up stop the agent."""
    async def ctx(app: web.Application):
        gen = plugin.lifecycle()
        try:
            await gen.__anext__()
        except Exception as e:
            log.exception("plugin %s failed to start", plugin.name)
            plugin.set_available(False, f"failed to start: {type(e).__name__}: {e}")
            gen = None
        yield
        if gen is not None:
            try:
                await gen.__anext__()
            except StopAsyncIteration:
                pass
            except Exception:
                log.exception("plugin %s failed to stop cleanly", plugin.name)
    return ctx


def build_app(ctx: AgentContext, token: str, classes: dict[str, type[Plugin]],
              settings: dict[str, dict[str, Any]], failures: list[dict[str, Any]]) -> web.Application:
    metrics = ctx.metrics
    core = CorePlugin(ctx, {})
    plugins: dict[str, Plugin] = {"core": core}
    for name, cls in classes.items():
        try:
            plugins[name] = cls(ctx, settings.get(name, {}))
        except Exception as e:
            log.exception("plugin %s cannot be created", name)
            failures.append({"name": name, "available": False,
                             "reason": f"cannot be created: {type(e).__name__}: {e}"})
    core.plugins, core.failures, core.metrics = plugins, failures, metrics
    app = web.Application(client_max_size=ctx.config.server.max_body_bytes,
                          handler_args={"max_field_size": 16384})
    app[server.CTX_KEY] = ctx
    app[server.PLUGINS_KEY] = plugins
    routes = server.build_routes(app, ctx, plugins, token, metrics)
    core.all_routes = routes
    for plugin in plugins.values():
        app.cleanup_ctx.append(_plugin_ctx(plugin))

    async def end_streams(_app: web.Application) -> None:
        # on_shutdown runs before aiohttp waits for open handlers: end the jobs (a
        # long-poll on one then gets its 503 at once), the event streams and the
        # plugins' websockets now, so a stop does not wait them out.  The outbox
        # stops first: the ended jobs' webhooks go out after the restart, rather
        # than now and, cut off before their delivery is recorded, again then.
        await ctx.outbox.stop()
        await ctx.jobs.shutdown()
        ctx.events.close_streams()
        for plugin in plugins.values():
            try:
                await plugin.stopping()
            except Exception:
                log.exception("plugin %s failed while stopping", plugin.name)
    app.on_shutdown.append(end_streams)
    return app


async def release_startup_memory(delay: float = 1.0) -> None:
    """Start-up leaves a lot of freed memory behind (imports, model building, the
    plugins' first scans); once it has settled, collect it and give it back to the
    system (glibc keeps freed heap memory otherwise): ~2-3 MB of RSS."""
    await asyncio.sleep(delay)
    gc.collect()
    # What is left from start-up lives as long as the agent: out of the
    # collector's sight, a full collection later takes ~1 ms instead of ~20.
    gc.freeze()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):     # not glibc: nothing to trim
        pass


# mallopt's M_ARENA_MAX (glibc's malloc.h), what the MALLOC_ARENA_MAX variable sets.
M_ARENA_MAX = -8
MALLOC_ARENAS = 2


def limit_malloc_arenas() -> None:
    """At most two glibc malloc arenas (the default is 8 per core), before the first
    thread starts. Each pool thread otherwise gets an arena of its own whose pages stay
    resident although an idle agent's threads (sqlite, runners) allocate little: ~0.7 MB
    of idle RSS. The agent's threads wait on I/O, so they hardly contend for malloc.
    An explicit MALLOC_ARENA_MAX in the environment wins (glibc has applied it)."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, MALLOC_ARENAS)
    except (OSError, AttributeError):     # not glibc: nothing to limit
        pass


def tls_context(config: Config) -> ssl.SSLContext | None:
    s = config.server
    if not s.tls_cert:
        if s.tls_key or s.tls_client_ca:
            raise ConfigError("server.tls_key and server.tls_client_ca need server.tls_cert")
        return None
    if not s.tls_key:
        raise ConfigError("server.tls_cert needs server.tls_key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(s.tls_cert, s.tls_key)
        if s.tls_client_ca:
            context.load_verify_locations(cafile=s.tls_client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"server TLS files cannot be used: {e}") from None
    return context


async def serve(config: Config) -> None:
    limit_malloc_arenas()
    classes, failures = discover()
    settings = check_sections(config, classes)
    ssl_context = tls_context(config)
    token = ensure_token(config.token_file)
    logs.set_token(token)
    ctx = AgentContext(config)
    await ctx.open()
    app = build_app(ctx, token, classes, settings, failures)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5,
                           handler_cancellation=True)   # a client that left frees its place
    await runner.setup()
    site = web.TCPSite(runner, config.server.host, config.server.port, ssl_context=ssl_context,
                       reuse_address=True)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        await ctx.close()
        raise ConfigError(f"cannot listen on {config.server.host}:{config.server.port}: {e.strerror}") from None
    scheme = "https" if ssl_context else "http"
    log.info("node-agent %s listening on %s://%s:%d (state %s, token file %s)", ctx.version, scheme,
             config.server.host, config.server.port, ctx.state_dir, config.token_file)
    print(f"node-agent {ctx.version} ready on {scheme}://{config.server.host}:{config.server.port}; "
          f"token file: {config.token_file}", file=sys.stderr, flush=True)
    sdnotify.notify("READY=1\nSTATUS=serving")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watchdog = asyncio.create_task(sdnotify.watchdog_loop()) if sdnotify.watchdog_interval() else None
    flusher = asyncio.create_task(logs.flush_loop())
    settle = asyncio.create_task(release_startup_memory())
    await stop.wait()
    flusher.cancel()
    settle.cancel()
    sdnotify.notify("STOPPING=1")
    log.info("stopping")
    if watchdog:
        watchdog.cancel()
    await runner.cleanup()
    await ctx.close()
