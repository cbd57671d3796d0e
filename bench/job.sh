#!/usr/bin/env bash
# Job overhead: a whole backup job against the raw parallel copy of the same disks.
#
# A real stack on 127.0.0.1: a paused QEMU (TCG, no guest OS) with two qcow2 disks holding random
# data, `sendense-hub` (SQLite, its own NBD port range) and `sendense-node` (QMP to that QEMU).
# Pairs alternate (the order swaps every pair):
#   job: POST /api/v1/backups (full) -> the job polled every 10 ms until `completed` (fleecing
#        snapshot, per-disk qemu-nbd, the node's copy, FLUSH and stop, the whole-disk read-back
#        of every cell, qemu-img check, the catalog): the time a user waits.
#   raw: `sendense-node copy --destination-is-zero` of both disks at once (read through
#        `qemu-nbd -r` with file locking off: the paused VM writes nothing) into fresh qcow2
#        targets (the hub's cluster size) behind qemu-nbd with the hub's own options (--shared=8
#        --cache=none --aio=threads --discard=unmap --detect-zeroes=unmap, and the hub's default
#        TLS: x509 with verify-peer and an authz-list, bench/lib-nbd-tls.sh): the copy alone.
# Prints every run, the job's phases (from its event log: prepare = POST to exports ready, copy =
# to the node's completion report, stop = FLUSH and writable qemu-nbd stopped, verify = read-back
# and qemu-img check, catalog = to `completed`), medians, ranges, the ratio job/raw and the load
# average.
#
# Usage: bench/job.sh [RUNS] [SIZE] [DATA]   (defaults: 5 pairs, 4G disks, 1G of data per disk)
#   BENCH_DIR: work directory (default: a new one under /var/tmp); needs about
#              (RUNS + 2) x 2 x DATA of space (every job's point stays until the end).
#   CARGO_TARGET_DIR: as for cargo (default: target).
#   BENCH_TLS=plain: both without NBD TLS (the hub with --nbd-tls false); default tls.
#   JOB_EVENTS=1: print every job's event log (seconds since the POST) on stderr.
#   SENDENSE_BIN: a directory with sendense-hub and sendense-node to use instead of building.
# Every process it starts is stopped by PID; its directory is removed at the end.
set -euo pipefail

RUNS=${1:-5}
SIZE=${2:-4G}
DATA=${3:-1G}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
if [[ -n ${SENDENSE_BIN:-} ]]; then
    BIN=$SENDENSE_BIN # a directory holding both binaries, used as they are
else
    echo "building release sendense-hub and sendense-node..."
    (cd "$ROOT" && cargo build --release -q -p agent-hub -p agent-node --bins)
    BIN=$TARGET_DIR/release
fi

# shellcheck source=bench/lib-copy.sh
source "$ROOT/bench/lib-copy.sh"
bench_need qemu-img qemu-nbd qemu-system-x86_64 curl python3 openssl
bench_workdir job-bench
bytes() { numfmt --from=iec "$1"; }

size_b=$(bytes "$SIZE")
data_b=$(bytes "$DATA")
piece=$((64 << 20))
pieces=$((data_b / piece))
((pieces > 0)) || { echo "DATA must be at least 64M" >&2; exit 1; }
stride=$((size_b / pieces / piece * piece))
((stride >= piece)) || { echo "DATA does not fit in SIZE" >&2; exit 1; }

# Two disks: DATA of random bytes in 64 MiB pieces spread over SIZE, the rest holes.
echo "work dir: $WORK"
echo "making 2 disks of $SIZE with $DATA of random data each ($pieces x 64 MiB, $((stride >> 20)) MiB apart)..."
mkdir -p "$WORK/vm"
for d in 0 1; do
    raw=$WORK/vm/disk$d.raw
    truncate -s "$size_b" "$raw"
    for i in $(seq 0 $((pieces - 1))); do
        head -c "$piece" /dev/urandom |
            dd of="$raw" bs=1M seek=$((i * stride >> 20)) conv=notrunc status=none
    done
    qemu-img convert -q -f raw -O qcow2 "$raw" "$WORK/vm/disk$d.qcow2"
    rm -f "$raw"
done

# shellcheck source=bench/lib-nbd-tls.sh
. "$ROOT/bench/lib-nbd-tls.sh"
TLS_MODE=${BENCH_TLS:-tls}
if [[ $TLS_MODE == tls ]]; then
    DIR=$WORK/tls
    mkdir -m 700 "$DIR"
    nbd_tls_certs
    HUB_TLS=true
else
    DIR=$WORK
    HUB_TLS=false
fi
nbd_tls_args "$TLS_MODE"

