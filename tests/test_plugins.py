"""Third-party plugins found through entry points, for real.

Each test writes a tiny distribution into tmp (a module plus a
``demo_plugin-0.1.dist-info`` directory with METADATA and entry_points.txt)
and starts a real agent with that directory on PYTHONPATH, so
importlib.metadata finds it exactly like an installed package.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from conftest import run_job, submit, wait_job

DEMO_PLUGIN = '''
"""A third-party plugin package, as a vendor would ship it."""

import asyncio
import uuid as uuidlib

from pydantic import Field

from agent import errors
from agent.models import Empty, WireModel
from agent.plugin import Plugin, action, create, delete, get, query


class DemoSettings(WireModel):
    """The [demo] config section."""
    steps: int = 3
    greeting: str = "hello"


class DemoStatus(WireModel):
    steps: int
    greeting: str
    widget_count: int


class DemoItem(WireModel):
    uuid: str
    name: str
    color: str
    size_gb: int


class SlowCount(WireModel):
    steps: int | None = Field(None, ge=1, le=20)


class SlowCountResult(WireModel):
    counted: int


class WidgetSpec(WireModel):
    name: str = Field(min_length=1)
    size_gb: int = Field(1, ge=1)


class Widget(WireModel):
    uuid: str
    name: str
    size_gb: int


class WidgetReply(WireModel):
    inventory: Widget


class BatchSpec(WireModel):
    count: int = 1


class BatchResult(WireModel):
    count: int


ITEMS = [
    DemoItem(uuid="a" * 32, name="alpha", color="red", size_gb=10),
    DemoItem(uuid="b" * 32, name="beta", color="blue", size_gb=20),
    DemoItem(uuid="c" * 32, name="gamma", color="red", size_gb=30),
    DemoItem(uuid="d" * 32, name="delta", color="green", size_gb=40),
]


class DemoPlugin(Plugin):
    name = "demo"
    config_sections = {"demo": DemoSettings}

    def __init__(self, agent, settings):
        super().__init__(agent, settings)
        self.widgets = {}

    @property
    def conf(self):
        return self.settings["demo"]

    @get("/v1/demo", result=DemoStatus)
    async def describe(self):
        """The demo plugin's settings and state."""
        return DemoStatus(steps=self.conf.steps, greeting=self.conf.greeting,
                          widget_count=len(self.widgets))

    @query("/v1/demo/items", model=DemoItem)
    async def items(self):
        """A fixed list of items."""
        return ITEMS

    @query("/v1/demo/widgets", model=Widget)
    async def list_widgets(self):
        """The widgets created so far."""
        return list(self.widgets.values())

    @action("/v1/demo/actions", "slowCount", params=SlowCount, result=SlowCountResult)
    async def slow_count(self, job, params):
        """Count slowly, reporting progress at each step."""
        steps = params.steps or self.conf.steps
        for i in range(steps):
            job.progress(100 * i / steps, f"step {i + 1} of {steps}")
            await asyncio.sleep(0.5)
        return SlowCountResult(counted=steps)

    @action("/v1/demo/actions", "quickFinish", params=Empty)
    async def quick_finish(self, job, params):
        """Report two progress steps in quick succession, then end."""
        job.progress(10, "starting")
        job.progress(100, "done")
        return {"finished": True}

    @create("/v1/demo/widgets", params=WidgetSpec, result=WidgetReply)
    async def create_widget(self, job, params):
        """Create a widget."""
        w = Widget(uuid=uuidlib.uuid4().hex, name=params.name, size_gb=params.size_gb)
        self.widgets[w.uuid] = w
        return WidgetReply(inventory=w)

    @delete("/v1/demo/widgets/{uuid}")
    async def delete_widget(self, job, params, uuid):
        """Delete a widget."""
        self.widgets.pop(uuid, None)
        return {}

    @delete_widget.check
    async def _delete_check(self, params, uuid):
        if uuid not in self.widgets:
            raise errors.NotFound(f"no widget {uuid}", code="DEMO.1004")

    @create("/v1/demo/batches", params=BatchSpec, result=BatchResult)
    async def create_batch(self, job, params):
        """Create a batch (every parameter has a default)."""
        return BatchResult(count=params.count)


class GonePlugin(Plugin):
    """Its native binding is missing on this node."""
    name = "gone"

    async def lifecycle(self):
        self.set_available(False, "binding missing: libfoo")
        yield

    @get("/v1/gone")
    async def gone_status(self):
        return {"ok": True}

    @action("/v1/gone/actions", "poke", params=Empty)
    async def poke(self, job, params):
        return {"poked": True}


