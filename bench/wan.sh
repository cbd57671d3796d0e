#!/usr/bin/env bash
# WAN benchmark: the copy engine writing a disk to a hub-like target through a simulated 20 ms
# round trip, for 1, 4 and 8 NBD connections and the node's defaults.
#
# This machine has no netem, so the latency comes from the project's own delaying TCP relay
# (`sendense-node relay`, hidden; agent-node/src/copy/relay.rs): each direction of each
# connection is a delay line (+10 ms, reads never wait for writes), so it adds latency without
# capping throughput the way a stop-and-wait relay would. nbdkit's `delay` filter was not used:
# it delays each request inside the server (requests in flight overlap), which models a slow
# disk, not a link: a round trip there does not delay the bytes of a WRITE on the wire.
#
# Layout (as in a backup: the node reads its snapshot locally, the hub is across the WAN):
#   qemu-nbd (source, read-only qcow2) -> sendense-node copy -> relay (+10 ms each way)
#     -> qemu-nbd (target like the hub's: --shared=8 --cache=none --aio=threads, fresh qcow2)
# Source: a 4 GiB disk with 1 GiB of data (16 x 64 MiB, 256 MiB apart). Each run: fresh target,
# fresh processes, the copy timed, then `qemu-img compare`. Modes interleave every round.
# Prints MB/s (10^6 bytes, as the Xen Orchestra anchor: 23 MB/s with 1 connection, 145 MB/s
# with 8, at 20 ms) per run, median and range per mode, the ratio to the 290 MB/s goal, the
# measured round trip through the relay, and the load average.
#
# Usage: bench/wan.sh [RUNS] [-- extra sendense-node copy options]
#   RUNS: rounds (default 5); MODES: default "default 1 4 8 nodelay direct" (a number:
#   --connections N; default: no option, the node's defaults; nodelay: through the relay with
#   0 ms, defaults: what the relay's own copying costs; direct: no relay, defaults).
#   NODE_BIN: a sendense-node binary to use instead of building one.
#   DELAY_MS: per direction (default 10).
set -euo pipefail

. "$(dirname "$0")/lib-copy.sh"
bench_args 5 "$@"
MODES=${MODES:-default 1 4 8 nodelay direct}
DELAY_MS=${DELAY_MS:-10}
GOAL_MBS=290
bench_node
bench_need qemu-img qemu-io qemu-nbd python3
bench_cleanup_extra() {
    [[ -n ${RELAY_PID:-} ]] && { kill "$RELAY_PID" 2>/dev/null || true; wait "$RELAY_PID" 2>/dev/null || true; }
    return 0
}
bench_workdir wan

