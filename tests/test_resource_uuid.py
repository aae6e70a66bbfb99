"""Issue 13.3: one rule for resourceUuid, owned by the core (agent/models.CreateParams,
agent/server.Dispatcher.decide_resource_uuid): every create of a resource takes the
manual's resourceUuid (32 hex or dashed, kept as 32 lowercase hex), a used one is
a 409, none means a new random one, and the plugin gets the decided uuid."""

from __future__ import annotations

import re
import uuid as uuidlib

import pytest
from pydantic import ValidationError

from agent.app import discover
from agent.models import CreateParams
from conftest import run_job, submit

# Creates that make no resource of their own, or whose uuid is another resource's id:
# a mon joins a storage, a console is a session, a cache entry is named by its image.
NOT_RESOURCES = {("ceph", "/v1/primary-storage/ceph/{uuid}/mons"),
                 ("ceph", "/v1/backup-storage/ceph/{uuid}/mons"),
                 ("baremetal", "/v1/baremetal/consoles"),
                 ("storage", "/v1/primary-storage/{uuid}/image-cache")}
# Registering the same storage again (same uuid, type and url) is idempotent, so the
# storage plugin's own check gives the 409 (for a different registration) instead.
IDEMPOTENT = {"/v1/primary-storage/local", "/v1/primary-storage/local-storage",
              "/v1/primary-storage/nfs", "/v1/primary-storage/smp"}


def creates() -> list[tuple[str, object]]:
    classes, failures = discover()
    assert not failures, failures
    return [(name, r) for name, cls in classes.items() for r in cls.routes() if r.kind == "create"]


def test_every_create_of_a_resource_takes_resource_uuid_and_says_when_it_is_used():
    seen = set()
    for plugin, r in creates():
        key = (plugin, r.canonical_path)
        seen.add(key)
        if key in NOT_RESOURCES:
            assert not issubclass(r.params, CreateParams), key
            continue
        assert issubclass(r.params, CreateParams), key
        fields = r.params.model_fields
        assert "resourceUuid" in r.params.model_json_schema(by_alias=True)["properties"], key
        assert fields["resource_uuid"].annotation == CreateParams.model_fields["resource_uuid"].annotation
        if r.canonical_path not in IDEMPOTENT:
            assert r.exists is not None, f"{key}: declare @{r.func.__name__}.exists"
    assert NOT_RESOURCES <= seen
    assert len(seen) >= 15


@pytest.mark.parametrize("given,kept", [
    ("0123456789abcdef0123456789ABCDEF", "0123456789abcdef0123456789abcdef"),
    ("01234567-89AB-cdef-0123-456789abcdef", "0123456789abcdef0123456789abcdef"),
])
def test_resource_uuid_is_normalised(given, kept):
    assert CreateParams.model_validate({"resourceUuid": given}).resource_uuid == kept
    assert CreateParams.model_validate({"uuid": given}).resource_uuid == kept   # the older name


@pytest.mark.parametrize("bad", ["0123456789abcdef0123456789abcdef\n", "0123456789abcdef0123456789abcde",
                                 "0123456789abcdef-0123456789abcdef", "g" * 32, "0" * 32,
                                 "01234567-89ab-cdef-0123-456789abcdef\n", " " + "a" * 32, ""])
def test_bad_resource_uuid_is_refused(bad):
    with pytest.raises(ValidationError):
        CreateParams.model_validate({"resourceUuid": bad})


def test_both_names_at_once_are_refused():
    with pytest.raises(ValidationError):
        CreateParams.model_validate({"resourceUuid": "a" * 32, "uuid": "b" * 32})


def test_the_chassis_create_takes_uuid_too():
    """The chassis create used to refuse `uuid` while the storage creates took it."""
    from plugins.baremetal.chassis import CreateChassis
    p = CreateChassis.model_validate({"uuid": "A" * 32, "ipmiAddress": "10.0.0.1",
                                      "ipmiUsername": "u", "ipmiPassword": "p"})
    assert p.resource_uuid == "a" * 32


# -- against a real agent -------------------------------------------------------------------

PS = "/v1/primary-storage"


