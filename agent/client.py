"""An async client for the agent's wire contract, as a controller uses it.

Reads are synchronous GETs; every other verb answers ``202`` with a job
location that is then long-polled at ``/v1/api-jobs/<uuid>?wait=N``.
Failures come back as :class:`AgentError`, built from the contract's
``{"error": {...}}`` body.  Transport problems (connection refused, TLS,
a request timeout) are left as aiohttp / ``TimeoutError`` exceptions so a
caller can tell "the agent said no" from "the agent did not answer".
"""

from __future__ import annotations

import asyncio
import json
import math
import ssl as _ssl
import time
from pathlib import Path
from typing import Any, Callable

import aiohttp
from yarl import URL

# The server bounds ?wait; 30 s keeps each poll well under proxies' idle limits.
MAX_POLL_WAIT = 30
# A caller that shows progress polls twice a second: a long-poll answers only at the end.
PROGRESS_POLL_WAIT = 0.5


class AgentError(Exception):
    """The agent answered with an error status (or an unexpected one)."""

    def __init__(self, status: int, code: str | None, description: str,
                 details: str | None = None, cause: Any = None,
                 job_uuid: str | None = None) -> None:
        self.status = status
        self.code = code
        self.description = description
        self.details = details
        self.cause = cause
        self.job_uuid = job_uuid
        super().__init__(str(self))

    def __str__(self) -> str:
        head = f"HTTP {self.status}" + (f" {self.code}" if self.code else "")
        job = f" (job {self.job_uuid})" if self.job_uuid else ""
        text = f"{head}{job}: {self.description}"
        return f"{text} [{self.details}]" if self.details else text

    @classmethod
    def from_body(cls, status: int, body: Any, raw: str = "", *,
                  job_uuid: str | None = None) -> "AgentError":
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            return cls(status, err.get("code"), err.get("description") or "(no description)",
                       err.get("details"), err.get("cause"), job_uuid=job_uuid)
        # Not the contract's error body (a proxy, aiohttp's plain 404...):
        # keep the raw text, shortened, so the message still says something.
        text = " ".join(raw.split())[:300] or "(empty body)"
        return cls(status, None, text, job_uuid=job_uuid)


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def _query(params: dict | list[tuple[str, str]] | None) -> list[tuple[str, str]] | None:
    # aiohttp refuses bools in queries; the contract spells them true/false.
    if params is None:
        return None
    items = params.items() if isinstance(params, dict) else params
    return [(k, ("true" if v else "false") if isinstance(v, bool) else str(v))
            for k, v in items]


def _seconds(wait: float) -> str:
    return str(int(wait)) if float(wait).is_integer() else f"{wait:g}"