# rtt PORT: one NBD option round trip (NBD_OPT_LIST after the greeting), milliseconds.
rtt() {
    python3 - "$1" <<'EOF'
import socket, struct, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
def recv(n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c: raise SystemExit("closed")
        b += c
    return b
recv(18)                      # NBDMAGIC, IHAVEOPT, handshake flags
s.sendall(struct.pack(">I", 3))   # FIXED_NEWSTYLE | NO_ZEROES
t0 = time.monotonic()
s.sendall(struct.pack(">QII", 0x49484156454F5054, 3, 0))  # NBD_OPT_LIST
recv(20)
t1 = time.monotonic()
print(f"{(t1 - t0) * 1000:.1f}")
EOF
}

SRC=$WORK/src.qcow2
DATA=$((1 << 30))
echo "work dir: $WORK"
echo "making the 4 GiB source with 1 GiB of data..."
qemu-img create -q -f qcow2 "$SRC" 4G
args=()
for i in $(seq 0 15); do args+=(-c "write -P $((i + 1)) $((i * (256 << 20))) 64M"); done
qemu-io -f qcow2 "${args[@]}" "$SRC" >/dev/null

# one_run MODE: prints seconds (and checks the target).
one_run() {
    local mode=$1 dst=$WORK/target.qcow2 sp tp spid tpid start end opts=() to ok=1
    rm -f "$dst"
    qemu-img create -q -f qcow2 "$dst" 4G
    sp=$(free_port)
    qemu-nbd --read-only --format=qcow2 --export-name=src --bind=127.0.0.1 --port="$sp" \
        --persistent --shared=8 "$SRC" &
    spid=$!
    tp=$(free_port)
    while [[ $tp == "$sp" ]]; do tp=$(free_port); done
    qemu-nbd --format=qcow2 --export-name=dst --bind=127.0.0.1 --port="$tp" --persistent \
        --shared=8 --cache=none --aio=threads --discard=unmap --detect-zeroes=unmap "$dst" &
    tpid=$!
    PIDS=("$spid" "$tpid")
    wait_port "$sp"
    wait_port "$tp"
    to=$tp
    if [[ $mode != direct ]]; then
        if [[ $mode == nodelay ]]; then start_relay "$tp" 0; else start_relay "$tp"; fi
        to=$RELAY_PORT
    fi
    [[ $mode =~ ^[0-9]+$ ]] && opts=(--connections "$mode")
    start=$(date +%s.%N)
    "$NODE" copy --from "nbd://127.0.0.1:$sp/src" --to "nbd://127.0.0.1:$to/dst" \
        --destination-is-zero "${opts[@]}" "${EXTRA[@]}" >"$WORK/out.txt" 2>&1 || ok=0
    end=$(date +%s.%N)
    stop_relay
    copy_done "mode $mode" "$ok" "$SRC" "$dst" "$start" "$end"
}

# start_relay UPSTREAM_PORT [DELAY_MS]: a relay on RELAY_PORT in front of it (a fresh one per
# run).
start_relay() {
    RELAY_PORT=$(free_port)
    "$NODE" relay --listen "127.0.0.1:$RELAY_PORT" --to "127.0.0.1:$1" --delay-ms "${2:-$DELAY_MS}" \
        >"$WORK/relay.txt" 2>&1 &
    RELAY_PID=$!
    wait_port "$RELAY_PORT"
}
stop_relay() {
    if [[ -n ${RELAY_PID:-} ]]; then
        kill "$RELAY_PID" 2>/dev/null || true
        wait "$RELAY_PID" 2>/dev/null || true
        RELAY_PID=
    fi
}

# Round trip through the relay (and without), on a scratch target.
qemu-img create -q -f qcow2 "$WORK/rtt.qcow2" 64M
rp=$(free_port)
qemu-nbd --format=qcow2 --export-name=dst --bind=127.0.0.1 --port="$rp" --persistent \
    --shared=8 "$WORK/rtt.qcow2" &
PIDS=($!)
wait_port "$rp"
start_relay "$rp"
echo "NBD option round trip: direct $(rtt "$rp") ms, through the relay $(rtt "$RELAY_PORT") ms (+${DELAY_MS} ms each way)"
stop_relay
kill "${PIDS[0]}"; wait "${PIDS[0]}" 2>/dev/null || true
PIDS=()

echo "load average at start: $(loadavg)"
declare -A TIMES=()
for r in $(seq 1 "$RUNS"); do
    line="round $r:"
    for m in $MODES; do
        t=$(one_run "$m")
        TIMES[$m]="${TIMES[$m]:-} $t"
        line+=" $m $(python3 -c "print(f'{$DATA / $t / 1e6:.0f}')") MB/s |"
    done
    echo "$line"
done
echo
for m in $MODES; do
    python3 -c "
import statistics
t=[float(x) for x in '${TIMES[$m]}'.split()]
r=[$DATA / x / 1e6 for x in t]
med=statistics.median(r)
label='$m' if not '$m'.isdigit() else '$m connection(s)'
where={'direct': 'no relay', 'nodelay': 'relay, 0 ms'}.get('$m', '${DELAY_MS} ms each way')
print(f'{label:>16} ({where}): median {med:6.0f} MB/s per disk (min {min(r):.0f}, max {max(r):.0f}; {len(r)} runs), {med / $GOAL_MBS:.2f}x the {$GOAL_MBS} MB/s goal')"
done
echo "load average at end: $(loadavg)"
