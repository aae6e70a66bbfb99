#!/bin/bash
# micro-ceph.sh - throwaway single-node Ceph (Pacific 16.2) cluster on loopback.
#
#   micro-ceph.sh start  DIR   # create DIR, 1 mon + 1 memstore osd (+ 1 mgr), wait until usable
#   micro-ceph.sh stop   DIR   # SIGTERM osd, mgr, mon (pids from DIR/run/*.pid; KILL after 5s)
#   micro-ceph.sh purge  DIR   # stop + rm -rf DIR
#   micro-ceph.sh status DIR   # ceph -s
#   micro-ceph.sh add-mon DIR NAME IP     # a second mon joins live on IP:MON_PORT (quorum awaited)
#   micro-ceph.sh remove-mon DIR NAME     # 'ceph mon remove NAME' (the mon then exits by itself)
#   micro-ceph.sh stop-mon DIR NAME       # SIGTERM one mon and wait for it to exit
#   micro-ceph.sh start-mon DIR NAME      # start a stopped mon again
#
# node-agent's copy of ../shared/recipes/micro-ceph.sh, with the mon commands above and:
#   MON_ONLY=1      only a mon (no OSD, no mgr): a second cluster with another fsid, ~1 s
#   ADMIN_KEYRING=F use this client.admin keyring instead of generating one
#
# Environment knobs (all optional):
#   MON_IP=127.0.0.1  MON_PORT=40000 (msgr v2; v1 listens on MON_PORT+1)
#   WITH_MGR=1        (0 = no ceph-mgr, ~2 s start: df/get_cluster_stats/ioctx.get_stats report 0,
#                      'osd pool get-quota' -> ENOENT, 'osd pool stats' hangs)
#   AUTH=cephx        (or none)
#   OBJECTSTORE=memstore (or bluestore: uses a sparse file DIR/osd.0/block)
#   MEMSTORE_BYTES=1073741824   (memstore capacity == what 'ceph df' reports as total)
#
# Clients: ceph -c DIR/ceph.conf ... ; rados.Rados(conffile="DIR/ceph.conf")
# (the admin keyring path is in the [client] section of the generated ceph.conf).
set -euo pipefail

cmd=${1:-}; DIR=${2:-}
[ -n "$cmd" ] && [ -n "$DIR" ] || { echo "usage: $0 start|stop|purge|status DIR" >&2; exit 2; }
DIR=$(realpath -m "$DIR")
CONF=$DIR/ceph.conf
MON_IP=${MON_IP:-127.0.0.1}
MON_PORT=${MON_PORT:-40000}
WITH_MGR=${WITH_MGR:-1}
AUTH=${AUTH:-cephx}
OBJECTSTORE=${OBJECTSTORE:-memstore}
MEMSTORE_BYTES=${MEMSTORE_BYTES:-1073741824}
MON_ONLY=${MON_ONLY:-0}
ADMIN_KEYRING=${ADMIN_KEYRING:-}
# Python mgr modules NOT to load (ceph-mgr imports every module dir at start: ~7 s, 300 MB RSS).
# Stats (df, osd pool stats, get-quota, get_cluster_stats) come from the mgr's C++ core.
# Set MGR_DISABLED_MODULES= (empty) to load everything.
# The 10 "always on" modules must stay loadable, else HEALTH_ERR MGR_MODULE_ERROR.
ALWAYS_ON="balancer crash devicehealth orchestrator pg_autoscaler progress rbd_support status telemetry volumes"
MGR_DISABLED_MODULES=${MGR_DISABLED_MODULES-$(ls /usr/share/ceph/mgr | grep -v '\.py$' | grep -vxF -f <(tr ' ' '\n' <<<"$ALWAYS_ON") | paste -sd, -)}
CEPH=(ceph -c "$CONF" --connect-timeout 30)

T0=$(date +%s%N)
log() { local ms=$(( ($(date +%s%N) - T0) / 1000000 )); printf '[micro-ceph %d.%03ds] %s\n' $((ms/1000)) $((ms%1000)) "$*" >&2; }

# pid belongs to a ceph daemon started with *this* conf?
ours() { local pid=$1; [ -r /proc/$pid/cmdline ] && tr '\0' ' ' </proc/$pid/cmdline | grep -q -- "$CONF"; }

stop_daemons() {
    # order matters: an OSD stopped after its mon waits osd_mon_shutdown_timeout (5 s)
    local f pid n name
    shopt -s nullglob
    for f in "$DIR"/run/osd.*.pid "$DIR"/run/mgr.*.pid "$DIR"/run/mon.*.pid; do
        pid=$(cat "$f" 2>/dev/null || true); name=$(basename "$f" .pid)
        if [ -n "$pid" ] && ours "$pid"; then
            kill -TERM "$pid" 2>/dev/null || true
            for n in $(seq 100); do ours "$pid" || break; sleep 0.05; done
            if ours "$pid"; then log "$name pid $pid alive after 5s, SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; fi
            log "stopped $name (pid $pid)"
        fi
        rm -f "$f"
    done
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local secs=$1 what=$2; shift 2
    local end=$(( $(date +%s) + secs ))
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$end" ] || { log "timeout waiting for $what"; return 1; }
        sleep 0.2
    done
    log "$what"
}

