#!/usr/bin/env bash
# Live demo: a hub, a node and a real QEMU VM with two disks holding data, then the console.
#
#   sudo ./scripts/demo.sh              # ends in the console (TUI), a full backup already moving
#   sudo ./scripts/demo.sh --headless   # no TUI: full backup, guest writes, incremental, results
#
# Everything runs on 127.0.0.1 (hub :8082, node :8081, NBD 10100-10200) under $SENDENSE_DEMO_DIR
# (default /tmp/sendense-demo, recreated each run). Every process the demo starts is stopped by
# PID when it exits. Needs root for package installation only.
#
# In the TUI the node's copy is throttled (SENDENSE_DEMO_THROTTLE_BPS, default 8 MiB/s per disk)
# so that the backup moves for about half a minute instead of finishing before the eye finds it;
# --headless copies at full speed unless the variable is set.
#
# Other scripts (scripts/screenshots.sh) source this file to get the same stack: sourcing defines
# the demo_* functions and runs nothing.
set -euo pipefail

demo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
demo=${SENDENSE_DEMO_DIR:-/tmp/sendense-demo}
hub_addr=127.0.0.1:8082
node_addr=127.0.0.1:8081
vm=demo-vm
demo_pids=()

say() { printf '\033[1m[demo]\033[0m %s\n' "$*" >&2; }

