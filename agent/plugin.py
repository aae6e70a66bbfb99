"""How a plugin declares what it answers.

A plugin is a class; each URL it serves is one decorated method, with the
pydantic models of its parameters and result (which also make the OpenAPI
document).  In the style of ironic-python-agent's extensions::

    class PollPlugin(Plugin):
        name = "poll"

        @get("/v1/poll", result=PollStatus)
        async def status(self):
            ...

        @action("/v1/poll/actions", "startPoll", params=StartPoll, result=PollStarted)
        async def start_poll(self, job, params):
            job.progress(50, "half way")
            ...

Reads (GET) answer at once.  Everything else becomes a durable job: the
method gets a ``JobContext`` and the validated parameters, and whatever it
returns is the job's result.  ``@method.check`` adds a check that runs in the
request, before the job exists, for refusals that must be a 4xx.

A create whose params model is a ``CreateParams`` gets the manual's
``resourceUuid`` rule from the core: ``@method.exists`` tells the core whether
a uuid is in use (then 409), and the method gets ``params.resource_uuid``
already decided (given and normalised, or new)::

        @create("/v1/poll/things", params=CreateThing, result=ThingReply)
        async def create_thing(self, job, params):
            self.things[params.resource_uuid] = ...

        @create_thing.exists
        async def _thing_exists(self, uuid):
            return uuid in self.things
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from pydantic import BaseModel

if TYPE_CHECKING:
    from .context import AgentContext


_PATTERN_RE = re.compile(r"{(\w+):(?:[^{}]|{[^{}]*})*}")


@dataclass
class Route:
    method: str                       # GET, POST, PUT, DELETE
    path: str                         # aiohttp pattern, e.g. /v1/vm-instances/{uuid}
    func: Callable[..., Any]
    kind: str                         # read | query | stream | raw | action | create | delete
    action: str | None = None         # the body key of a PUT .../actions call
    params: type[BaseModel] | None = None
    result: type[BaseModel] | None = None
    query_model: type[BaseModel] | None = None   # the inventory of a query route
    query_params: type[BaseModel] | None = None  # extra query-string parameters
    summary: str | None = None
    needs_available: bool = True      # answer 503 while the plugin is unavailable
    requires: str | None = None       # a capability the route needs (e.g. "libvirt")
    auth: bool = True
    check: Callable[..., Any] | None = None
    exists: Callable[..., Any] | None = None   # create: is this resourceUuid in use?
    plugin: str = ""

    @property
    def canonical_path(self) -> str:
        """The path without regex constraints: /v1/x/{uuid:[0-9a-f]{32}} -> /v1/x/{uuid}."""
        return _PATTERN_RE.sub(r"{\1}", self.path)

    @property
    def is_job(self) -> bool:
        return self.kind in ("action", "create", "delete")


def _declare(route: Route) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(func: Callable[..., Any]) -> Callable[..., Any]:
        route.func = func
        route.summary = route.summary or (inspect.getdoc(func) or "").split("\n")[0] or None
        func.__route__ = route  # type: ignore[attr-defined]

        def check(fn: Callable[..., Any]) -> Callable[..., Any]:
            route.check = fn
            return fn

        def exists(fn: Callable[..., Any]) -> Callable[..., Any]:
            route.exists = fn
            return fn
        func.check = check      # type: ignore[attr-defined]
        func.exists = exists    # type: ignore[attr-defined]
        return func
    return deco


def get(path: str, *, result: type[BaseModel] | None = None,
        params: type[BaseModel] | None = None, summary: str | None = None,
        needs_available: bool = True, auth: bool = True, requires: str | None = None) -> Callable:
    """A synchronous read; ``params`` validates the query string."""
    return _declare(Route("GET", path, None, "read", result=result, query_params=params,
                          summary=summary, needs_available=needs_available, auth=auth,
                          requires=requires))


def query(path: str, *, model: type[BaseModel], params: type[BaseModel] | None = None,
          summary: str | None = None, needs_available: bool = True,
          requires: str | None = None) -> Callable:
    """A collection read: the method returns inventories, the query API filters them."""
    return _declare(Route("GET", path, None, "query", query_model=model, query_params=params,
                          summary=summary, needs_available=needs_available, requires=requires))


def action(path: str, name: str, *, params: type[BaseModel], result: type[BaseModel] | None = None,
           summary: str | None = None, needs_available: bool = True,
           requires: str | None = None) -> Callable:
    """``PUT path {name: params}``, run as a job."""
    return _declare(Route("PUT", path, None, "action", action=name, params=params, result=result,
                          summary=summary, needs_available=needs_available, requires=requires))


def create(path: str, *, params: type[BaseModel], result: type[BaseModel] | None = None,
           summary: str | None = None, needs_available: bool = True,
           requires: str | None = None) -> Callable:
    """``POST path {"params": {...}}``, run as a job."""
    return _declare(Route("POST", path, None, "create", params=params, result=result,
                          summary=summary, needs_available=needs_available, requires=requires))


def delete(path: str, *, result: type[BaseModel] | None = None, params: type[BaseModel] | None = None,
           summary: str | None = None, needs_available: bool = True,
           requires: str | None = None) -> Callable:
    """``DELETE path``, run as a job; ``params`` validates the query string."""
    return _declare(Route("DELETE", path, None, "delete", query_params=params, result=result,
                          summary=summary, needs_available=needs_available, requires=requires))


def raw(method: str, path: str, *, summary: str | None = None, auth: bool = True,
        needs_available: bool = True, kind: str = "raw", requires: str | None = None) -> Callable:
    """A handler that takes the aiohttp request itself (streams, websockets, files)."""
    return _declare(Route(method, path, None, kind, summary=summary, auth=auth,
                          needs_available=needs_available, requires=requires))


class Plugin:
    """One capability of the agent.  Subclass, set ``name``, declare routes."""

    name: ClassVar[str] = ""
    #: the config sections this plugin owns, each with its model ([host], [libvirt], ...)
    config_sections: ClassVar[dict[str, type[BaseModel]]] = {}
    #: the runner's pool sizes
    max_threads: ClassVar[int] = 4
    max_processes: ClassVar[int] = 8

    def __init__(self, agent: "AgentContext", settings: dict[str, Any]) -> None:
        self.agent = agent
        self.settings = settings      # section name -> validated model
        self.runner = agent.runner(self.name, max_threads=self.max_threads,
                                   max_processes=self.max_processes)
        self.available = True
        self.unavailable_reason: str | None = None
        # Parts of a plugin that can be down while the rest works (libvirt for
        # the VM routes while device inventory still answers): name -> reason or None.
        self.capabilities: dict[str, str | None] = {}

    def set_available(self, ok: bool, reason: str | None = None) -> None:
        self.available, self.unavailable_reason = ok, (None if ok else reason)

    def down_reason(self) -> str | None:
        """Why the plugin cannot answer now, or None (e.g. a StorageKind's ``available``)."""
        return None if self.available else (self.unavailable_reason or f"the {self.name} plugin is down")

    def set_capability(self, name: str, ok: bool, reason: str | None = None) -> None:
        self.capabilities[name] = None if ok else (reason or f"{name} is not available")

    async def lifecycle(self):
        """An async generator used as an aiohttp cleanup_ctx: open, yield, close."""
        yield

    async def stopping(self) -> None:
        """Called as the agent starts to stop, before it waits for open requests:
        end long-lived streams (websockets, event streams) here."""

    def plugin_status(self) -> dict[str, Any]:
        return {"name": self.name, "available": self.available, "reason": self.unavailable_reason,
                "capabilities": {n: {"available": r is None, "reason": r}
                                 for n, r in self.capabilities.items()}}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A route method must not shadow the base class's own machinery.
        for name, attr in vars(cls).items():
            if getattr(attr, "__route__", None) is not None and hasattr(Plugin, name):
                raise TypeError(f"route method {cls.__name__}.{name} shadows Plugin.{name}; rename it")

    @classmethod
    def routes(cls) -> list[Route]:
        found = []
        for klass in reversed(cls.__mro__):
            for attr in vars(klass).values():
                route = getattr(attr, "__route__", None)
                if route is not None:
                    found.append(route)
        return found


@dataclass
class PluginLoadFailure:
    """A plugin that could not even be imported or constructed."""
    name: str
    reason: str
    routes: list[Route] = field(default_factory=list)
