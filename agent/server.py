"""The HTTP server: wire contract, auth, logging, and dispatch to plugins.

Each plugin route becomes one aiohttp route.  Reads are answered in the
request; every other verb is validated here (JSON, action name, parameters,
X-Job-UUID, X-Web-Hook, the route's own check) and only then becomes a job,
so a bad request gets its 4xx and nothing is run or stored.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import time
import uuid as uuidlib
from collections import defaultdict
from typing import Any, Awaitable, Callable

from aiohttp import web
from pydantic import BaseModel, ValidationError
from yarl import URL

from . import errors, logs
from .context import AgentContext
from .jobs import JobMeta
from .models import CreateParams, dump
from .plugin import Plugin, Route
from .query import FrozenItems, run_query, spec_for
from .validation import ControlCharError, control_chars, refuse_control_chars

log = logging.getLogger("node_agent.server")

JOB_UUID_RE = re.compile(r"[0-9a-f]{12}4[0-9a-f]{3}[89ab][0-9a-f]{15}", re.I)
IGNORED_BODY_KEYS = ("systemTags", "userTags")
ROUTE_KEY = web.AppKey("routes", dict)
CTX_KEY = web.AppKey("ctx", AgentContext)
PLUGINS_KEY = web.AppKey("plugins", dict)


def json_response(body: Any, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(text=json.dumps(body), status=status, headers=headers,
                        content_type="application/json")


def model_response(model: BaseModel) -> web.Response:
    """A model straight to JSON bytes by pydantic-core (the serializer dump() uses), with
    no dict in between and no json.dumps: about 1.5 us instead of 4 for a small model.
    Compact separators, and UTF-8 rather than \\u escapes: the same JSON value."""
    return web.Response(body=model.__pydantic_serializer__.to_json(model, by_alias=True),
                        content_type="application/json", charset="utf-8")


def describe_validation(err: ValidationError, where: str) -> errors.BadRequest:
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(body)"
        problems.append(f"'{loc}': {e['msg'][:1].lower() + e['msg'][1:]}" if e["type"] != "extra_forbidden"
                        else f"'{loc}': unknown field")
    return errors.BadRequest(f"invalid {where}: " + "; ".join(problems), code="SYS.1002",
                             details=json.dumps([{"loc": list(e["loc"]), "msg": e["msg"]}
                                                 for e in err.errors()]))


def validate(model: type[BaseModel] | None, data: Any, where: str, *, from_json: bool = True) -> BaseModel | None:
    """JSON bodies are validated strictly (no "60" for 60, no true for 1);
    query strings, which are text by nature, with pydantic's usual coercion."""
    if model is None:
        if data not in (None, {}):
            raise errors.BadRequest(f"{where} takes no parameters", code="SYS.1002")
        return None
    data = data if data is not None else {}
    try:
        refuse_control_chars(model, data)
    except ControlCharError as e:
        raise errors.BadRequest(f"invalid {where}: {e}", code="SYS.1002",
                                details=json.dumps([{"loc": list(e.loc), "msg": str(e)}])) from None
    try:
        if from_json:
            return model.model_validate_json(json.dumps(data), strict=True)
        return model.model_validate(data)
    except ValidationError as e:
        raise describe_validation(e, where) from None


def check_path_args(args: dict[str, str]) -> None:
    """A decoded path segment (%0A...) is refused like a body string with control characters."""
    for name, value in args.items():
        if (bad := control_chars(value)) is not None:
            raise errors.BadRequest(f"invalid URL: {{{name}}} must not contain control "
                                    f"characters (found {bad})", code="SYS.1002")


def query_string_params(route: Route, request: web.Request, extra: set[str] = set()) -> BaseModel | None:
    if route.query_params is None:
        return None
    fields = {f.alias or n for n, f in route.query_params.model_fields.items()}
    data = {k: v for k, v in request.query.items() if k in fields}
    return validate(route.query_params, data, "query parameters", from_json=False)


