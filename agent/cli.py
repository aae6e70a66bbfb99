"""The ``node-agent`` command: serve, call, doctor, openapi."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from typing import Any

from . import __version__
from .config import Config, ConfigError, load_config


def _config_from(args: argparse.Namespace) -> Config:
    overrides: dict[str, dict[str, Any]] = {
        "server": {"host": getattr(args, "host", None), "port": getattr(args, "port", None)},
        "state": {"dir": getattr(args, "state_dir", None)},
        "auth": {"token_file": getattr(args, "token_file", None)},
        "log": {"format": getattr(args, "log_format", None)},
    }
    return load_config(args.config, overrides)


def _loop_factory(choice: str):
    """uvloop's event loop (libuv, in C) when asked for and installed: it spends about
    10% less CPU per request than asyncio's on ping under load, for ~2.3 MB more RSS
    (bench/RESULTS.md). None: asyncio's own, the default."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def cmd_serve(args: argparse.Namespace) -> int:
    from . import logs
    from .app import serve
    try:
        config = _config_from(args)
        logs.setup(config.log.format, config.log.level)
        with asyncio.Runner(loop_factory=_loop_factory(config.server.event_loop)) as runner:
            runner.run(serve(config))
    except ConfigError as e:
        print(f"node-agent: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    # A thread stuck in a blocking call (a hung mount, a dead BMC) would make
    # the interpreter wait for it forever at exit: everything is closed by now.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


async def _call(args: argparse.Namespace, config: Config, view) -> int:
    from .client import AgentClient, AgentError, default_base_url, read_token
    body = None
    if args.json:
        try:
            body = json.loads(args.json)
        except ValueError as e:
            print(f"node-agent call: the JSON argument does not parse: {e}", file=sys.stderr)
            return 2
    url = args.url or default_base_url(config)
    token = read_token(config.token_file)
    async with AgentClient(url, token, ssl=False if args.insecure else None,
                           timeout=args.timeout) as client:
        show = view is not None
        try:
            result = await client.call(args.method.upper(), args.path, body, timeout=args.timeout,
                                       on_submit=view.submitted if show else None,
                                       on_progress=view.progress if show else None)
        except AgentError as e:
            if show:
                view.finish()
            print(f"node-agent call: {e}", file=sys.stderr)
            return 1
    if show:
        view.finish()
    print(json.dumps(result, indent=2))
    return 0


def cmd_call(args: argparse.Namespace) -> int:
    from .progress_view import JobProgressView
    view = None if args.no_progress else JobProgressView(sys.stderr)
    try:
        config = _config_from(args)
        return asyncio.run(_call(args, config, view))
    except ConfigError as e:
        print(f"node-agent: {e}", file=sys.stderr)
        return 2
    except (OSError, TimeoutError) as e:
        if view is not None:
            view.finish()
        print(f"node-agent call: cannot reach the agent: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if view is not None:
            view.interrupted()
        return 130


def cmd_doctor(args: argparse.Namespace) -> int:
    from . import doctor
    try:
        config = _config_from(args)
    except ConfigError as e:
        checks = [doctor.Check("config", "fail", str(e))]
    else:
        checks = asyncio.run(doctor.run_checks(config, base_url=args.url))
    print(doctor.to_json(checks) if args.json else doctor.render_table(checks))
    return doctor.exit_code(checks)


def cmd_openapi(args: argparse.Namespace) -> int:
    from .app import discover
    from .openapi import build
    from .core_routes import CorePlugin
    classes, _ = discover()
    routes = CorePlugin.routes() + [r for c in classes.values() for r in c.routes()]
    for cls in [CorePlugin, *classes.values()]:
        for r in cls.routes():
            r.plugin = cls.name
    print(json.dumps(build(routes, __version__), indent=2))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="node-agent", description="The node agent of a private cloud.")
    p.add_argument("--version", action="version", version=f"node-agent {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", help="TOML configuration file")
        sp.add_argument("--state-dir", help="state directory (default /var/lib/node-agent as root)")
        sp.add_argument("--token-file", help="API token file (default <state dir>/token)")

    s = sub.add_parser("serve", help="run the agent")
    common(s)
    s.add_argument("--host", help="listen address (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="listen port (default 7070)")
    s.add_argument("--log-format", choices=["text", "json"])
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("call", help="call the agent's API and print the result (jobs are waited for)")
    common(c)
    c.add_argument("method", help="GET, POST, PUT or DELETE")
    c.add_argument("path", help="e.g. /v1/host")
    c.add_argument("json", nargs="?", help="the JSON body")
    c.add_argument("--url", help="the agent's base URL (default from the config)")
    c.add_argument("--timeout", type=float, default=300.0)
    c.add_argument("--insecure", action="store_true", help="do not verify the agent's TLS certificate")
    c.add_argument("--no-progress", action="store_true",
                   help="do not show the job's uuid and progress on stderr")
    c.set_defaults(func=cmd_call)

    d = sub.add_parser("doctor", help="check this node and the agent, as an operator would")
    common(d)
    d.add_argument("--url", help="the agent's base URL (default from the config)")
    d.add_argument("--json", action="store_true", help="machine-readable output")
    d.set_defaults(func=cmd_doctor)

    o = sub.add_parser("openapi", help="print the OpenAPI document")
    o.set_defaults(func=cmd_openapi)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
