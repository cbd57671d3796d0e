#!/usr/bin/env bash
# Copy throughput through the node's SSH tunnel against a direct copy, in one run.
#
# Sets up, all on loopback: a real sshd (own config, generated host and user keys, the restricted
# key line printed by `sendense-node tunnel authorized-key`), a `sendense-node` daemon holding the
# tunnel (forwards bound on 127.0.0.2), a qemu-nbd source (qcow2, DATA_MIB of random data in a
# disk twice that size) and, per run, a fresh qcow2 target behind qemu-nbd on 127.0.0.1:P with the
# hub's options. Then, round-robin, `sendense-node copy --destination-is-zero` to
# nbd://127.0.0.1:P (direct) and to nbd://127.0.0.2:P (ssh's forward of the same port). Prints
# every run, the median throughput of each, and the ratio tunnel/direct. The last tunnel copy is
# compared with the source byte for byte (qemu-img compare).
#
# Usage: bench/tunnel.sh [DATA_MIB (default 1024)] [RUNS (default 3)]
# Env:   NODE_BIN (default: $CARGO_TARGET_DIR or target, release/sendense-node)
#        BENCH_DIR (default: a new directory under /var/tmp, removed at the end)
#        TUNNEL_CIPHERS (default: the node's, see DEFAULT_CIPHERS in agent-node/src/tunnel/config.rs;
#                        e.g. chacha20-poly1305@openssh.com to measure OpenSSH's own first choice)
set -euo pipefail

DATA_MIB=${1:-1024}
RUNS=${2:-3}
SIZE_MIB=$((DATA_MIB * 2))
HERE=$(cd "$(dirname "$0")/.." && pwd)
NODE_BIN=${NODE_BIN:-${CARGO_TARGET_DIR:-$HERE/target}/release/sendense-node}
BIND=127.0.0.2

for tool in "$NODE_BIN" /usr/sbin/sshd ssh ssh-keygen qemu-nbd qemu-img curl setsid awk; do
    command -v "$tool" >/dev/null || { echo "missing $tool (build: cargo build --release -p agent-node)" >&2; exit 1; }
done

DIR=${BENCH_DIR:-$(mktemp -d /var/tmp/tunnel-bench.XXXXXX)}
mkdir -p "$DIR" /run/sshd
PIDS=()
cleanup() {
    # Only what this script started, by PID (sshd by its own process group: its sessions too).
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    [[ -n ${SSHD_PID:-} ]] && kill -KILL -- "-$SSHD_PID" 2>/dev/null || true
    [[ -z ${BENCH_DIR:-} ]] && rm -rf "$DIR"
}
trap cleanup EXIT

