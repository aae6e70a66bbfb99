"""Issue 10.4: no control character in any request string, full matches everywhere.

The request models are not listed by hand: the model-level tests take them from
the plugins' route registrations, the end-to-end test from the running agent's
OpenAPI document, so a new route is covered the day it is added.
"""

from __future__ import annotations

import re
import types
import typing
from typing import Any
from urllib.parse import quote

import pytest
from pydantic import BaseModel, Field, ValidationError

from agent import errors, server
from agent.app import discover
from agent.core_routes import CorePlugin
from agent.models import WireModel
from agent.validation import _MultilineMarker, full_match

PAYLOADS = ["ok\n", "o\rk", "ok\x00", "\nok", "ok\x1b[31m", "ok\u2028"]


# -- discovering every request model and its string fields -----------------------------

def request_models() -> dict[str, type[BaseModel]]:
    classes, failures = discover()
    assert not failures, failures
    found: dict[str, type[BaseModel]] = {}
    for cls in [*classes.values(), CorePlugin]:
        for r in cls.routes():
            for m in (r.params, r.query_params):
                if m is not None:
                    found[f"{cls.name or 'core'}:{m.__module__}.{m.__qualname__}"] = m
    return found


def string_slots(model: type[BaseModel], depth: int = 0) -> list[tuple[tuple, bool]]:
    """Where a string can go in a body for ``model``: (path of keys, '[]' for a list
    element, '{}' for a free dict value; is the field Multiline)."""
    out: list[tuple[tuple, bool]] = []
    for name, f in model.model_fields.items():
        multiline = any(isinstance(m, _MultilineMarker) for m in f.metadata)
        for path in _type_slots(f.annotation, depth):
            out.append(((f.alias or name, *path), multiline))
    return out


def _type_slots(t: Any, depth: int) -> list[tuple]:
    origin = typing.get_origin(t)
    if t is str or t is typing.Any:
        return [()]
    if isinstance(t, type) and issubclass(t, BaseModel):
        return [p for p, _ in string_slots(t, depth + 1)] if depth < 4 else []
    if origin in (typing.Union, types.UnionType, typing.Annotated):
        args = typing.get_args(t)[:1] if origin is typing.Annotated else typing.get_args(t)
        return [p for a in args for p in _type_slots(a, depth)]
    if origin in (list, set, frozenset, tuple):
        return [("[]", *p) for a in typing.get_args(t) for p in _type_slots(a, depth)]
    if origin is dict:
        return [("{}", *p) for p in _type_slots(typing.get_args(t)[1], depth)]
    return []


def place(path: tuple, value: str) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if head == "[]":
        return [place(rest, value)]
    if head == "{}":
        return {"k": place(rest, value)}
    return {head: place(rest, value)}


def wire_loc(path: tuple) -> str:
    return ".".join("0" if p == "[]" else "k" if p == "{}" else p for p in path)


MODELS = request_models()
SLOTS = [(name, path, multiline) for name, m in sorted(MODELS.items())
         for path, multiline in string_slots(m)]


def test_every_plugin_has_request_models_with_strings():
    plugins = {name.split(":")[0] for name, _, _ in SLOTS}
    assert {"baremetal", "ceph", "devices", "host", "storage", "vm"} <= plugins, plugins
    assert len(SLOTS) > 100


@pytest.mark.parametrize("name,path,multiline", SLOTS,
                         ids=[f"{n.split('.')[-1]}:{wire_loc(p)}" for n, p, _ in SLOTS])
def test_every_string_field_refuses_control_characters(name, path, multiline):
    model = MODELS[name]
    for bad in PAYLOADS:
        if multiline and bad in ("ok\n", "o\rk", "\nok"):
            continue
        with pytest.raises(errors.BadRequest) as e:
            server.validate(model, place(path, bad), "params")
        assert f"'{wire_loc(path)}'" in e.value.description, e.value.description
        assert "control characters" in e.value.description
        assert "\n" not in e.value.description and "\x00" not in e.value.description


def test_multiline_fields_take_lines_but_no_nul():
    from plugins.host import RunShell
    params = server.validate(RunShell, {"script": "echo a\r\n\techo b\n"}, "params")
    assert params.script == "echo a\r\n\techo b\n"
    with pytest.raises(errors.BadRequest, match="other than line breaks"):
        server.validate(RunShell, {"script": "echo a\x00"}, "params")


