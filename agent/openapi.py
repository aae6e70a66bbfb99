"""The OpenAPI 3.1 document, generated from the routes and their models."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .plugin import Route

REF = "#/components/schemas/{model}"
# The manual's ErrorCode: every key always present, the empty ones null.
ERROR_FIELDS = {
    "code": {"type": "string", "description": "stable and namespaced, e.g. SYS.1001"},
    "description": {"type": "string", "description": "what was wrong and what to do"},
    "details": {"type": ["string", "null"]},
    "elaboration": {"type": ["string", "null"], "description": "reserved by the manual; null"},
    "opaque": {"type": ["object", "null"], "description": "reserved by the manual; null"},
    "cause": {"type": ["object", "null"], "description": "the error that caused this one"},
}
ERROR_SCHEMA = {
    "type": "object",
    "properties": {"error": {"type": "object", "properties": ERROR_FIELDS,
                             "required": list(ERROR_FIELDS)}},
    "required": ["error"],
}
LOCATION_SCHEMA = {"type": "object", "properties": {"location": {"type": "string"}},
                   "required": ["location"]}
BODY_METHODS = ("POST", "PUT", "PATCH")
QUERY_PARAMS = ["q", "condition", "limit", "start", "count", "replyWithCount", "sort", "fields",
                "groupBy"]


def _error(desc: str) -> dict[str, Any]:
    return {"description": desc, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _json(schema: dict[str, Any], desc: str = "OK") -> dict[str, Any]:
    return {"description": desc, "content": {"application/json": {"schema": schema}}}


def build(routes: list[Route], version: str) -> dict[str, Any]:
    models: set[tuple[type[BaseModel], str]] = set()
    for r in routes:
        for m, mode in ((r.params, "validation"), (r.query_params, "validation"),
                        (r.result, "serialization"), (r.query_model, "serialization")):
            if m is not None:
                models.add((m, mode))
    keys, defs = models_json_schema(sorted(models, key=lambda mm: (mm[0].__name__, mm[1])),
                                    by_alias=True, ref_template=REF)
    schemas = dict(defs.get("$defs", {}))
    schemas["Error"] = ERROR_SCHEMA

    def ref(model: type[BaseModel] | None, mode: str) -> dict[str, Any]:
        return keys[(model, mode)] if model is not None else {"type": "object"}

    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        path = r.canonical_path
        op = paths.setdefault(path, {}).get(r.method.lower())
        if op is not None and r.kind == "action":   # more actions on one path: oneOf
            op["requestBody"]["content"]["application/json"]["schema"]["oneOf"].append(
                _action_schema(r, ref))
            op["summary"] += f", {r.action}"
            continue
        op = {"operationId": f"{r.plugin}_{r.func.__name__}", "tags": [r.plugin],
              "summary": r.summary or r.func.__name__, "parameters": [], "responses": {}}
        for name in re.findall(r"{(\w+)}", path):
            op["parameters"].append({"name": name, "in": "path", "required": True,
                                     "schema": {"type": "string"}})
        if r.query_params is not None:
            for name, f in r.query_params.model_fields.items():
                op["parameters"].append({"name": f.alias or name, "in": "query",
                                         "required": f.is_required(), "schema": {}})
        if r.kind == "query":
            for name in QUERY_PARAMS:
                op["parameters"].append({"name": name, "in": "query", "required": False,
                                         "schema": {"type": "string"}})
            op["responses"]["200"] = _json({"type": "object", "properties": {
                "inventories": {"type": "array", "items": ref(r.query_model, "serialization")},
                "total": {"type": "integer"}}})
        elif r.is_job:
            op["summary"] = r.summary or (r.action or r.func.__name__)
            if r.kind == "action":
                op["summary"] = f"{r.action}"
                op["requestBody"] = {"required": True, "content": {"application/json": {
                    "schema": {"oneOf": [_action_schema(r, ref)]}}}}
            elif r.kind == "create":
                op["requestBody"] = {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "properties": {"params": ref(r.params, "validation"),
                                                     "systemTags": {"type": "array"},
                                                     "userTags": {"type": "array"}},
                    "required": ["params"]}}}}
            op["parameters"] += [
                {"name": "X-Job-UUID", "in": "header", "required": False, "schema": {"type": "string"}},
                {"name": "X-Web-Hook", "in": "header", "required": False, "schema": {"type": "string"}}]
            op["responses"]["202"] = _json(LOCATION_SCHEMA, "Accepted: poll the location; "
                                           "the job's result is " + (r.result.__name__ if r.result else "{}"))
            op["responses"]["409"] = _error("X-Job-UUID reused for another request, or a conflict")
        elif r.kind in ("raw", "stream"):
            op["responses"]["200"] = {"description": r.summary or "OK"}
        else:
            op["responses"]["200"] = _json(ref(r.result, "serialization"))
        op["responses"]["400"] = _error("Bad or missing parameter")
        if r.auth:
            op["responses"]["401"] = _error("Missing or wrong token")
        else:
            op["security"] = []       # public by design: /v1/health, or a token in the URL
        if "{" in path or r.is_job:
            # A path parameter, or a job's parameter naming another resource, can name
            # nothing; the check of the submission then answers 404.
            op["responses"]["404"] = _error("No such resource, or no such URL")
        if "{" in path:
            # A path parameter can also (".", "..", a literal sibling such as "stats")
            # make the URL another route's.
            op["responses"]["405"] = _error("The URL is another route's, which does not "
                                            "take this method (see the Allow header)")
        if r.method in BODY_METHODS:
            op["responses"]["413"] = _error("The request body is larger than [server] max_body_bytes")
        op["responses"]["503"] = _error("The operation failed or the plugin is unavailable")
        paths[path][r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "node-agent", "version": version,
                 "description": "The node agent's wire contract (see API.md)."},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {
            "token": {"type": "apiKey", "in": "header", "name": "Authorization",
                      "description": "OAuth <token> or Bearer <token>"}}},
        "security": [{"token": []}],
    }


def _action_schema(r: Route, ref) -> dict[str, Any]:
    return {"type": "object", "properties": {r.action: ref(r.params, "validation")},
            "required": [r.action], "additionalProperties": False}
