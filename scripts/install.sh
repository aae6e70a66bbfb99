#!/usr/bin/env bash
# Installs what node-agent and its test suite need, idempotently:
#   1. Debian packages (as root; skipped when all are installed, or with
#      NODE_AGENT_SKIP_APT=1),
#   2. <repo>/.venv, made from /usr/bin/python3 with --system-site-packages
#      (Debian's libvirt/rados/rbd bindings exist only for that interpreter),
#   3. `pip install -e '.[test]'` into it (skipped while pyproject.toml and the
#      venv are unchanged since the last successful install),
#   4. <repo>/.venv-fuzz with schemathesis for the fuzz tests: a venv of its own,
#      so its dependencies never clash with the agent's pins.
# One progress line per step on stderr; tool output goes to a log that is shown
# only when a step fails.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY=/usr/bin/python3
STAMP="$VENV/.node-agent-install-stamp"
FUZZ_VENV="$ROOT/.venv-fuzz"
FUZZ_REQUIREMENTS=(schemathesis==4.32.5)
APT_STAMP=/var/lib/apt/periodic/update-success-stamp
cd "$ROOT"

PACKAGES=(
    python3 python3-venv python3-dev gcc pkg-config iproute2
    libvirt-daemon-system libvirt-daemon-driver-qemu qemu-system-x86 qemu-utils
    python3-libvirt libvirt-dev
    ceph-mon ceph-osd ceph-mgr ceph-common python3-rados python3-rbd qemu-block-extra
    dnsmasq ipmitool tftp-hpa isc-dhcp-client umockdev ipxe-qemu ipxe openssl
    debian-installer-12-netboot-amd64
    nfs-ganesha nfs-ganesha-vfs fuse3 python3-pyudev
    systemd util-linux procps curl
    python3-fusepy xfsprogs e2fsprogs rsync openssh-client openssh-server
    pci.ids
)

LOG="$(mktemp -t node-agent-install.XXXXXX)"
POLICY_RC_CREATED=0
cleanup() {
    rm -f "$LOG"
    # Remove the temporary policy-rc.d only if this script created it.
    if [[ $POLICY_RC_CREATED == 1 ]]; then rm -f /usr/sbin/policy-rc.d; fi
}
trap cleanup EXIT

T0=$EPOCHREALTIME
step_t0=$T0
# elapsed START: seconds since START with one decimal.
elapsed() {
    local now=$EPOCHREALTIME
    awk -v a="$1" -v b="$now" 'BEGIN { printf "%.1fs", b - a }'
}
say() { printf 'install: %s\n' "$*" >&2; }
step_begin() { step_t0=$EPOCHREALTIME; }
step_done() { say "$* ($(elapsed "$step_t0"))"; }
# run CMD...: runs quietly into the log; on failure shows the log's tail.
run() {
    if ! "$@" >>"$LOG" 2>&1; then
        say "FAILED: $*"
        tail -n 40 "$LOG" >&2
        return 1
    fi
}

# --- 1. Debian packages ------------------------------------------------------
missing_packages() {
    # Prints the packages of PACKAGES that are not fully installed.
    local installed
    installed="$(dpkg-query -W -f='${Package} ${db:Status-Abbrev}\n' "${PACKAGES[@]}" 2>/dev/null \
                 | awk '$2 == "ii" { print $1 }' || true)"
    local p
    for p in "${PACKAGES[@]}"; do
        grep -qxF "$p" <<<"$installed" || printf '%s\n' "$p"
    done
}

# True when the package lists are missing or older than a day.
lists_stale() {
    compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null || return 0
    [[ -n "$(find "$APT_STAMP" /var/lib/apt/lists -maxdepth 1 -mmin -1440 -print -quit 2>/dev/null)" ]] && return 1
    return 0
}

apt_update() {
    run apt-get -q update
    mkdir -p "$(dirname "$APT_STAMP")" && touch "$APT_STAMP"
}

apt_install() {
    run apt-get install -y -q --no-install-recommends \
        -o Dpkg::Use-Pty=0 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "$@"
}

step_begin
if [[ ${NODE_AGENT_SKIP_APT:-0} == 1 ]]; then
    step_done "apt: skipped (NODE_AGENT_SKIP_APT=1)"