free_port() { # free on 127.0.0.1 and 127.0.0.2
    local p
    for _ in $(seq 500); do
        p=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && ! (exec 3<>"/dev/tcp/$BIND/$p") 2>/dev/null; then
            echo "$p"; return
        fi
    done
    echo "no free port" >&2; exit 1
}
wait_port() { # host port pid what
    for _ in $(seq 500); do
        (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0
        kill -0 "$3" 2>/dev/null || { echo "$4 died" >&2; return 1; }
        sleep 0.02
    done
    echo "$4 does not listen on $1:$2" >&2; return 1
}

SSH_PORT=$(free_port); NBD_PORT=$(free_port); HUB_API=$(free_port); REVERSE=$(free_port)
NODE_API=$(free_port); SRC_PORT=$(free_port)
USER_NAME=$(id -un)

# Keys and the restricted authorized_keys line.
ssh-keygen -q -t ed25519 -N '' -C bench-host -f "$DIR/host_key"
ssh-keygen -q -t ed25519 -N '' -C bench-node -f "$DIR/user_key"
"$NODE_BIN" tunnel authorized-key --tunnel-identity "$DIR/user_key" \
    --nbd-ports "$NBD_PORT-$NBD_PORT" --hub-api-port "$HUB_API" --reverse-port "$REVERSE" \
    >"$DIR/authorized_keys"
cat >"$DIR/sshd_config" <<EOF
Port $SSH_PORT
ListenAddress 127.0.0.1
HostKey $DIR/host_key
AuthorizedKeysFile $DIR/authorized_keys
PidFile $DIR/sshd.pid
StrictModes no
UsePAM no
PermitRootLogin prohibit-password
PasswordAuthentication no
EOF
setsid /usr/sbin/sshd -D -e -f "$DIR/sshd_config" 2>"$DIR/sshd.log" &
SSHD_PID=$!
disown "$SSHD_PID"  # killed by its process group in cleanup; no job-control notice
wait_port 127.0.0.1 "$SSH_PORT" "$SSHD_PID" sshd
echo "[127.0.0.1]:$SSH_PORT $(cat "$DIR/host_key.pub")" >"$DIR/known_hosts"

# The node daemon holding the tunnel.
echo bench-token >"$DIR/token"
chmod 600 "$DIR/token" # the node refuses a token file others may read
NODE_CFG="$DIR/node.toml"
printf 'run_dir = "%s"\n[tunnel]\n' "$DIR/run" >"$NODE_CFG"
[[ -n ${TUNNEL_CIPHERS:-} ]] && printf 'ciphers = "%s"\n' "$TUNNEL_CIPHERS" >>"$NODE_CFG"
RUST_LOG=warn "$NODE_BIN" --config "$NODE_CFG" --listen "127.0.0.1:$NODE_API" --name bench \
    --token-file "$DIR/token" \
    --tunnel "$USER_NAME@127.0.0.1:$SSH_PORT" --tunnel-identity "$DIR/user_key" \
    --tunnel-known-hosts "$DIR/known_hosts" --tunnel-bind "$BIND" \
    --tunnel-nbd-ports "$NBD_PORT-$NBD_PORT" --tunnel-hub-api-port "$HUB_API" \
    --tunnel-reverse-port "$REVERSE" 2>"$DIR/node.log" &
PIDS+=($!)
NODE_PID=$!
state=
for _ in $(seq 300); do
    state=$(curl -s -H "Authorization: Bearer bench-token" "http://127.0.0.1:$NODE_API/api/v1/tunnel" || true)
    [[ $state == *'"state":"up"'* ]] && break
    kill -0 "$NODE_PID" 2>/dev/null || { cat "$DIR/node.log" >&2; exit 1; }
    sleep 0.1
done
[[ $state == *'"state":"up"'* ]] || { echo "tunnel not up: $state" >&2; cat "$DIR/node.log" >&2; exit 1; }

echo "tunnel throughput benchmark: ${DATA_MIB} MiB of data in a ${SIZE_MIB} MiB qcow2, ${RUNS} runs each"
echo "machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), $(ssh -V 2>&1), $(qemu-nbd --version | head -1)"
echo "tunnel: $state"
echo "ssh cipher: $(grep -m1 '^    Ciphers' "$DIR/run/tunnel.ssh_config" | awk '{print $2}' | cut -d, -f1) (first choice)"

SRC=$DIR/source.qcow2
head -c $((DATA_MIB * 1024 * 1024)) /dev/urandom >"$DIR/source.raw"
truncate -s "${SIZE_MIB}M" "$DIR/source.raw"
qemu-img convert -f raw -O qcow2 "$DIR/source.raw" "$SRC"
rm -f "$DIR/source.raw"
qemu-nbd --read-only --format=qcow2 --export-name=src --bind=127.0.0.1 "--port=$SRC_PORT" \
    --persistent --shared=8 "$SRC" 2>"$DIR/src.err" &
PIDS+=($!)
wait_port 127.0.0.1 "$SRC_PORT" "$!" "source qemu-nbd"

run_one() { # host -> prints seconds
    local host=$1 tgt=$DIR/target.qcow2 pid start end
    rm -f "$tgt"
    qemu-img create -q -f qcow2 "$tgt" "${SIZE_MIB}M"
    # The hub's target options (agent-hub/src/qemu_nbd.rs).
    qemu-nbd --format=qcow2 --export-name=dst --bind=127.0.0.1 "--port=$NBD_PORT" --persistent \
        --shared=8 --discard=unmap --detect-zeroes=unmap --cache=none --aio=threads "$tgt" \
        2>"$DIR/dst.err" &
    pid=$!
    wait_port 127.0.0.1 "$NBD_PORT" "$pid" "target qemu-nbd"
    start=$(date +%s.%N)
    "$NODE_BIN" copy --from "nbd://127.0.0.1:$SRC_PORT/src" --to "nbd://$host:$NBD_PORT/dst" \
        --destination-is-zero >/dev/null 2>"$DIR/copy.err" || { cat "$DIR/copy.err" >&2; kill "$pid"; exit 1; }
    end=$(date +%s.%N)
    kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
    awk -v a="$start" -v b="$end" 'BEGIN {printf "%.3f\n", b - a}'
}

div() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.4f\n", a / b}'; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

DIRECT=(); TUNNEL=()
for i in $(seq "$RUNS"); do
    d=$(run_one 127.0.0.1); DIRECT+=("$d")
    t=$(run_one "$BIND"); TUNNEL+=("$t")
    printf 'run %d: direct %6.2f s (%7.1f MiB/s)   tunnel %6.2f s (%7.1f MiB/s)\n' "$i" \
        "$d" "$(div "$DATA_MIB" "$d")" "$t" "$(div "$DATA_MIB" "$t")"
done
qemu-img compare -q -f qcow2 -F qcow2 "$SRC" "$DIR/target.qcow2" \
    && echo "last tunnel copy: identical to the source (qemu-img compare)" \
    || { echo "last tunnel copy DIFFERS from the source" >&2; exit 1; }

dm=$(printf '%s\n' "${DIRECT[@]}" | median)
tm=$(printf '%s\n' "${TUNNEL[@]}" | median)
printf 'median: direct %.2f s = %.1f MiB/s, tunnel %.2f s = %.1f MiB/s\n' \
    "$dm" "$(div "$DATA_MIB" "$dm")" "$tm" "$(div "$DATA_MIB" "$tm")"
printf 'ratio tunnel/direct throughput: %.2f\n' "$(div "$dm" "$tm")"
grep -q '"restarts":0' <<<"$(curl -s -H "Authorization: Bearer bench-token" "http://127.0.0.1:$NODE_API/api/v1/tunnel")" \
    || echo "note: the tunnel restarted during the benchmark" >&2
