"""The error body of the wire contract and the exceptions that produce it.

Every failure that reaches a caller is an ApiError: a stable, namespaced code
(``SYS.1001``), a plain-words description of what was wrong and what to do,
optional details, and the HTTP status it travels with.  Handlers raise these;
the server and the job runner turn them into ``{"error": {...}}`` bodies.

The body carries all the fields of the manual's ErrorCode (code, description,
details, elaboration, opaque, cause), the empty ones as null, so a client
written from the manual finds every key it reads.
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    status = 503
    code = "SYS.1000"

    def __init__(self, description: str, *, code: str | None = None,
                 status: int | None = None, details: str | None = None,
                 cause: dict[str, Any] | None = None, elaboration: str | None = None,
                 opaque: dict[str, Any] | None = None) -> None:
        super().__init__(description)
        self.description = description
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.details = details
        self.cause = cause
        self.elaboration = elaboration
        self.opaque = opaque

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "description": self.description,
                          "details": self.details, "elaboration": self.elaboration,
                          "opaque": self.opaque, "cause": self.cause}}


class BadRequest(ApiError):
    """400: a bad or missing parameter; nothing was run or stored."""
    status = 400
    code = "SYS.1001"


class Unauthorized(ApiError):
    status = 401
    code = "AUTH.1001"


class NotFound(ApiError):
    status = 404
    code = "SYS.1004"


class MethodNotAllowed(ApiError):
    status = 405
    code = "SYS.1005"


class Conflict(ApiError):
    """409: the resource is busy or in the wrong state, or an id was reused."""
    status = 409
    code = "SYS.1009"


class PayloadTooLarge(ApiError):
    status = 413
    code = "SYS.1013"


class OperationFailed(ApiError):
    """503: the operation itself failed (libvirt, Ceph, a BMC, a subprocess)."""
    status = 503
    code = "SYS.1503"


class Unavailable(OperationFailed):
    """503: the plugin or the component behind it is not usable right now."""
    code = "SYS.1504"


class Timeout(OperationFailed):
    """503: a blocking call or subprocess did not finish within its timeout."""
    code = "SYS.1408"


class InternalError(ApiError):
    """500: a bug in the agent; never used for bad input."""
    status = 500
    code = "SYS.1500"