def test_a_key_with_a_control_character_is_refused_and_not_echoed_raw():
    from plugins.host import RunShell
    with pytest.raises(errors.BadRequest) as e:
        server.validate(RunShell, {"script": "true", "time\nout": 1}, "params")
    assert "time\\x0aout" in e.value.description and "\n" not in e.value.description


# -- the pattern rules themselves --------------------------------------------------------

def test_full_match_refuses_what_re_match_with_dollar_lets_through():
    assert re.match(r"^[a-z]+$", "abc\n")            # the trap this module exists for
    assert not full_match(r"^[a-z]+$", "abc\n")
    assert not full_match(r"[0-9a-f]{32}|x", "x\n")
    assert full_match(re.compile(r"[a-z]+"), "abc")
    assert not full_match(r"[a-z]+", None)


def test_pydantic_pattern_dollar_is_the_end_of_the_text():
    """pydantic-core's Rust regex: '$' does not match before a final newline, and an
    unanchored pattern is a search.  If a pydantic upgrade changed this, every
    Field(pattern=...) would need a second look."""
    class M(WireModel):
        a: str = Field(pattern=r"^[a-z]+$")
        b: str = Field("x", pattern=r"[a-z]+")
    assert M(a="abc").a == "abc"
    with pytest.raises(ValidationError):
        M(a="abc\n")
    assert M(a="abc", b="x; rm").b == "x; rm"         # unanchored: a search


def test_no_unanchored_field_pattern_in_request_models():
    def patterns(model, depth=0):
        for f in model.model_fields.values():
            for m in f.metadata:
                if getattr(m, "pattern", None):
                    yield model.__name__, m.pattern
            for sub in _models_in(f.annotation):
                if depth < 4:
                    yield from patterns(sub, depth + 1)
    for model in MODELS.values():
        for owner, p in patterns(model):
            for alt in _top_alternatives(p):
                assert alt.startswith("^") and alt.endswith("$"), (owner, p)


def _models_in(t):
    if isinstance(t, type) and issubclass(t, BaseModel):
        yield t
    for a in typing.get_args(t):
        yield from _models_in(a)


def _top_alternatives(p: str) -> list[str]:
    out, depth, cur, i = [], 0, "", 0
    while i < len(p):
        c = p[i]
        if c == "\\":
            cur += p[i:i + 2]
            i += 2
            continue
        depth += c in "([{"
        depth -= c in ")]}"
        if c == "|" and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += c
        i += 1
    return out + [cur]


# -- the places the issue names, at the model level (no server walk in between) ---------

def _refused(model: type[BaseModel], data: dict, loc_part: str) -> None:
    with pytest.raises(ValidationError) as e:
        model.model_validate(data)
    assert any(loc_part in ".".join(map(str, err["loc"])) or loc_part in err["msg"]
               for err in e.value.errors()), e.value.errors()


def test_pxe_server_resource_uuid_with_a_newline_is_refused_by_the_model():
    from plugins.baremetal.pxe_models import CreatePxeServer
    base = {"name": "p", "dhcpInterface": "br0", "dhcpRangeBegin": "10.0.0.10",
            "dhcpRangeEnd": "10.0.0.20"}
    assert CreatePxeServer.model_validate({**base, "resourceUuid": "a" * 32}).resource_uuid == "a" * 32
    _refused(CreatePxeServer, {**base, "resourceUuid": "a" * 32 + "\n"}, "resourceUuid")
    _refused(CreatePxeServer, {**base, "dhcpInterface": "br0\n"}, "dhcpInterface")


def test_hostcfg_hostname_and_bond_name_with_a_newline_are_refused_by_the_model():
    from plugins.baremetal.pxe_models import CreateHostCfg
    base = {"chassisUuid": "b" * 32, "nicCfgs": [{"mac": "52:54:00:00:00:01", "pxe": True}]}
    assert CreateHostCfg.model_validate({**base, "hostname": "node1"}).hostname == "node1"
    _refused(CreateHostCfg, {**base, "hostname": "node1\n"}, "hostname")
    bond = {"name": "bond0\n", "slaves": ["52:54:00:00:00:02"]}
    _refused(CreateHostCfg, {**base, "bondings": [bond]}, "name")


