#!/usr/bin/env bash
# Restore benchmark: a 3-point qcow2 chain (full + 2 incrementals) restored by the copy engine
# as a node's restore runs it, against nbdcopy of the same chain to the same kind of target.
#
# Chain: full.qcow2 (8 GiB disk, 2 GiB data: 32 x 64 MiB, 256 MiB apart) <- inc1.qcow2 (256 x
# 1 MiB scattered changes) <- inc2.qcow2 (another 256 x 1 MiB). The source is inc2 served
# the way the hub serves a restore point (qemu-nbd --read-only --shared=8 --cache=none
# --aio=threads; qemu-nbd reads through the backing chain). The target is what a node's
# restore writes into (agent-node/src/restore/run.rs): a fresh qcow2 behind a private qemu-nbd
# on a unix socket (-f qcow2 --shared=5 -t --discard=unmap --detect-zeroes=unmap: room for the
# copy's 4 connections and one more).
# sendense: `sendense-node copy --destination-is-zero --grid-cell 4M --connections 4` (the
# restore's copy_disk call: target_is_zero, the hub's DEFAULT_GRID_CELL, the node's restore
# connections, CopyOptions::restore_connections, and default in-flight bytes); the restore's
# read-back verification afterwards is not timed here (it is the hub's shared verify routine,
# not the copy). nbdcopy: `--destination-is-zero --flush`.
# Each run: fresh target and servers; `qemu-img compare` of the chain with the result.
# Prints each pair, the median ratio nbdcopy/sendense (> 1: sendense faster), range, load.
#
# Usage: bench/restore.sh [PAIRS] [-- extra sendense-node copy options]
#   NODE_BIN: a sendense-node binary to use instead of building one.
set -euo pipefail

. "$(dirname "$0")/lib-copy.sh"
bench_args 5 "$@"
bench_node
bench_need qemu-img qemu-io qemu-nbd nbdcopy python3
bench_workdir restore

# writes SEED COUNT: qemu-io commands, COUNT x 1 MiB at distinct random MiB offsets of 8 GiB.
writes() {
    python3 -c "
import random
r = random.Random($1)
for i, mib in enumerate(sorted(r.sample(range(8192), $2))):
    print(f'write -P {(i % 200) + $1} {mib << 20} 1M')"
}

echo "work dir: $WORK"
echo "making the chain (8 GiB: 2 GiB full, 2 x 256 MiB incrementals)..."
qemu-img create -q -f qcow2 "$WORK/full.qcow2" 8G
args=()
for i in $(seq 0 31); do args+=(-c "write -P $((i + 1)) $((i * (256 << 20))) 64M"); done
qemu-io -f qcow2 "${args[@]}" "$WORK/full.qcow2" >/dev/null
prev=$WORK/full.qcow2
for n in 1 2; do
    qemu-img create -q -f qcow2 -b "$prev" -F qcow2 "$WORK/inc$n.qcow2"
    mapfile -t cmds < <(writes "$n" 256)
    args=()
    for c in "${cmds[@]}"; do args+=(-c "$c"); done
    qemu-io -f qcow2 "${args[@]}" "$WORK/inc$n.qcow2" >/dev/null
    prev=$WORK/inc$n.qcow2
done
SRC=$WORK/inc2.qcow2
DATA=$(qemu-img map --output=json -f qcow2 "$SRC" |
    python3 -c 'import json,sys; print(sum(e["length"] for e in json.load(sys.stdin) if e["data"]))')
echo "chain holds $((DATA >> 20)) MiB of data"

one_run() {
    local tool=$1 dst=$WORK/restored.qcow2 sock=$WORK/restore.sock sp spid tpid start end ok=1
    rm -f "$dst" "$sock"
    qemu-img create -q -f qcow2 "$dst" 8G
    sp=$(free_port)
    qemu-nbd --format=qcow2 --export-name=point --bind=127.0.0.1 --port="$sp" --persistent \
        --shared=8 --cache=none --aio=threads --read-only "$SRC" &
    spid=$!
    qemu-nbd -f qcow2 -x restore --shared=5 -t --discard=unmap --detect-zeroes=unmap \
        -k "$sock" "$dst" &
    tpid=$!
    PIDS=("$spid" "$tpid")
    wait_port "$sp"
    wait_socket "$sock"
    local from="nbd://127.0.0.1:$sp/point" to="nbd+unix:///restore?socket=$sock"
    start=$(date +%s.%N)
    case $tool in
        sendense) "$NODE" copy --from "$from" --to "$to" --destination-is-zero --grid-cell 4M --connections 4 \
            "${EXTRA[@]}" >"$WORK/out.txt" 2>&1 || ok=0 ;;
        nbdcopy) nbdcopy --destination-is-zero --flush "$from" "$to" >"$WORK/out.txt" 2>&1 || ok=0 ;;
    esac
    end=$(date +%s.%N)
    copy_done "$tool" "$ok" "$SRC" "$dst" "$start" "$end" "RESTORED IMAGE DIFFERS FROM THE CHAIN"
}

echo "load average at start: $(loadavg)"
ratios=()
for i in $(seq 1 "$RUNS"); do
    if (( i % 2 )); then order="sendense nbdcopy"; else order="nbdcopy sendense"; fi
    declare -A t=()
    for tool in $order; do t[$tool]=$(one_run "$tool"); done
    s=${t[sendense]} n=${t[nbdcopy]}
    ratios+=("$(python3 -c "print(f'{$n / $s:.3f}')")")
    python3 -c "
d=$DATA/1048576
print(f'pair $i: sendense {$s:7.3f} s {d/$s:7.1f} MiB/s | nbdcopy {$n:7.3f} s {d/$n:7.1f} MiB/s | nbdcopy/sendense {$n/$s:.2f}')"
done
python3 -c "
import statistics
r=[$(IFS=,; echo "${ratios[*]}")]
print(f'restore of a 3-point chain: median ratio nbdcopy/sendense = {statistics.median(r):.2f} (min {min(r):.2f}, max {max(r):.2f}; {len(r)} pairs; > 1 means sendense is faster; load average $(loadavg))')"
