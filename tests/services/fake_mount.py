#!/usr/bin/python3
"""A stand-in for mount(8) in the NFS tests: this kernel has no NFS client.

The agent runs it as ``fake_mount.py -t nfs -o OPTS SERVER:/EXPORT PATH`` (the
[storage] mount_command of the tests).  It appends its argv, as JSON, to
$FAKE_MOUNT_LOG, checks the shape the agent must use, and then mounts
something real at PATH with SERVER:/EXPORT as the source shown in mountinfo,
so the agent's mountinfo logic is exercised for real:

* FAKE_MOUNT_MODE=tmpfs (default): a tmpfs;
* FAKE_MOUNT_MODE=fuse: the hanging FUSE filesystem (hangfs.py) over
  $FAKE_MOUNT_BACKING/<export> (the "server's" data, kept across mounts),
  switched by $FAKE_MOUNT_CONTROL ("fuse:/other/control" names another one);
* FAKE_MOUNT_MODE=fail: exits 32 like mount.nfs when the server says no.

$FAKE_MOUNT_MODE_FILE, when it exists, overrides FAKE_MOUNT_MODE (tests switch
modes while the agent runs).
"""
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split(" ")[4] == path for line in f)


def main() -> int:
    argv = sys.argv[1:]
    log = os.environ.get("FAKE_MOUNT_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps(argv) + "\n")
    if len(argv) != 6 or argv[0] != "-t" or argv[1] != "nfs" or argv[2] != "-o":
        print(f"fake_mount: unexpected argv {argv}", file=sys.stderr)
        return 1
    opts, src, dst = argv[3], argv[4], argv[5]
    mode = os.environ.get("FAKE_MOUNT_MODE", "tmpfs")
    mode_file = os.environ.get("FAKE_MOUNT_MODE_FILE")
    if mode_file and os.path.exists(mode_file):
        mode = open(mode_file).read().strip() or mode
    if mode == "fail":
        print(f"mount.nfs: access denied by server while mounting {src}", file=sys.stderr)
        return 32
    if mode == "fuse" or mode.startswith("fuse:"):
        # one backing directory per export, kept across mounts like a real NFS server's data
        backing = os.path.join(os.environ["FAKE_MOUNT_BACKING"], src.replace("/", "_").replace(":", "_"))
        os.makedirs(backing, exist_ok=True)
        control = mode[5:] if mode.startswith("fuse:") else os.environ["FAKE_MOUNT_CONTROL"]
        subprocess.Popen([sys.executable, os.path.join(HERE, "hangfs.py"), backing, dst, control,
                          "--fsname", src],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
        for _ in range(100):
            if mounted(dst):
                return 0
            time.sleep(0.05)
        print("fake_mount: hangfs did not mount", file=sys.stderr)
        return 1
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", src, dst]).returncode


if __name__ == "__main__":
    sys.exit(main())
