#!/usr/bin/env bash
# The hub's cost with a full port range of live exports: RSS and CPU of `sendense-hub` idle,
# then while 101 backups hold one export each, then after they are cancelled; the qemu-nbd
# processes' memory (PSS, shared pages counted once); and the console's TUI attached meanwhile.
#
# A real hub on 127.0.0.1 (SQLite, NBD TLS on, exports on unix sockets in its own directory, an
# NBD range of 101 slots), 101 VMs registered with `"node": null` (one 64 MiB disk each: the hub
# prepares the exports and waits for a writer, so every export stays live while we measure), one
# full backup POSTed for each. The console (`sendense-console`, its TUI in a detached tmux session
# of 160x48) watches the same hub, its event stream busy with 101 jobs.
#
# Each phase is sampled SAMPLES times over SECS seconds: CPU % of one core from /proc/PID/stat
# (utime + stime), RSS from /proc/PID/status; prints every sample, then medians and ranges.
#
# Usage: bench/hub-exports.sh [SAMPLES (default 5)] [SECS (default 10)]
#   SENDENSE_BIN: a directory with sendense-hub and sendense-console (default: a release build).
# Every process it starts is stopped by PID (tmux by its own server socket); its directory goes.
set -euo pipefail

SAMPLES=${1:-5}
SECS=${2:-10}
EXPORTS=101
ROOT=$(cd "$(dirname "$0")/.." && pwd)
if [[ -n ${SENDENSE_BIN:-} ]]; then
    BIN=$SENDENSE_BIN
else
    echo "building release sendense-hub and sendense-console..."
    (cd "$ROOT" && cargo build --release -q -p agent-hub -p console@0.1.0 --bins)
    BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
fi
# shellcheck source=bench/lib-copy.sh
source "$ROOT/bench/lib-copy.sh"
bench_need qemu-img qemu-nbd curl python3 tmux
bench_workdir hub-exports
TMUX_SOCK=$WORK/tmux.sock
bench_cleanup_extra() { tmux -S "$TMUX_SOCK" kill-server 2>/dev/null || true; }

hub_port=$(free_port)
HUB=http://127.0.0.1:$hub_port
mkdir -p "$WORK/hub" "$WORK/nbd"
chmod 0750 "$WORK/nbd"
RUST_LOG=warn "$BIN/sendense-hub" --listen "127.0.0.1:$hub_port" --data-dir "$WORK/hub" \
    --token-file "$WORK/token" --nbd-ports "20000-$((20000 + EXPORTS - 1))" \
    --nbd-socket-dir "$WORK/nbd" </dev/null >"$WORK/hub/stderr.log" 2>&1 &
HUB_PID=$!
PIDS+=("$HUB_PID")
for _ in $(seq 200); do
    [[ -s $WORK/token ]] && curl -sf "$HUB/health" >/dev/null 2>&1 && break
    sleep 0.1
done
curl -sf "$HUB/health" >/dev/null || { echo "hub did not come up:" >&2; tail -20 "$WORK/hub/stderr.log" >&2; exit 1; }

# ticks of utime+stime of a PID, and its RSS in KiB
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
HZ=$(getconf CLK_TCK)
qemu_nbd_pids() { pgrep -d ' ' -P "$HUB_PID" -x qemu-nbd || true; }
pss_total_mib() { # PSS of the hub's qemu-nbd children, MiB
    local sum=0 p k
    for p in $(qemu_nbd_pids); do
        k=$(awk '/^Pss:/ {print $2}' "/proc/$p/smaps_rollup" 2>/dev/null || echo 0)
        sum=$((sum + k))
    done
    echo $((sum / 1024))
}

declare -A CPU RSS
sample() { # PHASE PID LABEL: SAMPLES samples of SECS seconds
    local phase=$1 pid=$2 label=$3 i t0 t1 c rss extra
    for i in $(seq "$SAMPLES"); do
        t0=$(ticks "$pid")
        sleep "$SECS"
        t1=$(ticks "$pid")
        c=$(python3 -c "print(f'{($t1 - $t0) / $HZ / $SECS * 100:.2f}')")
        rss=$(( $(rss_kib "$pid") / 1024 ))
        CPU[$phase.$label]+="$c "
        RSS[$phase.$label]+="$rss "
        extra=
        [[ $label == hub ]] && extra=", qemu-nbd: $(wc -w <<<"$(qemu_nbd_pids)") processes, PSS $(pss_total_mib) MiB"
        printf '%-10s %-8s sample %d: CPU %6s %% of a core, RSS %4d MiB%s | load %s\n' "$phase" "$label" "$i" \
            "$c" "$rss" "$extra" "$(cut -d' ' -f1 /proc/loadavg)"
    done
}
median_range() { python3 -c "import statistics,sys; v=[float(x) for x in sys.argv[1:]]; print(f'{statistics.median(v):g} ({min(v):g}-{max(v):g})')" $1; }