VM=bench-vm
qemu-system-x86_64 -machine q35,accel=tcg -S -nodefaults -display none -m 64 -name "$VM" \
    -blockdev "driver=file,filename=$WORK/vm/disk0.qcow2,node-name=file0" \
    -blockdev driver=qcow2,file=file0,node-name=fmt0 -device virtio-blk-pci,id=disk0,drive=fmt0 \
    -blockdev "driver=file,filename=$WORK/vm/disk1.qcow2,node-name=file1" \
    -blockdev driver=qcow2,file=file1,node-name=fmt1 -device virtio-blk-pci,id=disk1,drive=fmt1 \
    -qmp "unix:$WORK/vm/node.qmp,server=on,wait=off" </dev/null >"$WORK/vm/qemu.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do [[ -S $WORK/vm/node.qmp ]] && break; sleep 0.05; done

# An NBD range of 8 free ports of our own (other hubs on this machine use 10100-10200).
while :; do
    first=$((20000 + RANDOM % 20000))
    ok=1
    for p in $(seq "$first" $((first + 7))); do
        (exec 3<>/dev/tcp/127.0.0.1/"$p") 2>/dev/null && ok=0
    done
    ((ok)) && break
done
hub_port=$(free_port)
node_port=$(free_port)
while [[ $node_port == "$hub_port" ]]; do node_port=$(free_port); done
HUB=http://127.0.0.1:$hub_port
mkdir -p "$WORK/hub" "$WORK/node"
RUST_LOG=${RUST_LOG:-info} "$BIN/sendense-hub" --listen "127.0.0.1:$hub_port" --data-dir "$WORK/hub" \
    --token-file "$WORK/token" --nbd-ports "$first-$((first + 7))" --nbd-tls "$HUB_TLS" \
    </dev/null >"$WORK/hub/stderr.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 200); do
    [[ -s $WORK/token ]] && curl -sf "$HUB/health" >/dev/null 2>&1 && break
    sleep 0.1
done
curl -sf "$HUB/health" >/dev/null || { echo "hub did not come up:" >&2; tail -20 "$WORK/hub/stderr.log" >&2; exit 1; }
"$BIN/sendense-hub" --data-dir "$WORK/hub" node enroll bench-node --output "$WORK/node.credential" \
    >"$WORK/hub/enroll.log" 2>&1 || { cat "$WORK/hub/enroll.log" >&2; exit 1; }
printf 'run_dir = "%s"\n' "$WORK/node/run" >"$WORK/node/node.toml"
RUST_LOG=${RUST_LOG:-info} NO_COLOR=1 "$BIN/sendense-node" --config "$WORK/node/node.toml" \
    --listen "127.0.0.1:$node_port" --name bench-node --hub-url "$HUB" \
    --token-file "$WORK/node.credential" --qmp "$VM=$WORK/vm/node.qmp" \
    </dev/null >"$WORK/node/stderr.log" 2>&1 &
PIDS+=($!)
AUTH=(-H "Authorization: Bearer $(cat "$WORK/token")")
for _ in $(seq 300); do
    curl -sf "${AUTH[@]}" "$HUB/api/v1/vms/$VM" 2>/dev/null | grep -q bench-node && break
    sleep 0.1
done
curl -sf "${AUTH[@]}" "$HUB/api/v1/vms/$VM" | grep -q bench-node ||
    { echo "the node did not register $VM:" >&2; tail -20 "$WORK/node/stderr.log" >&2; exit 1; }

# One job, POST -> completed; prints "SECONDS<TAB>phases".
run_job() {
    BENCH_LIB=$ROOT/bench python3 - "$HUB" "$WORK/token" "$VM" <<'EOF'
import datetime, os, sys, time
sys.path.insert(0, os.environ["BENCH_LIB"])
from hubapi import Hub
hub, token_file, vm = sys.argv[1], sys.argv[2], sys.argv[3]
call = Hub(hub, token_file).call
t0 = time.time()
b = call("POST", "/api/v1/backups",
         {"vm_name": vm, "repository_id": "default", "backup_type": "full"})
bid = b["backup_id"]
while True:
    b = call("GET", f"/api/v1/backups/{bid}")
    if b["status"] in ("completed", "failed", "cancelled"):
        break
    time.sleep(0.01)
t1 = time.time()
if b["status"] != "completed":
    sys.exit(f"job {bid} ended {b['status']}: {b.get('error_message')}")
ev = call("GET", f"/api/v1/backups/{bid}/events")
ev = ev if isinstance(ev, list) else ev.get("events", [])
def at(e):
    return datetime.datetime.fromisoformat(e["at"].replace("Z", "+00:00")).timestamp()
def last(step):
    ts = [at(e) for e in ev if e["step"] == step]
    return max(ts) if ts else None
def first(step):
    ts = [at(e) for e in ev if e["step"] == step]
    return min(ts) if ts else None
# Phase ends, in the order the job passes them (a missing step takes the previous end).
# The read-back and `qemu-img check` may run side by side: "verify" ends with the later of them.
ends = [t for t in (last("image_verified"), last("image_checked")) if t is not None]
marks = [("prepare", first("running")), ("copy", first("finalizing")),
         ("stop", last("qemu_nbd_stopped")), ("verify", max(ends) if ends else None),
         ("catalog", t1)]
prev, out = t0, []
for name, t in marks:
    t = prev if t is None else t
    out.append(f"{name} {t - prev:.2f}")
    prev = t
print(f"{t1 - t0:.3f}\t{' '.join(out)}")
if os.environ.get("JOB_EVENTS"):
    for e in ev:
        print(f"  {at(e) - t0:7.3f} {e['step']:<20} {e['message'][:150]}", file=sys.stderr)
EOF
}

