#!/usr/bin/python3
"""umount(8) that first appends its argv, as JSON with a leading "umount", to $FAKE_MOUNT_LOG."""
import json
import os
import sys

log = os.environ.get("FAKE_MOUNT_LOG")
if log:
    with open(log, "a") as f:
        f.write(json.dumps(["umount", *sys.argv[1:]]) + "\n")
os.execvp("umount", ["umount", *sys.argv[1:]])