class AgentClient:
    def __init__(self, base_url: str, token: str | None, *,
                 ssl: _ssl.SSLContext | bool | None = None, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.ssl = True if ssl is None else ssl
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "AgentClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        # Created lazily: a ClientSession wants a running loop.
        if self._session is None or self._session.closed:
            headers = {"Authorization": f"OAuth {self.token}"} if self.token else {}
            self._session = aiohttp.ClientSession(headers=headers)
        return self._session

    async def _request(self, method: str, path: str, *, params=None, body=None,
                       headers=None, timeout: float | None = None
                       ) -> tuple[int, Any, str, Any]:
        """One call; returns (status, parsed JSON or None, raw text, response headers)."""
        total = self.timeout if timeout is None else timeout
        kwargs: dict[str, Any] = {}
        if body is not None:
            kwargs["json"] = body
        async with self._get_session().request(
                method, self.base_url + path, params=_query(params), headers=headers,
                ssl=self.ssl, timeout=aiohttp.ClientTimeout(total=total), **kwargs) as resp:
            raw = await resp.text(errors="replace")
            return resp.status, _parse_json(raw), raw, resp.headers

    async def get(self, path: str, params: dict | list[tuple[str, str]] | None = None) -> dict:
        status, data, raw, _ = await self._request("GET", path, params=params)
        if not 200 <= status < 300:
            raise AgentError.from_body(status, data, raw)
        if not isinstance(data, dict):
            raise AgentError(status, None, f"expected a JSON object from GET {path}, "
                             f"got: {' '.join(raw.split())[:200]!r}")
        return data

    async def submit(self, method: str, path: str, body: dict | None = None, *,
                     job_uuid: str | None = None, webhook: str | None = None) -> str:
        headers = {}
        if job_uuid:
            headers["X-Job-UUID"] = job_uuid
        if webhook:
            headers["X-Web-Hook"] = webhook
        status, data, raw, resp_headers = await self._request(
            method.upper(), path, body=body, headers=headers)
        if status != 202:
            if 200 <= status < 300:
                raise AgentError(status, None, f"expected 202 with a job location "
                                 f"from {method.upper()} {path}")
            raise AgentError.from_body(status, data, raw)
        location = (data or {}).get("location") if isinstance(data, dict) else None
        location = location or resp_headers.get("Location")
        uuid = URL(location).name if location else ""
        if not uuid:
            raise AgentError(status, None, f"202 from {method.upper()} {path} "
                             "carried no job location")
        return uuid

    async def job(self, job_uuid: str, wait: float | None = None) -> tuple[int, dict]:
        """One poll: (200, result) done, (202, ...) running, (503, error) failed,
        (404, error) unknown/expired.  Anything else (401, 400...) raises."""
        params = {"wait": _seconds(wait)} if wait else None
        # The HTTP timeout must outlast the long-poll itself.
        status, data, raw, _ = await self._request(
            "GET", f"/v1/api-jobs/{job_uuid}", params=params,
            timeout=self.timeout + (wait or 0))
        if status not in (200, 202, 404, 503):
            raise AgentError.from_body(status, data, raw, job_uuid=job_uuid)
        if not isinstance(data, dict):
            err = AgentError.from_body(status, data, raw, job_uuid=job_uuid)
            if status in (200, 202):
                err.description = f"expected a JSON object, got: {err.description}"
                raise err
            # A plain-text 404/503 (a proxy...): hand back the contract's shape.
            data = {"error": {"code": None, "description": err.description,
                              "details": None, "cause": None}}
        return status, data

    async def wait(self, job_uuid: str, timeout: float = 300.0,
                   on_progress: Callable[[dict], None] | None = None) -> dict:
        """The job's result; on_progress gets each running poll's progress object."""
        deadline = time.monotonic() + timeout
        longest = MAX_POLL_WAIT if on_progress is None else PROGRESS_POLL_WAIT
        backoff = 0.1
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"job {job_uuid} not finished after {timeout:g} s")
            # Whole seconds: "?wait=N"; may overshoot the deadline by < 1 s.
            asked = min(longest, math.ceil(remaining))
            started = time.monotonic()
            status, body = await self.job(job_uuid, wait=asked)
            if status == 200:
                return body
            if status in (404, 503):
                raise AgentError.from_body(status, body, job_uuid=job_uuid)
            if on_progress is not None and isinstance(body.get("progress"), dict):
                on_progress(body["progress"])
            # 202.  If it came back well before the wait we asked for, the
            # server is not long-polling: back off rather than hammer it.
            if time.monotonic() - started < asked / 2:
                await asyncio.sleep(min(backoff, max(0.0, deadline - time.monotonic())))
                backoff = min(backoff * 2, 2.0)

    async def call(self, method: str, path: str, body: dict | None = None, *,
                   timeout: float = 300.0, on_submit: Callable[[str], None] | None = None,
                   on_progress: Callable[[dict], None] | None = None) -> dict:
        """GET -> get() (body used as query params); other verbs -> submit + wait.

        on_submit gets the job's uuid as soon as it is known; on_progress, see wait().
        """
        if method.upper() == "GET":
            return await self.get(path, body)
        job_uuid = await self.submit(method, path, body)
        if on_submit is not None:
            on_submit(job_uuid)
        return await self.wait(job_uuid, timeout=timeout, on_progress=on_progress)


def read_token(path: str | Path) -> str:
    token = Path(path).read_text().strip()
    if not token:
        raise ValueError(f"token file {path} is empty")
    return token


def default_base_url(config) -> str:
    """Where this node's own agent listens, as seen from the node itself."""
    scheme = "https" if config.server.tls_cert else "http"
    host = config.server.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"      # a wildcard listen address is reachable on loopback
    elif ":" in host:
        host = f"[{host}]"      # IPv6 literal
    return f"{scheme}://{host}:{config.server.port}"