osd_up() { "${CEPH[@]}" osd dump -f json | python3 -c 'import json,sys; d=json.load(sys.stdin); sys.exit(0 if any(o["up"] for o in d["osds"]) else 1)'; }
mgr_up() { "${CEPH[@]}" mgr stat -f json | python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)["available"] else 1)'; }

start() {
    if [ -e "$CONF" ]; then echo "$CONF exists; run '$0 purge $DIR' first" >&2; exit 1; fi
    for b in ceph ceph-mon ceph-osd ceph-authtool monmaptool; do command -v $b >/dev/null || { echo "missing $b" >&2; exit 1; }; done
    for port in $MON_PORT $((MON_PORT+1)); do
        if (exec 3<>/dev/tcp/$MON_IP/$port) 2>/dev/null; then
            echo "$MON_IP:$port already in use (another cluster?); pick another MON_PORT" >&2; exit 1
        fi
    done
    # on any failure: stop whatever was started, keep DIR (logs in DIR/log)
    trap 'rc=$?; if [ $rc -ne 0 ]; then log "start failed (rc=$rc), stopping daemons; see $DIR/log"; stop_daemons; fi' EXIT
    mkdir -p "$DIR"/{mon.a,osd.0,mgr.x,run,log,crash}
    local FSID OSD_UUID
    FSID=$(cat /proc/sys/kernel/random/uuid)
    OSD_UUID=$(cat /proc/sys/kernel/random/uuid)

    cat >"$CONF" <<EOF
[global]
fsid = $FSID
mon host = [v2:$MON_IP:$MON_PORT,v1:$MON_IP:$((MON_PORT+1))]
mon initial members = a
auth cluster required = $AUTH
auth service required = $AUTH
auth client required = $AUTH
auth allow insecure global id reclaim = false
ms bind ipv6 = false
run dir = $DIR/run
crash dir = $DIR/crash
log file = $DIR/log/\$name.log
mon cluster log file = $DIR/log/cluster.log
pid file = $DIR/run/\$name.pid
admin socket = $DIR/run/\$name.asok
client mount timeout = 30
# single-OSD cluster
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
mgr stats period = 1
paxos propose interval = 0.1
[mon]
mon data = $DIR/mon.\$id
[osd]
osd data = $DIR/osd.\$id
osd objectstore = $OBJECTSTORE
memstore device bytes = $MEMSTORE_BYTES
# bluestore only: creates a sparse regular file osd.N/block (don't set 'bluestore block path' to
# a file inside osd data: mkfs then fails with ELOOP, it symlinks osd_data/block to the path)
bluestore block size = 10737418240
bluestore block create = true
osd memory target = 939524096
osd class load list = *
osd class default list = *
public addr = 127.0.0.1
cluster addr = 127.0.0.1
[mgr]
mgr data = $DIR/mgr.\$id
mgr disabled modules = ${MGR_DISABLED_MODULES:-diskprediction_local}
public addr = 127.0.0.1
[client]
keyring = $DIR/ceph.client.admin.keyring
EOF

    # keys: mon., client.admin, osd.0, mgr.x all pre-seeded into the initial mon keyring
    ceph-authtool --create-keyring "$DIR/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    if [ -n "$ADMIN_KEYRING" ]; then
        cp "$ADMIN_KEYRING" "$DIR/ceph.client.admin.keyring"
        ceph-authtool "$DIR/ceph.client.admin.keyring" -n client.admin \
            --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *' >/dev/null
    else
        ceph-authtool --create-keyring "$DIR/ceph.client.admin.keyring" --gen-key -n client.admin \
            --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *' >/dev/null
    fi
    chmod 600 "$DIR/ceph.client.admin.keyring"
    ceph-authtool --create-keyring "$DIR/osd.0/keyring" --gen-key -n osd.0 \
        --cap mon 'allow profile osd' --cap mgr 'allow profile osd' --cap osd 'allow *' >/dev/null
    ceph-authtool --create-keyring "$DIR/mgr.x/keyring" --gen-key -n mgr.x \
        --cap mon 'allow profile mgr' --cap osd 'allow *' --cap mds 'allow *' >/dev/null
    for k in ceph.client.admin.keyring osd.0/keyring mgr.x/keyring; do
        ceph-authtool "$DIR/mon.keyring" --import-keyring "$DIR/$k" >/dev/null
    done

    monmaptool --create --fsid "$FSID" --addv a "[v2:$MON_IP:$MON_PORT,v1:$MON_IP:$((MON_PORT+1))]" \
        "$DIR/monmap" >/dev/null
    ceph-mon -c "$CONF" -i a --mkfs --monmap "$DIR/monmap" --keyring "$DIR/mon.keyring"
    ceph-mon -c "$CONF" -i a                       # daemonizes, writes run/mon.a.pid
    log "mon.a started"
    if [ "$MON_ONLY" = 1 ]; then
        wait_for 30 "mon answering" "${CEPH[@]}" mon stat
        log "mon-only cluster ready: ceph -c $CONF -s"
        return 0
    fi

    local id
    id=$("${CEPH[@]}" osd create "$OSD_UUID")       # key already in mon keyring
    [ "$id" = 0 ] || { log "unexpected osd id '$id'"; exit 1; }
    log "mon answering, osd.0 allocated"
    if [ "$WITH_MGR" = 1 ]; then
        # keep devicehealth from creating pool 'device_health_metrics' (module options are read
        # from the mon config db only; a ceph.conf line is ignored)
        "${CEPH[@]}" config set mgr mgr/devicehealth/enable_monitoring false --force  # unknown to mon before 1st mgr start
        ceph-mgr -c "$CONF" -i x                  # slowest part (python modules): start it first
    fi

    ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$OSD_UUID" >"$DIR/log/osd.0.mkfs.log" 2>&1 \
        || { cat "$DIR/log/osd.0.mkfs.log" >&2; log "osd mkfs failed"; exit 1; }
    ceph-osd -c "$CONF" -i 0

    wait_for 60 "osd.0 up" osd_up
    if [ "$WITH_MGR" = 1 ]; then wait_for 60 "mgr available" mgr_up; fi
    log "cluster ready: ceph -c $CONF -s"
}

