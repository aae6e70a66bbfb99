#!/usr/bin/env bash
# Installs what is needed (scripts/install.sh), then runs the whole test suite
# from the repo root: scripts/run-tests.sh [pytest args...]
# The fixtures start and stop libvirtd, Ceph, dnsmasq... themselves; on exit
# this script still stops any process of this run that was left behind (found
# by a marker variable that every descendant inherits).
# Exits with pytest's code; "no tests collected" (5) is a failure (1).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

RUN_ID="$$-${EPOCHREALTIME/[.,]/}"
export NODE_AGENT_TEST_RUN="$RUN_ID"

# Prints the pids (other than this shell) whose environment has our marker.
# shellcheck disable=SC2317  # only reached through the EXIT trap
marked_pids() {
    local d pid var env
    for d in /proc/[0-9]*; do
        pid="${d#/proc/}"
        [[ $pid == "$$" || $pid == "$BASHPID" ]] && continue
        # Builtins only: no fork per process.
        mapfile -t -d '' env 2>/dev/null <"$d/environ" || continue
        for var in "${env[@]}"; do
            if [[ $var == "NODE_AGENT_TEST_RUN=$RUN_ID" ]]; then
                printf '%s\n' "$pid"
                break
            fi
        done
    done
}

# shellcheck disable=SC2317  # only reached through the EXIT trap
cleanup() {
    local pids names deadline
    mapfile -t pids < <(marked_pids)
    ((${#pids[@]})) || return 0
    names="$(ps -o comm= -p "$(IFS=,; echo "${pids[*]}")" 2>/dev/null | sort | uniq -c | awk '{printf "%s%s(x%s)", sep, $2, $1; sep=" "}')"
    echo "run-tests: stopping ${#pids[@]} stray process(es) left by the run: $names" >&2
    kill -TERM "${pids[@]}" 2>/dev/null || true
    deadline=$((SECONDS + 5))
    while ((SECONDS < deadline)); do
        sleep 0.2
        mapfile -t pids < <(marked_pids)
        ((${#pids[@]})) || return 0
    done
    echo "run-tests: SIGKILL to ${#pids[@]} process(es) that ignored SIGTERM" >&2
    kill -KILL "${pids[@]}" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

bash scripts/install.sh

rc=0
.venv/bin/python -m pytest -q -p no:cacheprovider "$@" || rc=$?

if ((rc == 5)); then
    echo "run-tests: FAILED: pytest collected no tests (exit 5); check testpaths and the arguments: $*" >&2
    exit 1
fi
exit "$rc"
