#!/usr/bin/env bash
# Copy throughput through the node's SSH tunnel against a direct copy, for both ways the hub can
# serve its exports (TCP ports; unix sockets forwarded as streamlocal, the default) and with the
# NBD authentication (TLS with x509 client certificates, the hub's `nbd_tls`) off and on.
#
# Sets up, all on loopback: a real sshd (own config, generated host and user keys, the restricted
# key lines printed by `sendense-node tunnel authorized-key --nbd tcp|unix`), two `sendense-node`
# daemons holding one tunnel each (TCP forwards bound on 127.0.0.2; streamlocal forwards into
# the second node's run directory), a qemu-nbd source (qcow2, DATA_MIB of random data in a disk
# twice that size) and, per run, a fresh qcow2 target behind qemu-nbd with the hub's options, on
# 127.0.0.1:P or on DIR/hubnbd/P.sock, plain or TLS. Then, round-robin, `sendense-node copy
# --destination-is-zero` to each of the eight combinations (direct or tunnel, tcp or unix, plain
# or tls). Prints every run with the load average, the median throughput of each combination and
# the ratios tunnel/direct and tls/plain. The last copy is compared with the source byte for byte.
#
# Usage: bench/tunnel.sh [DATA_MIB (default 1024)] [RUNS (default 3)]
# Env:   NODE_BIN (default: $CARGO_TARGET_DIR or target, release/sendense-node)
#        BENCH_DIR (default: a new directory under /var/tmp, removed at the end)
#        TUNNEL_CIPHERS (default: the node's, see DEFAULT_CIPHERS in agent-node/src/tunnel/config.rs;
#                        e.g. chacha20-poly1305@openssh.com to measure OpenSSH's own first choice)
#        MODES (default "tcp unix"), AUTH (default "plain tls"): a subset to measure
set -euo pipefail

DATA_MIB=${1:-1024}
RUNS=${2:-3}
SIZE_MIB=$((DATA_MIB * 2))
HERE=$(cd "$(dirname "$0")/.." && pwd)
NODE_BIN=${NODE_BIN:-${CARGO_TARGET_DIR:-$HERE/target}/release/sendense-node}
BIND=127.0.0.2

for tool in "$NODE_BIN" /usr/sbin/sshd ssh ssh-keygen qemu-nbd qemu-img curl setsid awk openssl; do
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

# shellcheck source=bench/lib-nbd-tls.sh
. "$HERE/bench/lib-nbd-tls.sh"
nbd_tls_certs
MODES=${MODES:-tcp unix}
AUTH=${AUTH:-plain tls}
HUB_NBD=$DIR/hubnbd
mkdir -m 750 "$HUB_NBD"
REVERSE2=$(free_port); NODE_API2=$(free_port); HUB_API2=$(free_port)

# Keys and the restricted authorized_keys lines (one key per node: TCP and unix exports).
ssh-keygen -q -t ed25519 -N '' -C bench-host -f "$DIR/host_key"
ssh-keygen -q -t ed25519 -N '' -C bench-node -f "$DIR/user_key"
ssh-keygen -q -t ed25519 -N '' -C bench-node-unix -f "$DIR/user_key_unix"
"$NODE_BIN" tunnel authorized-key --tunnel-identity "$DIR/user_key" --nbd tcp \
    --nbd-ports "$NBD_PORT-$NBD_PORT" --hub-api-port "$HUB_API" --reverse-port "$REVERSE" \
    >"$DIR/authorized_keys"
"$NODE_BIN" tunnel authorized-key --tunnel-identity "$DIR/user_key_unix" --nbd unix \
    --hub-nbd-dir "$HUB_NBD" --nbd-ports "$NBD_PORT-$NBD_PORT" --hub-api-port "$HUB_API2" \
    --reverse-port "$REVERSE2" >>"$DIR/authorized_keys"
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
AllowStreamLocalForwarding local
EOF
setsid /usr/sbin/sshd -D -e -f "$DIR/sshd_config" 2>"$DIR/sshd.log" &
SSHD_PID=$!
disown "$SSHD_PID"  # killed by its process group in cleanup; no job-control notice
wait_port 127.0.0.1 "$SSH_PORT" "$SSHD_PID" sshd
echo "[127.0.0.1]:$SSH_PORT $(cat "$DIR/host_key.pub")" >"$DIR/known_hosts"

# The node daemons holding the tunnels.
echo bench-token >"$DIR/token"
chmod 600 "$DIR/token" # the node refuses a token file others may read
start_node() { # name run_dir key nbd-mode hub_api reverse node_api; waits for `up`
    local cfg="$DIR/$1.toml" pid state=
    printf 'run_dir = "%s"\n[tunnel]\n' "$2" >"$cfg"
    [[ -n ${TUNNEL_CIPHERS:-} ]] && printf 'ciphers = "%s"\n' "$TUNNEL_CIPHERS" >>"$cfg"
    RUST_LOG=warn "$NODE_BIN" --config "$cfg" --listen "127.0.0.1:$7" --name "$1" \
        --token-file "$DIR/token" \
        --tunnel "$USER_NAME@127.0.0.1:$SSH_PORT" --tunnel-identity "$3" \
        --tunnel-known-hosts "$DIR/known_hosts" --tunnel-bind "$BIND" \
        --tunnel-nbd "$4" --tunnel-hub-nbd-dir "$HUB_NBD" \
        --tunnel-nbd-ports "$NBD_PORT-$NBD_PORT" --tunnel-hub-api-port "$5" \
        --tunnel-reverse-port "$6" 2>"$DIR/$1.log" &
    pid=$!
    PIDS+=("$pid")
    for _ in $(seq 300); do
        state=$(curl -s -H "Authorization: Bearer bench-token" "http://127.0.0.1:$7/api/v1/tunnel" || true)
        [[ $state == *'"state":"up"'* ]] && break
        kill -0 "$pid" 2>/dev/null || { cat "$DIR/$1.log" >&2; exit 1; }
        sleep 0.1
    done
    [[ $state == *'"state":"up"'* ]] || { echo "tunnel of $1 not up: $state" >&2; cat "$DIR/$1.log" >&2; exit 1; }
    echo "tunnel of $1: $state"
}