api() { BENCH_LIB=$ROOT/bench python3 - "$HUB" "$WORK/token" "$@" <<'EOF'
import os, sys, time
sys.path.insert(0, os.environ["BENCH_LIB"])
from hubapi import Hub
hub, token_file, what = sys.argv[1], sys.argv[2], sys.argv[3]
n = int(sys.argv[4])
call = Hub(hub, token_file, timeout=120).call
names = [f"exp{i:03d}" for i in range(n)]
def wait_all(want, ids, limit=300):
    deadline = time.time() + limit
    while True:
        st = [call("GET", f"/api/v1/backups/{b}")["status"] for b in ids]
        if all(s in want for s in st):
            return st
        if time.time() > deadline:
            sys.exit(f"not all {want} after {limit} s: {sorted(set(st))}")
        time.sleep(0.5)
if what == "start":
    for v in names:
        call("POST", "/api/v1/vms", {"vm_name": v, "node": None, "disks": [
            {"disk_key": 2000, "unit_number": 0, "size_bytes": 64 << 20, "label": "disk0"}]})
    t0 = time.time()
    ids = [call("POST", "/api/v1/backups", {"vm_name": v, "repository_id": "default",
                                             "backup_type": "full"})["backup_id"] for v in names]
    wait_all({"running"}, ids)
    print(f"{n} backups running (exports ready) {time.time() - t0:.2f} s after the first POST", file=sys.stderr)
    open(sys.argv[5], "w").write("\n".join(ids))
    ports = call("GET", "/api/v1/ports")
    print(f"ports in use: {len(ports['allocations'])}", file=sys.stderr)
elif what == "cancel":
    ids = open(sys.argv[5]).read().split()
    t0 = time.time()
    for b in ids:
        call("POST", f"/api/v1/backups/{b}/cancel")
    st = wait_all({"cancelled"}, ids)
    print(f"{len(ids)} backups cancelled {time.time() - t0:.2f} s after the first cancel", file=sys.stderr)
    left = call("GET", "/api/v1/ports")["allocations"]
    if left:
        sys.exit(f"ports still allocated after the cancels: {left}")
EOF
}

echo "hub with $EXPORTS live exports: $SAMPLES samples of $SECS s per phase; machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), $(qemu-nbd --version | head -1)"
sample idle "$HUB_PID" hub

tmux -S "$TMUX_SOCK" new-session -d -x 160 -y 48 \
    "SENDENSE_HUB_URL=$HUB SENDENSE_TOKEN_FILE=$WORK/token $BIN/sendense-console 2>$WORK/console.err"
CONSOLE_PID=
for _ in $(seq 100); do
    pane=$(tmux -S "$TMUX_SOCK" display -p '#{pane_pid}')
    if [[ $(cat "/proc/$pane/comm" 2>/dev/null) == sendense-consol* ]]; then
        CONSOLE_PID=$pane # the shell exec'd it
    else
        CONSOLE_PID=$(pgrep -n -f "$BIN/sendense-console" -P "$pane" || true)
    fi
    [[ -n $CONSOLE_PID ]] && break
    sleep 0.1
done
[[ -n $CONSOLE_PID ]] || { echo "the console did not start: $(cat "$WORK/console.err")" >&2; exit 1; }

api start "$EXPORTS" "$WORK/ids"
live=$(wc -w <<<"$(qemu_nbd_pids)")
((live == EXPORTS)) || { echo "expected $EXPORTS qemu-nbd, found $live" >&2; exit 1; }
sample exports "$HUB_PID" hub
sample exports "$CONSOLE_PID" console
api cancel 0 "$WORK/ids"
left=$(wc -w <<<"$(qemu_nbd_pids)")
((left == 0)) || { echo "$left qemu-nbd left after the cancels" >&2; exit 1; }
sample after "$HUB_PID" hub

echo
echo "summary (CPU: % of one core, median (range) of $SAMPLES x $SECS s; RSS: MiB)"
for k in idle.hub exports.hub exports.console after.hub; do
    printf '  %-16s CPU %-22s RSS %s\n' "$k" "$(median_range "${CPU[$k]}")" "$(median_range "${RSS[$k]}")"
done
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