# The raw peer: both disks copied at once into fresh targets; prints seconds. A subshell, with
# its own EXIT trap for its own qemu-nbd.
run_raw() (
    local pids=() ports=() d sp tp t0 t1 ok=1
    trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' EXIT
    for d in 0 1; do
        rm -f "$WORK/raw$d.qcow2"
        qemu-img create -q -f qcow2 -o cluster_size=65536 "$WORK/raw$d.qcow2" "$size_b"
        sp=$(free_port)
        qemu-nbd --read-only --export-name=src --bind=127.0.0.1 --port="$sp" --persistent --shared=8 \
            --image-opts "driver=qcow2,file.driver=file,file.filename=$WORK/vm/disk$d.qcow2,file.locking=off" \
            2>>"$WORK/qemu-nbd.log" &
        pids+=($!)
        tp=$(free_port)
        while [[ $tp == "$sp" ]]; do tp=$(free_port); done
        qemu-nbd --format=qcow2 --export-name=dst --bind=127.0.0.1 --port="$tp" --persistent \
            --shared=8 --discard=unmap --detect-zeroes=unmap --cache=none --aio=threads \
            "${NBD_TLS_ARGS[@]}" "$WORK/raw$d.qcow2" 2>>"$WORK/qemu-nbd.log" &
        pids+=($!)
        ports+=("$sp" "$tp")
    done
    for p in "${ports[@]}"; do wait_port "$p"; done
    t0=$(date +%s.%N)
    local copies=()
    for d in 0 1; do
        "$BIN/sendense-node" copy --from "nbd://127.0.0.1:${ports[$((2 * d))]}/src" \
            --to "nbd://127.0.0.1:${ports[$((2 * d + 1))]}/dst" --destination-is-zero "${COPY_TLS_ARGS[@]}" \
            >"$WORK/raw$d.out" 2>&1 &
        copies+=($!)
    done
    for c in "${copies[@]}"; do wait "$c" || ok=0; done
    t1=$(date +%s.%N)
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    if ((!ok)); then
        echo "raw copy failed:" >&2
        cat "$WORK"/raw?.out >&2
        exit 1
    fi
    python3 -c "print(f'{$t1 - $t0:.3f}')"
)

echo "NBD TLS on the targets: $TLS_MODE (job and raw alike)"
echo "warm-up (one of each, not counted)..."
run_job >/dev/null
run_raw >/dev/null
for d in 0 1; do
    qemu-img compare -q -U -f qcow2 -F qcow2 "$WORK/vm/disk$d.qcow2" "$WORK/raw$d.qcow2" ||
        { echo "raw copy of disk $d differs from its source" >&2; exit 1; }
done

jobs_t=()
raws_t=()
loads=()
for i in $(seq 1 "$RUNS"); do
    if ((i % 2)); then
        j=$(run_job)
        r=$(run_raw)
    else
        r=$(run_raw)
        j=$(run_job)
    fi
    jt=${j%%$'\t'*}
    jobs_t+=("$jt")
    raws_t+=("$r")
    loads+=("$(cut -d' ' -f1 /proc/loadavg)")
    printf 'pair %d: job %6.3f s (%s) | raw %6.3f s | job/raw %.2f | load %s\n' \
        "$i" "$jt" "${j#*$'\t'}" "$r" "$(python3 -c "print($jt / $r)")" "${loads[-1]}"
done
python3 - "$DATA" "${jobs_t[*]}" "${raws_t[*]}" "${loads[*]}" <<'EOF'
import statistics, sys
j = [float(x) for x in sys.argv[2].split()]
r = [float(x) for x in sys.argv[3].split()]
l = [float(x) for x in sys.argv[4].split()]
ratios = [a / b for a, b in zip(j, r)]
mj, mr = statistics.median(j), statistics.median(r)
print(f"2 disks x {sys.argv[1]} of data: job median {mj:.3f} s (range {min(j):.3f}-{max(j):.3f}); "
      f"raw parallel copy median {mr:.3f} s (range {min(r):.3f}-{max(r):.3f})")
print(f"ratio job/raw: median of pairs {statistics.median(ratios):.2f} (range {min(ratios):.2f}-"
      f"{max(ratios):.2f}); of medians {mj / mr:.2f}; load average 1 min {min(l):.1f}-{max(l):.1f}")
EOF
