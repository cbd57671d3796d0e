#!/usr/bin/env bash
# The cost of TLS on the NBD data path: `sendense-node copy --destination-is-zero` from a qemu-nbd
# source into a fresh qcow2 behind qemu-nbd with the hub's target options, round-robin plain
# (nbd_tls = false) and TLS (nbd_tls = true: tls-creds-x509 with verify-peer and an authz-list
# naming the client, the way the hub starts its exports). All on loopback. Prints every run, the
# medians, the ratio TLS/plain throughput and the load average before and after. The last TLS
# copy is compared with the source byte for byte.
#
# Usage: bench/nbd-tls.sh [DATA_MIB (default 1024)] [RUNS (default 3)]
# Env:   NODE_BIN (default: $CARGO_TARGET_DIR or target, release/sendense-node)
set -euo pipefail

DATA_MIB=${1:-1024}
RUNS=${2:-3}
SIZE_MIB=$((DATA_MIB * 2))
HERE=$(cd "$(dirname "$0")/.." && pwd)
NODE_BIN=${NODE_BIN:-${CARGO_TARGET_DIR:-$HERE/target}/release/sendense-node}
for tool in "$NODE_BIN" qemu-nbd qemu-img openssl awk; do
    command -v "$tool" >/dev/null || { echo "missing $tool (build: cargo build --release -p agent-node)" >&2; exit 1; }
done

DIR=$(mktemp -d /var/tmp/nbd-tls-bench.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
    rm -rf "$DIR"
}
trap cleanup EXIT

free_port() {
    local p
    for _ in $(seq 500); do
        p=$((20000 + RANDOM % 40000))
        (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
    done
    echo "no free port" >&2; exit 1
}
wait_port() { # port pid what
    for _ in $(seq 500); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        kill -0 "$2" 2>/dev/null || { echo "$3 died: $(cat "$DIR/dst.err")" >&2; return 1; }
        sleep 0.02
    done
    echo "$3 does not listen on $1" >&2; return 1
}

# shellcheck source=bench/lib-nbd-tls.sh
. "$HERE/bench/lib-nbd-tls.sh"
nbd_tls_certs

SRC_PORT=$(free_port); NBD_PORT=$(free_port)
echo "NBD TLS benchmark: ${DATA_MIB} MiB of data in a ${SIZE_MIB} MiB qcow2, ${RUNS} runs each"
echo "machine: $(nproc) cores, load before $(cut -d' ' -f1-3 /proc/loadavg), $(qemu-nbd --version | head -1)"
SRC=$DIR/source.qcow2
head -c $((DATA_MIB * 1024 * 1024)) /dev/urandom >"$DIR/source.raw"
truncate -s "${SIZE_MIB}M" "$DIR/source.raw"
qemu-img convert -f raw -O qcow2 "$DIR/source.raw" "$SRC"
rm -f "$DIR/source.raw"
qemu-nbd --read-only --format=qcow2 --export-name=src --bind=127.0.0.1 "--port=$SRC_PORT" \
    --persistent --shared=8 "$SRC" 2>"$DIR/src.err" &
PIDS+=($!)
wait_port "$SRC_PORT" "$!" "source qemu-nbd"

run_one() { # plain|tls -> prints seconds
    local mode=$1 tgt=$DIR/target.qcow2 pid start end
    rm -f "$tgt"
    qemu-img create -q -f qcow2 "$tgt" "${SIZE_MIB}M"
    nbd_tls_args "$mode"
    # The hub's target options (agent-hub/src/qemu_nbd/config.rs).
    qemu-nbd --format=qcow2 --export-name=dst --bind=127.0.0.1 "--port=$NBD_PORT" --persistent \
        --shared=8 --discard=unmap --detect-zeroes=unmap --cache=none --aio=threads "${NBD_TLS_ARGS[@]}" "$tgt" \
        2>"$DIR/dst.err" &
    pid=$!
    wait_port "$NBD_PORT" "$pid" "target qemu-nbd"
    start=$(date +%s.%N)
    "$NODE_BIN" copy --from "nbd://127.0.0.1:$SRC_PORT/src" --to "nbd://127.0.0.1:$NBD_PORT/dst" \
        --destination-is-zero "${COPY_TLS_ARGS[@]}" >/dev/null 2>"$DIR/copy.err" \
        || { cat "$DIR/copy.err" "$DIR/dst.err" >&2; kill "$pid"; exit 1; }
    end=$(date +%s.%N)
    kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
    awk -v a="$start" -v b="$end" 'BEGIN {printf "%.3f\n", b - a}'
}

div() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.4f\n", a / b}'; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

PLAIN=(); TLS=()
for i in $(seq "$RUNS"); do
    p=$(run_one plain); PLAIN+=("$p")
    t=$(run_one tls); TLS+=("$t")
    printf 'run %d: plain %6.2f s (%7.1f MiB/s)   tls %6.2f s (%7.1f MiB/s)   load %s\n' "$i" \
        "$p" "$(div "$DATA_MIB" "$p")" "$t" "$(div "$DATA_MIB" "$t")" "$(cut -d' ' -f1 /proc/loadavg)"
done
qemu-img compare -q -f qcow2 -F qcow2 "$SRC" "$DIR/target.qcow2" \
    && echo "last TLS copy: identical to the source (qemu-img compare)" \
    || { echo "last TLS copy DIFFERS from the source" >&2; exit 1; }
pm=$(printf '%s\n' "${PLAIN[@]}" | median)
tm=$(printf '%s\n' "${TLS[@]}" | median)
printf 'median: plain %.2f s = %.1f MiB/s, tls %.2f s = %.1f MiB/s\n' \
    "$pm" "$(div "$DATA_MIB" "$pm")" "$tm" "$(div "$DATA_MIB" "$tm")"
printf 'ratio tls/plain throughput: %.2f\n' "$(div "$pm" "$tm")"
echo "load after $(cut -d' ' -f1-3 /proc/loadavg)"