mon_pid() { cat "$DIR/run/mon.$1.pid" 2>/dev/null || true; }

in_quorum() {  # in_quorum NAME
    "${CEPH[@]}" quorum_status -f json | python3 -c 'import json,sys; sys.exit(0 if sys.argv[1] in json.load(sys.stdin)["quorum_names"] else 1)' "$1"
}

add_mon() {  # add_mon NAME IP: mkfs from the live monmap and start; it joins by itself
    local name=$1 ip=$2
    [ -n "$name" ] && [ -n "$ip" ] || { echo "usage: $0 add-mon DIR NAME IP" >&2; exit 2; }
    mkdir -p "$DIR/mon.$name"
    "${CEPH[@]}" mon getmap -o "$DIR/monmap.$name" >/dev/null 2>&1
    "${CEPH[@]}" auth get mon. -o "$DIR/mon.$name.keyring" >/dev/null 2>&1
    ceph-mon -c "$CONF" -i "$name" --mkfs --monmap "$DIR/monmap.$name" --keyring "$DIR/mon.$name.keyring"
    ceph-mon -c "$CONF" -i "$name" --public-addrv "[v2:$ip:$MON_PORT,v1:$ip:$((MON_PORT+1))]"
    wait_for 60 "mon.$name in quorum" in_quorum "$name"
    # just after joining, a mon may not authenticate clients for a few seconds
    wait_for 60 "mon.$name answers clients" ceph -c "$CONF" --connect-timeout 2 -m "v2:$ip:$MON_PORT" mon stat
}

stop_mon() {
    local name=$1 pid n
    pid=$(mon_pid "$name")
    if [ -n "$pid" ] && ours "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        for n in $(seq 200); do ours "$pid" || break; sleep 0.05; done
        if ours "$pid"; then kill -KILL "$pid" 2>/dev/null || true; sleep 0.2; fi
        log "stopped mon.$name (pid $pid)"
    fi
    rm -f "$DIR/run/mon.$name.pid"
}

case $cmd in
    start) start ;;
    add-mon) add_mon "${3:-}" "${4:-}" ;;
    remove-mon) "${CEPH[@]}" mon remove "${3:?name}"
                for n in $(seq 100); do pid=$(mon_pid "$3"); { [ -n "$pid" ] && ours "$pid"; } || break; sleep 0.05; done
                stop_mon "$3"; rm -rf "$DIR/mon.$3" ;;
    stop-mon) stop_mon "${3:?name}" ;;
    start-mon) ceph-mon -c "$CONF" -i "${3:?name}"; log "mon.$3 started" ;;
    stop) stop_daemons ;;
    purge) stop_daemons; rm -rf "$DIR"; log "removed $DIR" ;;
    status) "${CEPH[@]}" -s ;;
    *) echo "unknown command $cmd" >&2; exit 2 ;;
esac
