#!/usr/bin/env bash
# Live demo: a hub, a node, a real QEMU VM with two disks holding data and a VMware vSphere VM
# with two disks (govmomi's vCenter simulator, started by the tests' launcher), then the console.
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
# The vSphere VM needs Go and govmomi (Debian's golang-go, golang-github-vmware-govmomi-dev,
# installed by scripts/setup.sh): the launcher in tests/vcsim is built in GOPATH mode into the
# cargo target directory. If it cannot be built or started, the demo says why and goes on with the
# QEMU VM alone.
#
# Other scripts (scripts/screenshots.sh) source this file to get the same stack: sourcing defines
# the demo_* functions and runs nothing.
set -euo pipefail

demo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
demo=${SENDENSE_DEMO_DIR:-/tmp/sendense-demo}
hub_addr=127.0.0.1:8082
node_addr=127.0.0.1:8081
vm=demo-vm
vsphere_vm=demo-vsphere
vsphere_user=backup@vsphere.local
# Set by demo_vsphere_start once the simulator serves: its directory and control endpoint.
vsphere=""
vsphere_control=""
demo_pids=()
# The prefix that runs a build as the user who ran sudo (see demo_build); empty otherwise.
demo_as_user=()

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
    # The same user (and PATH) builds the vSphere simulator's launcher with Go.
    if [ "${cargo[0]}" = runuser ]; then demo_as_user=("${cargo[@]:0:7}"); fi
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

# The vSphere VM: govmomi's vCenter simulator, started by the tests' launcher (tests/vcsim, see
# tests/src/vcsim.rs), which makes snapshots, changed block tracking and the datastore's HTTPS
# file access behave like vSphere's. Any failure here leaves the demo with its QEMU VM only.

# Builds the launcher with the go build line the tests use (GOPATH mode, Debian's govmomi) into
# the cargo target directory; sets $launcher, or prints why it cannot and returns 1.
demo_vsphere_build() {
  launcher=""
  if ! command -v go >/dev/null; then
    say "no vSphere VM in this demo: go is not installed (Debian package golang-go)"; return 1
  fi
  if [ ! -d /usr/share/gocode/src/github.com/vmware/govmomi/simulator ]; then
    say "no vSphere VM in this demo: govmomi's simulator is not installed (golang-github-vmware-govmomi-dev)"; return 1
  fi
  local out
  out=$(dirname "$bin")/vcsim
  "${demo_as_user[@]}" mkdir -p "$out"
  say "building the vSphere simulator's launcher (tests/vcsim, go build in GOPATH mode)"
  if ! (cd "$demo_root/tests/vcsim" &&
    "${demo_as_user[@]}" env GO111MODULE=off GOPATH=/usr/share/gocode GOCACHE="$out/gocache" GOFLAGS= \
      go build -o "$out/demo-vcsim-launcher.tmp" .) >"$demo/vsphere-build.log" 2>&1; then
    say "no vSphere VM in this demo: go build of tests/vcsim failed ($demo/vsphere-build.log):"
    tail -5 "$demo/vsphere-build.log" >&2
    return 1
  fi
  mv -f "$out/demo-vcsim-launcher.tmp" "$out/demo-vcsim-launcher"
  launcher=$out/demo-vcsim-launcher
}

# Prints field $1 of the launcher's ready file (a dotted path, e.g. vm.moref).
vsphere_ready() {
  python3 -c '
import functools, json, sys
print(functools.reduce(lambda v, k: v[k], sys.argv[2].split("."), json.load(open(sys.argv[1]))))' \
    "$vsphere/ready.json" "$1"
}

# Writes $3 MiB of byte $4 at MiB $2 into disk $1 of the vSphere VM, as its guest would.
vsphere_write() { python3 "$demo_root/scripts/vsphere_disk.py" "$vsphere_control" "$vsphere_vm" "$@"; }

vsphere_guest_writes() {
  say "guest writes into both disks of $vsphere_vm (into the files that took over at the snapshot)"
  vsphere_write 2000 40 8 0x57
  vsphere_write 2001 100 4 0x58
}