class CrashyPlugin(Plugin):
    """Its start-up raises."""
    name = "crashy"

    async def lifecycle(self):
        raise RuntimeError("cannot open /dev/crashy: No such device")
        yield

    @get("/v1/crashy")
    async def crashy_status(self):
        return {"ok": True}
'''

DEMO_BROKEN = '''
raise ImportError("libbroken.so.1: cannot open shared object file: No such file or directory")
'''

ENTRY_POINTS = """\
[node_agent.plugins]
demo = demo_plugin:DemoPlugin
gone = demo_plugin:GonePlugin
crashy = demo_plugin:CrashyPlugin
broken = demo_broken:BrokenPlugin
"""


def install(site: Path, dist: str, modules: dict[str, str], entry_points: str) -> dict[str, str]:
    """Write modules and a <dist>-0.1.dist-info into site; the env that makes them 'installed'."""
    site.mkdir(parents=True, exist_ok=True)
    for name, text in modules.items():
        (site / f"{name}.py").write_text(text)
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)
    path = os.pathsep.join(p for p in [str(site), os.environ.get("PYTHONPATH", "")] if p)
    return {"PYTHONPATH": path}


@pytest.fixture
def demo_env(tmp_path) -> dict[str, str]:
    return install(tmp_path / "site", "demo_plugin",
                   {"demo_plugin": DEMO_PLUGIN, "demo_broken": DEMO_BROKEN}, ENTRY_POINTS)


@pytest.fixture
def demo_agent(agent_factory, demo_env):
    return agent_factory({"demo": {"steps": 2, "greeting": "hi"}}, env=demo_env).start()


async def get_json(http, agent, path, params=None, auth=True):
    async with http.get(agent.url + path, params=params,
                        headers=agent.headers if auth else None) as r:
        return r.status, await r.json()


def brief(plugin: dict) -> dict:
    """The part of a /v1/health plugin entry these tests are about."""
    return {k: plugin.get(k) for k in ("name", "available", "reason")}


async def job_count(http, agent) -> int:
    status, body = await get_json(http, agent, "/v1/api-jobs", {"count": "true"})
    assert status == 200, body
    return body["total"]


# --------------------------------------------------------------------------
# demo: config, reads, queries
# --------------------------------------------------------------------------

async def test_demo_plugin_is_discovered_and_gets_its_config(demo_agent, http):
    status, body = await get_json(http, demo_agent, "/v1/demo")
    assert status == 200
    assert body == {"steps": 2, "greeting": "hi", "widgetCount": 0}
    # the host plugin, from the project's own entry point, is still there
    status, body = await get_json(http, demo_agent, "/v1/host/ping")
    assert status == 200 and set(body) == {"hostUuid", "version", "uptime"}
    # a plugin route needs the token like any other
    status, body = await get_json(http, demo_agent, "/v1/demo", auth=False)
    assert status == 401 and body["error"]["code"] == "AUTH.1001"


async def test_demo_query_route_takes_the_query_api(demo_agent, http):
    status, body = await get_json(http, demo_agent, "/v1/demo/items")
    assert status == 200
    assert [i["name"] for i in body["inventories"]] == ["alpha", "beta", "gamma", "delta"]
    assert set(body["inventories"][0]) == {"uuid", "name", "color", "sizeGb"}

    status, body = await get_json(http, demo_agent, "/v1/demo/items", {"q": "color=red"})
    assert status == 200 and [i["name"] for i in body["inventories"]] == ["alpha", "gamma"]

    status, body = await get_json(http, demo_agent, "/v1/demo/items",
                                  [("q", "sizeGb>15"), ("sort", "-sizeGb"), ("limit", "2"),
                                   ("replyWithCount", "true"), ("fields", "name,sizeGb")])
    assert status == 200
    assert body == {"inventories": [{"name": "delta", "sizeGb": 40}, {"name": "gamma", "sizeGb": 30}],
                    "total": 3}

    status, body = await get_json(http, demo_agent, "/v1/demo/items", {"q": "color?=red,green", "count": "true"})
    assert status == 200 and body == {"total": 3}

    status, body = await get_json(http, demo_agent, "/v1/demo/items", {"q": "weight=3"})
    assert status == 400 and "weight" in body["error"]["description"]


async def test_bad_demo_config_refuses_to_start_naming_the_key(agent_factory, demo_env):
    a = agent_factory({"demo": {"steps": "x"}}, env=demo_env).start(wait=False)
    assert a.proc.wait(15) == 2
    log = a.log()
    assert "demo.steps" in log, log
    assert not (a.state_dir / "token").exists()

    b = agent_factory({"demo": {"stepz": 3}}, name="agent2", env=demo_env).start(wait=False)
    assert b.proc.wait(15) == 2
    assert "demo.stepz" in b.log(), b.log()


async def test_demo_section_without_the_plugin_is_an_unknown_section(agent_factory):
    a = agent_factory({"demo": {"steps": 3}}).start(wait=False)
    assert a.proc.wait(15) == 2
    assert "unknown config section(s): demo" in a.log(), a.log()


# --------------------------------------------------------------------------
# demo: jobs
# --------------------------------------------------------------------------

async def test_action_polling_shows_progress_then_result(demo_agent, http):
    status, reply = await submit(http, demo_agent, "PUT", "/v1/demo/actions", {"slowCount": {"steps": 4}})
    assert status == 202
    location = reply["location"]
    seen = []
    t0 = asyncio.get_running_loop().time()
    while True:
        async with http.get(location, headers=demo_agent.headers) as r:
            body = await r.json()
            if r.status != 202:
                final_status = r.status
                break
        assert body["location"] == location
        if "progress" in body:
            seen.append(body["progress"])
        assert asyncio.get_running_loop().time() - t0 < 15, "slowCount never ended"
        await asyncio.sleep(0.1)
    assert final_status == 200 and body == {"counted": 4}
    assert seen, "no 202 carried a progress object"
    for p in seen:
        assert 0 <= p["percent"] <= 100 and isinstance(p["message"], str)
    percents = [p["percent"] for p in seen]
    assert percents == sorted(percents)
    messages = list(dict.fromkeys(p["message"] for p in seen))
    assert len(messages) >= 3 and messages[0] == "step 1 of 4", messages
    assert {"step 1 of 4": 0.0, "step 2 of 4": 25.0, "step 3 of 4": 50.0, "step 4 of 4": 75.0}.items() \
        >= {p["message"]: p["percent"] for p in seen}.items()

    job = location.rsplit("/", 1)[1]
    status, body = await get_json(http, demo_agent, "/v1/api-jobs", {"q": f"uuid={job}"})
    [inv] = body["inventories"]
    assert (inv["state"], inv["plugin"], inv["action"], inv["success"]) == \
        ("Succeeded", "demo", "slowCount", True)


async def test_finished_job_inventory_keeps_the_last_progress(demo_agent, http):
    status, reply = await submit(http, demo_agent, "PUT", "/v1/demo/actions", {"quickFinish": {}})
    status, result = await wait_job(http, demo_agent, reply["location"])
    assert status == 200 and result == {"finished": True}
    job = reply["location"].rsplit("/", 1)[1]
    status, body = await get_json(http, demo_agent, "/v1/api-jobs", {"q": f"uuid={job}"})
    [inv] = body["inventories"]
    assert inv["state"] == "Succeeded"
    assert inv["progress"] is None or (inv["progress"]["percent"], inv["progress"]["message"]) == \
        (100, "done"), inv["progress"]


async def test_action_defaults_come_from_the_config_and_params_are_validated(demo_agent, http):
    status, result = await run_job(http, demo_agent, "PUT", "/v1/demo/actions", {"slowCount": {}})
    assert status == 200 and result == {"counted": 2}   # [demo] steps = 2
    status, body = await submit(http, demo_agent, "PUT", "/v1/demo/actions", {"slowCount": {"steps": 0}})
    assert status == 400 and "steps" in body["error"]["description"]
    status, body = await submit(http, demo_agent, "PUT", "/v1/demo/actions", {"fastCount": {}})
    assert status == 400 and body["error"]["code"] == "SYS.1006" and "slowCount" in body["error"]["description"]


async def test_create_list_delete_widget(demo_agent, http):
    status, result = await run_job(http, demo_agent, "POST", "/v1/demo/widgets",
                                   {"params": {"name": "w1", "sizeGb": 5},
                                    "systemTags": ["a"], "userTags": ["b"]})
    assert status == 200, result
    w = result["inventory"]
    assert w["name"] == "w1" and w["sizeGb"] == 5 and len(w["uuid"]) == 32
    status, body = await get_json(http, demo_agent, "/v1/demo/widgets", {"q": "name=w1"})
    assert body["inventories"] == [w]

    status, result = await run_job(http, demo_agent, "DELETE", f"/v1/demo/widgets/{w['uuid']}")
    assert status == 200 and result == {}
    status, body = await get_json(http, demo_agent, "/v1/demo/widgets")
    assert body["inventories"] == []
    # deleting it again: refused in the request by the route's check, no job
    n = await job_count(http, demo_agent)
    status, body = await submit(http, demo_agent, "DELETE", f"/v1/demo/widgets/{w['uuid']}")
    assert status == 404 and body["error"]["code"] == "DEMO.1004"
    assert await job_count(http, demo_agent) == n


async def test_create_body_without_params_or_with_unknown_keys_is_400(demo_agent, http):
    bad = {
        "empty object": {},
        "fields beside params": {"name": "w1"},
        "params plus unknown key": {"params": {"name": "w1"}, "extra": 1},
        "unknown field in params": {"params": {"name": "w1", "colour": "red"}},
        "params not an object": {"params": "w1"},
        "bad value": {"params": {"name": "w1", "sizeGb": 0}},
        "not an object": ["w1"],
    }
    for what, body in bad.items():
        status, reply = await submit(http, demo_agent, "POST", "/v1/demo/widgets", body)
        assert status == 400, (what, status, reply)
        assert reply["error"]["code"].startswith("SYS."), (what, reply)
    status, reply = await submit(http, demo_agent, "POST", "/v1/demo/widgets", {"name": "w1"})
    assert "params" in reply["error"]["description"]
    status, reply = await submit(http, demo_agent, "POST", "/v1/demo/widgets",
                                 {"params": {"name": "w1", "colour": "red"}})
    assert "colour" in reply["error"]["description"]
    async with http.post(demo_agent.url + "/v1/demo/widgets", headers=demo_agent.headers) as r:
        assert r.status == 400       # no body at all
    assert await job_count(http, demo_agent) == 0
    status, body = await get_json(http, demo_agent, "/v1/demo")
    assert body["widgetCount"] == 0


async def test_create_without_params_is_400_even_when_every_field_has_a_default(demo_agent, http):
    status, reply = await submit(http, demo_agent, "POST", "/v1/demo/batches", {})
    assert status == 400, (status, reply)


# --------------------------------------------------------------------------
# unavailable, broken and crashing plugins
# --------------------------------------------------------------------------

async def test_unavailable_broken_and_crashing_plugins_leave_the_agent_up(demo_agent, http):
    status, health = await get_json(http, demo_agent, "/v1/health", auth=False)
    assert status == 200 and health["status"] == "ok"
    plugins = {p["name"]: p for p in health["plugins"]}
    assert set(plugins) >= {"host", "demo", "gone", "crashy", "broken"}
    assert brief(plugins["host"]) == {"name": "host", "available": True, "reason": None}
    assert brief(plugins["demo"]) == {"name": "demo", "available": True, "reason": None}
    assert brief(plugins["gone"]) == {"name": "gone", "available": False, "reason": "binding missing: libfoo"}

    broken = plugins["broken"]
    assert broken["available"] is False
    assert "ImportError" in broken["reason"] and "libbroken.so.1" in broken["reason"], broken

    crashy = plugins["crashy"]
    assert crashy["available"] is False
    assert "RuntimeError" in crashy["reason"] and "cannot open /dev/crashy" in crashy["reason"], crashy

    # the unavailable plugins' routes answer 503 with the reason, nothing is run
    status, body = await get_json(http, demo_agent, "/v1/gone")
    assert status == 503 and body["error"]["code"] == "SYS.1504"
    assert "binding missing: libfoo" in body["error"]["description"]
    status, body = await submit(http, demo_agent, "PUT", "/v1/gone/actions", {"poke": {}})
    assert status == 503 and "binding missing: libfoo" in body["error"]["description"]
    status, body = await get_json(http, demo_agent, "/v1/crashy")
    assert status == 503 and "cannot open /dev/crashy" in body["error"]["description"]
    assert await job_count(http, demo_agent) == 0

    # everything else is served
    assert (await get_json(http, demo_agent, "/v1/demo"))[0] == 200
    assert (await get_json(http, demo_agent, "/v1/host/ping"))[0] == 200
    status, result = await run_job(http, demo_agent, "PUT", "/v1/demo/actions", {"slowCount": {"steps": 1}})
    assert status == 200 and result == {"counted": 1}


async def test_broken_plugin_alone_does_not_stop_the_agent(agent_factory, tmp_path, http):
    env = install(tmp_path / "only-broken", "broken_plugin", {"demo_broken": DEMO_BROKEN},
                  "[node_agent.plugins]\nbroken = demo_broken:BrokenPlugin\n")
    a = agent_factory(env=env).start()
    status, health = await get_json(http, a, "/v1/health", auth=False)
    assert status == 200
    plugins = {p["name"]: p for p in health["plugins"]}
    assert plugins["host"]["available"] is True
    assert plugins["broken"]["available"] is False and "ImportError" in plugins["broken"]["reason"]
    assert (await get_json(http, a, "/v1/hypervisor-types"))[0] == 200
    assert "plugin broken cannot be loaded" in a.log()


# The plugin of README.md's "Writing a plugin", as written there.
README_PLUGIN = '''
from agent.plugin import Plugin, get, action
from agent.models import WireModel