def test_ceph_user_pool_and_mon_url_with_a_newline_are_refused_by_the_model():
    from plugins.ceph.models import AddCephPrimaryStorage, AddPool
    base = {"monUrls": ["10.0.0.1:6789"], "user": "admin",
            "key": "AQAA8VNlAAAAABAAAAECAwQFBgcICQoLDA0ODw=="}    # a well-formed CephX key
    AddCephPrimaryStorage.model_validate(base)
    _refused(AddCephPrimaryStorage, {**base, "user": "admin\n"}, "user")
    _refused(AddCephPrimaryStorage, {**base, "monUrls": ["10.0.0.1:6789\n"]}, "mon URL")
    AddPool.model_validate({"poolName": "rbd"})
    _refused(AddPool, {"poolName": "rbd\n"}, "poolName")


def test_vm_bridge_network_and_mac_with_a_newline_are_refused_by_the_model():
    from plugins.vm.models import NicSpec
    assert NicSpec.model_validate({"bridge": "br0"}).bridge == "br0"
    _refused(NicSpec, {"bridge": "br0\n"}, "bridge")
    _refused(NicSpec, {"network": "default\n"}, "network")
    _refused(NicSpec, {"bridge": "br0", "mac": "52:54:00:00:00:01\n"}, "mac")


# -- end to end: every string of every operation in the running agent's OpenAPI document --

@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from agentproc import AgentProcess
    a = AgentProcess(tmp_path_factory.mktemp("strings"), {"host": {"allow_run_shell": True}})
    a.start()
    yield a
    a.stop()


def _schema_slots(schema: dict, defs: dict, depth: int = 0) -> list[tuple]:
    if "$ref" in schema:
        return _schema_slots(defs[schema["$ref"].rsplit("/", 1)[-1]], defs, depth)
    if depth > 6:
        return []
    out: list[tuple] = []
    for key in ("anyOf", "oneOf", "allOf"):
        for sub in schema.get(key, []):
            out += _schema_slots(sub, defs, depth)
    types_ = schema.get("type")
    types_ = types_ if isinstance(types_, list) else [types_]
    if "string" in types_ and "enum" not in schema and "const" not in schema:
        out.append(())
    if "object" in types_ or "properties" in schema:
        for name, sub in schema.get("properties", {}).items():
            out += [(name, *p) for p in _schema_slots(sub, defs, depth + 1)]
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            out += [("{}", *p) for p in _schema_slots(extra, defs, depth + 1)]
    if "array" in types_ and isinstance(schema.get("items"), dict):
        out += [("[]", *p) for p in _schema_slots(schema["items"], defs, depth + 1)]
    if not types_ or types_ == [None]:
        if not any(k in schema for k in ("anyOf", "oneOf", "allOf", "$ref", "properties")):
            out.append(())          # {} or Any: any JSON, a string included
    return list(dict.fromkeys(out))


def _fill_path(path: str) -> str:
    return re.sub(r"{[^}]+}", "0" * 32, path) if "{address}" not in path \
        else path.replace("{address}", "0000:00:01.0")


def operations(doc: dict) -> list[tuple[str, str, dict, tuple, str]]:
    """(method, url, body, slot, plugin) for every string slot of every request body."""
    defs = doc["components"]["schemas"]
    out = []
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            body = op.get("requestBody")
            if not body:
                continue
            schema = body["content"]["application/json"]["schema"]
            if "oneOf" in schema:                       # actions: {name: params}
                for alt in schema["oneOf"]:
                    (name, sub), = alt["properties"].items()
                    for slot in _schema_slots(sub, defs):
                        out.append((method.upper(), _fill_path(path), (name,), slot, op["tags"][0]))
            else:                                       # creates: {"params": ...}
                for slot in _schema_slots(schema["properties"]["params"], defs):
                    out.append((method.upper(), _fill_path(path), ("params",), slot, op["tags"][0]))
    return out


