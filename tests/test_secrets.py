"""Secrets stay secret (issues 10.5, 10.7): the token file and the state database are
private, and a real agent at DEBUG that was handed every kind of secret it takes
writes none of them to its log, its answers or its state files."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import uuid as uuidlib
from pathlib import Path

import pytest

from bmcproc import FakeBmcProcess
from conftest import run_job, submit

CHASSIS = "/v1/baremetal/chassis"


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# ------------------------------------------------------------------ the token file, state.db

@pytest.mark.parametrize("bad", [0o644, 0o640, 0o604], ids=["0644", "0640", "0604"])
def test_a_token_file_others_can_read_is_refused(agent_factory, bad):
    agent = agent_factory()
    agent.state_dir.mkdir(mode=0o700)
    token = agent.state_dir / "token"
    token.write_text("a-token-that-others-may-have-read-0123456789\n")
    os.chmod(token, bad)
    with pytest.raises(RuntimeError, match="exited with 2"):
        agent.start(timeout=10)
    log = agent.log()
    assert f"can be read by others (mode {bad:04o})" in log and f"chmod 600 {token}" in log
    assert "a-token-that-others" not in log
    assert mode(token) == bad                      # refused, not silently changed
    os.chmod(token, 0o600)
    agent.start()
    assert agent.token == "a-token-that-others-may-have-read-0123456789"


def test_a_token_file_of_another_user_is_refused(agent_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root to give the file to another user")
    agent = agent_factory()
    agent.state_dir.mkdir(mode=0o700)
    token = agent.state_dir / "token"
    token.write_text("someone-elses-token-0123456789\n")
    os.chmod(token, 0o600)
    os.chown(token, 65534, 65534)
    with pytest.raises(RuntimeError, match="exited with 2"):
        agent.start(timeout=10)
    assert "owned by uid 65534" in agent.log()


def test_state_db_is_private_new_and_existing(agent_factory):
    agent = agent_factory().start()
    db = agent.state_dir / "state.db"
    for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        assert p.exists() and mode(p) == 0o600, (p, oct(mode(p)))
    agent.stop()
    # A state dir from before: the database and its WAL files were 0644.
    c = sqlite3.connect(db, isolation_level=None)       # kept open: its -wal and -shm stay
    try:
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("INSERT INTO kv(key, value) VALUES('probe', '1')")
        os.chmod(db, 0o644)
        for p in (Path(f"{db}-wal"), Path(f"{db}-shm")):
            if p.exists():
                os.chmod(p, 0o644)
        agent.start()
        for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
            if p.exists():
                assert mode(p) == 0o600, (p, oct(mode(p)))
    finally:
        c.close()
    agent.stop()
    assert "readable by others (mode 0644): set to 0600" in agent.log()


# ------------------------------------------------------------------ every secret, at DEBUG

async def test_no_secret_in_log_answers_or_state_at_debug(agent_factory, tmp_path, http):
    tag = uuidlib.uuid4().hex[:10]
    bmc_password = f"Bmc-{tag}"
    root_password = f"Root-{tag}-pw"
    vnc_password = uuidlib.uuid4().hex[:8]        # VNC: at most 8 characters
    bmc = FakeBmcProcess(tmp_path, password=bmc_password).start()
    agent = agent_factory({"log": {"level": "DEBUG"}, "baremetal": {},
                           # libvirt's in-process test driver: a VM with a VNC password is
                           # defined for real, on nothing but memory
                           "libvirt": {"uri": "test:///default"}})
    # install URLs name the agent's own address (no PXE server here)
    agent.config["pxe"] = {"http_base_url": f"http://127.0.0.1:{agent.port}"}
    try:
        agent.start()
        token = agent.token
        answers: list[str] = []

        async def call(method, path, body=None, **kw):
            if method == "GET":
                async with http.get(agent.url + path, headers=agent.headers, **kw) as r:
                    text = await r.text()
                    answers.append(text)
                    return r.status, (json.loads(text) if text.startswith("{") else text)
            status, reply = await run_job(http, agent, method, path, body)
            answers.append(json.dumps(reply))
            return status, reply

        # the BMC password: a chassis, its power, a wrong password, the right one again
        status, reply = await call("POST", CHASSIS, {"params": bmc.params()})
        assert status == 200, reply
        chassis = reply["inventory"]["uuid"]
        await call("GET", f"{CHASSIS}/{chassis}/power")
        status, reply = await call("PUT", f"{CHASSIS}/{chassis}/actions",
                                   {"updateBaremetalChassis": {"ipmiPassword": bmc_password[::-1]}})
        assert status == 503, reply
        # the host config's root password, and its install token (a secret in a URL)
        status, reply = await call("POST", "/v1/baremetal/hostcfg", {"params": {
            "chassisUuid": chassis, "password": root_password, "hostname": "s1", "osFamily": "debian",
            "nicCfgs": [{"mac": "52:54:00:5e:c0:01", "pxe": True}]}})
        assert status == 200, reply
        install_url = reply["inventory"]["installUrl"]
        install_token = install_url.rsplit("/", 1)[1]
        async with http.get(install_url) as r:
            assert r.status == 200
            answers.append(await r.text())
        # the VNC password
        status, reply = await submit(http, agent, "POST", "/v1/vm-instances", {"params": {
            "name": f"s-{tag}", "cpuNum": 1, "memorySize": 64 << 20, "disks": [],
            "graphics": {"type": "vnc", "listen": "127.0.0.1", "password": vnc_password}}})
        answers.append(json.dumps(reply))
        vm_defined = False
        if status == 202:
            status, reply = await call("GET", reply["location"].split(str(agent.port))[1] + "?wait=20")
            vm_defined = status == 200
        # the token itself, where a careless client puts it
        for path in (f"/v1/accounts/sessions/{token}", f"/v1/host/ping?session={token}"):
            await call("GET", path)
        # everything readable back
        for path in (CHASSIS, f"{CHASSIS}/{chassis}", "/v1/baremetal/hostcfg", "/v1/api-jobs",
                     "/v1/vm-instances", "/v1/openapi.json", "/metrics", "/v1/health", "/v1/host"):
            await call("GET", path)
    finally:
        agent.stop()
        bmc.stop()

    secrets = {"token": token, "BMC password": bmc_password, "its reverse": bmc_password[::-1],
               "root password": root_password, "install token": install_token}
    if vm_defined:
        secrets["VNC password"] = vnc_password
    log = agent.log()
    assert " DEBUG " in log                              # the test ran at DEBUG
    answers_text = "\n".join(answers)
    for what, secret in secrets.items():
        assert secret not in log, f"{what} in the log"
        if what not in ("install token",):             # the install URL is its owner's answer
            assert secret not in answers_text, f"{what} in an answer"
    # The state files: the token only in the token file; the install token only in
    # state.db (the agent hands its URL out again on every GET, so it keeps it); the
    # passwords nowhere in clear (BMC: encrypted with baremetal.key; root: a crypt hash;
    # VNC: in libvirt's domain XML, which is libvirt's, not under the state dir).
    where: dict[str, list[str]] = {}
    for f in agent.state_dir.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            for what, secret in secrets.items():
                if secret.encode() in data:
                    where.setdefault(what, []).append(f.relative_to(agent.state_dir).as_posix())
    assert where.get("token") == ["token"], where
    assert set(where.get("install token", [])) <= {"state.db", "state.db-wal"}, where
    assert set(where) <= {"token", "install token"}, where
    for name in ["token", "state.db", *where.get("install token", []), "baremetal.key"]:
        assert mode(agent.state_dir / name) == 0o600, name
    assert vm_defined, "the VNC part did not run: the VM plugin refused the define"