async def test_resource_uuid_end_to_end(agent, http, tmp_path):
    wanted = uuidlib.uuid4()
    dashed = str(wanted).upper()
    status, body = await run_job(http, agent, "POST", f"{PS}/local",
                                 {"params": {"resourceUuid": dashed, "url": str(tmp_path / "ps")}})
    assert status == 200, body
    ps = body["inventory"]["uuid"]
    assert ps == wanted.hex

    # The same uuid for another storage: 409, nothing registered.
    status, body = await submit(http, agent, "POST", f"{PS}/local",
                                {"params": {"resourceUuid": wanted.hex, "url": str(tmp_path / "p2")}})
    assert status == 409, body

    # Volumes: a given uuid (dashed, upper case) is kept normalised; reused: the core's 409.
    vol = uuidlib.uuid4()
    status, body = await run_job(http, agent, "POST", f"{PS}/{ps}/volumes",
                                 {"params": {"resourceUuid": str(vol).upper(), "size": 1 << 20}})
    assert status == 200 and body["inventory"]["uuid"] == vol.hex, body
    status, body = await submit(http, agent, "POST", f"{PS}/{ps}/volumes",
                                {"params": {"resourceUuid": str(vol), "size": 1 << 20}})
    assert status == 409 and body["error"]["code"] == "SYS.1009", body
    assert vol.hex in body["error"]["description"] and "resourceUuid" in body["error"]["description"]
    status, body = await submit(http, agent, "POST", f"{PS}/{ps}/volumes",
                                {"params": {"uuid": vol.hex, "size": 1 << 20}})   # the older name
    assert status == 409 and body["error"]["code"] == "SYS.1009", body

    # The same create again under its X-Job-UUID is the same job, not a 409.
    vol2, job_id = uuidlib.uuid4().hex, uuidlib.uuid4().hex
    body = {"params": {"resourceUuid": vol2, "size": 1 << 20}}
    status, first = await run_job(http, agent, "POST", f"{PS}/{ps}/volumes", body,
                                  headers={"X-Job-UUID": job_id})
    assert status == 200 and first["inventory"]["uuid"] == vol2, first
    status, again = await submit(http, agent, "POST", f"{PS}/{ps}/volumes", body,
                                 headers={"X-Job-UUID": job_id})
    assert status == 202 and again["location"].endswith(job_id), again

    # None given: a new random one, 32 lowercase hex digits.
    status, body = await run_job(http, agent, "POST", f"{PS}/{ps}/volumes",
                                 {"params": {"size": 1 << 20}})
    assert status == 200 and re.fullmatch(r"[0-9a-f]{32}", body["inventory"]["uuid"]), body

    # Malformed: a 400 naming the field, before anything runs.
    for bad in (vol.hex + "\n", "x" * 32, "0" * 32):
        status, body = await submit(http, agent, "POST", f"{PS}/{ps}/volumes",
                                    {"params": {"resourceUuid": bad, "size": 1 << 20}})
        assert status == 400 and "resourceUuid" in body["error"]["description"], body
    status, body = await submit(http, agent, "POST", f"{PS}/{ps}/volumes",
                                {"params": {"resourceUuid": vol.hex, "uuid": vol.hex, "size": 1}})
    assert status == 400, body


async def test_a_primary_storage_takes_no_uuid_of_a_backup_storage(agent, http, tmp_path):
    """Registering a primary storage is idempotent, so the storage plugin applies the rule
    itself: the uuid of a storage of another kind (here an image store) is the core's
    409 SYS.1009 too (it was a 200, two storages under one uuid), and nothing is made."""
    bs = uuidlib.uuid4().hex
    status, body = await run_job(http, agent, "POST", "/v1/backup-storage/image-store",
                                 {"params": {"resourceUuid": bs, "url": str(tmp_path / "is")}})
    assert status == 200, body
    for kind in ("local", "smp"):
        status, body = await submit(http, agent, "POST", f"{PS}/{kind}",
                                    {"params": {"resourceUuid": bs, "url": str(tmp_path / "ps")}})
        assert status == 409 and body["error"]["code"] == "SYS.1009", body
        assert "backup" in body["error"]["description"], body
    status, body = await submit(http, agent, "GET", PS)
    assert status == 200 and body["inventories"] == [], body
    assert not (tmp_path / "ps").exists()


def test_every_route_model_builds():
    """Models are built lazily (defer_build): a bad validator would only show on the
    first request, as a 500. Build them all here."""
    classes, _ = discover()
    for cls in classes.values():
        for r in cls.routes():
            for m in (r.params, r.query_params, r.result, r.query_model):
                if m is not None:
                    m.model_json_schema()
