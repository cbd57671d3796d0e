#!/usr/bin/env bash
# Cost of the whole-disk checksum grid (`sendense-node copy --grid-cell 4M`) against the same
# copy without it, qcow2 -> qcow2 through two qemu-nbd on loopback (as bench/copy.sh).
#
# Case 1: full copy of a 1 GiB disk holding 960 MiB of data (15 x 64 MiB, then a 64 MiB hole).
# Case 2: incremental of that disk after 256 scattered 64 KiB writes (a 64 KiB dirty bitmap
#         exported by qemu-nbd --bitmap; the target an overlay on the full): with the grid, the
#         unchanged rest of every 4 MiB cell a write touched is read (not written).
# Runs alternate grid off / on (the order swaps every pair). Prints each run and the medians
# of time and of the bytes read (data, and for the grid only).
#
# Usage: bench/grid.sh [RUNS]   (RUNS pairs per case, default 5)
#   BENCH_DIR: where the images go (default: a new directory under /var/tmp); needs ~3 GiB.
set -euo pipefail

RUNS=${1:-5}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
echo "building release sendense-node..."
(cd "$ROOT" && cargo build --release -q -p agent-node)
NODE=$TARGET_DIR/release/sendense-node

for tool in qemu-img qemu-io qemu-nbd python3; do
    command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 1; }
done

WORK=${BENCH_DIR:-$(mktemp -d /var/tmp/sendense-grid-bench.XXXXXX)}
mkdir -p "$WORK"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    [[ -z ${BENCH_DIR:-} ]] && rm -rf "$WORK"
}
trap cleanup EXIT

wait_socket() {
    for _ in $(seq 200); do
        [[ -S $1 ]] && return 0
        sleep 0.05
    done
    echo "qemu-nbd did not create $1" >&2
    exit 1
}

# one_run MODE GRID: MODE full|incr, GRID on|off; prints "seconds read_bytes grid_read_bytes".
one_run() {
    local mode=$1 grid=$2 src=$WORK/src.qcow2 dst=$WORK/target.qcow2 spid tpid start end
    local sargs=() cargs=()
    rm -f "$dst" "$WORK"/*.sock
    if [[ $mode == full ]]; then
        qemu-img create -q -f qcow2 "$dst" 1G
        cargs+=(--destination-is-zero)
    else
        qemu-img create -q -f qcow2 -F qcow2 -b "$WORK/base.qcow2" "$dst"
        sargs+=(--bitmap=since)
        cargs+=(--dirty-bitmap since)
    fi
    [[ $grid == on ]] && cargs+=(--grid-cell 4M)
    qemu-nbd --read-only --format=qcow2 --export-name=src --socket="$WORK/src.sock" \
        --persistent --shared=8 "${sargs[@]}" "$src" &
    spid=$!
    qemu-nbd --format=qcow2 --export-name=dst --socket="$WORK/dst.sock" --persistent \
        --shared=8 --cache=none --aio=threads --discard=unmap --detect-zeroes=unmap "$dst" &
    tpid=$!
    PIDS=("$spid" "$tpid")
    wait_socket "$WORK/src.sock"
    wait_socket "$WORK/dst.sock"
    start=$(date +%s.%N)
    if ! "$NODE" copy --from "nbd+unix:///src?socket=$WORK/src.sock" \
        --to "nbd+unix:///dst?socket=$WORK/dst.sock" "${cargs[@]}" >"$WORK/out.txt" 2>&1; then
        echo "copy failed:" >&2
        head -c 2000 "$WORK/out.txt" >&2
        exit 1
    fi
    end=$(date +%s.%N)
    kill "$spid" "$tpid"
    wait "$spid" "$tpid" 2>/dev/null || true
    PIDS=()
    if ! qemu-img compare -q -f qcow2 -F qcow2 "$src" "$dst"; then
        echo "$mode grid $grid: TARGET DIFFERS FROM SOURCE" >&2
        exit 1
    fi
    python3 - "$start" "$end" "$WORK/out.txt" <<'PY'
import re, sys
out = open(sys.argv[3]).read()
read = int(re.search(r"read (\d+) bytes", out).group(1))
g = re.search(r"(\d+) bytes read for it only", out)
print(f"{float(sys.argv[2]) - float(sys.argv[1]):.3f} {read} {g.group(1) if g else 0}")
PY
}

bench_case() {
    local mode=$1 name=$2 first second off=() on=()
    echo
    echo "== $name: $RUNS pairs"
    for i in $(seq 1 "$RUNS"); do
        if (( i % 2 )); then first=off; second=on; else first=on; second=off; fi
        for g in $first $second; do
            r=$(one_run "$mode" "$g")
            echo "run $i grid $g: $r (s, read, read for grid)"
            if [[ $g == on ]]; then on+=("$r"); else off+=("$r"); fi
        done
    done
    python3 - "$name" "$(printf '%s\n' "${off[@]}")" "$(printf '%s\n' "${on[@]}")" <<'PY'
import statistics, sys
def med(rows, k): return statistics.median(float(r.split()[k]) for r in rows)
off = sys.argv[2].split("\n"); on = sys.argv[3].split("\n")
t0, t1 = med(off, 0), med(on, 0)
print(f"{sys.argv[1]}: median grid off {t0:.3f} s, on {t1:.3f} s ({(t1 / t0 - 1) * 100:+.1f} %); "
      f"read {med(off, 1) / 2**20:.1f} MiB off, {med(on, 1) / 2**20:.1f} MiB on, "
      f"+ {med(on, 2) / 2**20:.1f} MiB read for the grid only")
PY
}

echo "work dir: $WORK"
echo "making the 1 GiB source with 960 MiB of data..."
qemu-img create -q -f qcow2 "$WORK/src.qcow2" 1G
args=()
for i in $(seq 0 14); do args+=(-c "write -P $((i + 1)) $((i * 64))M 64M"); done
qemu-io -f qcow2 "${args[@]}" "$WORK/src.qcow2" >/dev/null
bench_case full "full, 1 GiB disk, 960 MiB data"

cp "$WORK/src.qcow2" "$WORK/base.qcow2"
qemu-img bitmap --add -g 65536 -f qcow2 "$WORK/src.qcow2" since
args=()
while read -r off; do args+=(-c "write -P 0x5c $off 64k"); done < <(python3 -c '
import random
r = random.Random(7)
for o in sorted(r.sample(range(16384), 256)): print(o * 65536)')
qemu-io -f qcow2 "${args[@]}" "$WORK/src.qcow2" >/dev/null
bench_case incr "incremental, 256 x 64 KiB scattered writes"
