#!/usr/bin/env bash
# Several disks copied at once through the node's SSH tunnel against the same disks copied
# directly, for tunnels of 1, 2 and 4 ssh processes ("links", `[tunnel] links`), with the CPU
# each kind of process used.
#
# Sets up, all on loopback: a real sshd (own config, generated keys, one restricted key line per
# node from `sendense-node tunnel authorized-key --nbd unix`), one `sendense-node` daemon per link
# count holding its tunnel (streamlocal forwards, the default), a qcow2 source holding DATA_MIB of
# random data in a disk twice that size, served by one read-only qemu-nbd per disk (as a snapshot
# export per disk), and per copy a fresh qcow2 target per disk behind qemu-nbd with the hub's
# options on HUBDIR/<slot>.sock (plain NBD; AUTH=tls for the hub's x509 TLS). The slots are
# consecutive, as the hub hands them out, so N disks land on N different links when there are
# N links. Then, for 1, 2 and 4 disks, round-robin: all disks at once directly, then through each
# tunnel (`sendense-node copy --destination-is-zero`, one per disk, in parallel).
#
# Prints every run (aggregate MiB/s, load average, CPU seconds of: the copies (the node's copy
# engine), the source and target qemu-nbd, the tunnel's ssh processes and the hub's sshd session
# processes), then per disk count and tunnel: the median throughput, the median and range of
# the paired ratio tunnel/direct, and median CPU seconds per GiB of each kind of process.
#
# Usage: bench/tunnel-disks.sh [DATA_MIB per disk (default 512)] [RUNS (default 5)]
# Env:   NODE_BIN (default: $CARGO_TARGET_DIR or target, release/sendense-node)
#        DISKS (default "1 2 4"), LINKS (default "1 2 4"), AUTH (plain|tls, default plain)
#        TUNNEL_CIPHERS (default: the node's), COPY_ARGS (extra `copy` flags, e.g. "--connections 2")
#        TUNNEL_COPY_ARGS: flags only for the copies through a tunnel (default "--connections 4",
#                  what the node's backups through its tunnel take: CopyOptions::tunnel_connections;
#                  the direct copies keep the node's default of 1)
#        DELAY_MS: a simulated WAN between node and hub: every tunnel's ssh connection goes through
#                  the project's delaying relay (`sendense-node relay`, +DELAY_MS each way, so a
#                  round trip gains 2 x DELAY_MS); the direct copies stay on loopback as the
#                  reference. E.g. `DELAY_MS=10 DISKS="1 2" bench/tunnel-disks.sh 1024 5`.
set -euo pipefail

DATA_MIB=${1:-512}
RUNS=${2:-5}
SIZE_MIB=$((DATA_MIB * 2))
DISKS=${DISKS:-1 2 4}
LINKS=${LINKS:-1 2 4}
AUTH=${AUTH:-plain}
HERE=$(cd "$(dirname "$0")/.." && pwd)
NODE_BIN=${NODE_BIN:-${CARGO_TARGET_DIR:-$HERE/target}/release/sendense-node}
BIND=127.0.0.2
MAXD=0; for n in $DISKS; do ((n > MAXD)) && MAXD=$n; done
read -r -a COPY_EXTRA <<<"${COPY_ARGS:-}"
read -r -a TUNNEL_EXTRA <<<"${TUNNEL_COPY_ARGS---connections 4}"

for tool in "$NODE_BIN" /usr/sbin/sshd ssh ssh-keygen qemu-nbd qemu-img curl setsid awk openssl pgrep; do
    command -v "$tool" >/dev/null || { echo "missing $tool (build: cargo build --release -p agent-node)" >&2; exit 1; }
done

