#!/usr/bin/env bash
# Benchmark of the copy engine against nbdcopy, qcow2 -> qcow2 through two qemu-nbd on loopback.
#
# Shapes (CASES, default all four, in this order):
#   scattered:  an 8 GiB virtual disk holding 2 GiB of data (32 x 64 MiB at spread offsets);
#   contiguous: a 4 GiB disk holding two contiguous 512 MiB extents (at 0 and at 2 GiB);
#   sparse:     a sparse 1 TiB disk holding 1 GiB of data (16 x 64 MiB, 64 GiB apart);
#   fragmented: a 4 GiB disk with about 10 % data in small runs (nbdkit's sparse-random plugin,
#               percent=10 runlength=65536 seed=16, written once into a qcow2 by qemu-img convert:
#               thousands of extents of a few clusters each).
# Each run: a fresh target image, fresh qemu-nbd processes (source read-only; target like the
# hub's: --shared=8 --cache=none --aio=threads --discard=unmap --detect-zeroes=unmap), then the
# copy, timed, then `qemu-img compare`. `sendense-node copy --destination-is-zero` and
# `nbdcopy --destination-is-zero` alternate (and swap order every pair). Prints each time, MiB/s
# of data, and the median of the per-pair ratios nbdcopy time / sendense time (> 1: sendense is
# faster).
#
# Usage: bench/copy.sh [RUNS] [-- extra sendense-node copy options]
#   RUNS: pairs per case (default 5).
#   CASES: which shapes, e.g. CASES="contiguous fragmented" (default: all four).
#   BENCH_DIR: where the images go (default: a new directory under /var/tmp); needs ~6 GiB.
#   CARGO_TARGET_DIR: as for cargo (default: target).
#   NODE_BIN: a sendense-node binary to use instead of building one.
set -euo pipefail

. "$(dirname "$0")/lib-copy.sh"
bench_args 5 "$@"
CASES=${CASES:-scattered contiguous sparse fragmented}
bench_node
bench_need qemu-img qemu-io qemu-nbd nbdcopy nbdkit python3
bench_workdir bench

# make_source FILE SIZE COUNT STRIDE [PIECE]: COUNT x PIECE (default 64M) of patterned data,
# STRIDE apart.
make_source() {
    local file=$1 size=$2 count=$3 stride=$4 piece=${5:-64M} args=()
    qemu-img create -q -f qcow2 "$file" "$size"
    for i in $(seq 0 $((count - 1))); do
        args+=(-c "write -P $((i % 250 + 1)) $((i * stride)) $piece")
    done
    qemu-io -f qcow2 "${args[@]}" "$file" >/dev/null
}

# one_run TOOL SOURCE DATA_BYTES: prints seconds.
one_run() {
    local tool=$1 src=$2 dst=$WORK/target.qcow2 sp tp spid tpid start end
    rm -f "$dst"
    qemu-img create -q -f qcow2 "$dst" "$(qemu-img info --output=json "$src" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')"
    sp=$(free_port)
    qemu-nbd --read-only --format=qcow2 --export-name=src --bind=127.0.0.1 --port="$sp" \
        --persistent --shared=8 "$src" &
    spid=$!
    tp=$(free_port)
    while [[ $tp == "$sp" ]]; do tp=$(free_port); done
    qemu-nbd --format=qcow2 --export-name=dst --bind=127.0.0.1 --port="$tp" --persistent \
        --shared=8 --cache=none --aio=threads --discard=unmap --detect-zeroes=unmap "$dst" &
    tpid=$!
    PIDS=("$spid" "$tpid")
    wait_port "$sp"
    wait_port "$tp"
    start=$(date +%s.%N)
    local ok=1
    case $tool in
        sendense) "$NODE" copy --from "nbd://127.0.0.1:$sp/src" --to "nbd://127.0.0.1:$tp/dst" \
            --destination-is-zero "${EXTRA[@]}" >"$WORK/out.txt" 2>&1 || ok=0 ;;
        nbdcopy) nbdcopy --destination-is-zero --flush "nbd://127.0.0.1:$sp/src" \
            "nbd://127.0.0.1:$tp/dst" >"$WORK/out.txt" 2>&1 || ok=0 ;;
    esac
    end=$(date +%s.%N)
    copy_done "$tool" "$ok" "$src" "$dst" "$start" "$end"
}