# Starts the simulator on 127.0.0.1 with the 2-disk VM $vsphere_vm, fills its disks with
# recognisable data and sets $vsphere and $vsphere_control; returns 1 (having said why) if not.
demo_vsphere_start() {
  demo_vsphere_build || return 1
  local d=$demo/vsphere
  mkdir -p "$d"
  (umask 077 && head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$d/password")
  say "starting the vSphere simulator (vCenter 6.5 API) with VM $vsphere_vm: 2 disks, 256 MiB + 128 MiB"
  # Its stdin is a pipe from a tail that lives as long as this shell: the launcher exits on EOF,
  # so even a demo killed with SIGKILL does not leave it behind. Its own process group (the
  # launcher is its leader), so that cleanup stops tail and launcher together.
  set -m
  bash -c 'exec "$@" < <(exec tail --pid="$0" -f /dev/null)' "$$" "$launcher" -listen 127.0.0.1:0 \
    -dir "$d/datastore" -ready "$d/ready.json" -user "$vsphere_user" -password-file "$d/password" \
    -disks 256M,128M -vm "$vsphere_vm" </dev/null >"$d/launcher.log" 2>&1 &
  local pgid=$!
  demo_pids+=("-$pgid")
  set +m
  for _ in $(seq 1 300); do
    [ -s "$d/ready.json" ] && break
    kill -0 "$pgid" 2>/dev/null || break
    sleep 0.1
  done
  if [ ! -s "$d/ready.json" ]; then
    say "no vSphere VM in this demo: the simulator did not come up ($d/launcher.log):"
    tail -5 "$d/launcher.log" >&2
    kill -TERM -- "-$pgid" 2>/dev/null
    return 1
  fi
  vsphere=$d
  vsphere_control=$(vsphere_ready control_url)
  # Recognisable data: disk 2000 48 MiB in three runs, disk 2001 24 MiB in two.
  if ! { vsphere_write 2000 0 16 0x31 && vsphere_write 2000 96 16 0x32 &&
    vsphere_write 2000 200 16 0x33 && vsphere_write 2001 0 8 0x41 && vsphere_write 2001 64 16 0x42; }; then
    say "no vSphere VM in this demo: writing into its disks failed"; vsphere=""; return 1
  fi
}

# The node's [vsphere] table: the simulator's URL, the user, the password file (0600) and its
# certificate as the CA file; only the demo's VM.
vsphere_node_config() {
  cat <<TOML

[vsphere]
url = "$(vsphere_ready url)"
user = "$vsphere_user"
password_file = "$vsphere/password"
ca_file = "$(vsphere_ready cert_pem)"
vms = ["$vsphere_vm"]
TOML
}

# Turns CBT on through the node (so that a second backup can be incremental) and has the hub
# import the node's inventory again, so that it knows the VM tracks changes.
vsphere_enable_cbt() {
  local token
  token=$(cat "$demo/token")
  for _ in $(seq 1 150); do
    curl -sf -H "Authorization: Bearer $token" "http://$hub_addr/api/v1/vms/$vsphere_vm" 2>/dev/null | grep -q demo-node && break
    sleep 0.2
  done
  say "enabling changed block tracking on $vsphere_vm (POST node /api/v1/vms/$vsphere_vm/change-tracking)"
  # The node's API takes the node's own credential (the one the hub calls it with).
  if ! curl -sS -f -X POST -H "Authorization: Bearer $(cat "$demo/node.credential")" \
    "http://$node_addr/api/v1/vms/$vsphere_vm/change-tracking" >"$vsphere/cbt.json" 2>&1; then
    say "no vSphere VM in this demo: enabling CBT failed: $(cat "$vsphere/cbt.json")"; tail -5 "$demo/node/stderr.log" >&2
    vsphere=""; return 1
  fi
  curl -sf -X POST -H "Authorization: Bearer $token" "http://$hub_addr/api/v1/nodes/demo-node/discover" >/dev/null
  for _ in $(seq 1 50); do
    curl -sf -H "Authorization: Bearer $token" "http://$hub_addr/api/v1/vms/$vsphere_vm" 2>/dev/null |
      grep -q '"change_tracking":true' && return 0
    sleep 0.2
  done
  say "no vSphere VM in this demo: the hub does not list $vsphere_vm with CBT on"; vsphere=""; return 1
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

  demo_vsphere_start || true

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

  # The node gets its own credential (never the hub's admin token), issued by the hub.
  "$bin/sendense-hub" --data-dir "$demo/hub" node enroll demo-node --output "$demo/node.credential" \
    >"$demo/hub/enroll.log" 2>&1 || { say "enrolling the node failed:"; cat "$demo/hub/enroll.log"; exit 1; }

  say "starting sendense-node on $node_addr (VM $vm over QMP$([ -n "$vsphere" ] && echo ", VM $vsphere_vm over vSphere SOAP")$([ "$throttle" -gt 0 ] && echo ", copy throttled to $((throttle >> 20)) MiB/s per disk"))"
  # The run directory (fleecing files, NBD sockets, journal) has no flag: it is a config-file key.
  printf 'run_dir = "%s"\n' "$demo/node/run" >"$demo/node/node.toml"
  [ -z "$vsphere" ] || vsphere_node_config >>"$demo/node/node.toml"
  SENDENSE_COPY_THROTTLE_BPS=$throttle NO_COLOR=1 \
    "$bin/sendense-node" --config "$demo/node/node.toml" --listen "$node_addr" --name demo-node \
    --hub-url "http://$hub_addr" --token-file "$demo/node.credential" --qmp "$vm=$demo/vm/node.qmp" \
    </dev/null >"$demo/node/stderr.log" 2>&1 &
  demo_pids+=($!)

  for _ in $(seq 1 150); do
    if curl -sf -H "Authorization: Bearer $(cat "$demo/token")" "http://$hub_addr/api/v1/vms/$vm" 2>/dev/null | grep -q demo-node; then
      [ -z "$vsphere" ] || vsphere_enable_cbt || true
      return 0
    fi
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
  DEMO=$demo ROOT=$demo_root CONTROL=$vsphere_control "$@" &
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
    if [ -n "$vsphere" ]; then
      say "full backup of $vsphere_vm (vSphere: one snapshot, disks read through nbdkit over HTTPS, CBT on)"
      console backup start "$vsphere_vm" --type full --wait
      vsphere_guest_writes
      say "incremental backup of $vsphere_vm (only the areas CBT names since the full backup's change ids)"
      console backup start "$vsphere_vm" --type incremental --wait
    fi
    say "backups:"
    console backups list
    if [ -n "$vsphere" ]; then
      say "$vsphere_vm: bytes written and change id per disk (the incremental asked CBT from the full one's)"
      console backups list --json | python3 -c '
import json, sys
for b in reversed([b for b in json.load(sys.stdin) if b["vm_name"] == sys.argv[1]]):
    print("  %s %-11s %-9s %6.1f MiB written" % (b["backup_id"][:8], b["backup_type"], b["status"], (b.get("bytes_transferred") or 0) / 2**20))
    for d in b.get("disk_results", []):
        print("    disk %s: change id %s" % (d["disk_key"], d.get("change_id") or "-"))' "$vsphere_vm"
    fi
    say "the repository's QCOW2 images (disk key / backup id), newest chain per disk:"
    for d in "$demo/hub/repo/$vm"/*/ ${vsphere:+"$demo/hub/repo/$vsphere_vm"/*/}; do
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
    # The vSphere VM's full backup runs next to it, then guest writes and a CBT incremental.
    if [ -n "$vsphere" ]; then
      demo_background bash -c '
        c=("$@")
        "${c[@]}" backup start "$0" --type full --wait >"$DEMO/vsphere-full.log" 2>&1 &&
        python3 "$ROOT/scripts/vsphere_disk.py" "$CONTROL" "$0" 2000 40 8 0x57 &&
        "${c[@]}" backup start "$0" --type incremental --wait >"$DEMO/vsphere-incr.log" 2>&1' \
        "$vsphere_vm" "$bin/sendense-console" --hub "http://$hub_addr" --token-file "$demo/token"
    fi
    # Wait for the job to exist so that the console's first screen shows it.
    for _ in $(seq 1 50); do console backups list --json 2>/dev/null | grep -q backup_id && break; sleep 0.1; done
    console
  fi
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  demo_main "$@"
fi