# Installs what is missing and builds the three binaries; sets $bin.
demo_build() {
  bash "$demo_root/scripts/setup.sh" packages
  # Under sudo, PATH is reset and root usually has no Rust toolchain: build as the user who
  # ran sudo, with their rustup installation (the target directory stays theirs too).
  local cargo=(cargo)
  if ! command -v cargo >/dev/null && [ -n "${SUDO_USER:-}" ]; then
    local home
    home=$(getent passwd "$SUDO_USER" | cut -d: -f6)
    [ -x "$home/.cargo/bin/cargo" ] &&
      cargo=(runuser -u "$SUDO_USER" -- env "PATH=$home/.cargo/bin:$PATH" "HOME=$home" cargo)
  fi
  command -v "${cargo[0]}" >/dev/null || { say "cargo not found: install Rust (https://rustup.rs)"; exit 1; }
  say "building sendense-hub, sendense-node, sendense-console (debug)"
  (cd "$demo_root" && "${cargo[@]}" build -q --bin sendense-hub --bin sendense-node --bin sendense-console)
  bin=$(cd "$demo_root" && "${cargo[@]}" metadata --format-version 1 --no-deps |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug
}

# Stops every process the demo started, by PID (a background pipeline by its process group),
# SIGTERM first, SIGKILL after 10 s. The hub stops its own qemu-nbd children on SIGTERM.
demo_cleanup() {
  set +e
  [ ${#demo_pids[@]} -gt 0 ] || return 0
  say "stopping demo processes: ${demo_pids[*]}"
  for p in "${demo_pids[@]}"; do kill -TERM -- "$p" 2>/dev/null; done
  for _ in $(seq 1 50); do
    alive=0; for p in "${demo_pids[@]}"; do kill -0 -- "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break; sleep 0.2
  done
  for p in "${demo_pids[@]}"; do kill -KILL -- "$p" 2>/dev/null; done
  wait 2>/dev/null
  demo_pids=()
}

# Starts QEMU, the hub and the node (with a copy throttle of $1 bytes/s per disk, 0 = none)
# and waits until the hub lists the VM as the node's.
demo_stack() {
  local throttle=${1:-0}
  for a in "$hub_addr" "$node_addr"; do
    if (exec 3<>"/dev/tcp/${a%:*}/${a#*:}") 2>/dev/null; then
      say "something already listens on $a (another demo or a real hub/node?): stop it first"; exit 1
    fi
  done
  rm -rf "$demo"; mkdir -p "$demo"/{hub,node,vm}

  # Two disks with recognisable data: disk0 1 GiB with 192 MiB written, disk1 512 MiB with 96 MiB.
  say "creating the VM's disks"
  qemu-img create -q -f qcow2 "$demo/vm/disk0.qcow2" 1G
  qemu-img create -q -f qcow2 "$demo/vm/disk1.qcow2" 512M
  qemu-io -f qcow2 -c "write -P 0x11 0 64M" -c "write -P 0x12 256M 64M" -c "write -P 0x13 900M 64M" "$demo/vm/disk0.qcow2" >/dev/null
  qemu-io -f qcow2 -c "write -P 0x21 0 32M" -c "write -P 0x22 128M 64M" "$demo/vm/disk1.qcow2" >/dev/null

  say "starting QEMU (q35, TCG, paused: no guest OS needed) with two virtio disks"
  qemu-system-x86_64 -machine q35,accel=tcg -S -nodefaults -display none -m 64 -name "$vm" \
    -blockdev "driver=file,filename=$demo/vm/disk0.qcow2,node-name=file0" \
    -blockdev driver=qcow2,file=file0,node-name=fmt0 -device virtio-blk-pci,id=disk0,drive=fmt0 \
    -blockdev "driver=file,filename=$demo/vm/disk1.qcow2,node-name=file1" \
    -blockdev driver=qcow2,file=file1,node-name=fmt1 -device virtio-blk-pci,id=disk1,drive=fmt1 \
    -qmp "unix:$demo/vm/node.qmp,server=on,wait=off" -qmp "unix:$demo/vm/demo.qmp,server=on,wait=off" \
    </dev/null >"$demo/vm/qemu.log" 2>&1 &
  demo_pids+=($!)
  for _ in $(seq 1 100); do [ -S "$demo/vm/node.qmp" ] && break; sleep 0.1; done

  say "starting sendense-hub on $hub_addr"
  "$bin/sendense-hub" --listen "$hub_addr" --data-dir "$demo/hub" --token-file "$demo/token" \
    </dev/null >"$demo/hub/stderr.log" 2>&1 &
  demo_pids+=($!)
  for _ in $(seq 1 100); do [ -s "$demo/token" ] && curl -sf "http://$hub_addr/health" >/dev/null 2>&1 && break; sleep 0.2; done
  curl -sf "http://$hub_addr/health" >/dev/null || { say "hub did not come up:"; tail -20 "$demo/hub/stderr.log"; exit 1; }

  say "starting sendense-node on $node_addr (VM $vm over QMP$([ "$throttle" -gt 0 ] && echo ", copy throttled to $((throttle >> 20)) MiB/s per disk"))"
  # The run directory (fleecing files, NBD sockets, journal) has no flag: it is a config-file key.
  printf 'run_dir = "%s"\n' "$demo/node/run" >"$demo/node/node.toml"
  SENDENSE_COPY_THROTTLE_BPS=$throttle NO_COLOR=1 \
    "$bin/sendense-node" --config "$demo/node/node.toml" --listen "$node_addr" --name demo-node \
    --hub-url "http://$hub_addr" --token-file "$demo/token" --qmp "$vm=$demo/vm/node.qmp" \
    </dev/null >"$demo/node/stderr.log" 2>&1 &
  demo_pids+=($!)

  for _ in $(seq 1 150); do
    curl -sf -H "Authorization: Bearer $(cat "$demo/token")" "http://$hub_addr/api/v1/vms/$vm" 2>/dev/null | grep -q demo-node && return 0
    sleep 0.2
  done
  say "the node did not register VM $vm with the hub:"; tail -20 "$demo/node/stderr.log"; exit 1
}

console() { "$bin/sendense-console" --hub "http://$hub_addr" --token-file "$demo/token" "$@"; }

guest_writes() {
  say "guest writes into both disks (through QEMU, as the VM itself would)"
  python3 "$demo_root/scripts/qmp.py" "$demo/vm/demo.qmp" hmp "qemu-io -d /machine/peripheral/disk0/virtio-backend \"write -P 0x77 64M 16M\"" >/dev/null
  python3 "$demo_root/scripts/qmp.py" "$demo/vm/demo.qmp" hmp "qemu-io -d /machine/peripheral/disk1/virtio-backend \"write -P 0x78 0 8M\"" >/dev/null
}

# Runs a command line in the background in a process group of its own (so that cleanup stops
# the whole pipeline, not only its shell) and records the group.
demo_background() {
  set -m
  DEMO=$demo ROOT=$demo_root "$@" &
  demo_pids+=("-$!")
  set +m
}

demo_main() {
  local headless=0
  case "${1:-}" in
    --headless) headless=1 ;;
    "") ;;
    *) echo "usage: $0 [--headless]" >&2; exit 2 ;;
  esac
  if [ $headless = 0 ] && ! { [ -t 0 ] && [ -t 1 ]; }; then
    say "no terminal: running --headless"; headless=1
  fi
  trap demo_cleanup EXIT
  trap 'exit 130' INT TERM
  demo_build

  if [ $headless = 1 ]; then
    demo_stack "${SENDENSE_DEMO_THROTTLE_BPS:-0}"
    say "full backup of $vm"
    console backup start "$vm" --type full --wait
    guest_writes
    say "incremental backup of $vm"
    console backup start "$vm" --type incremental --wait
    say "backups:"
    console backups list
    say "the repository's QCOW2 images (disk key / backup id), newest chain per disk:"
    for d in "$demo/hub/repo/$vm"/*/; do
      newest=$(ls -t "$d"*.qcow2 | head -1)
      qemu-img info --backing-chain --output=json "$newest" | python3 -c '
import json, sys
for i, img in enumerate(json.load(sys.stdin)):
    print("  " + "  " * i + ("└ " if i else "") + img["filename"].split("/repo/")[-1],
          "· %.1f MiB on disk of %d MiB" % (img["actual-size"] / 2**20, img["virtual-size"] >> 20))'
    done
    say "logs: $demo/hub/stderr.log $demo/node/stderr.log"
  else
    demo_stack "${SENDENSE_DEMO_THROTTLE_BPS:-$((8 << 20))}"
    # The full backup is started now so that the console opens on a moving job; guest writes
    # and an incremental follow once the full one has completed.
    demo_background bash -c '
      c=("$@")
      "${c[@]}" backup start "$0" --type full --wait >"$DEMO/full.log" 2>&1 &&
      python3 "$ROOT/scripts/qmp.py" "$DEMO/vm/demo.qmp" hmp \
        "qemu-io -d /machine/peripheral/disk0/virtio-backend \"write -P 0x77 64M 16M\"" >/dev/null &&
      "${c[@]}" backup start "$0" --type incremental --wait >"$DEMO/incr.log" 2>&1' \
      "$vm" "$bin/sendense-console" --hub "http://$hub_addr" --token-file "$demo/token"
    # Wait for the job to exist so that the console's first screen shows it.
    for _ in $(seq 1 50); do console backups list --json 2>/dev/null | grep -q backup_id && break; sleep 0.1; done
    console
  fi
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  demo_main "$@"
fi
