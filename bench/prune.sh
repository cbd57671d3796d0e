#!/usr/bin/env bash
# Time of a prune that merges a full into its 1 GiB incremental (4 GiB full, keep-last 1: the
# full is committed into, then renamed over, the incremental, which becomes the chain's full)
# on the real hub (release build, POST /api/v1/prune until the job completes: qemu-img commit,
# `check -r leaks`, the read-back of the merged image against the incremental's checksums,
# rename, catalog, deletes), against `qemu-img commit -d -b FULL INC` alone on copies of the
# same two images. Each pair takes a new 1 GiB incremental on top of the previous merge, so
# every pair merges the same sizes; the order of the two timings swaps every pair. Prints each
# pair, the medians, the ratio and the load average (2 shared cores: read it with the load).
#
# Usage: bench/prune.sh [PAIRS]   (default 3)
#   BENCH_DIR: where the hub, its repository and the copies go (default: under /var/tmp).
set -euo pipefail

PAIRS=${1:-3}
FULL_MIB=4096
INC_MIB=1024
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
echo "building release sendense-hub..."
(cd "$ROOT" && cargo build --release -q -p agent-hub --bin sendense-hub)
HUB=$TARGET_DIR/release/sendense-hub
for tool in qemu-img qemu-io nbdcopy curl python3 bc; do
    command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 1; }
done

WORK=${BENCH_DIR:-$(mktemp -d /var/tmp/sendense-prune-bench.XXXXXX)}
mkdir -p "$WORK"
HUB_PID=
cleanup() {
    [[ -n $HUB_PID ]] && kill "$HUB_PID" 2>/dev/null && wait "$HUB_PID" 2>/dev/null
    [[ -z ${BENCH_DIR:-} ]] && rm -rf "$WORK"
    return 0
}
trap cleanup EXIT

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$HUB" --data-dir "$WORK/hub" --listen "127.0.0.1:$PORT" --nbd-ports 10300-10303 --nbd-tls false \
    2>"$WORK/hub.log" &
HUB_PID=$!
URL=http://127.0.0.1:$PORT/api/v1
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.1; done
TOKEN=$(cat "$WORK/hub/token")
api() { curl -sf -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' "$@"; }
field() { python3 -c "import json,sys; v=json.load(sys.stdin); print(eval(sys.argv[1]))" "$1"; }

wait_backup() {
    while :; do
        s=$(api "$URL/backups/$1" | field 'v["status"]')
        [[ $s == completed ]] && return
        [[ $s == failed || $s == cancelled ]] && { api "$URL/backups/$1/events" >&2; exit 1; }
        sleep 0.5
    done
}

# backup KIND -> id; the writer's data: the whole source for a full, 1 GiB at 1 GiB for an
# incremental (a different pattern each time).
n=0
backup() {
    local b id uri
    b=$(api -X POST "$URL/backups" -d "{\"vm_name\":\"bench\",\"repository_id\":\"default\",\"backup_type\":\"$1\"}")
    id=$(field 'v["backup_id"]' <<<"$b")
    uri=$(field 'v["nbd_targets_string"].split(":",1)[1]' <<<"$b")
    if [[ $1 == full ]]; then
        nbdcopy --destination-is-zero "$WORK/src.qcow2" "$uri" 2>/dev/null ||
            nbdcopy -- [ qemu-nbd -r -f qcow2 "$WORK/src.qcow2" ] "$uri"
    else
        n=$((n + 1))
        cmds=()
        for ((off = 0; off < INC_MIB; off += 64)); do
            cmds+=(-c "write -P $((n % 200 + 20)) $((1024 + off))M 64M")
        done
        qemu-io -f raw "${cmds[@]}" "$uri" >/dev/null
    fi
    api -X POST "$URL/backups/$id/complete" \
        -d '{"status":"completed","disks":[{"disk_key":2000,"status":"completed"}]}' >/dev/null
    wait_backup "$id"
    echo "$id"
}

qemu-img create -q -f qcow2 "$WORK/src.qcow2" "$((FULL_MIB * 2))M"
for ((off = 0; off < FULL_MIB; off += 256)); do
    qemu-io -f qcow2 -c "write -P $((off / 256 + 17)) ${off}M 256M" "$WORK/src.qcow2" >/dev/null
done
api -X POST "$URL/vms" -d "{\"vm_name\":\"bench\",\"node\":null,\"disks\":[{\"disk_key\":2000,\"unit_number\":0,\"size_bytes\":$((FULL_MIB * 2 << 20)),\"label\":\"d0\"}]}" >/dev/null
echo "full backup of ${FULL_MIB} MiB..."
full=$(backup full)

run_prune() {
    local s e id st
    s=$(date +%s.%N)
    id=$(api -X POST "$URL/prune" -d '{"vm_name":"bench","retention":{"keep_last":1}}' | field 'v["prune_id"]')
    while :; do
        st=$(api "$URL/prune/$id" | field 'v["status"]')
        [[ $st == completed ]] && break
        [[ $st == failed || $st == cancelled ]] && { api "$URL/prune/$id" >&2; exit 1; }
        sleep 0.05
    done
    e=$(date +%s.%N)
    echo "$e - $s" | bc -l
}

run_commit() {
    local s e
    s=$(date +%s.%N)
    qemu-img commit -q -d -b "$WORK/copy/$full.qcow2" "$WORK/copy/$inc.qcow2"
    e=$(date +%s.%N)
    echo "$e - $s" | bc -l
}

prunes=()
commits=()
img_dir=$WORK/hub/repo/bench/2000
for i in $(seq 1 "$PAIRS"); do
    inc=$(backup incremental)
    rm -rf "$WORK/copy" && mkdir "$WORK/copy"
    cp --sparse=always "$img_dir/$full.qcow2" "$img_dir/$inc.qcow2" "$WORK/copy/"
    sync
    if ((i % 2)); then
        p=$(run_prune)
        c=$(run_commit)
    else
        c=$(run_commit)
        p=$(run_prune)
    fi
    prunes+=("$p")
    commits+=("$c")
    printf 'pair %d: prune job %.3f s, qemu-img commit alone %.3f s\n' "$i" "$p" "$c"
    full=$inc
done
python3 - "${prunes[*]}" "${commits[*]}" <<'PY'
import os, statistics, sys
p = [float(x) for x in sys.argv[1].split()]
c = [float(x) for x in sys.argv[2].split()]
mp, mc = statistics.median(p), statistics.median(c)
print(f"merge of a 1 GiB incremental into a 4 GiB full: prune job median {mp:.3f} s "
      f"(range {min(p):.3f}-{max(p):.3f}); qemu-img commit alone median {mc:.3f} s "
      f"(range {min(c):.3f}-{max(c):.3f})")
print(f"ratio prune / commit: {mp / mc:.2f}; load average {os.getloadavg()}")
PY
