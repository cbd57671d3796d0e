#!/usr/bin/env bash
# Resident memory and CPU of sendense-console, idle and while a 2-disk backup runs.
#
# Starts a real sendense-hub (SQLite, own data dir, NBD ports 20100-20200) on a free loopback
# port, registers a 2-disk VM without a node, opens the console in a private tmux server at
# 80x24, and measures the console process from /proc (schedstat: CPU time in ns; status: RSS):
#   1. idle: event stream open, nothing changing, for $SECS seconds;
#   2. running: a backup whose progress this script reports to the hub once a second (as a node
#      would), with the console on the job's detail view (gauges, sparklines), for $SECS seconds.
# Everything started here is stopped by PID (and its tmux server by socket) on exit.
#
# usage: console/bench/resources.sh [debug|release] [SECS]   (build first: cargo build -p agent-hub
#        and cargo build [--release] -p console@0.1.0 with the same CARGO_TARGET_DIR)
set -euo pipefail
profile=${1:-release}
secs=${2:-30}
target=${CARGO_TARGET_DIR:-$(cd "$(dirname "$0")/../.." && pwd)/target}
console_bin=$target/$profile/sendense-console
hub_bin=$target/debug/sendense-hub
[ -x "$hub_bin" ] || hub_bin=$target/release/sendense-hub
for b in "$console_bin" "$hub_bin"; do [ -x "$b" ] || { echo "missing $b: build it first" >&2; exit 1; }; done

work=$(mktemp -d)
sock=sendense-console-bench-$$
hub_pid=
progress_pid=
cleanup() {
  [ -n "$progress_pid" ] && kill "$progress_pid" 2>/dev/null || true
  tmux -L "$sock" kill-server 2>/dev/null || true
  if [ -n "$hub_pid" ]; then kill -TERM "$hub_pid" 2>/dev/null || true; wait "$hub_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
url=http://127.0.0.1:$port
"$hub_bin" --listen "127.0.0.1:$port" --data-dir "$work/hub" --nbd-ports 20100-20200 >"$work/hub.out" 2>&1 &
hub_pid=$!
for _ in $(seq 50); do curl -sf "$url/health" >/dev/null && break; sleep 0.2; done
token=$(cat "$work/hub/token")
api() { curl -sf -H "Authorization: Bearer $token" -H 'content-type: application/json' "$@"; }
api -X POST "$url/api/v1/vms" -d '{"vm_name":"benchvm","node":null,"disks":[
  {"disk_key":2000,"unit_number":0,"size_bytes":1073741824,"label":"disk0"},
  {"disk_key":2001,"unit_number":1,"size_bytes":268435456,"label":"disk1"}]}' >/dev/null
repo=$(api "$url/api/v1/repositories" | python3 -c 'import json,sys;print(json.load(sys.stdin)[0]["id"])')

tmux -L "$sock" -f /dev/null new-session -d -s ui -x 80 -y 24 \
  "$console_bin --hub $url --token-file $work/hub/token --log-file $work/console.log"
pid=$(tmux -L "$sock" display-message -p -t ui '#{pane_pid}')
for _ in $(seq 50); do tmux -L "$sock" capture-pane -p -t ui | grep -q 'live' && break; sleep 0.2; done

measure() { # label
  local a b
  a=$(awk '{print $1}' "/proc/$pid/schedstat"); sleep "$secs"; b=$(awk '{print $1}' "/proc/$pid/schedstat")
  python3 - "$1" "$a" "$b" "$secs" "$(awk '/VmRSS/{print $2}' "/proc/$pid/status")" <<'PY'
import sys
label, a, b, secs, rss = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
print(f"{label:<28} cpu {100*(b-a)/1e9/secs:6.3f}% of a core ({(b-a)/1e6:7.1f} ms in {secs:.0f} s)   rss {rss/1024:5.1f} MiB")
PY
}

echo "sendense-console ($profile) at 80x24 against $url, console pid $pid"
measure "idle (stream open)"

id=$("$console_bin" --hub "$url" --token-file "$work/hub/token" backup start benchvm --type full --repository "$repo" 2>/dev/null)
(
  g=1073741824; q=268435456
  for i in $(seq 1 $((secs + 10))); do
    a=$((g * i / (secs + 10))); b=$((q * i / (secs + 10)))
    api -X POST "$url/api/v1/backups/$id/progress" -d "{\"disks\":[
      {\"disk_key\":2000,\"bytes_done\":$a,\"bytes_total\":$g,\"status\":\"running\"},
      {\"disk_key\":2001,\"bytes_done\":$b,\"bytes_total\":$q,\"status\":\"running\"}]}" >/dev/null || true
    sleep 1
  done
) &
progress_pid=$!
sleep 2
tmux -L "$sock" send-keys -t ui 1 Enter
measure "running job (detail view)"
tmux -L "$sock" capture-pane -p -t ui | sed -n 4,6p
"$console_bin" --hub "$url" --token-file "$work/hub/token" backup cancel "$id" >/dev/null 2>&1 || true
