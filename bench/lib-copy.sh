# Sourced by the benchmarks (copy.sh, restore.sh, incremental.sh, wan.sh, job.sh): their common
# set-up, once. After `set -euo pipefail`:
#   bench_args DEFAULT_RUNS "$@"  sets RUNS and EXTRA (options after `--` for sendense-node copy)
#   bench_node                    sets ROOT and NODE (NODE_BIN, or a fresh release build)
#   bench_need TOOL...            exits naming a tool that is missing
#   bench_workdir NAME            sets WORK (BENCH_DIR, or a new /var/tmp/sendense-NAME.XXXXXX) and
#                                 PIDS; on exit every PID in PIDS is killed and waited for, then
#                                 bench_cleanup_extra runs when the script defines it, and WORK
#                                 goes unless BENCH_DIR was given
#   free_port, wait_port PORT, wait_socket PATH, loadavg

bench_args() {
    RUNS=${2:-$1}
    shift $(($# > 1 ? 2 : 1))
    [[ ${1:-} == "--" ]] && shift
    EXTRA=("$@")
}

bench_node() {
    ROOT=$(cd "$(dirname "$0")/.." && pwd)
    if [[ -n ${NODE_BIN:-} ]]; then
        NODE=$NODE_BIN # built already: no cargo build
    else
        echo "building release sendense-node..."
        (cd "$ROOT" && cargo build --release -q -p agent-node)
        NODE=${CARGO_TARGET_DIR:-$ROOT/target}/release/sendense-node
    fi
}

bench_need() {
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 1; }
    done
}

bench_workdir() {
    WORK=${BENCH_DIR:-$(mktemp -d "/var/tmp/sendense-$1.XXXXXX")}
    mkdir -p "$WORK"
    chmod 0700 "$WORK"
    PIDS=()
    trap bench_cleanup EXIT
    # Interrupted: the EXIT trap still stops every process and removes the directory.
    trap 'exit 130' INT TERM
}

bench_cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    if declare -F bench_cleanup_extra >/dev/null; then bench_cleanup_extra; fi
    [[ -z ${BENCH_DIR:-} ]] && rm -rf "$WORK"
    return 0
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_port() {
    for _ in $(seq 400); do
        (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing listens on 127.0.0.1:$1" >&2
    exit 1
}

wait_socket() {
    for _ in $(seq 200); do [[ -S $1 ]] && return 0; sleep 0.05; done
    echo "nothing listens on $1" >&2
    exit 1
}

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

# copy_done NAME OK SRC DST START END [WHAT]: the end of one timed copy. Stops the run's two
# qemu-nbd (PIDS); exits naming NAME when the copy failed (the head of $WORK/out.txt) or when
# DST does not read as SRC (WHAT says how, default "TARGET DIFFERS FROM SOURCE"); else prints
# the seconds from START to END.
copy_done() {
    local name=$1 ok=$2 src=$3 dst=$4 start=$5 end=$6
    local what=${7:-TARGET DIFFERS FROM SOURCE}
    kill "${PIDS[@]}"
    wait "${PIDS[@]}" 2>/dev/null || true
    PIDS=()
    if (( ! ok )); then
        echo "$name: copy failed:" >&2
        head -c 2000 "$WORK/out.txt" >&2
        exit 1
    fi
    if ! qemu-img compare -q -f qcow2 -F qcow2 "$src" "$dst"; then
        echo "$name: $what" >&2
        exit 1
    fi
    python3 -c "print(f'{$end - $start:.3f}')"
}
