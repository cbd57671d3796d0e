#!/usr/bin/env bash
# Benchmark of a whole node backup: a QEMU VM (TCG, paused) with one disk of SIZE holding DATA
# bytes of non-zero data; `sendense-node` takes the fleecing snapshot and copies the disk into a
# fresh qcow2 behind qemu-nbd. For reference, in the same run, `nbdcopy --destination-is-zero`
# copies the same image (read through `qemu-nbd -r` with
# file locking off: QEMU holds the lock, and the paused VM writes nothing) into another fresh qcow2 behind qemu-nbd.
# Prints seconds and throughput of each pair and the median ratio node/nbdcopy.
#
#   agent-node/bench/backup.sh [RUNS] [SIZE] [DATA]      (defaults: 3 4G 1G)
#
# Uses target/release/sendense-node (builds it when missing; set CARGO_TARGET_DIR as usual).
# Everything listens on 127.0.0.1 with free ports; every process it starts is killed by PID.
set -euo pipefail
RUNS=${1:-3}
SIZE=${2:-4G}
DATA=${3:-1G}
root=$(cd "$(dirname "$0")/../.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$root/target}
node_bin=$target_dir/release/sendense-node
[ -x "$node_bin" ] || (cd "$root" && cargo build --release -p agent-node >&2)

work=$(mktemp -d /tmp/sendense-bench-XXXXXX)
pids=()
cleanup() {
  # RUST_LOG=info shows the node's own timing of each step.
  [ "${RUST_LOG:-warn}" = warn ] || grep -E "snapshot taken|disk copied|backup (starts|ends)" "$work/node.log" >&2 || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; return 1; }
now() { date +%s.%N; }

# Source: DATA bytes of pattern data in 64 MiB runs with 64 MiB holes between them.
src=$work/src.qcow2
qemu-img create -q -f qcow2 "$src" "$SIZE"
data_bytes=$(numfmt --from=iec "$DATA")
chunk=$((64 * 1024 * 1024))
off=0; written=0
while [ "$written" -lt "$data_bytes" ]; do
  qemu-io -f qcow2 -c "write -P 0x5a $off $chunk" "$src" >/dev/null
  off=$((off + 2 * chunk)); written=$((written + chunk))
done

qemu-system-x86_64 -machine q35,accel=tcg -S -nodefaults -display none -m 64 \
  -blockdev driver=file,filename="$src",node-name=file0 \
  -blockdev driver=qcow2,file=file0,node-name=fmt0 \
  -device virtio-blk-pci,id=disk0,drive=fmt0 \
  -qmp unix:"$work/node.qmp",server=on,wait=off &
pids+=($!)
for _ in $(seq 1 100); do [ -S "$work/node.qmp" ] && break; sleep 0.05; done

echo bench-token > "$work/token"
printf 'run_dir = "%s/run"\n' "$work" > "$work/node.toml"
node_port=$(free_port)
RUST_LOG=${RUST_LOG:-warn} "$node_bin" --config "$work/node.toml" --listen 127.0.0.1:"$node_port" \
  --name bench --token-file "$work/token" --qmp vm1="$work/node.qmp" 2>"$work/node.log" &
pids+=($!)
wait_port "$node_port"
api=http://127.0.0.1:$node_port/api/v1

# qemu-nbd serving a fresh target image; prints "PID PORT".
serve_target() {
  local img=$1 port
  qemu-img create -q -f qcow2 "$img" "$SIZE"
  port=$(free_port)
  qemu-nbd -f qcow2 -x t -b 127.0.0.1 -p "$port" -t --shared=8 --discard=unmap \
    --detect-zeroes=unmap --cache=none --aio=threads "$img" &
  echo "$! $port"
}

node_times=(); nbdcopy_times=()
for run in $(seq 1 "$RUNS"); do
  read -r tpid tport < <(serve_target "$work/t-node-$run.qcow2"); pids+=("$tpid")
  wait_port "$tport"
  t0=$(now)
  curl -sf -H 'Authorization: Bearer bench-token' -H 'content-type: application/json' \
    -X POST "$api/backup/start" \
    -d "{\"backup_id\":\"bench-$run\",\"vm_name\":\"vm1\",\"backup_type\":\"full\",\"nbd_targets\":\"2000:nbd://127.0.0.1:$tport/t\"}" >/dev/null
  while :; do
    st=$(curl -sf -H 'Authorization: Bearer bench-token' "$api/backup/bench-$run" | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])')
    case $st in completed) break;; failed|cancelled) echo "node backup $st" >&2; cat "$work/node.log" >&2; exit 1;; esac
    sleep 0.02
  done
  t1=$(now)
  kill "$tpid"; wait "$tpid" 2>/dev/null || true
  node_times+=("$(echo "$t1 - $t0" | bc)")

  read -r tpid tport < <(serve_target "$work/t-nbdcopy-$run.qcow2"); pids+=("$tpid")
  wait_port "$tport"
  t0=$(now)
  nbdcopy --destination-is-zero -- [ qemu-nbd -r --image-opts "driver=qcow2,file.driver=file,file.filename=$src,file.locking=off" ] "nbd://127.0.0.1:$tport/t"
  t1=$(now)
  kill "$tpid"; wait "$tpid" 2>/dev/null || true
  nbdcopy_times+=("$(echo "$t1 - $t0" | bc)")
  printf 'run %d: node backup %.2f s (%.0f MiB/s)   nbdcopy %.2f s (%.0f MiB/s)\n' "$run" \
    "${node_times[-1]}" "$(echo "$data_bytes / 1048576 / ${node_times[-1]}" | bc -l)" \
    "${nbdcopy_times[-1]}" "$(echo "$data_bytes / 1048576 / ${nbdcopy_times[-1]}" | bc -l)"
  rm -f "$work"/t-*.qcow2
done

ratios=$(for i in $(seq 0 $((RUNS - 1))); do echo "${node_times[$i]} / ${nbdcopy_times[$i]}" | bc -l; done | sort -n)
median=$(echo "$ratios" | sed -n "$(( (RUNS + 1) / 2 ))p")
printf 'disk %s with %s data, %d runs: median time ratio node/nbdcopy = %.2f (below 1: node faster)\n' \
  "$SIZE" "$DATA" "$RUNS" "$median"