async def read_json(request: web.Request) -> Any:
    limit = request.app[CTX_KEY].config.server.max_body_bytes
    # Refused from the header, before any byte of the body is awaited: a client that
    # declares too much (and may never send it) gets its 413 at once.
    if request.content_length is not None and request.content_length > limit:
        raise errors.PayloadTooLarge(f"the request body is larger than the limit of {limit} bytes "
                                     f"(Content-Length: {request.content_length})")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise errors.PayloadTooLarge(
            f"the request body is larger than the limit of {limit} bytes") from None
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise errors.BadRequest(f"the request body is not valid JSON: {e}", code="SYS.1003") from None
    except RecursionError:
        raise errors.BadRequest("the request body is JSON nested too deeply", code="SYS.1003") from None


def job_headers(request: web.Request) -> tuple[str | None, str | None]:
    job_uuid = request.headers.get("X-Job-UUID")
    if job_uuid is not None and not JOB_UUID_RE.fullmatch(job_uuid):
        raise errors.BadRequest(
            "X-Job-UUID must be a v4 (random) UUID written as 32 hex digits without dashes",
            code="JOB.1400")
    if job_uuid is not None:
        job_uuid = job_uuid.lower()
    hook = request.headers.get("X-Web-Hook")
    if hook is not None:
        try:
            url = URL(hook)
        except ValueError:
            url = None
        if url is None or url.scheme not in ("http", "https") or not url.host:
            raise errors.BadRequest("X-Web-Hook must be an absolute http:// or https:// URL",
                                    code="JOB.1401")
    return job_uuid, hook


def fingerprint(key: bytes, request: web.Request, body: Any) -> str:
    """What makes two submissions "the same request" for X-Job-UUID.

    Keyed (HMAC), because bodies carry passwords: a plain hash in the state
    database could be guessed offline.
    """
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    text = f"{request.method} {request.path}?{request.query_string}\n{canonical}"
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


