#!/usr/bin/env bash
# Incremental benchmark: the copy engine's incremental of 5 % scattered changes on a 16 GiB
# disk, against the time to copy just those bytes.
#
# Source: a 16 GiB qcow2 with 1 GiB of older data (16 x 64 MiB), a persistent dirty bitmap
# `inc` added (`qemu-img bitmap --add`), then 819 x 1 MiB written at distinct random MiB
# offsets (5 % of the disk; qemu-io records them in the bitmap). It is served like the node's
# snapshot export: qemu-nbd --read-only --shared=8 -B inc (offers qemu:dirty-bitmap:inc).
# Target: like the hub's incremental target, a fresh qcow2 overlay whose backing file is the
# previous backup (a copy of the source taken before the changes), behind qemu-nbd --shared=8
# --cache=none --aio=threads --discard=unmap --detect-zeroes=unmap.
# incremental: `sendense-node copy --dirty-bitmap inc` (+ `--grid-cell 4M` in the "grid" mode,
#   as backup jobs ask: a changed 4 MiB cell is also read whole for its checksum).
# peer ("just those bytes"): `nbdcopy --destination-is-zero --flush` of an image holding only
#   the changed MiBs at the same offsets (no backing) into a fresh qcow2, same target options.
# Each run: fresh target and servers; `qemu-img compare` (incremental target vs source; peer
# target vs the changes image). Prints time per run, the median ratio incremental/peer (goal
# <= 1.2), range and load average.
#
# Usage: bench/incremental.sh [PAIRS] [-- extra sendense-node copy options]
#   NODE_BIN: a sendense-node binary to use instead of building one.
#   MODES: default "nogrid grid".
set -euo pipefail

. "$(dirname "$0")/lib-copy.sh"
bench_args 5 "$@"
MODES=${MODES:-nogrid grid}
bench_node
bench_need qemu-img qemu-io qemu-nbd nbdcopy python3
bench_workdir incr

SIZE=$((16 << 30))
CHANGES=819
echo "work dir: $WORK"
echo "making the 16 GiB source (1 GiB old data, then $CHANGES x 1 MiB changes under a bitmap)..."
qemu-img create -q -f qcow2 "$WORK/src.qcow2" 16G
args=()
for i in $(seq 0 15); do args+=(-c "write -P $((i + 1)) $((i * (1 << 30))) 64M"); done
qemu-io -f qcow2 "${args[@]}" "$WORK/src.qcow2" >/dev/null
cp "$WORK/src.qcow2" "$WORK/prev.qcow2"
qemu-img bitmap --add "$WORK/src.qcow2" inc
mapfile -t cmds < <(python3 -c "
import random
r = random.Random(5)
for i, mib in enumerate(sorted(r.sample(range(16384), $CHANGES))):
    print(f'write -P {(i % 200) + 30} {mib << 20} 1M')")
args=()
for c in "${cmds[@]}"; do args+=(-c "$c"); done
qemu-io -f qcow2 "${args[@]}" "$WORK/src.qcow2" >/dev/null
qemu-img create -q -f qcow2 "$WORK/changes.qcow2" 16G
qemu-io -f qcow2 "${args[@]}" "$WORK/changes.qcow2" >/dev/null
DATA=$((CHANGES << 20))

one_run() {
    local mode=$1 dst=$WORK/target.qcow2 src sp tp spid tpid start end ok=1 bitmap=()
    rm -f "$dst"
    if [[ $mode == peer ]]; then
        src=$WORK/changes.qcow2
        qemu-img create -q -f qcow2 "$dst" 16G
    else
        src=$WORK/src.qcow2
        bitmap=(-B inc)
        qemu-img create -q -f qcow2 -b "$WORK/prev.qcow2" -F qcow2 "$dst"
    fi
    sp=$(free_port)
    qemu-nbd --read-only --format=qcow2 --export-name=src --bind=127.0.0.1 --port="$sp" \
        --persistent --shared=8 "${bitmap[@]}" "$src" &
    spid=$!
    tp=$(free_port)
    while [[ $tp == "$sp" ]]; do tp=$(free_port); done
    qemu-nbd --format=qcow2 --export-name=dst --bind=127.0.0.1 --port="$tp" --persistent \
        --shared=8 --cache=none --aio=threads --discard=unmap --detect-zeroes=unmap "$dst" &
    tpid=$!
    PIDS=("$spid" "$tpid")
    wait_port "$sp"
    wait_port "$tp"
    local from="nbd://127.0.0.1:$sp/src" to="nbd://127.0.0.1:$tp/dst"
    start=$(date +%s.%N)
    case $mode in
        peer) nbdcopy --destination-is-zero --flush "$from" "$to" >"$WORK/out.txt" 2>&1 || ok=0 ;;
        nogrid) "$NODE" copy --from "$from" --to "$to" --dirty-bitmap inc "${EXTRA[@]}" \
            >"$WORK/out.txt" 2>&1 || ok=0 ;;
        grid) "$NODE" copy --from "$from" --to "$to" --dirty-bitmap inc --grid-cell 4M \
            "${EXTRA[@]}" >"$WORK/out.txt" 2>&1 || ok=0 ;;
    esac
    end=$(date +%s.%N)
    [[ $mode == grid && ${SHOW_GRID:-} ]] && grep grid "$WORK/out.txt" >&2
    copy_done "$mode" "$ok" "$src" "$dst" "$start" "$end"
}

echo "load average at start: $(loadavg)"
declare -A TIMES=()
for r in $(seq 1 "$RUNS"); do
    # The peer goes first and last in turn.
    if (( r % 2 )); then order="peer $MODES"; else order="$MODES peer"; fi
    line="round $r:"
    for m in $order; do
        t=$(one_run "$m")
        TIMES[$m]="${TIMES[$m]:-} $t"
        line+=" $m $t s |"
    done
    echo "$line"
done
echo
for m in $MODES; do
    python3 -c "
import statistics
p=[float(x) for x in '${TIMES[peer]}'.split()]
t=[float(x) for x in '${TIMES[$m]}'.split()]
r=[a / b for a, b in zip(t, p)]
print(f'incremental ($m) / copy of just the changed bytes: median {statistics.median(r):.2f} (min {min(r):.2f}, max {max(r):.2f}; {len(r)} pairs; goal <= 1.2); incremental median {statistics.median(t):.2f} s, peer {statistics.median(p):.2f} s for $((DATA >> 20)) MiB')"
done
echo "load average at end: $(loadavg)"
