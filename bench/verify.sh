#!/usr/bin/env bash
# Cost of the hub's whole-disk read-back (`sendense-hub check-image`: a read-only qemu-nbd on a
# unix socket, block status, every data cell read and BLAKE3-hashed, cells in parallel) against
# the raw read of the same image through qemu-nbd by `nbdcopy ... null:` (libnbd's reader, no
# hashing). The read-back is what finalization and verify jobs spend per disk; the ratio says
# what proving the bytes costs over just reading them.
#
# The image: a 2-deep chain (a base with DATA MiB of data, an overlay with 64 scattered 64 KiB
# writes) on a disk twice that size, so block status, backing reads and holes all play.
# Runs alternate (the order swaps every pair); prints each run, then the medians, the ratio and
# the load average. Page cache is warm for both (each reads the image once first).
#
# Usage: bench/verify.sh [RUNS] [DATA_MIB]   (default 5 pairs, 2048 MiB)
#   BENCH_DIR: where the images go (default: a new directory under /var/tmp).
set -euo pipefail

RUNS=${1:-5}
DATA=${2:-2048}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
echo "building release sendense-hub..."
(cd "$ROOT" && cargo build --release -q -p agent-hub --bin sendense-hub)
HUB=$TARGET_DIR/release/sendense-hub

for tool in qemu-img qemu-io qemu-nbd nbdcopy python3; do
    command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 1; }
done

WORK=${BENCH_DIR:-$(mktemp -d /var/tmp/sendense-verify-bench.XXXXXX)}
mkdir -p "$WORK"
trap '[[ -z ${BENCH_DIR:-} ]] && rm -rf "$WORK"' EXIT

base=$WORK/base.qcow2
top=$WORK/top.qcow2
qemu-img create -q -f qcow2 "$base" "$((DATA * 2))M"
for ((off = 0; off < DATA; off += 256)); do
    n=$((DATA - off < 256 ? DATA - off : 256))
    qemu-io -f qcow2 -c "write -P $(((off / 256) % 200 + 17)) ${off}M ${n}M" "$base" >/dev/null
done
qemu-img create -q -f qcow2 -F qcow2 -b base.qcow2 "$top"
for i in $(seq 0 63); do
    qemu-io -f qcow2 -c "write -P 0x77 $((i * DATA / 64))M 64k" "$top" >/dev/null
done
"$HUB" --data-dir "$WORK/hub" check-image "$top" --compute >/dev/null

run_check() {
    local s e
    s=$(date +%s.%N)
    "$HUB" --data-dir "$WORK/hub" check-image "$top" >"$WORK/out.txt" || {
        cat "$WORK/out.txt" >&2
        exit 1
    }
    e=$(date +%s.%N)
    echo "$e - $s" | bc -l
}

run_raw() {
    local s e
    s=$(date +%s.%N)
    nbdcopy -- [ qemu-nbd -r -f qcow2 "$top" ] null:
    e=$(date +%s.%N)
    echo "$e - $s" | bc -l
}

run_check >/dev/null
run_raw >/dev/null
checks=()
raws=()
for i in $(seq 1 "$RUNS"); do
    if ((i % 2)); then
        c=$(run_check)
        r=$(run_raw)
    else
        r=$(run_raw)
        c=$(run_check)
    fi
    checks+=("$c")
    raws+=("$r")
    printf 'pair %d: check-image %.3f s, nbdcopy null: %.3f s\n' "$i" "$c" "$r"
done
python3 - "$DATA" "${checks[*]}" "${raws[*]}" <<'EOF'
import os, statistics, sys
data = int(sys.argv[1])
c = [float(x) for x in sys.argv[2].split()]
r = [float(x) for x in sys.argv[3].split()]
mc, mr = statistics.median(c), statistics.median(r)
print(f"data {data} MiB: check-image median {mc:.3f} s (range {min(c):.3f}-{max(c):.3f}), "
      f"{data / 1024 / mc * 60:.1f} GiB/min; nbdcopy to null median {mr:.3f} s "
      f"(range {min(r):.3f}-{max(r):.3f})")
print(f"ratio check-image / raw read: {mc / mr:.2f}; load average {os.getloadavg()}")
EOF
