#!/bin/bash
# Runs a command with / as an overlay whose writes land in UPPER, not on the host:
#   unshare -m --propagation private overlay-root.sh BASE BIND... -- CMD ARGS...
# BASE gets upper/ (every write the command made outside the binds), work/ and
# root/ (the merged tree it is chrooted into). /proc, /sys, /dev and each BIND
# directory are bound into it read-write, so they are shared with the host
# (the test's own temp dirs, an isolated libvirtd's sockets). The fuzz tests
# run the agent this way: whatever a fuzzed request writes is caught, not done.
set -euo pipefail
# The command's PATH may hold stubs (a refusing mount): not for this script.
caller_path=$PATH
PATH=/usr/sbin:/usr/bin:/sbin:/bin
base=$1; shift
binds=()
while [[ $1 != -- ]]; do binds+=("$1"); shift; done
shift
mkdir -p "$base/upper" "$base/work" "$base/root"
mount -t overlay overlay -o "lowerdir=/,upperdir=$base/upper,workdir=$base/work" "$base/root"
for d in /proc /sys /dev; do
    mount --rbind "$d" "$base/root$d"
done
for d in "${binds[@]}"; do
    mkdir -p "$base/root$d"
    mount --bind "$d" "$base/root$d"
done
exec chroot "$base/root" /usr/bin/env PATH="$caller_path" /bin/sh -c 'cd "$1" && shift && exec "$@"' sh "$PWD" "$@"
