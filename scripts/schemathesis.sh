#!/usr/bin/env bash
# Schemathesis against a live hub and a live node: the real debug binaries on 127.0.0.1 (hub on
# SQLite with its admin token, node with its own credential enrolled by the hub), every operation
# of docs/openapi/{hub,node}.json (the documents each agent serves at /api/v1/openapi.json; the
# script checks they are the committed ones), generated and mutated inputs, every check. Fails on
# any 5xx, any answer not matching its documented schema or status, any crash.
#
# Settings and the short allow-list (operations not run, each with its reason) are in
# scripts/schemathesis.toml. schemathesis comes from PyPI into /opt/sendense-venv
# (scripts/setup.sh). Usage: scripts/schemathesis.sh [hub|node]... (default both); extra
# arguments after `--` go to `schemathesis run` (e.g. `-- --max-examples 20`).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
venv=${SENDENSE_SCHEMATHESIS_VENV:-/opt/sendense-venv}
[ -x "$venv/bin/schemathesis" ] || { echo "schemathesis.sh: $venv/bin/schemathesis missing; run scripts/setup.sh" >&2; exit 1; }
# Through scripts/schemathesis-run.py: the venv's schemathesis with a guard for CPython gh-106905.
st=("$venv/bin/python" "$root/scripts/schemathesis-run.py")
"${st[@]}" --guard-check || { echo "schemathesis.sh: the gh-106905 guard no longer hooks this hypothesis; see scripts/schemathesis-run.py" >&2; exit 1; }

agents=()
while [ $# -gt 0 ]; do
  case $1 in
    hub|node) agents+=("$1"); shift ;;
    --) shift; break ;;
    *) echo "schemathesis.sh: unknown argument $1 (hub, node, -- ARGS)" >&2; exit 2 ;;
  esac
done
[ ${#agents[@]} -gt 0 ] || agents=(hub node)

target=${CARGO_TARGET_DIR:-$root/target}
cargo build -q --bin sendense-hub --bin sendense-node
bin=$target/debug

work=$target/schemathesis
rm -rf "$work"
mkdir -p -m 0700 "$work"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

free_port() {
  /usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
wait_up() { # URL LOG
  for _ in $(seq 1 150); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "schemathesis.sh: $1 did not answer; its log:" >&2; tail -30 "$2" >&2; exit 1
}

hub_port=$(free_port)
node_port=$(free_port)
hub=http://127.0.0.1:$hub_port
node=http://127.0.0.1:$node_port
mkdir -p -m 0700 "$work/hub" "$work/node/run"
# NBD ports no other test of this machine uses; no operation run here starts a qemu-nbd, but a
# fuzzed backup of a registered VM would try.
"$bin/sendense-hub" --listen "127.0.0.1:$hub_port" --data-dir "$work/hub" \
  --token-file "$work/token" --nbd-ports 10390-10399 </dev/null >"$work/hub.log" 2>&1 &
pids+=($!)
wait_up "$hub/health" "$work/hub.log"
"$bin/sendense-hub" --data-dir "$work/hub" node enroll st-node --output "$work/node.credential" \
  >"$work/enroll.log" 2>&1 || { cat "$work/enroll.log" >&2; exit 1; }
printf 'run_dir = "%s"\n' "$work/node/run" >"$work/node/node.toml"
"$bin/sendense-node" --config "$work/node/node.toml" --listen "127.0.0.1:$node_port" \
  --name st-node --hub-url "$hub" --token-file "$work/node.credential" \
  </dev/null >"$work/node.log" 2>&1 &
pids+=($!)
wait_up "$node/api/v1/health" "$work/node.log"

status=0
for agent in "${agents[@]}"; do
  case $agent in
    hub) url=$hub; token_file=$work/token ;;
    node) url=$node; token_file=$work/node.credential ;;
  esac
  # The served document is the committed one (the unit tests check the code generates it).
  printf 'Authorization: Bearer %s\n' "$(cat "$token_file")" >"$work/$agent.auth"
  chmod 600 "$work/$agent.auth"
  curl -sf -H @"$work/$agent.auth" "$url/api/v1/openapi.json" >"$work/$agent.json"
  if ! /usr/bin/python3 -c 'import json,sys; sys.exit(json.load(open(sys.argv[1])) != json.load(open(sys.argv[2])))' \
    "$work/$agent.json" "docs/openapi/$agent.json"; then
    echo "schemathesis.sh: $url/api/v1/openapi.json differs from docs/openapi/$agent.json" >&2
    status=1
    continue
  fi
  echo "schemathesis: $agent at $url ($(/usr/bin/python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(sum(len(v) for v in d["paths"].values()))' "docs/openapi/$agent.json") operations)"
  # The token reaches schemathesis through its environment (the config's ${...}), never argv.
  # From the work directory: schemathesis keeps its cache (.schemathesis/) where it runs.
  run_st() {
    (cd "$work" && SENDENSE_ST_TOKEN=$(cat "$token_file") "${st[@]}" --config-file "$root/scripts/schemathesis.toml" \
      run "$root/docs/openapi/$agent.json" --url "$url" \
      --report junit --report-dir "$work/report-$agent" "$@" >"$work/$agent.log" 2>&1)
  }
  if run_st "$@"; then
    grep -E "^(Test cases|API Operations|Summary|[0-9]+ passed)" "$work/$agent.log" || tail -5 "$work/$agent.log"
    echo "schemathesis: $agent ok (log: $work/$agent.log)"
  else
    status=1
    echo "schemathesis: $agent FAILED (full log: $work/$agent.log)" >&2
    tail -120 "$work/$agent.log" >&2
  fi
  if grep -qE "panicked|internal error answered" "$work/hub.log" "$work/node.log"; then
    echo "schemathesis: a panic or internal error in the agents' logs:" >&2
    grep -E "panicked|internal error answered" "$work/hub.log" "$work/node.log" | head -20 >&2
    status=1
  fi
done
for p in "${pids[@]}"; do
  kill -0 "$p" 2>/dev/null || { echo "schemathesis: an agent died during the run (pid $p)" >&2; status=1; }
done
exit $status