async def test_every_request_string_of_the_openapi_document_is_a_400_end_to_end(live, http):
    """Against a real agent: each string slot of each create and action, with each
    payload, is a 400 naming the field; no job is created (libvirt is not running
    here: bad input is refused before the plugin's availability is looked at)."""
    async with http.get(live.url + "/v1/openapi.json", headers=live.headers) as r:
        doc = await r.json()
    ops = operations(doc)
    assert len(ops) > 100, len(ops)
    assert {p for *_, p in ops} >= {"baremetal", "ceph", "devices", "host", "storage", "vm"}
    async with http.get(live.url + "/v1/api-jobs", params={"count": "true"},
                        headers=live.headers) as r:
        before = (await r.json())["total"]
    failures = []
    for method, url, head, slot, plugin in ops:
        multiline = slot == ("script",)
        for bad in PAYLOADS:
            if multiline and "\x00" not in bad:
                continue
            body = place((*head, *slot), bad)
            async with http.request(method, live.url + url, json=body, headers=live.headers) as r:
                reply = await r.json()
                if r.status != 400 or "control characters" not in reply["error"]["description"] \
                        or f"'{wire_loc(slot)}'" not in reply["error"]["description"]:
                    failures.append((method, url, body, r.status, reply))
    assert not failures, failures[:5]
    async with http.get(live.url + "/v1/api-jobs", params={"count": "true"},
                        headers=live.headers) as r:
        assert (await r.json())["total"] == before


async def test_every_query_string_parameter_of_the_openapi_document_is_a_400(live, http):
    """The routes' own query-string parameters (GET and DELETE), from the OpenAPI document."""
    from agent.openapi import QUERY_PARAMS
    async with http.get(live.url + "/v1/openapi.json", headers=live.headers) as r:
        doc = await r.json()
    failures, tried = [], 0
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for p in op.get("parameters", []):
                if p["in"] != "query" or p["name"] in QUERY_PARAMS:
                    continue
                for bad in PAYLOADS:
                    tried += 1
                    url = live.url + _fill_path(path) + f"?{p['name']}={quote(bad)}"
                    async with http.request(method.upper(), url, headers=live.headers) as r:
                        reply = await r.json()
                        if r.status != 400 or "control characters" not in reply["error"]["description"]:
                            failures.append((method, path, p["name"], bad, r.status, reply))
    assert tried >= 5 * len(PAYLOADS)
    assert not failures, failures[:5]


@pytest.mark.parametrize("path", ["/v1/pci-devices/0000:00:01.0%0A/actions",
                                  "/v1/primary-storage/ceph/" + "0" * 32 + "/pools/x%0Ay/actions"])
async def test_a_newline_in_a_path_segment_is_a_400(live, http, path):
    body = ({"attachPciDeviceToVm": {"vmInstanceUuid": "1" * 32}} if "pci" in path
            else {"updateCephPrimaryStoragePool": {}})
    async with http.put(live.url + path, json=body, headers=live.headers) as r:
        reply = await r.json()
        assert r.status == 400, reply
        assert "control characters" in reply["error"]["description"]


async def test_public_boot_file_404_names_no_server_path(agent_factory, tmp_path, http):
    """Issue 10.5: the unauthenticated boot-file route said where the agent looks."""
    boot = tmp_path / "secret-boot-dir"
    boot.mkdir()
    a = agent_factory({"pxe": {"boot_dir": str(boot)}}).start()
    async with http.get(a.url + "/v1/baremetal/boot/rhel/vmlinuz") as r:
        text = await r.text()
        assert r.status == 404, text
    assert "secret-boot-dir" not in text and str(tmp_path) not in text, text
    assert "secret-boot-dir" in a.log()           # the operator still learns where


async def test_error_body_has_the_manuals_fields_here_and_in_openapi(live, http):
    """Issue 13.2: code, description, details, elaboration, opaque, cause; empty ones null."""
    async with http.get(live.url + "/v1/openapi.json", headers=live.headers) as r:
        schema = (await r.json())["components"]["schemas"]["Error"]["properties"]["error"]
    fields = ["code", "description", "details", "elaboration", "opaque", "cause"]
    assert list(schema["properties"]) == fields and schema["required"] == fields
    async with http.put(live.url + "/v1/host/actions", json={"reconnectHost": None},
                        headers=live.headers) as r:
        body = await r.json()
        assert r.status == 400
    assert list(body["error"]) == fields
    assert body["error"]["elaboration"] is None and body["error"]["opaque"] is None