# bench_case NAME SOURCE DATA_BYTES PAIRS
bench_case() {
    local name=$1 src=$2 data=$3 pairs=$4 ratios=() s n first second
    echo
    echo "== $name: $pairs pairs (data $((data >> 20)) MiB; extra options: ${EXTRA[*]:-none})"
    for i in $(seq 1 "$pairs"); do
        if (( i % 2 )); then first=sendense; second=nbdcopy; else first=nbdcopy; second=sendense; fi
        declare -A t=()
        for tool in $first $second; do
            t[$tool]=$(one_run "$tool" "$src")
        done
        s=${t[sendense]}
        n=${t[nbdcopy]}
        ratios+=("$(python3 -c "print(f'{$n / $s:.3f}')")")
        python3 -c "
d=$data/1048576
print(f'pair $i: sendense {$s:7.3f} s {d/$s:7.1f} MiB/s | nbdcopy {$n:7.3f} s {d/$n:7.1f} MiB/s | nbdcopy/sendense {$n/$s:.2f}')"
    done
    python3 -c "
import statistics
r=[$(IFS=,; echo "${ratios[*]}")]
print(f'$name: median ratio nbdcopy/sendense = {statistics.median(r):.2f} (min {min(r):.2f}, max {max(r):.2f}; > 1 means sendense is faster; load average $(loadavg))')"
}

# data_bytes FILE: allocated bytes that read as data (what a copy moves).
data_bytes() {
    qemu-img map --output=json -f qcow2 "$1" |
        python3 -c 'import json,sys; print(sum(e["length"] for e in json.load(sys.stdin) if e["data"]))'
}

echo "work dir: $WORK"
echo "load average at start: $(loadavg)"
for c in $CASES; do
    case $c in
        scattered)
            echo
            echo "making the 8 GiB source with 2 GiB of data..."
            make_source "$WORK/src8g.qcow2" 8G 32 $((256 << 20))
            bench_case "scattered: 8 GiB disk, 2 GiB data" "$WORK/src8g.qcow2" $((2 << 30)) "$RUNS"
            rm -f "$WORK/src8g.qcow2" ;;
        contiguous)
            echo
            echo "making the 4 GiB source with two contiguous 512 MiB extents..."
            make_source "$WORK/src4g.qcow2" 4G 2 $((2 << 30)) 512M
            bench_case "contiguous: 4 GiB disk, 2 x 512 MiB extents" "$WORK/src4g.qcow2" $((1 << 30)) "$RUNS"
            rm -f "$WORK/src4g.qcow2" ;;
        sparse)
            echo
            echo "making the sparse 1 TiB source with 1 GiB of data..."
            make_source "$WORK/src1t.qcow2" 1T 16 $((64 << 30))
            bench_case "sparse: 1 TiB disk, 1 GiB data" "$WORK/src1t.qcow2" $((1 << 30)) "$RUNS"
            rm -f "$WORK/src1t.qcow2" ;;
        fragmented)
            echo
            echo "making the fragmented 4 GiB source (sparse-random, 10 % in ~64 KiB runs)..."
            nbdkit -U - sparse-random size=4G percent=10 runlength=65536 seed=16 \
                --run "qemu-img convert -q -f raw -O qcow2 \"\$uri\" $WORK/srcfrag.qcow2"
            d=$(data_bytes "$WORK/srcfrag.qcow2")
            echo "  $(qemu-img map --output=json -f qcow2 "$WORK/srcfrag.qcow2" | python3 -c 'import json,sys; print(sum(1 for e in json.load(sys.stdin) if e["data"]))') data extents, $((d >> 20)) MiB"
            bench_case "fragmented: 4 GiB disk, sparse-random 10 %" "$WORK/srcfrag.qcow2" "$d" "$RUNS"
            rm -f "$WORK/srcfrag.qcow2" ;;
        *) echo "unknown case $c (scattered, contiguous, sparse, fragmented)" >&2; exit 1 ;;
    esac
done
echo
echo "load average at end: $(loadavg)"
