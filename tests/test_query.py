"""The query API shared by every list endpoint (agent/query.py)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import pytest
from multidict import MultiDict, MultiDictProxy
from pydantic import BaseModel, ConfigDict, Field, computed_field
from pydantic.alias_generators import to_camel
from yarl import URL

from agent.errors import BadRequest
from agent.query import QuerySpec, run_query

ITEMS = [
    {"uuid": "u1", "name": "vm1", "cpuNum": 2, "memory": 1.5, "ha": True,
     "createDate": "2024-01-02T00:00:00Z", "hostUuid": "h1",
     "metaData": {"driver": "vfio-pci", "numa": 0},
     "vmNics": [{"ip": "10.0.0.1", "mac": "aa"}, {"ip": "10.0.0.2", "mac": "bb"}],
     "tags": ["gpu", "fast"]},
    {"uuid": "u2", "name": "vm2", "cpuNum": 4, "memory": 8.0, "ha": False,
     "createDate": "2024-03-01T00:00:00Z", "hostUuid": None,
     "metaData": {"driver": "nvidia"},
     "vmNics": [{"ip": "10.0.0.3", "mac": "cc"}], "tags": []},
    {"uuid": "u3", "name": "IntelCoreI7", "cpuNum": 8, "memory": 16, "ha": False,
     "createDate": "2023-12-31T23:59:59Z",
     "metaData": {}, "vmNics": [], "tags": ["fast"]},
    {"uuid": "u4", "name": "a_b%c", "cpuNum": 1, "memory": 0.5, "ha": True,
     "createDate": "2024-02-01T00:00:00Z", "hostUuid": "h2",
     "metaData": {"driver": None}, "vmNics": [{"ip": None, "mac": "dd"}], "tags": ["slow"]},
]

SPEC = QuerySpec(["uuid", "name", "cpuNum", "memory", "ha", "createDate", "hostUuid",
                  "metaData", "vmNics", "vmNics.ip", "vmNics.mac", "tags"],
                 open_fields=["metaData"])


def q(*conditions: str, **params: Any) -> dict:
    multi = MultiDict([("q", c) for c in conditions])
    for key, value in params.items():
        for v in value if isinstance(value, list) else [value]:
            multi.add(key, v)
    return run_query(ITEMS, MultiDictProxy(multi), SPEC, extra_params={"wait"})


def uuids(*conditions: str, **params: Any) -> list[str]:
    return [it["uuid"] for it in q(*conditions, **params)["inventories"]]


def bad(*conditions: str, **params: Any) -> str:
    with pytest.raises(BadRequest) as exc:
        q(*conditions, **params)
    assert exc.value.status == 400 and exc.value.code == "SYS.1100"
    return exc.value.description


# --- operators -------------------------------------------------------------

def test_no_parameters_returns_everything():
    assert q() == {"inventories": ITEMS}


def test_equal_and_not_equal():
    assert uuids("name=vm1") == ["u1"]
    assert uuids("name!=vm1") == ["u2", "u3", "u4"]
    assert uuids("name=nope") == []


def test_ordering_operators_on_numbers():
    assert uuids("cpuNum>2") == ["u2", "u3"]
    assert uuids("cpuNum>=2") == ["u1", "u2", "u3"]
    assert uuids("cpuNum<2") == ["u4"]
    assert uuids("cpuNum<=2") == ["u1", "u4"]
    assert uuids("memory>1.5") == ["u2", "u3"]     # floats and ints mixed
    assert uuids("cpuNum>2.5") == ["u2", "u3"]     # int field, float value


def test_in_and_not_in():
    assert uuids("name?=vm1,vm2,other") == ["u1", "u2"]
    assert uuids("name!?=vm1,vm2") == ["u3", "u4"]
    assert uuids("cpuNum?=1,8") == ["u3", "u4"]    # coerced to int
    assert uuids("cpuNum?=x,4") == ["u2"]          # an uncoercible piece matches nothing


def test_like_and_not_like():
    assert uuids("name~=vm%") == ["u1", "u2"]
    assert uuids("name~=IntelCore_7") == ["u3"]
    assert uuids("name~=vm_") == ["u1", "u2"]
    assert uuids("name~=vm") == []                 # whole-string match
    assert uuids("name~=VM%") == []                # case-sensitive
    assert uuids("name!~=vm%") == ["u3", "u4"]
    assert uuids("name~=a.b%") == []               # '.' is literal, not a regex
    assert uuids("name~=a_b%c") == ["u4"]
    assert uuids("cpuNum~=_") == ["u1", "u2", "u3", "u4"]  # numbers match as text


def test_is_null_and_not_null():
    assert uuids("hostUuid is null") == ["u2", "u3"]   # null and missing alike
    assert uuids("hostUuid not null") == ["u1", "u4"]


def test_null_never_matches_comparisons():
    assert uuids("hostUuid!=h1") == ["u4"]
    assert uuids("hostUuid!?=h1") == ["u4"]
    assert uuids("hostUuid!~=h1") == ["u4"]
    assert uuids("hostUuid<zzz") == ["u1", "u4"]


def test_conditions_are_anded_and_condition_is_an_alias():
    assert uuids("cpuNum>1", "ha=false") == ["u2", "u3"]
    assert uuids("cpuNum>1", condition="ha=false") == ["u2", "u3"]
    assert uuids(condition=["cpuNum>1", "name=vm2"]) == ["u2"]


def test_value_may_contain_operator_characters():
    items = [{"name": "a=b"}, {"name": "a>b"}, {"name": "x"}]
    spec = QuerySpec(["name"])
    assert run_query(items, {"q": ["name=a=b"]}, spec)["inventories"] == [{"name": "a=b"}]
    assert run_query(items, {"q": ["name=a>b"]}, spec)["inventories"] == [{"name": "a>b"}]
    assert run_query(items, {"q": ["name>=x"]}, spec)["inventories"] == [{"name": "x"}]


# --- coercion, nesting, lists ----------------------------------------------

def test_type_coercion():
    assert uuids("ha=true") == ["u1", "u4"]
    assert uuids("ha=TRUE") == ["u1", "u4"]
    assert uuids("ha=yes") == []                   # not a bool: equal to nothing
    assert uuids("ha!=false") == ["u1", "u4"]
    assert uuids("cpuNum=2") == ["u1"]
    assert uuids("cpuNum=2.0") == ["u1"]
    assert uuids("cpuNum=two") == []
    assert uuids("memory=16") == ["u3"]


def test_timestamps_compare_as_strings():
    assert uuids("createDate>2024-01-01") == ["u1", "u2", "u4"]
    assert uuids("createDate<2024-01-01T00:00:00Z") == ["u3"]


def test_nested_dict_paths():
    assert uuids("metaData.driver=vfio-pci") == ["u1"]
    assert uuids("metaData.driver~=%i%") == ["u1", "u2"]
    assert uuids("metaData.driver is null") == ["u3", "u4"]
    assert uuids("metaData.numa=0") == ["u1"]
    assert uuids("metaData.anything.deeper is null") == ["u1", "u2", "u3", "u4"]


def test_list_paths_match_any_element():
    assert uuids("vmNics.ip=10.0.0.2") == ["u1"]
    assert uuids("vmNics.ip~=10.0.0.%") == ["u1", "u2"]
    assert uuids("vmNics.ip!=10.0.0.1") == ["u1", "u2"]   # u1's second nic differs
    assert uuids("vmNics.ip is null") == ["u3", "u4"]     # no nics / no ip
    assert uuids("vmNics.ip not null") == ["u1", "u2"]
    assert uuids("tags=fast") == ["u1", "u3"]              # a list of scalars
    assert uuids("tags is null") == ["u2"]


# --- paging, count, sort, fields ---------------------------------------------

def test_pagination_with_reply_with_count():
    assert q(limit="2", replyWithCount="true") == {"inventories": ITEMS[:2], "total": 4}
    body = q("cpuNum>1", start="1", limit="1", replyWithCount="true")
    assert [i["uuid"] for i in body["inventories"]] == ["u2"] and body["total"] == 3
    assert q(start="10", replyWithCount="true") == {"inventories": [], "total": 4}
    assert q(limit="0") == {"inventories": []}
    assert "total" not in q(replyWithCount="false")


def test_default_limit_is_1000():
    items = [{"n": i} for i in range(1500)]
    body = run_query(items, {"replyWithCount": ["true"]}, QuerySpec(["n"]))
    assert len(body["inventories"]) == 1000 and body["total"] == 1500


def test_count_only():
    assert q(count="true") == {"total": 4}
    assert q("ha=true", count="true", limit="1") == {"total": 2}
    assert q(count="false") == {"inventories": ITEMS}


def test_sort_both_directions_nulls_last():
    assert uuids(sort="+cpuNum") == ["u4", "u1", "u2", "u3"]
    assert uuids(sort="-cpuNum") == ["u3", "u2", "u1", "u4"]
    assert uuids(sort=" cpuNum") == ["u4", "u1", "u2", "u3"]   # '+' decoded from a URL
    assert uuids(sort="+hostUuid") == ["u1", "u4", "u2", "u3"]
    assert uuids(sort="-hostUuid") == ["u4", "u1", "u2", "u3"]
    assert uuids(sort="+vmNics.ip") == ["u1", "u2", "u3", "u4"]
    assert uuids("ha=false", sort="-memory", limit="1") == ["u3"]   # sort before paging


def test_bare_sort_field_is_ascending():
    # Issue 13.1: ZStack's server takes sort=name as +name, and clients send it.
    assert uuids(sort="name") == uuids(sort="+name") == ["u3", "u4", "u1", "u2"]
    assert uuids(sort="cpuNum") == ["u4", "u1", "u2", "u3"]
    assert bad(sort="nmae") == "unknown sort field 'nmae'"


def test_group_by_one_row_per_value():
    # Issue 13.1, the manual's 3.9: groupBy is SQL's GROUP BY, e.g. groupBy=type.
    assert uuids(groupBy="ha") == ["u1", "u2"]                  # first item of each group
    assert uuids(groupBy="ha", sort="-cpuNum") == ["u3", "u1"]  # first in sort order
    assert uuids(groupBy="hostUuid") == ["u1", "u2", "u4"]      # null is a group
    assert uuids("cpuNum>1", groupBy="ha") == ["u1", "u2"]
    assert q(groupBy="ha", replyWithCount="true", limit="1") == {"inventories": [ITEMS[0]],
                                                                  "total": 2}
    assert uuids(groupBy="vmNics.mac") == ["u1", "u2", "u3", "u4"]
    assert q(groupBy="ha", fields="ha") == {"inventories": [{"ha": True}, {"ha": False}]}


def test_group_by_with_count_gives_each_group_size():
    assert q(groupBy="ha", count="true") == {
        "total": 2, "groups": [{"value": True, "total": 2}, {"value": False, "total": 2}]}
    assert q("cpuNum>1", groupBy="metaData.driver", count="true", sort="+metaData.driver") == {
        "total": 3, "groups": [{"value": "nvidia", "total": 1}, {"value": "vfio-pci", "total": 1},
                               {"value": None, "total": 1}]}
    assert q("cpuNum>100", groupBy="ha", count="true") == {"total": 0, "groups": []}


def test_group_by_errors():
    assert bad(groupBy="nmae") == "unknown groupBy field 'nmae'"
    assert "'groupBy'" in bad(groupBy=["ha", "name"])


def test_sort_by_and_direction():
    assert uuids(sortBy="name") == ["u3", "u4", "u1", "u2"]
    assert uuids(sortBy="name", sortDirection="desc") == ["u2", "u1", "u4", "u3"]
    assert uuids(sortBy="metaData.driver", sortDirection="asc") == ["u2", "u1", "u3", "u4"]


def test_fields_selection():
    body = q("name=vm1", fields="uuid,name")
    assert body == {"inventories": [{"uuid": "u1", "name": "vm1"}]}
    body = q("name=vm1", fields=["uuid", "metaData.driver"])
    assert body["inventories"] == [{"uuid": "u1", "metaData": {"driver": "vfio-pci"}}]
    body = q("name=vm1", fields="vmNics.ip,hostUuid")
    assert body["inventories"] == [{"vmNics": [{"ip": "10.0.0.1"}, {"ip": "10.0.0.2"}],
                                    "hostUuid": "h1"}]
    # a whole field wins over a sub-path of it, in either order
    for order in (["metaData", "metaData.driver"], ["metaData.driver", "metaData"]):
        body = q("name=vm1", fields=order)
        assert body["inventories"] == [{"metaData": ITEMS[0]["metaData"]}]
    assert q("name=vm3", fields="hostUuid")["inventories"] == []
    assert q("uuid=u3", fields="uuid,hostUuid")["inventories"] == [{"uuid": "u3"}]
    assert ITEMS[0]["metaData"] == {"driver": "vfio-pci", "numa": 0}   # not mutated


def test_plain_dict_params():
    body = run_query(ITEMS, {"q": ["cpuNum>2"], "sort": ["-cpuNum"], "fields": ["uuid"]},
                     SPEC)
    assert body == {"inventories": [{"uuid": "u3"}, {"uuid": "u2"}]}
    assert run_query(ITEMS, {"q": "name=vm2", "count": "true"}, SPEC) == {"total": 1}


def test_real_url_query_string():
    # aiohttp hands handlers yarl's decoded query: '+' becomes a space.
    url = URL("/v1/vm-instances?q=cpuNum%3E1&q=hostUuid+is+null&sort=+cpuNum"
              "&fields=uuid&replyWithCount=true")
    assert run_query(ITEMS, url.query, SPEC) == {
        "inventories": [{"uuid": "u2"}, {"uuid": "u3"}], "total": 2}
    url = URL("/v1/vm-instances?condition=name%3D%3Dx&sort=-cpuNum&limit=1")
    assert run_query(ITEMS, url.query, SPEC) == {"inventories": []}


def test_extra_params_are_allowed():
    assert uuids("name=vm1", wait="5") == ["u1"]


# --- errors name the bad thing ---------------------------------------------------

def test_malformed_conditions():
    for cond in ("name = vm1", "name =vm1", "name= vm1", "name", "=vm1", "",
                 "na-me=x", "name is  null", "name is nul", "name  not null"):
        assert bad(cond).startswith(f"malformed query condition '{cond}'")


def test_unknown_fields_are_named():
    assert bad("nmae=vm1") == "unknown field 'nmae' in condition 'nmae=vm1'"
    assert "'vmNics.foo'" in bad("vmNics.foo=1")
    assert "'metaData..x'" in bad("metaData..x=1")
    assert "'nmae'" in bad("nmae is null")
    assert bad(fields="uuid,foo") == "unknown field 'foo' in fields"
    assert bad(sort="+foo") == "unknown sort field 'foo'"
    assert bad(sortBy="foo") == "unknown sort field 'foo'"


def test_ordering_on_non_comparable_value_is_400():
    msg = bad("cpuNum>abc")
    assert "'cpuNum'" in msg and "'cpuNum>abc'" in msg
    assert "'ha<=maybe'" in bad("ha<=maybe")
    assert "'metaData>1'" in bad("metaData>1")


def test_parameter_errors():
    assert bad(limit="x") == "limit must be a non-negative integer: 'x'"
    assert bad(limit="-1") == "limit must be a non-negative integer: '-1'"
    assert "100000" in bad(limit="100001")
    assert q(limit="100000")["inventories"] == ITEMS
    assert bad(start="1.5") == "start must be a non-negative integer: '1.5'"
    assert bad(limit="٣") == "limit must be a non-negative integer: '٣'"   # not ASCII
    assert "at most" in bad(limit="9" * 5000)
    assert q(start="9" * 5000) == {"inventories": []}
    assert bad(count="yes") == "count must be true or false: 'yes'"
    assert "replyWithCount" in bad(replyWithCount="1")
    assert "sortDirection" in bad(sortBy="name", sortDirection="up")
    assert "sortBy" in bad(sortDirection="asc")
    assert "sortBy" in bad(sort="+name", sortBy="name")
    assert "'limit'" in bad(limit=["1", "2"])


def test_unknown_query_parameters():
    assert bad(nmae="vm1") == "unknown query parameter 'nmae'"
    with pytest.raises(BadRequest, match="'wait'"):
        run_query(ITEMS, {"wait": ["1"]}, SPEC)


def test_sort_on_mixed_types_is_400():
    items = [{"v": 1}, {"v": "a"}]
    with pytest.raises(BadRequest, match="'v'"):
        run_query(items, {"sort": ["+v"]}, QuerySpec(["v"]))


# --- QuerySpec.from_model ---------------------------------------------------------------

class Nic(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)
    ip_address: Optional[str] = None
    mac: str = ""


class Host(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)
    uuid: str
    management_ip: str = Field("", serialization_alias="managementIp")


class Vm(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)
    uuid: str
    cpu_num: int = 1
    vm_nics: list[Nic] = []
    host: Host | None = None
    meta_data: dict[str, Any] = {}
    extra: Any = None
    tags: list[str] = []
    parent: Optional["Vm"] = None
    ipmi_password: str = Field("", exclude=True)
    odd: int = Field(0, serialization_alias="oddName")
    labels: Mapping[str, str] = {}

    @computed_field
    @property
    def nic_count(self) -> int:
        return len(self.vm_nics)


def test_spec_from_nested_model_with_aliases():
    spec = QuerySpec.from_model(Vm)
    for path in ("uuid", "cpuNum", "vmNics", "vmNics.ipAddress", "vmNics.mac", "host",
                 "host.uuid", "host.managementIp", "metaData", "metaData.driver",
                 "metaData.a.b", "extra.whatever", "tags", "parent", "oddName",
                 "labels.team", "nicCount"):
        assert spec.knows(path), path
    for path in ("cpu_num", "vm_nics.ip_address", "vmNics.foo", "host.x", "tags.x",
                 "ipmiPassword", "odd", "metaData.", "", "uuid.x",
                 "parent.uuid"):   # a self-referencing model is not walked again
        assert not spec.knows(path), path


def test_spec_from_model_end_to_end():
    vms = [Vm(uuid="a", cpu_num=2, vm_nics=[Nic(ip_address="1.1.1.1")],
              meta_data={"driver": "vfio-pci"}),
           Vm(uuid="b", cpu_num=4, host=Host(uuid="h", management_ip="10.0.0.9"))]
    items = [vm.model_dump(by_alias=True, mode="json") for vm in vms]
    spec = QuerySpec.from_model(Vm)
    params = MultiDictProxy(MultiDict([("q", "vmNics.ipAddress=1.1.1.1"),
                                       ("q", "metaData.driver=vfio-pci"),
                                       ("fields", "uuid,cpuNum")]))
    assert run_query(items, params, spec) == {"inventories": [{"uuid": "a", "cpuNum": 2}]}
    assert run_query(items, {"q": ["nicCount>0"], "fields": ["uuid"]}, spec) == {
        "inventories": [{"uuid": "a"}]}
    params = {"q": ["host.managementIp~=10.%"], "fields": ["host.managementIp"]}
    assert run_query(items, params, spec) == {
        "inventories": [{"host": {"managementIp": "10.0.0.9"}}]}
    with pytest.raises(BadRequest, match="'ipmiPassword'"):
        run_query(items, {"q": ["ipmiPassword~=%"]}, spec)


# --- scale (its speed is measured by bench/device_inventory.py, not asserted here) ----------

def test_ten_thousand_items_three_conditions_and_sort():
    items = [{"uuid": f"u{i:05d}", "name": f"vm{i}", "cpuNum": i % 16,
              "state": "Running" if i % 3 else "Stopped",
              "metaData": {"driver": "vfio-pci" if i % 2 else "nvidia"}}
             for i in range(10_000)]
    spec = QuerySpec(["uuid", "name", "cpuNum", "state", "metaData"], ["metaData"])
    params = MultiDictProxy(MultiDict([
        ("q", "cpuNum>=2"), ("q", "state!=Stopped"), ("q", "metaData.driver~=vfio%"),
        ("sort", "-cpuNum"), ("replyWithCount", "true")]))
    body = run_query(items, params, spec)
    assert body["total"] == sum(1 for it in items if it["cpuNum"] >= 2
                                and it["state"] != "Stopped" and it["cpuNum"] % 2)
    assert body["inventories"][0]["cpuNum"] == 15
    assert [it["cpuNum"] for it in body["inventories"]] == sorted(
        (it["cpuNum"] for it in body["inventories"]), reverse=True)


# --- against a real agent ------------------------------------------------------

async def test_group_by_and_bare_sort_against_a_real_agent(agent, http):
    """Issue 13.1 end to end: groupBy=state with count, and sort=<field> without a sign."""
    from conftest import run_job, submit
    for _ in range(2):
        status, _ = await run_job(http, agent, "PUT", "/v1/host/actions",
                                  {"kvmRunShell": {"script": "true"}})
        assert status == 200
    status, reply = await submit(http, agent, "PUT", "/v1/host/actions",
                                 {"kvmRunShell": {"script": "sleep 20", "timeout": 30}})
    assert status == 202

    async def get(**params):
        async with http.get(agent.url + "/v1/api-jobs", params=params, headers=agent.headers) as r:
            return r.status, await r.json()
    status, body = await get(groupBy="state", count="true", sort="state")
    assert status == 200, body
    assert body == {"total": 2, "groups": [{"value": "Running", "total": 1},
                                           {"value": "Succeeded", "total": 2}]}
    status, body = await get(groupBy="state", replyWithCount="true", fields="state")
    assert status == 200 and body["total"] == 2
    assert sorted(i["state"] for i in body["inventories"]) == ["Running", "Succeeded"]
    status, body = await get(sort="createDate")
    assert status == 200
    dates = [i["createDate"] for i in body["inventories"]]
    assert dates == sorted(dates) and len(dates) == 3
    status, body = await get(groupBy="nope")
    assert status == 400 and "groupBy" in body["error"]["description"]
