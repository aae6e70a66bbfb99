#!/usr/bin/env python3
"""Long schema-fuzzing runs: schemathesis over a sandboxed agent, for as long as asked.

The same sandbox as tests/test_fuzz.py (tests/fuzz_sandbox.py): every plugin on temp
dirs, stubs that refuse mount/umount/package managers, an isolated libvirtd started
here, a generated sysfs, / as an overlay so no fuzzed write reaches this host;
updateHostOS and kvmRunShell are never sent, the endless /v1/events stream is left
out.  CI runs ~350 seeded cases; this runs all of schemathesis's phases (examples,
coverage, fuzzing, stateful) with many examples per operation, in a time budget:

    .venv/bin/python bench/fuzz_long.py                         # 10 minutes
    .venv/bin/python bench/fuzz_long.py --minutes 120 --examples 500 --seed 7

It prints schemathesis's summary, the number of cases, the writes made outside the
sandbox (none expected), the jobs that ended in an internal error (none expected) and
the agent's own tracebacks; the exit code is 0 only when all of them are clean.  The
reports (JUnit, schemathesis's output, the agent's log) stay in --out.  With
--append a dated section goes to the end of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from benchlib import cpu_model, git_head  # noqa: E402
from fuzz_sandbox import (Sandbox, fuzz_available, get_json, internal_error_jobs, own_traceback_lines,  # noqa: E402
                          remove_domains, run_schemathesis)
from libvirt_fixture import Libvirtd  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="time budget of schemathesis")
    ap.add_argument("--examples", type=int, default=200, help="max examples per operation")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--phases", default="examples,coverage,fuzzing,stateful")
    ap.add_argument("--out", type=Path, default=None, help="where the reports stay")
    ap.add_argument("--append", action="store_true", help="append a section to bench/RESULTS.md")
    args = ap.parse_args()
    reason = fuzz_available()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    out = args.out or Path(tempfile.mkdtemp(prefix="node-agent-fuzz-"))
    out.mkdir(parents=True, exist_ok=True)
    libvirtd = Libvirtd(Path(tempfile.mkdtemp(prefix="node-agent-fuzz-libvirt-")))
    libvirtd.start()
    agent = None
    try:
        sandbox = Sandbox(out, libvirtd.uri, libvirtd.base)
        agent = sandbox.agent()
        agent.start(timeout=60)
        t0 = time.monotonic()
        done = run_schemathesis(agent, out / "st", max_examples=args.examples, seed=args.seed,
                                phases=args.phases, workers=args.workers,
                                max_time=args.minutes * 60)
        seconds = time.monotonic() - t0
        text = done.stdout + done.stderr
        (out / "schemathesis.txt").write_text(text)
        bad_jobs = len(internal_error_jobs(agent))
        healthy = get_json(agent, "/v1/health", token=False)["status"] == "ok"
    finally:
        if agent is not None:
            agent.stop()
        print("domains fuzzing defined:", len(remove_domains(libvirtd.uri, set())))
        libvirtd.stop()
        shutil.rmtree(libvirtd.base, ignore_errors=True)
    log = agent.log()
    own = own_traceback_lines(log)
    writes = sandbox.writes_outside()
    found = re.search(r"(\d+) generated", text)
    cases = int(found.group(1)) if found else 0
    summary = text[text.find("= SUMMARY ="):] if "= SUMMARY =" in text else text[-3000:]
    print(text[text.find("= FAILURES ="):] if "= FAILURES =" in text else "", summary, sep="\n")
    ok = done.returncode == 0 and not writes and not bad_jobs and not own and healthy
    report = (f"cases {cases} in {seconds:.0f} s ({cases / max(seconds, 1):.1f}/s), "
              f"schemathesis exit {done.returncode}, writes outside the sandbox {len(writes)}, "
              f"jobs with an internal error {bad_jobs}, agent tracebacks {len(own)}, "
              f"agent healthy after: {healthy}")
    print(report)
    if writes:
        print("writes outside the sandbox:", *writes[:50], sep="\n  ")
    print(f"reports in {out}")
    if args.append:
        head, dirty = git_head("agent", "plugins")
        when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        with open(REPO / "bench" / "RESULTS.md", "a") as f:
            f.write(f"\n## Fuzz run, {when} (bench/fuzz_long.py)\n\n"
                    f"Machine: {cpu_model()}, shared with other work (figures are not quiet-"
                    f"machine figures). Commit {head}{' + local changes' if dirty else ''}. "
                    f"Phases {args.phases}, --examples {args.examples}, seed {args.seed}, "
                    f"{args.workers} workers, budget {args.minutes:g} min.\n\n"
                    f"- {report}\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