else
    mapfile -t MISSING < <(missing_packages)
    if ((${#MISSING[@]} == 0)); then
        step_done "apt: all ${#PACKAGES[@]} packages installed"
    elif ((EUID != 0)); then
        say "missing Debian packages: ${MISSING[*]}"
        say "run as root:  sudo $ROOT/scripts/install.sh"
        say "or:           sudo apt-get install -y --no-install-recommends ${MISSING[*]}"
        say "(or set NODE_AGENT_SKIP_APT=1 to skip this step)"
        exit 1
    else
        export DEBIAN_FRONTEND=noninteractive
        # Keep package scripts from starting daemons (libvirtd, dnsmasq,
        # ganesha...): the test fixtures start their own isolated ones.
        if [[ ! -e /usr/sbin/policy-rc.d ]]; then
            printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
            chmod 755 /usr/sbin/policy-rc.d
            POLICY_RC_CREATED=1
        fi
        updated=0
        if lists_stale; then apt_update; updated=1; fi
        if ! apt_install "${MISSING[@]}"; then
            # Stale lists give 404s; refresh once and retry.
            ((updated == 0)) || exit 1
            say "retrying after apt-get update"
            apt_update
            updated=1
            apt_install "${MISSING[@]}"
        fi
        step_done "apt: installed ${#MISSING[@]} package(s)$( ((updated)) && echo ' after apt-get update'): ${MISSING[*]}"
    fi
fi

# --- 2. The venv -------------------------------------------------------------
venv_ok() {
    [[ -x "$VENV/bin/python" && -f "$VENV/pyvenv.cfg" ]] || return 1
    grep -qx 'include-system-site-packages = true' "$VENV/pyvenv.cfg" || return 1
    grep -qx "home = $(dirname "$(readlink -f "$PY")")" "$VENV/pyvenv.cfg" || return 1
    "$VENV/bin/python" -c '' 2>/dev/null
}

step_begin
if venv_ok; then
    step_done "venv: $VENV ok"
else
    [[ -x $PY ]] || { say "$PY not found: install python3 (see step 1)"; exit 1; }
    rm -rf "$VENV"
    run "$PY" -m venv --system-site-packages "$VENV"
    step_done "venv: created $VENV"
fi

# --- 3. The project, editable, with its test extras --------------------------
# The stamp records what the last install was made from.
want_stamp="$(cat "$ROOT/pyproject.toml" <(printf '%s\n' "$ROOT" "$("$VENV/bin/python" -VV)") \
              | sha256sum | cut -d' ' -f1)"
step_begin
if [[ -f $STAMP && "$(cat "$STAMP")" == "$want_stamp" && -x "$VENV/bin/node-agent" ]]; then
    step_done "pip: node-agent[test] up to date"
else
    rm -f "$STAMP"
    run env PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 \
        "$VENV/bin/python" -m pip install -q -e '.[test]'
    printf '%s\n' "$want_stamp" >"$STAMP"
    step_done "pip: installed node-agent[test] (editable)"
fi

# --- 4. The fuzz venv (tests/test_fuzz.py, bench/fuzz_long.py) --------------
fuzz_stamp="$(printf '%s\n' "${FUZZ_REQUIREMENTS[@]}" "$("$PY" -VV)" | sha256sum | cut -d' ' -f1)"
step_begin
if [[ -f $FUZZ_VENV/.stamp && "$(cat "$FUZZ_VENV/.stamp")" == "$fuzz_stamp" && -x $FUZZ_VENV/bin/st ]]; then
    step_done "fuzz venv: ${FUZZ_REQUIREMENTS[*]} up to date"
else
    rm -rf "$FUZZ_VENV"
    run "$PY" -m venv "$FUZZ_VENV"
    run env PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 \
        "$FUZZ_VENV/bin/python" -m pip install -q "${FUZZ_REQUIREMENTS[@]}"
    printf '%s\n' "$fuzz_stamp" >"$FUZZ_VENV/.stamp"
    step_done "fuzz venv: installed ${FUZZ_REQUIREMENTS[*]} in $FUZZ_VENV"
fi

say "done in $(elapsed "$T0")"