DIR=$(mktemp -d /var/tmp/tunnel-disks.XXXXXX)
mkdir -p /run/sshd
PIDS=()
cleanup() {
    # Only what this script started, by PID (sshd by its own process group: its sessions too).
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    [[ -n ${SSHD_PID:-} ]] && kill -KILL -- "-$SSHD_PID" 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT

free_port() { # free on 127.0.0.1 and 127.0.0.2
    local p
    for _ in $(seq 500); do
        p=$((20000 + RANDOM % 12000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && ! (exec 3<>"/dev/tcp/$BIND/$p") 2>/dev/null; then
            echo "$p"; return
        fi
    done
    echo "no free port" >&2; exit 1
}

SSH_PORT=$(free_port); SLOT0=$(free_port); USER_NAME=$(id -un)
TUNNEL_PORT=$SSH_PORT # where the nodes' ssh connects: sshd itself, or the delaying relay before it
HUB_NBD=$DIR/hubnbd
mkdir -m 750 "$HUB_NBD"
# shellcheck source=bench/lib-nbd-tls.sh
. "$HERE/bench/lib-nbd-tls.sh"
[[ $AUTH == tls ]] && nbd_tls_certs
nbd_tls_args "$AUTH"

ssh-keygen -q -t ed25519 -N '' -C bench-host -f "$DIR/host_key"
declare -A HUB_API REVERSE NODE_API NODE_PID
: >"$DIR/authorized_keys"
for l in $LINKS; do
    HUB_API[$l]=$(free_port); REVERSE[$l]=$(free_port); NODE_API[$l]=$(free_port)
    ssh-keygen -q -t ed25519 -N '' -C "bench-links-$l" -f "$DIR/key$l"
    "$NODE_BIN" tunnel authorized-key --tunnel-identity "$DIR/key$l" --nbd unix --hub-nbd-dir "$HUB_NBD" \
        --nbd-ports "$SLOT0-$((SLOT0 + MAXD - 1))" --hub-api-port "${HUB_API[$l]}" \
        --reverse-port "${REVERSE[$l]}" >>"$DIR/authorized_keys"
done
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
disown "$SSHD_PID"
for _ in $(seq 500); do (exec 3<>"/dev/tcp/127.0.0.1/$SSH_PORT") 2>/dev/null && break; sleep 0.02; done
echo "[127.0.0.1]:$SSH_PORT $(cat "$DIR/host_key.pub")" >"$DIR/known_hosts"
if [[ -n ${DELAY_MS:-} ]]; then
    TUNNEL_PORT=$(free_port)
    "$NODE_BIN" relay --listen "127.0.0.1:$TUNNEL_PORT" --to "127.0.0.1:$SSH_PORT" --delay-ms "$DELAY_MS" \
        >"$DIR/relay.log" 2>&1 &
    PIDS+=("$!")
    for _ in $(seq 500); do (exec 3<>"/dev/tcp/127.0.0.1/$TUNNEL_PORT") 2>/dev/null && break; sleep 0.02; done
    echo "[127.0.0.1]:$TUNNEL_PORT $(cat "$DIR/host_key.pub")" >>"$DIR/known_hosts"
fi

echo bench-token >"$DIR/token"
chmod 600 "$DIR/token"
for l in $LINKS; do
    cfg=$DIR/node$l.toml
    printf 'run_dir = "%s"\n[tunnel]\nlinks = %d\n' "$DIR/run$l" "$l" >"$cfg"
    [[ -n ${TUNNEL_CIPHERS:-} ]] && printf 'ciphers = "%s"\n' "$TUNNEL_CIPHERS" >>"$cfg"
    RUST_LOG=warn "$NODE_BIN" --config "$cfg" --listen "127.0.0.1:${NODE_API[$l]}" --name "bench$l" \
        --token-file "$DIR/token" --tunnel "$USER_NAME@127.0.0.1:$TUNNEL_PORT" --tunnel-identity "$DIR/key$l" \
        --tunnel-known-hosts "$DIR/known_hosts" --tunnel-bind "$BIND" --tunnel-nbd unix \
        --tunnel-hub-nbd-dir "$HUB_NBD" --tunnel-nbd-ports "$SLOT0-$((SLOT0 + MAXD - 1))" \
        --tunnel-hub-api-port "${HUB_API[$l]}" --tunnel-reverse-port "${REVERSE[$l]}" 2>"$DIR/node$l.log" &
    NODE_PID[$l]=$!
    PIDS+=("$!")
done
tunnel_state() { curl -s -H "Authorization: Bearer bench-token" "http://127.0.0.1:${NODE_API[$1]}/api/v1/tunnel" || true; }
for l in $LINKS; do
    for _ in $(seq 300); do
        [[ $(tunnel_state "$l") == '{"state":"up"'* ]] && break
        kill -0 "${NODE_PID[$l]}" 2>/dev/null || { cat "$DIR/node$l.log" >&2; exit 1; }
        sleep 0.1
    done
    [[ $(tunnel_state "$l") == '{"state":"up"'* ]] || { echo "tunnel of $l link(s) not up" >&2; cat "$DIR/node$l.log" >&2; exit 1; }
    echo "tunnel with $l link(s) up: ssh PIDs $(pgrep -d, -P "${NODE_PID[$l]}" -x ssh)"
done

echo "tunnel disks benchmark: ${DATA_MIB} MiB of data per disk (qcow2 of ${SIZE_MIB} MiB), ${RUNS} runs, disks: $DISKS, links: $LINKS, NBD $AUTH"
echo "copies through a tunnel add: ${TUNNEL_EXTRA[*]:-nothing}"
[[ -n ${DELAY_MS:-} ]] && echo "WAN: every tunnel through the delaying relay, +$DELAY_MS ms each way (direct copies: loopback)"
echo "machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), AES-NI: $(grep -qw aes /proc/cpuinfo && echo yes || echo no), $(ssh -V 2>&1), $(qemu-nbd --version | head -1)"
echo "ssh cipher: $(grep -m1 '^    Ciphers' "$DIR/run${LINKS%% *}/tunnel.ssh_config" | awk '{print $2}' | cut -d, -f1) (first choice)"

head -c $((DATA_MIB * 1024 * 1024)) /dev/urandom >"$DIR/source.raw"
truncate -s "${SIZE_MIB}M" "$DIR/source.raw"
qemu-img convert -f raw -O qcow2 "$DIR/source.raw" "$DIR/source.qcow2"
rm -f "$DIR/source.raw"
SRC_PIDS=()
for i in $(seq 0 $((MAXD - 1))); do
    qemu-nbd --read-only --format=qcow2 --export-name=src "--socket=$DIR/src$i.sock" --persistent \
        --shared=8 "$DIR/source.qcow2" 2>"$DIR/src$i.err" &
    PIDS+=("$!"); SRC_PIDS+=("$!")
done
for i in $(seq 0 $((MAXD - 1))); do
    for _ in $(seq 500); do [[ -S $DIR/src$i.sock ]] && break; sleep 0.02; done
done

ticks() { # utime+stime of the live PIDs given, in clock ticks
    local t=0 p s
    for p in "$@"; do
        s=$(cat "/proc/$p/stat" 2>/dev/null) || continue
        s=${s##*) }
        read -r -a f <<<"$s"
        t=$((t + f[11] + f[12]))
    done
    echo "$t"
}
sshd_sessions() { local p; for p in $(pgrep -P "$SSHD_PID"); do echo "$p"; pgrep -P "$p" || true; done; }
HZ=$(getconf CLK_TCK)

# One copy of N disks at once: direct or through the tunnel of L links. Prints
# "seconds copy_ticks src_ticks dst_ticks ssh_ticks sshd_ticks".
run_one() { # ndisks direct|L
    local n=$1 via=$2 i to tp=() cp=() ssh_pids=() s0 h0 d0 t0 t1 cc=0 dt
    for i in $(seq 0 $((n - 1))); do
        rm -f "$DIR/t$i.qcow2"
        qemu-img create -q -f qcow2 "$DIR/t$i.qcow2" "${SIZE_MIB}M"
        # The hub's target options (agent-hub/src/qemu_nbd/config.rs).
        qemu-nbd --format=qcow2 --export-name=dst "--socket=$HUB_NBD/$((SLOT0 + i)).sock" --persistent \
            --shared=8 --discard=unmap --detect-zeroes=unmap --cache=none --aio=threads \
            "${NBD_TLS_ARGS[@]}" "$DIR/t$i.qcow2" 2>"$DIR/dst$i.err" &
        tp+=("$!")
    done
    for i in $(seq 0 $((n - 1))); do
        for _ in $(seq 500); do [[ -S $HUB_NBD/$((SLOT0 + i)).sock ]] && break; sleep 0.02; done
    done
    local via_extra=()
    if [[ $via != direct ]]; then
        via_extra=("${TUNNEL_EXTRA[@]}")
        read -r -a ssh_pids <<<"$(pgrep -d' ' -P "${NODE_PID[$via]}" -x ssh)"
    fi
    # shellcheck disable=SC2046
    s0=$(ticks "${SRC_PIDS[@]}"); h0=$(ticks "${ssh_pids[@]}"); d0=$(ticks $(sshd_sessions))
    t0=$(date +%s.%N)
    for i in $(seq 0 $((n - 1))); do
        if [[ $via == direct ]]; then to="nbd+unix:///dst?socket=$HUB_NBD/$((SLOT0 + i)).sock"
        else to="nbd+unix:///dst?socket=$DIR/run$via/nbd/$((SLOT0 + i)).sock"; fi
        # The wrapper reports the CPU of the copy it waited for (cutime + cstime of its /proc/stat).
        bash -c '"$@" >/dev/null 2>"'"$DIR/copy$i.err"'"; s=$?; st=$(cat /proc/$$/stat); st=${st##*) };
                 read -r -a f <<<"$st"; echo $((f[13] + f[14])) >"'"$DIR/cpu$i"'"; exit $s' _ \
            "$NODE_BIN" copy --from "nbd+unix:///src?socket=$DIR/src$i.sock" --to "$to" \
            --destination-is-zero "${COPY_TLS_ARGS[@]}" "${COPY_EXTRA[@]}" "${via_extra[@]}" &
        cp+=("$!")
    done
    for i in "${!cp[@]}"; do
        wait "${cp[$i]}" || { cat "$DIR/copy$i.err" "$DIR/dst$i.err" >&2; exit 1; }
    done
    t1=$(date +%s.%N)
    for i in $(seq 0 $((n - 1))); do cc=$((cc + $(cat "$DIR/cpu$i"))); done
    dt=$(ticks "${tp[@]}")
    # shellcheck disable=SC2046
    echo "$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", b - a}') $cc $(($(ticks "${SRC_PIDS[@]}") - s0)) $dt" \
        "$(($(ticks "${ssh_pids[@]}") - h0)) $(($(ticks $(sshd_sessions)) - d0))"
    kill -TERM "${tp[@]}"; wait "${tp[@]}" 2>/dev/null || true
}

declare -A T CPU
for n in $DISKS; do
    for r in $(seq "$RUNS"); do
        for via in direct $LINKS; do
            read -r secs cc cs ct ch cd <<<"$(run_one "$n" "$via")"
            T[$n-$via]+="$secs "
            CPU[$n-$via]+="$cc,$cs,$ct,$ch,$cd "
            awk -v n="$n" -v v="$via" -v s="$secs" -v m="$DATA_MIB" -v cc="$cc" -v cs="$cs" -v ct="$ct" \
                -v ch="$ch" -v cd="$cd" -v hz="$HZ" -v r="$r" -v l="$(cut -d' ' -f1 /proc/loadavg)" 'BEGIN {
                printf "run %d: %d disk(s) %-8s %6.2f s %7.1f MiB/s  cpu s: copy %.2f src-nbd %.2f dst-nbd %.2f ssh %.2f sshd %.2f  load %s\n",
                    r, n, (v == "direct" ? "direct" : v " link"), s, n * m / s, cc/hz, cs/hz, ct/hz, ch/hz, cd/hz, l }'
        done
    done
    if [[ $n == "${DISKS##* }" ]]; then
        for i in $(seq 0 $((n - 1))); do
            qemu-img compare -q -f qcow2 -F qcow2 "$DIR/source.qcow2" "$DIR/t$i.qcow2" \
                || { echo "disk $i of the last copy DIFFERS from the source" >&2; exit 1; }
        done
        echo "last copy: every disk identical to the source (qemu-img compare)"
    fi
done

median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
echo "medians over $RUNS paired runs (ratio = direct time / tunnel time of the same run):"
for n in $DISKS; do
    read -r -a dts <<<"${T[$n-direct]}"
    printf '  %d disk(s) direct %7.1f MiB/s\n' "$n" \
        "$(printf '%s\n' "${dts[@]}" | median | awk -v m="$DATA_MIB" -v n="$n" '{print n * m / $1}')"
    for l in $LINKS; do
        read -r -a tts <<<"${T[$n-$l]}"
        ratios=$(for i in "${!dts[@]}"; do awk -v a="${dts[$i]}" -v b="${tts[$i]}" 'BEGIN {printf "%.3f\n", a / b}'; done)
        per_gib=$(printf '%s\n' ${CPU[$n-$l]} | awk -F, -v hz="$HZ" -v g="$(awk -v m="$DATA_MIB" -v n="$n" 'BEGIN {print n * m / 1024}')" \
            '{for (k = 1; k <= 5; k++) print k, $k / hz / g}')
        cpu_med() { awk -v k="$1" '$1 == k {print $2}' <<<"$per_gib" | median; }
        printf '  %d disk(s) %d link(s) %7.1f MiB/s  tunnel/direct median %.2f (range %.2f-%.2f)  cpu s/GiB: copy %.2f src-nbd %.2f dst-nbd %.2f ssh %.2f sshd %.2f\n' \
            "$n" "$l" "$(printf '%s\n' "${tts[@]}" | median | awk -v m="$DATA_MIB" -v n="$n" '{print n * m / $1}')" \
            "$(median <<<"$ratios")" "$(sort -g <<<"$ratios" | head -1)" "$(sort -g <<<"$ratios" | tail -1)" \
            "$(cpu_med 1)" "$(cpu_med 2)" "$(cpu_med 3)" "$(cpu_med 4)" "$(cpu_med 5)"
    done
    per_gib=$(printf '%s\n' ${CPU[$n-direct]} | awk -F, -v hz="$HZ" -v g="$(awk -v m="$DATA_MIB" -v n="$n" 'BEGIN {print n * m / 1024}')" \
        '{for (k = 1; k <= 3; k++) print k, $k / hz / g}')
    printf '  %d disk(s) direct cpu s/GiB: copy %.2f src-nbd %.2f dst-nbd %.2f\n' "$n" \
        "$(awk '$1 == 1 {print $2}' <<<"$per_gib" | median)" "$(awk '$1 == 2 {print $2}' <<<"$per_gib" | median)" \
        "$(awk '$1 == 3 {print $2}' <<<"$per_gib" | median)"
done
echo "load after $(cut -d' ' -f1-3 /proc/loadavg)"
for l in $LINKS; do
    [[ $(tunnel_state "$l") == *'"restarts":0,'* ]] || echo "note: the tunnel with $l link(s) restarted during the benchmark" >&2
done
