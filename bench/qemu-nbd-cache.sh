#!/usr/bin/env bash
# Picks qemu-nbd's --cache/--aio for the hub's backup targets.
#
# For each mode: a fresh qcow2 target served by qemu-nbd with the hub's options
# (agent-hub/src/qemu_nbd.rs), then `nbdcopy --destination-is-zero --flush` from a qcow2 source
# (served by a private qemu-nbd that nbdcopy starts itself), then SIGTERM to the target qemu-nbd
# and wait for it to exit (it flushes and closes the image). The wall time of copy + stop is
# what a backup pays. Modes run round-robin so that noise from other work on the machine spreads
# over all of them; the median of RUNS runs is reported.
#
# Usage: bench/qemu-nbd-cache.sh [DATA_MIB (default 1024)] [RUNS (default 5)]
# Env:   BENCH_DIR (default: a new directory under /var/tmp, removed at the end)
#        QEMU_NBD (default qemu-nbd)
set -euo pipefail

DATA_MIB=${1:-1024}
RUNS=${2:-5}
QEMU_NBD=${QEMU_NBD:-qemu-nbd}
# Virtual size twice the data, so the source has holes as real disks do.
SIZE_MIB=$((DATA_MIB * 2))
# "cache aio" pairs; "-" = no --aio. unsafe is measured for reference only: it drops flushes.
MODES=("writeback threads" "writeback io_uring" "none threads" "none native" "writethrough threads" "unsafe threads")

for tool in "$QEMU_NBD" qemu-img nbdcopy; do
    command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 1; }
done

DIR=${BENCH_DIR:-$(mktemp -d /var/tmp/qemu-nbd-bench.XXXXXX)}
mkdir -p "$DIR"
TARGET_PID=
cleanup() {
    # Only the qemu-nbd this script started, by its PID.
    if [[ -n $TARGET_PID ]] && kill -0 "$TARGET_PID" 2>/dev/null; then
        kill -KILL "$TARGET_PID" 2>/dev/null || true
        wait "$TARGET_PID" 2>/dev/null || true
    fi
    [[ -z ${BENCH_DIR:-} ]] && rm -rf "$DIR"
}
trap cleanup EXIT

free_port() {
    local p
    for _ in $(seq 200); do
        p=$((20000 + RANDOM % 20000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return
        fi
    done
    echo "no free port found" >&2
    exit 1
}

echo "qemu-nbd cache/aio benchmark: ${DATA_MIB} MiB of data in a ${SIZE_MIB} MiB qcow2, ${RUNS} runs per mode"
echo "machine: $(nproc) cores, $(uname -r), $($QEMU_NBD --version | head -1), dir $DIR ($(df -T "$DIR" | awk 'NR==2{print $2}'))"

SRC=$DIR/source.qcow2
if [[ ! -s $SRC ]]; then
    # Random data (incompressible, no zero blocks) in the first half, holes in the second.
    head -c $((DATA_MIB * 1024 * 1024)) /dev/urandom >"$DIR/source.raw"
    truncate -s "${SIZE_MIB}M" "$DIR/source.raw"
    qemu-img convert -f raw -O qcow2 "$DIR/source.raw" "$SRC"
    rm -f "$DIR/source.raw"
fi

run_one() { # cache aio -> prints seconds
    local cache=$1 aio=$2 port tgt start end
    port=$(free_port)
    tgt=$DIR/target.qcow2
    rm -f "$tgt"
    qemu-img create -q -f qcow2 "$tgt" "${SIZE_MIB}M"
    local args=(--format=qcow2 --export-name=bench --bind=127.0.0.1 "--port=$port" --persistent
        --shared=8 --discard=unmap --detect-zeroes=unmap "--cache=$cache")
    [[ $aio != - ]] && args+=("--aio=$aio")
    "$QEMU_NBD" "${args[@]}" "$tgt" 2>"$DIR/qemu-nbd.err" &
    TARGET_PID=$!
    for _ in $(seq 500); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        kill -0 "$TARGET_PID" 2>/dev/null || { cat "$DIR/qemu-nbd.err" >&2; exit 1; }
        sleep 0.01
    done
    sync
    start=$(date +%s.%N)
    nbdcopy --destination-is-zero --flush -- [ "$QEMU_NBD" -r -f qcow2 "$SRC" ] \
        "nbd://127.0.0.1:$port/bench"
    kill -TERM "$TARGET_PID"
    wait "$TARGET_PID" || true
    end=$(date +%s.%N)
    TARGET_PID=
    echo "$end - $start" | bc -l
}

# Cross-check once that the copy is exact, so the timings are of a correct copy.
run_one writeback threads >/dev/null
qemu-img compare -q "$SRC" "$DIR/target.qcow2" || { echo "copy differs from source!" >&2; exit 1; }

declare -A TIMES
for ((r = 1; r <= RUNS; r++)); do
    for m in "${MODES[@]}"; do
        read -r cache aio <<<"$m"
        t=$(run_one "$cache" "$aio")
        TIMES[$m]+="$t "
        printf 'run %d  %-22s %6.2f s\n' "$r" "cache=$cache aio=$aio" "$t"
    done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END{print (NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2}'; }
minmax() { tr ' ' '\n' | grep -v '^$' | sort -g | awk 'NR==1{mn=$1} {mx=$1} END{printf "%.2f-%.2f", mn, mx}'; }

base=$(echo "${TIMES["writeback threads"]}" | median)
echo
printf '%-24s %9s %13s %9s %10s\n' "cache / aio" "median s" "range s" "MiB/s" "vs wb/thr"
for m in "${MODES[@]}"; do
    read -r cache aio <<<"$m"
    med=$(echo "${TIMES[$m]}" | median)
    printf '%-24s %9.2f %13s %9.0f %9.2fx\n' "$cache / $aio" "$med" "$(echo "${TIMES[$m]}" | minmax)" \
        "$(echo "$DATA_MIB / $med" | bc -l)" "$(echo "$med / $base" | bc -l)"
done
echo "(copy + flush + qemu-nbd stop; unsafe ignores flushes and is never the default)"
