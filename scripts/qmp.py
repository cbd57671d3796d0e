#!/usr/bin/env python3
"""Send one QMP command to a QEMU QMP unix socket and print the answer (demo helper).

Usage: qmp.py SOCKET COMMAND [JSON-ARGUMENTS]
   or: qmp.py SOCKET hmp "qemu-io -d /machine/peripheral/disk0/virtio-backend 'write -P 0x99 0 4M'"
"""
import json
import socket
import sys


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    path, command = sys.argv[1], sys.argv[2]
    if command == "hmp":
        msg = {"execute": "human-monitor-command", "arguments": {"command-line": sys.argv[3]}}
    else:
        msg = {"execute": command}
        if len(sys.argv) > 3:
            msg["arguments"] = json.loads(sys.argv[3])
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    f = s.makefile("rw")
    json.loads(f.readline())  # greeting
    f.write(json.dumps({"execute": "qmp_capabilities"}) + "\n")
    f.flush()
    while "return" not in json.loads(f.readline()):
        pass
    f.write(json.dumps(msg) + "\n")
    f.flush()
    while True:
        reply = json.loads(f.readline())
        if "event" in reply:
            continue
        if "error" in reply:
            print(f"QMP error: {reply['error'].get('desc')}", file=sys.stderr)
            return 1
        print(json.dumps(reply["return"]))
        return 0


if __name__ == "__main__":
    sys.exit(main())