echo "tunnel throughput benchmark: ${DATA_MIB} MiB of data in a ${SIZE_MIB} MiB qcow2, ${RUNS} runs each"
echo "machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), $(ssh -V 2>&1), $(qemu-nbd --version | head -1)"
# The TCP node binds its NBD forward on 127.0.0.2; the unix one only its sockets (and its own
# API forward, on another port).
start_node bench "$DIR/run" "$DIR/user_key" tcp "$HUB_API" "$REVERSE" "$NODE_API"
start_node bench-unix "$DIR/run-unix" "$DIR/user_key_unix" unix "$HUB_API2" "$REVERSE2" "$NODE_API2"
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

run_one() { # direct|tunnel tcp|unix plain|tls -> prints seconds
    local path=$1 mode=$2 tgt=$DIR/target.qcow2 pid start end listen=() to sock=$HUB_NBD/$NBD_PORT.sock
    rm -f "$tgt"
    qemu-img create -q -f qcow2 "$tgt" "${SIZE_MIB}M"
    nbd_tls_args "$3"
    if [[ $mode == tcp ]]; then
        listen=(--bind=127.0.0.1 "--port=$NBD_PORT")
        if [[ $path == direct ]]; then to="nbd://127.0.0.1:$NBD_PORT/dst"; else to="nbd://$BIND:$NBD_PORT/dst"; fi
    else
        listen=("--socket=$sock")
        if [[ $path == direct ]]; then to="nbd+unix:///dst?socket=$sock"
        else to="nbd+unix:///dst?socket=$DIR/run-unix/nbd/$NBD_PORT.sock"; fi
    fi
    # The hub's target options (agent-hub/src/qemu_nbd/config.rs).
    qemu-nbd --format=qcow2 --export-name=dst "${listen[@]}" --persistent \
        --shared=8 --discard=unmap --detect-zeroes=unmap --cache=none --aio=threads \
        "${NBD_TLS_ARGS[@]}" "$tgt" 2>"$DIR/dst.err" &
    pid=$!
    if [[ $mode == tcp ]]; then
        wait_port 127.0.0.1 "$NBD_PORT" "$pid" "target qemu-nbd"
    else
        for _ in $(seq 500); do [[ -S $sock ]] && break; sleep 0.02; done
    fi
    start=$(date +%s.%N)
    "$NODE_BIN" copy --from "nbd://127.0.0.1:$SRC_PORT/src" --to "$to" \
        --destination-is-zero "${COPY_TLS_ARGS[@]}" >/dev/null 2>"$DIR/copy.err" \
        || { cat "$DIR/copy.err" "$DIR/dst.err" >&2; kill "$pid"; exit 1; }
    end=$(date +%s.%N)
    kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
    awk -v a="$start" -v b="$end" 'BEGIN {printf "%.3f\n", b - a}'
}

div() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.4f\n", a / b}'; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

declare -A TIMES
for i in $(seq "$RUNS"); do
    for mode in $MODES; do
        for auth in $AUTH; do
            for path in direct tunnel; do
                t=$(run_one "$path" "$mode" "$auth")
                TIMES[$path-$mode-$auth]+="$t "
                printf 'run %d: %-6s %-4s %-5s %6.2f s (%7.1f MiB/s)   load %s\n' "$i" "$path" "$mode" \
                    "$auth" "$t" "$(div "$DATA_MIB" "$t")" "$(cut -d' ' -f1 /proc/loadavg)"
            done
        done
    done
done
qemu-img compare -q -f qcow2 -F qcow2 "$SRC" "$DIR/target.qcow2" \
    && echo "last copy: identical to the source (qemu-img compare)" \
    || { echo "last copy DIFFERS from the source" >&2; exit 1; }

med() { printf '%s\n' ${TIMES[$1]} | median; }
echo "medians (MiB/s) and ratios:"
for mode in $MODES; do
    for auth in $AUTH; do
        d=$(med "direct-$mode-$auth"); t=$(med "tunnel-$mode-$auth")
        printf '  %-4s %-5s direct %7.1f  tunnel %7.1f  tunnel/direct %.2f\n' "$mode" "$auth" \
            "$(div "$DATA_MIB" "$d")" "$(div "$DATA_MIB" "$t")" "$(div "$d" "$t")"
    done
    if [[ $AUTH == *plain* && $AUTH == *tls* ]]; then
        for path in direct tunnel; do
            printf '  %-4s %-6s tls/plain %.2f\n' "$mode" "$path" \
                "$(div "$(med "$path-$mode-plain")" "$(med "$path-$mode-tls")")"
        done
    fi
done
echo "load after $(cut -d' ' -f1-3 /proc/loadavg)"
for api in "$NODE_API" "$NODE_API2"; do
    grep -q '"restarts":0' <<<"$(curl -s -H "Authorization: Bearer bench-token" "http://127.0.0.1:$api/api/v1/tunnel")" \
        || echo "note: a tunnel restarted during the benchmark" >&2
done
