#!/bin/bash
# Bring up an ISOLATED, privileged libvirtd (+qemu TCG/KVM) for tests, without systemd,
# without touching the system libvirt state (Debian 12, libvirt 9.0.0, qemu 7.2).
#
#   ./start-libvirtd.sh start   -> prints the URI to use:
#        qemu+unix:///system?socket=$LV_BASE/run/libvirt-sock
#   ./start-libvirtd.sh stop    -> destroys running domains, stops the daemon (by PID)
#   ./start-libvirtd.sh status
#   env: LV_BASE (default /tmp/lab-libvirt), LV_CGROUPS=1 (keep default
#        cgroup controllers; needed for dom.getCPUStats()), LV_LOG_FILTERS.
#
# How: libvirtd runs in its own mount namespace (unshare -m) in which the
# hard-coded privileged dirs /etc/libvirt, /run/libvirt, /var/lib/libvirt,
# /var/cache/libvirt, /var/log/libvirt are bind-mounted from $LV_BASE/*.
# The socket therefore appears on the host at $LV_BASE/run/libvirt-sock.
# qemu runs as root (so /dev/kvm crw------- root is usable and the QEMU caps
# cache does not flap), no virtlogd (stdio_handler=file), no per-VM mount
# namespace, no security driver, no default network / dnsmasq.
# libvirtd runs under a tiny PR_SET_CHILD_SUBREAPER wrapper: PID 1 here
# (process_api) reaps orphans only every ~2 s, so without it every
# virDomainDestroy waits ~1.2-2 s on a zombie qemu.
set -euo pipefail
BASE=${LV_BASE:-/tmp/node-agent-libvirt}
SOCK=$BASE/run/libvirt-sock
URI="qemu+unix:///system?socket=$SOCK"
PIDF=$BASE/daemon.pid

alive() { [ -f "$PIDF" ] && kill -0 "$(cat "$PIDF")" 2>/dev/null; }

start() {
  if alive; then echo "$URI"; return 0; fi
  mkdir -p "$BASE"/{etc/qemu,run,lib,cache,log}
  cat > "$BASE/etc/libvirtd.conf" <<EOF
unix_sock_group = "root"
unix_sock_ro_perms = "0700"
unix_sock_rw_perms = "0700"
auth_unix_ro = "none"
auth_unix_rw = "none"
log_filters = "${LV_LOG_FILTERS:-3:*}"
log_outputs = "1:file:/var/log/libvirt/libvirtd.log"
EOF
  cat > "$BASE/etc/qemu.conf" <<EOF
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
stdio_handler = "file"
namespaces = [ ]
EOF
  [ "${LV_CGROUPS:-0}" = 1 ] || echo 'cgroup_controllers = [ ]' >> "$BASE/etc/qemu.conf"
  cat > "$BASE/subreaper.py" <<'EOF'
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)   # PR_SET_CHILD_SUBREAPER
child = os.fork()
if child == 0:
    os.execv(sys.argv[1], sys.argv[1:])
for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(s, lambda n, f: os.kill(child, n))
while True:                       # reap libvirtd and orphaned qemu immediately
    try:
        pid, st = os.wait()
    except ChildProcessError:
        sys.exit(0)
    if pid == child:
        sys.exit(os.waitstatus_to_exitcode(st) & 0xff)
EOF
  # mount points must exist on the host side (they are libvirt's own dirs)
  mkdir -p /etc/libvirt /run/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt
  rm -f "$SOCK"
  local t0; t0=$(date +%s.%N)
  setsid unshare --mount --propagation private /bin/sh -c "
    set -e
    mount --bind '$BASE/etc'   /etc/libvirt
    mount --bind '$BASE/run'   /run/libvirt
    mount --bind '$BASE/lib'   /var/lib/libvirt
    mount --bind '$BASE/cache' /var/cache/libvirt
    mount --bind '$BASE/log'   /var/log/libvirt
    exec /usr/bin/python3 '$BASE/subreaper.py' /usr/sbin/libvirtd -p '$BASE/run/libvirtd.pid'" \
    >"$BASE/log/libvirtd.stdout" 2>&1 </dev/null &
  echo $! > "$PIDF"   # unshare and sh exec in place: PID of the subreaper (parent of libvirtd)
  for _ in $(seq 1 600); do
    if [ -S "$SOCK" ] && virsh -q -c "$URI" version >/dev/null 2>&1; then
      echo "libvirtd ready in $(echo "$(date +%s.%N) - $t0" | bc) s (subreaper pid $(cat "$PIDF"))" >&2
      echo "$URI"; return 0
    fi
    alive || { echo "libvirtd died:" >&2; cat "$BASE/log/libvirtd.stdout" >&2; return 1; }
    sleep 0.1
  done
  echo "timeout waiting for $SOCK" >&2; return 1
}

stop() {
  alive || { echo "not running"; rm -f "$PIDF"; return 0; }
  for d in $(virsh -q -c "$URI" list --name 2>/dev/null); do
    virsh -q -c "$URI" destroy "$d" >/dev/null || true
  done
  local pid; pid=$(cat "$PIDF")
  kill -TERM "$pid"                       # forwarded to libvirtd by the subreaper
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
  rm -f "$PIDF"; echo "stopped libvirtd (subreaper pid $pid)"
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) if alive; then echo "running (pid $(cat "$PIDF")) $URI"; else echo "not running"; fi ;;
  *) echo "usage: $0 start|stop|status"; exit 2 ;;
esac
