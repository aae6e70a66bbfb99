"""`node-agent call` shows a long job's progress (issue 13.11), against a real agent: a
slow image download into a local primary storage is the job that reports progress."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import wait_job
from storage_helpers import PS, add_storage, fast_storage, uid
from test_storage import ImageServer

REPO = __import__("pathlib").Path(__file__).resolve().parent.parent
IMAGE = b"\0" * (32 << 20)   # 128 chunks of 256 KiB; the agent reports every 4 MiB read


@pytest.fixture
async def download(agent_factory, tmp_path):
    """(agent, storage uuid, slow server): each download takes about 128 x delay."""
    agent = agent_factory(fast_storage()).start()
    server = await ImageServer({"img": IMAGE}).start()
    ps = uid()
    import aiohttp
    async with aiohttp.ClientSession() as http:
        status, body = await add_storage(http, agent, "local", {"uuid": ps, "url": str(tmp_path / "ps")})
    assert status == 200, body
    yield agent, ps, server
    await server.runner.cleanup()


def _argv(agent, ps, server, *extra) -> list[str]:
    body = json.dumps({"params": {"imageUuid": uid(), "url": server.url("img")}})
    return [sys.executable, "-m", "agent", "call", "--url", agent.url,
            "--token-file", str(agent.state_dir / "token"), *extra,
            "POST", f"{PS}/{ps}/image-cache", body]


async def _run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return await asyncio.to_thread(subprocess.run, argv, cwd=REPO, capture_output=True, text=True,
                                   timeout=timeout, stdin=subprocess.DEVNULL)


async def test_plain_progress_lines_when_not_a_terminal(download):
    agent, ps, server = download
    server.delay = 0.04
    r = await _run(_argv(agent, ps, server))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["inventory"]["format"] == "raw"     # stdout: the result only
    lines = r.stderr.splitlines()
    m = re.fullmatch(r"job ([0-9a-f]{32}) submitted \(Ctrl-C stops waiting, not the job\)", lines[0])
    assert m, lines
    job = m.group(1)
    progress = [line for line in lines[1:] if line.startswith(f"job {job}: ")]
    percents = [float(re.match(rf"job {job}: ([0-9.]+)% downloading$", p).group(1))
                for p in progress if p.endswith("downloading")]
    assert len(percents) >= 2 and percents == sorted(percents), lines
    assert any(0 < p < 100 for p in percents), lines
    assert "\r" not in r.stderr and "\x1b" not in r.stderr

    r = await _run(_argv(agent, ps, server, "--no-progress"))
    assert r.returncode == 0 and r.stderr == "", r.stderr


async def test_a_bar_on_a_terminal(download):
    agent, ps, server = download
    server.delay = 0.04
    cmd = " ".join(f"'{a}'" for a in _argv(agent, ps, server))
    # script(1) gives the call a pseudo-terminal; its output (stdout and stderr) is the typescript.
    # Bytes: text mode's universal newlines would turn the bar's \r into \n.
    r = await asyncio.to_thread(subprocess.run, ["script", "-qec", cmd, "/dev/null"], cwd=REPO,
                                capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    out = r.stdout.decode()
    assert r.returncode == 0, out
    bars = re.findall(r"\r\x1b\[K\[([#-]{30})\] +([0-9.]+)% downloading", out)
    assert len(bars) >= 2, repr(out)
    assert any(0 < float(p) < 100 for _, p in bars), bars
    assert all(bar.count("#") == round(30 * float(p) / 100) for bar, p in bars), bars
    assert '"inventory"' in out and re.search(r"job [0-9a-f]{32} submitted", out)


async def test_ctrl_c_names_the_job_and_how_to_cancel_it(download, http):
    agent, ps, server = download
    server.delay = 0.15                     # about 20 s: still running when Ctrl-C comes
    proc = subprocess.Popen(_argv(agent, ps, server), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        first = await asyncio.to_thread(proc.stderr.readline)
        job = re.match(r"job ([0-9a-f]{32}) submitted", first).group(1)
        await asyncio.to_thread(proc.stderr.readline)          # a progress line: it waits
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.to_thread(proc.communicate, timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert out == ""
    assert f"node-agent call: interrupted; job {job} goes on running on the agent" in err
    hint = f"node-agent call DELETE /v1/api-jobs/{job}"
    assert hint in err and "Traceback" not in err, err
    # The job did go on, and the hint works.
    r = await _run([sys.executable, "-m", "agent", "call", "--url", agent.url,
                    "--token-file", str(agent.state_dir / "token"), *hint.split()[2:]])
    assert r.returncode == 0, r.stderr
    status, body = await wait_job(http, agent, f"{agent.url}/v1/api-jobs/{job}", timeout=10)
    assert status == 503 and body["error"]["code"] == "JOB.1002", body
