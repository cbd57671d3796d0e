#!/usr/bin/env bash
# Live demo: a hub, a node and a real QEMU VM with two disks holding data, then the console.
#
#   sudo ./scripts/demo.sh              # ends in the console (TUI), a full backup already moving
#   sudo ./scripts/demo.sh --headless   # no TUI: full backup, guest writes, incremental, results
#
# Everything runs on 127.0.0.1 (hub :8082, node :8081, NBD 10100-10200) under $SENDENSE_DEMO_DIR
# (default /tmp/sendense-demo, recreated each run). Every process the demo starts is stopped by
# PID when it exits. Needs root for package installation only.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

headless=0
[ "${1:-}" = "--headless" ] && headless=1
[ -t 0 ] && [ -t 1 ] || headless=1

demo=${SENDENSE_DEMO_DIR:-/tmp/sendense-demo}
hub_addr=127.0.0.1:8082
node_addr=127.0.0.1:8081
vm=demo-vm

say() { printf '\033[1m[demo]\033[0m %s\n' "$*" >&2; }

bash scripts/setup.sh packages
say "building sendense-hub, sendense-node, sendense-console (debug)"
cargo build -q -p agent-hub -p agent-node -p console
bin=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug

for a in "$hub_addr" "$node_addr"; do
  if (exec 3<>"/dev/tcp/${a%:*}/${a#*:}") 2>/dev/null; then
    say "something already listens on $a (another demo or a real hub/node?): stop it first"; exit 1
  fi
done

rm -rf "$demo"; mkdir -p "$demo"/{hub,node,vm}
pids=()
cleanup() {
  set +e
  say "stopping demo processes: ${pids[*]}"
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for _ in $(seq 1 50); do
    alive=0; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break; sleep 0.2
  done
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null; done
  wait 2>/dev/null
}
trap cleanup EXIT INT TERM

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
pids+=($!)
for _ in $(seq 1 100); do [ -S "$demo/vm/node.qmp" ] && break; sleep 0.1; done

say "starting sendense-hub on $hub_addr"
"$bin/sendense-hub" --listen "$hub_addr" --data-dir "$demo/hub" --token-file "$demo/token" \
  >"$demo/hub/stderr.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do [ -s "$demo/token" ] && curl -sf "http://$hub_addr/health" >/dev/null 2>&1 && break; sleep 0.2; done
curl -sf "http://$hub_addr/health" >/dev/null || { say "hub did not come up:"; tail -20 "$demo/hub/stderr.log"; exit 1; }

say "starting sendense-node on $node_addr (VM $vm over QMP)"
"$bin/sendense-node" --listen "$node_addr" --name demo-node --hub-url "http://$hub_addr" \
  --token-file "$demo/token" --qmp "$vm=$demo/vm/node.qmp" --run-dir "$demo/node" \
  >"$demo/node/stderr.log" 2>&1 &
pids+=($!)

console() { "$bin/sendense-console" --hub "http://$hub_addr" --token-file "$demo/token" "$@"; }
for _ in $(seq 1 100); do
  curl -sf -H "Authorization: Bearer $(cat "$demo/token")" "http://$hub_addr/api/v1/vms/$vm" 2>/dev/null | grep -q demo-node && break
  sleep 0.2
done

guest_writes() {
  say "guest writes into both disks (through QEMU, as the VM itself would)"
  python3 scripts/qmp.py "$demo/vm/demo.qmp" hmp "qemu-io -d /machine/peripheral/disk0/virtio-backend \"write -P 0x77 64M 16M\"" >/dev/null
  python3 scripts/qmp.py "$demo/vm/demo.qmp" hmp "qemu-io -d /machine/peripheral/disk1/virtio-backend \"write -P 0x78 0 8M\"" >/dev/null
}

if [ $headless = 1 ]; then
  say "full backup of $vm"
  console backup start "$vm" --type full --wait
  guest_writes
  say "incremental backup of $vm"
  console backup start "$vm" --type incremental --wait
  say "backups:"
  console backups list
  say "the repository's QCOW2 chains:"
  find "$demo/hub/repo" -name '*.qcow2' | sort | while read -r f; do
    echo "  $f"; qemu-img info --backing-chain "$f" | grep -E '^(image|backing file|disk size):' | sed 's/^/    /'
  done
  say "logs: $demo/hub/stderr.log $demo/node/stderr.log"
else
  # The full backup is started now so that the console opens on a moving job; an incremental
  # follows in the background once the full one has completed.
  (
    console backup start "$vm" --type full --wait >"$demo/full.log" 2>&1 && guest_writes 2>/dev/null &&
      console backup start "$vm" --type incremental --wait >"$demo/incr.log" 2>&1
  ) &
  pids+=($!)
  console
fi