class Count(WireModel):
    steps: int = 3

class Demo(Plugin):
    name = "readme"

    @get("/v1/readme")
    async def status(self):
        return {"ok": True}

    @action("/v1/readme/actions", "count", params=Count)
    async def count(self, job, params):
        for i in range(params.steps):
            job.progress(100 * i / params.steps, f"step {i}")
            await job.runner.run(["sleep", "1"], timeout=5)   # never block the loop
        return {"counted": params.steps}
'''


async def test_readme_example_plugin_keeps_health_working(agent_factory, tmp_path, http):
    env = install(tmp_path / "readme", "readme_plugin", {"readme_plugin": README_PLUGIN},
                  "[node_agent.plugins]\nreadme = readme_plugin:Demo\n")
    a = agent_factory(env=env).start()
    assert (await get_json(http, a, "/v1/readme"))[1] == {"ok": True}
    status, health = await get_json(http, a, "/v1/health", auth=False)
    assert status == 200, health
    assert {"name": "readme", "available": True, "reason": None} in map(brief, health["plugins"])


# --------------------------------------------------------------------------
# OpenAPI
# --------------------------------------------------------------------------

def _refs(node, found: set[str]) -> set[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str):
                found.add(v)
            else:
                _refs(v, found)
    elif isinstance(node, list):
        for v in node:
            _refs(v, found)
    return found


async def test_openapi_includes_the_demo_routes_and_models(demo_agent, http):
    status, doc = await get_json(http, demo_agent, "/v1/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.1")
    paths = doc["paths"]
    assert set(paths["/v1/demo"]) == {"get"}
    assert set(paths["/v1/demo/items"]) == {"get"}
    assert set(paths["/v1/demo/actions"]) == {"put"}
    assert set(paths["/v1/demo/widgets"]) == {"get", "post"}
    assert set(paths["/v1/demo/widgets/{uuid}"]) == {"delete"}
    assert "/v1/gone" in paths and "/v1/host" in paths

    schemas = doc["components"]["schemas"]
    for model in ("DemoStatus", "DemoItem", "SlowCount", "SlowCountResult",
                  "WidgetSpec", "Widget", "WidgetReply"):
        assert model in schemas, (model, sorted(schemas))
    assert set(schemas["DemoItem"]["properties"]) == {"uuid", "name", "color", "sizeGb"}
    assert set(schemas["WidgetSpec"]["properties"]) == {"name", "sizeGb"}
    assert schemas["WidgetSpec"]["required"] == ["name"]

    items = paths["/v1/demo/items"]["get"]
    assert items["tags"] == ["demo"]
    assert items["responses"]["200"]["content"]["application/json"]["schema"]["properties"][
        "inventories"]["items"] == {"$ref": "#/components/schemas/DemoItem"}
    assert {"q", "limit", "sort", "fields"} <= {p["name"] for p in items["parameters"]}

    put = paths["/v1/demo/actions"]["put"]
    actions = {next(iter(o["properties"])): o
               for o in put["requestBody"]["content"]["application/json"]["schema"]["oneOf"]}
    assert set(actions) == {"slowCount", "quickFinish"}
    assert actions["slowCount"]["properties"] == {"slowCount": {"$ref": "#/components/schemas/SlowCount"}}
    assert actions["slowCount"]["required"] == ["slowCount"]
    assert "202" in put["responses"]

    post = paths["/v1/demo/widgets"]["post"]
    body = post["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["params"] == {"$ref": "#/components/schemas/WidgetSpec"}
    assert body["required"] == ["params"]
    delete = paths["/v1/demo/widgets/{uuid}"]["delete"]
    assert [p["name"] for p in delete["parameters"] if p["in"] == "path"] == ["uuid"]

    # every reference in the document resolves
    for ref in _refs(doc, set()):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
