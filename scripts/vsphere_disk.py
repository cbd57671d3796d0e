#!/usr/bin/env python3
"""Writes into a disk of the demo's vSphere VM as its guest would.

    vsphere_disk.py CONTROL_URL VM DISK_KEY OFFSET_MIB LENGTH_MIB BYTE

Fills LENGTH_MIB MiB from OFFSET_MIB with BYTE (e.g. 0x57) in the file that takes the VM's writes
now: the simulator launcher's control endpoint (tests/vcsim/control.go) names it, because after a
snapshot the VM writes into a new file, as on vSphere.
"""
import json
import os
import sys
import urllib.request


def main():
    if len(sys.argv) != 7:
        sys.exit(__doc__)
    url, vm = sys.argv[1], sys.argv[2]
    key, off, n, byte = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6], 0)
    # Loopback only: no proxy from the environment.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    state = json.load(opener.open("%s/vms/%s" % (url.rstrip("/"), vm), timeout=30))
    paths = [d["path_on_disk"] for d in state["disks"] if d["key"] == key]
    if not paths:
        sys.exit("VM %s has no disk %d (disks: %s)" % (vm, key, [d["key"] for d in state["disks"]]))
    with open(paths[0], "r+b") as f:
        f.seek(off << 20)
        block = bytes([byte]) * (1 << 20)
        for _ in range(n):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())


if __name__ == "__main__":
    main()