class Dispatcher:
    """Turns declared routes into aiohttp handlers."""

    def __init__(self, ctx: AgentContext, plugins: dict[str, Plugin]) -> None:
        self.ctx = ctx
        self.plugins = plugins

    def ensure_available(self, plugin: Plugin, route: Route) -> None:
        if route.needs_available and not plugin.available:
            raise errors.Unavailable(
                f"the {plugin.name} plugin is not available: {plugin.unavailable_reason}",
                code="SYS.1504")
        if route.requires:
            reason = plugin.capabilities.get(route.requires, f"{route.requires} is not ready yet")
            if reason is not None:
                raise errors.Unavailable(f"{route.requires} is not available: {reason}",
                                         code="SYS.1504")

    def read_handler(self, plugin: Plugin, route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        query_model = route.query_model
        extra = ({f.alias or n for n, f in route.query_params.model_fields.items()}
                 if route.query_params else set())
        # Decided once here, not per request: reads like ping are the hot path.
        func, raw, has_params = route.func, route.kind in ("raw", "stream"), route.query_params is not None
        needs_available, requires = route.needs_available, route.requires
        path_args = "{" in route.path

        if not (raw or path_args or has_params) and query_model is None:
            # Nothing taken from the request (ping): the function, then its model as JSON.
            async def plain(request: web.Request) -> web.StreamResponse:
                if (needs_available and not plugin.available) or requires:
                    self.ensure_available(plugin, route)
                result = await func(plugin)
                if isinstance(result, BaseModel):
                    return model_response(result)
                return json_response(dump(result))
            return plain

        async def handler(request: web.Request) -> web.StreamResponse:
            if raw:
                if (needs_available and not plugin.available) or requires:
                    self.ensure_available(plugin, route)
                return await func(plugin, request)
            kwargs: dict[str, Any] = {}
            if path_args:
                kwargs = dict(request.match_info)
                check_path_args(kwargs)
            if has_params:
                kwargs["params"] = query_string_params(route, request)
            if (needs_available and not plugin.available) or requires:   # after: bad input is a 400
                self.ensure_available(plugin, route)
            result = await func(plugin, **kwargs)
            if query_model is not None:
                if isinstance(result, FrozenItems):     # rendered once per query string
                    # The raw string: the decoded one can be the same for two queries.
                    return web.Response(body=result.reply(request.rel_url.raw_query_string,
                                                          request.query, spec_for(query_model),
                                                          extra),
                                        content_type="application/json", charset="utf-8")
                return json_response(run_query(dump(result), request.query, spec_for(query_model),
                                               extra_params=extra))
            if isinstance(result, BaseModel):
                return model_response(result)
            return json_response(dump(result))
        return handler

    def job_handler(self, routes: list[tuple[Plugin, Route]]) -> Callable[[web.Request], Awaitable[web.Response]]:
        """One handler per (verb, path); the actions on it may come from several plugins."""
        by_action = {r.action: (p, r) for p, r in routes}
        first = routes[0][1]

        async def handler(request: web.Request) -> web.Response:
            job_uuid, hook = job_headers(request)
            body = None if first.kind == "delete" else await read_json(request)
            action, data = self.pick(first, sorted(a for a in by_action if a), body)
            plugin, route = by_action[action]
            path_args = dict(request.match_info)
            check_path_args(path_args)
            where = f"parameters of {route.action}" if route.action else "params"
            # Bad input is a 400 whether or not the plugin is up (then 503).
            if route.kind == "delete":
                params = query_string_params(route, request)
            else:
                params = validate(route.params, data, where)
            self.ensure_available(plugin, route)

            async def check() -> None:      # only for a new job (not an X-Job-UUID repeat)
                if isinstance(params, CreateParams):
                    await self.decide_resource_uuid(plugin, route, params, path_args)
                if route.check is not None:
                    await route.check(plugin, params, **path_args)

            async def work(job) -> Any:
                return dump(await route.func(plugin, job, params, **path_args))

            # Shielded: a client that leaves mid-submission leaves a whole job (replay its
            # X-Job-UUID for the result), never a half-stored one.
            uuid, _ = await asyncio.shield(self.ctx.jobs.submit(
                job_uuid=job_uuid, webhook=hook,
                fingerprint=fingerprint(self.ctx.fingerprint_key, request, body),
                meta=JobMeta(plugin.name, request.method, request.path, route.action, request.remote),
                runner=plugin.runner, work=work, check=check))
            request["job_uuid"] = uuid
            location = f"{request.url.origin()}/v1/api-jobs/{uuid}"
            return json_response({"location": location}, status=202, headers={"Location": location})
        return handler

    @staticmethod
    async def decide_resource_uuid(plugin: Plugin, route: Route, params: CreateParams,
                                   path_args: dict[str, str]) -> None:
        """The manual's resourceUuid, one rule for every create: the given one (already
        normalised by its type) unless in use (409), else a new random one."""
        if params.resource_uuid is None:
            params.resource_uuid = uuidlib.uuid4().hex
        elif route.exists is not None and await route.exists(plugin, params.resource_uuid,
                                                             **path_args):
            raise errors.Conflict(f"resourceUuid {params.resource_uuid} is already in use: "
                                  "give another one, or none for a new random uuid",
                                  code="SYS.1009")

    @staticmethod
    def pick(first: Route, known: list[str], body: Any) -> tuple[str | None, Any]:
        """Find the action (or creation params) in the body."""
        if first.kind == "delete":
            return None, None
        if not isinstance(body, dict):
            raise errors.BadRequest("the request body must be a JSON object", code="SYS.1003")
        keys = [k for k in body if k not in IGNORED_BODY_KEYS]
        if first.kind == "create":
            extra = [k for k in keys if k != "params"]
            if extra:
                raise errors.BadRequest(f"unknown key(s) {extra} in the body: creation "
                                        "parameters go under \"params\"", code="SYS.1002")
            if not isinstance(body.get("params"), dict):
                raise errors.BadRequest("the creation parameters must be a JSON object under "
                                        "\"params\"", code="SYS.1002")
            return None, body["params"]
        if len(keys) != 1:
            raise errors.BadRequest(
                f"the body must name exactly one action, got {len(keys)}; actions here: {', '.join(known)}",
                code="SYS.1006")
        name = keys[0]
        if name not in known:
            raise errors.BadRequest(f"unknown action '{name}'; actions here: {', '.join(known)}",
                                    code="SYS.1006")
        data = body[name]
        if not isinstance(data, dict):      # null too: the schema says an object ({} for none)
            raise errors.BadRequest(f"the parameters of {name} must be a JSON object "
                                    "({} when there are none)", code="SYS.1002")
        return name, data


def build_routes(app: web.Application, ctx: AgentContext, plugins: dict[str, Plugin],
                 token: str, metrics) -> list[Route]:
    """Every route, each handler wrapped in ``guard``; then a catch-all for 404 and 405."""
    dispatcher = Dispatcher(ctx, plugins)
    all_routes: list[Route] = []
    jobs: dict[tuple[str, str], list[tuple[Plugin, Route]]] = defaultdict(list)
    handlers: list[tuple[str, str, Callable[[web.Request], Awaitable[web.StreamResponse]], bool]] = []
    # Literal paths first, so /v1/vm-instances/stats wins over /v1/vm-instances/{uuid}.
    ordered = sorted(((p, r) for p in plugins.values() for r in p.routes()),
                     key=lambda pr: ("{" in pr[1].path, pr[1].path))
    for plugin, route in ordered:
        route.plugin = plugin.name
        all_routes.append(route)
        if route.is_job:
            jobs[(route.method, route.path)].append((plugin, route))
        else:
            handlers.append((route.method, route.path, dispatcher.read_handler(plugin, route), False))
    for (method, path), routes in jobs.items():
        handlers.append((method, path, dispatcher.job_handler(routes), True))
    public = public_paths(all_routes)
    prefixes = {r.path.split("/")[1] for r in all_routes if not r.path.split("/")[1].startswith("{")}
    for method, path, handler, is_job in handlers:
        # aiohttp's canonical path of the resource names the route (metrics, log) and
        # decides auth; known here once instead of looked up on every request.
        resource = app.router.add_resource(path)
        name = resource.canonical
        resource.add_route(method, guard(handler, name, name not in public, token, metrics,
                                         is_job=is_job, method=method))
    # Last, so it only gets what no route matched. aiohttp would answer those itself with
    # a text body; this keeps our JSON error bodies, metrics and log line for them (and,
    # as before, a request to an unknown URL needs the token: no probing without it).
    # [\s\S]: a decoded %0A is a newline, which "." would not match (aiohttp then answered
    # a text 404 with no log line).
    app.router.add_route("*", "/{tail:[\\s\\S]*}", guard(unmatched, "unmatched", True, token, metrics,
                                                          unrouted=frozenset(prefixes)))
    return all_routes


def public_paths(routes: list[Route]) -> set[str]:
    return {r.canonical_path for r in routes if not r.auth}


async def unmatched(request: web.Request) -> web.StreamResponse:
    """No route took this request: 405 (with Allow) when the path exists, else 404."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not request.match_info.route.resource:
            methods = (await resource.resolve(request))[1]
            if methods:
                allowed |= methods
                request[LOG_PATH] = resource.canonical     # logged as the route, not the URL
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


LOG_PATH = "log_path"


def unrouted_path(path: str, prefixes: frozenset[str]) -> str:
    """What the access log writes for a URL no route has: none of its dynamic part
    (a client may put anything there, a session token included), only a first
    segment that the agent routes itself."""
    first = path.split("/", 2)[1] if path.startswith("/") else ""
    return f"/{first}/<unrouted>" if first in prefixes else "/<unrouted>"


def guard(handler: Callable[[web.Request], Awaitable[web.StreamResponse]], name: str,
          needs_token: bool, token: str, metrics, is_job: bool = False,
          unrouted: frozenset[str] | None = None,
          method: str | None = None) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Auth, error bodies, metrics and the access log around one route's handler.

    A wrapper per route rather than an aiohttp middleware: a middleware costs two more
    coroutines per request (aiohttp adds its own current-app layer to the chain) and a
    route lookup, and ping must stay cheap.  The token check is a constant-time compare.
    ``unrouted`` (the catch-all's guard): the first path segments the agent routes, for
    the access log's placeholder of an unknown URL.  ``method``: the route's one method.
    """
    expected = token.encode()
    observe = metrics.observe_request
    # A secret in the URL (a {token} part: install files, inspection, consoles) is never logged.
    log_path = name if "{token}" in name else None
    # A read route without a variable part (ping): only its own path matches it, so its
    # metrics series and its access line's method and escaped path are known here, once.
    constant = method is not None and "{" not in name and not is_job and unrouted is None
    observe_route = metrics.http.bind(method, name) if constant else None
    log_route = logs.route_access(method, name) if constant else None

    async def guarded(request: web.Request) -> web.StreamResponse:
        t0 = time.perf_counter()
        try:
            if needs_token:
                scheme, _, given = request.headers.get("Authorization", "").partition(" ")
                # Only HTTP's own whitespace is not part of the token (str.strip() would
                # also drop a no-break space); a header byte that is not UTF-8 arrives
                # as a surrogate escape, compared as the byte it was, never a 500.
                if scheme not in ("OAuth", "Bearer") or not hmac.compare_digest(
                        given.strip(" \t").encode(errors="surrogateescape"), expected):
                    raise errors.Unauthorized(
                        "missing or wrong token: send 'Authorization: OAuth <token>' with the "
                        "token from the agent's token file")
            resp = await handler(request)
        except errors.ApiError as e:
            resp = json_response(e.body(), status=e.status)
            if e.status == 413:
                _close_after_answer(request, resp)
        except web.HTTPRequestEntityTooLarge:
            resp = json_response(errors.PayloadTooLarge("the request body is too large").body(), 413)
            _close_after_answer(request, resp)
        except web.HTTPMethodNotAllowed as e:
            allowed = ", ".join(sorted(e.allowed_methods))
            # logs.clean: no token in an error body either (it may end up in a client's log)
            err = errors.MethodNotAllowed(f"{request.method} is not allowed on {logs.clean(request.path)}; use {allowed}")
            resp = json_response(err.body(), 405, headers={"Allow": allowed})
        except web.HTTPNotFound:
            resp = json_response(errors.NotFound(f"no such URL: {logs.clean(request.path)}").body(), 404)
        except web.HTTPException as e:
            _account(request, name, log_path if unrouted is None else _unrouted_log_path(request, unrouted),
                     e.status, t0, observe, is_job)
            raise
        except Exception as e:
            log.exception("unhandled error on %s %s", request.method, request.path)
            resp = json_response(errors.InternalError(
                f"internal error ({type(e).__name__}); this is a bug in the agent").body(), 500)
        if constant:
            seconds = time.perf_counter() - t0
            observe_route(resp.status, seconds)
            log_route(resp.status, seconds * 1000, request)
            return resp
        _account(request, name, log_path if unrouted is None else _unrouted_log_path(request, unrouted),
                 resp.status, t0, observe, is_job)
        return resp
    return guarded


def _close_after_answer(request: web.Request, resp: web.Response) -> None:
    """A body refused unread: answer, then end the connection at once.  aiohttp would
    otherwise read and drop the rest for up to 10 s (lingering close), bytes a client
    that declared them may never send.  No await in here: reading stops before the
    parser can feed the body again."""
    resp.force_close()
    if not request.content.is_eof() and request.protocol is not None:
        request.content.feed_eof()
        request.protocol.pause_reading()


def _unrouted_log_path(request: web.Request, prefixes: frozenset[str]) -> str:
    return request.get(LOG_PATH) or unrouted_path(request.path, prefixes)


def _account(request: web.Request, route: str, log_path: str | None, status: int, t0: float,
             observe, is_job: bool) -> None:
    seconds = time.perf_counter() - t0
    method = request.method
    observe(method, route, status, seconds)
    # request.get() raises and catches a KeyError when the key is missing: only job
    # submissions set job_uuid, so reads (ping) do not pay for it.
    logs.access(method, log_path or request.path, status, seconds * 1000,
                request.get("job_uuid") if is_job else None,
                request.remote if logs.wants_remote else None)
