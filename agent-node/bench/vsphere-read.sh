#!/usr/bin/env bash
# What the vSphere data path costs: reading one disk of the govmomi simulator (the project's
# launcher, tests/vcsim) through nbdkit's curl plugin over HTTPS with the SOAP session cookie, as
# the vSphere driver does, against reading the same flat file through nbdkit's file plugin.
# Both are read whole by `nbdcopy --connections=1 ... null:` (the copy engine uses one connection
# to an nbdkit, which does not advertise multi-conn for curl). Prints seconds and MiB/s per run
# and the median ratio curl/file.
#
#   agent-node/bench/vsphere-read.sh [RUNS] [SIZE_MIB]     (defaults: 5 512)
#
# First figures (`vsphere-read.sh 5 512`, shared 2-core machine, load ~3, debug-built launcher):
# curl 1.87-2.17 s (236-273 MiB/s), file 0.13-0.24 s (page cache), median ratio 14.7. The HTTPS
# path (the simulator's Go TLS server plus curl) bounds a vSphere copy here at ~250 MiB/s, below
# the copy engine's 330-540 MiB/s qcow2-to-qcow2 (bench/copy.sh); VDDK is the production path.
# Part 2 (`vsphere-read.sh 3 512`, release build, load ~2): from the curl export into a fresh
# qcow2 (qemu-nbd cache=none), sendense-node copy 2.12-2.43 s (211-242 MiB/s), nbdcopy 2.05-2.30 s
# (223-250 MiB/s), median time ratio sendense/nbdcopy 1.04: on par, both bound by the HTTPS read.
#
# Needs the launcher built by the tests (`cargo test -p agent-node --test vsphere_driver` builds
# it into $CARGO_TARGET_DIR/vcsim/). Everything listens on 127.0.0.1; every process it starts is
# stopped by PID.
set -euo pipefail
RUNS=${1:-5}
SIZE=${2:-512}
root=$(cd "$(dirname "$0")/../.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$root/target}
launcher=$(ls -t "$target_dir"/vcsim/vcsim-launcher-* 2>/dev/null | head -1)
[ -x "$launcher" ] || { echo "no launcher in $target_dir/vcsim: run the vsphere_driver tests once" >&2; exit 1; }

work=$(mktemp -d /tmp/sendense-vsbench-XXXXXX)
pids=()
cleanup() {
  exec 4>&- 2>/dev/null || true
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
now() { date +%s.%N; }
json() { python3 -c "import json,sys; d=json.load(open('$work/ready.json')); print($1)"; }

printf 'pw-%s' "$RANDOM$RANDOM" >"$work/password"
chmod 600 "$work/password"
mkfifo "$work/stdin"
"$launcher" -listen 127.0.0.1:0 -dir "$work/ds" -ready "$work/ready.json" -user bench@vsphere.local \
  -password-file "$work/password" -disks "${SIZE}M" -vm benchvm <"$work/stdin" >"$work/launcher.log" 2>&1 &
pids+=($!)
exec 4>"$work/stdin"   # the launcher exits when this closes
for _ in $(seq 1 600); do [ -s "$work/ready.json" ] && break; sleep 0.05; done
[ -s "$work/ready.json" ] || { cat "$work/launcher.log" >&2; exit 1; }
url=$(json "d['url']")
cp "$(json "d['cert_pem']")" "$work/cert.pem"
flat=$(json "d['vm']['disks'][0]['path_on_disk']")
file_name=$(json "d['vm']['disks'][0]['file_name']")
dc=$(json "d['datacenter']")
ds=$(json "d['datastore']")

# Half the disk random data in 8 MiB runs, half holes (the simulator serves holes as zeroes).
python3 - "$flat" "$SIZE" <<'EOF'
import os, sys
path, size = sys.argv[1], int(sys.argv[2])
with open(path, "r+b") as f:
    for mib in range(0, size, 16):
        f.seek(mib << 20)
        f.write(os.urandom(8 << 20))
EOF

# The session cookie, as the driver's client gets it (SOAP Login).
cookie=$(curl -sS --cacert "$work/cert.pem" -D - -o /dev/null -H 'Content-Type: text/xml' \
  -H 'SOAPAction: urn:vim25/6.5' --data-binary @- "$url/sdk" <<EOF | tr -d '\r' | sed -n 's/^[Ss]et-[Cc]ookie: \(vmware_soap_session=[^;]*\).*/\1/p'
<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body><Login xmlns="urn:vim25"><_this type="SessionManager">SessionManager</_this><userName>bench@vsphere.local</userName><password>$(cat "$work/password")</password></Login></soapenv:Body></soapenv:Envelope>
EOF
)
[ -n "$cookie" ] || { echo "login failed" >&2; exit 1; }
printf '%s' "$cookie" >"$work/cookie"
chmod 600 "$work/cookie"
path=${file_name#*] }
disk_url="$url/folder/${path%.vmdk}-flat.vmdk?dcPath=$dc&dsName=$ds"

start_nbdkit() { # name, plugin args...
  local sock=$work/$1.sock; shift
  nbdkit --exit-with-parent --foreground --readonly --unix "$sock" --exportname e "$@" 2>>"$work/nbdkit.log" &
  pids+=($!)
  for _ in $(seq 1 200); do nbdinfo --size "nbd+unix:///e?socket=$sock" >/dev/null 2>&1 && return 0; sleep 0.05; done
  cat "$work/nbdkit.log" >&2; return 1
}
start_nbdkit curl curl "url=$disk_url" "cookie=+$work/cookie" protocols=https "cainfo=$work/cert.pem"
start_nbdkit file file "$flat"
bytes=$(nbdinfo --size "nbd+unix:///e?socket=$work/curl.sock")
[ "$bytes" = "$(nbdinfo --size "nbd+unix:///e?socket=$work/file.sock")" ]
# Same bytes through both.
cmp <(nbdcopy "nbd+unix:///e?socket=$work/curl.sock" - | md5sum) <(md5sum <"$flat") >/dev/null \
  || { echo "curl path read different bytes" >&2; exit 1; }

echo "disk: $SIZE MiB ($((SIZE / 2)) MiB random data), $RUNS runs, nbdcopy --connections=1 to null:"
ratios=()
for i in $(seq 1 "$RUNS"); do
  line="run $i:"
  for kind in curl file; do
    t0=$(now)
    nbdcopy --connections=1 "nbd+unix:///e?socket=$work/$kind.sock" null:
    t1=$(now)
    secs=$(echo "$t1 - $t0" | bc -l)
    eval "t_$kind=$secs"
    line+=$(printf ' %s %.2f s (%.0f MiB/s)' "$kind" "$secs" "$(echo "$SIZE / $secs" | bc -l)")
  done
  r=$(echo "$t_curl / $t_file" | bc -l)
  ratios+=("$r")
  echo "$line  curl/file $(printf '%.2f' "$r")"
done
median=$(printf '%s\n' "${ratios[@]}" | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}')
printf 'median curl/file time ratio: %.2f\n' "$median"

# Part 2: the copy engine against nbdcopy on the same path, as a vSphere backup runs it: from the
# nbdkit curl export into a fresh QCOW2 served by qemu-nbd the way the hub serves targets
# (cache=none, aio=threads), the target known to be zero (holes skipped). Alternating order;
# every target is compared with the disk file.
node=${SENDENSE_NODE:-$target_dir/release/sendense-node}
if [ ! -x "$node" ]; then
  echo "building release sendense-node..."
  (cd "$root" && cargo build --release -q -p agent-node)
fi
copy_once() { # tool -> seconds
  local dst=$work/target.qcow2 sock=$work/target.sock t0 t1 ok=1
  rm -f "$dst" "$sock"
  qemu-img create -q -f qcow2 "$dst" "$bytes"
  qemu-nbd --format=qcow2 --export-name=t --socket="$sock" --persistent --shared=8 --cache=none \
    --aio=threads --discard=unmap --detect-zeroes=unmap "$dst" 2>>"$work/qemu-nbd.log" &
  local qpid=$!
  pids+=("$qpid")
  for _ in $(seq 1 200); do [ -S "$sock" ] && break; sleep 0.05; done
  t0=$(now)
  case $1 in
    sendense) "$node" copy --from "nbd+unix:///e?socket=$work/curl.sock" \
      --to "nbd+unix:///t?socket=$sock" --destination-is-zero >"$work/copy.log" 2>&1 || ok=0 ;;
    nbdcopy) nbdcopy --destination-is-zero --flush "nbd+unix:///e?socket=$work/curl.sock" \
      "nbd+unix:///t?socket=$sock" >"$work/copy.log" 2>&1 || ok=0 ;;
  esac
  t1=$(now)
  kill "$qpid"; wait "$qpid" 2>/dev/null || true
  [ "$ok" = 1 ] || { echo "$1 failed:" >&2; cat "$work/copy.log" >&2; exit 1; }
  qemu-img compare -q -f raw -F qcow2 "$flat" "$dst" || { echo "$1: target differs" >&2; exit 1; }
  echo "$t1 - $t0" | bc -l
}
echo
echo "copy into a fresh qcow2 (qemu-nbd cache=none): sendense-node copy vs nbdcopy, $RUNS runs"
ratios=()
for i in $(seq 1 "$RUNS"); do
  if (( i % 2 )); then order="sendense nbdcopy"; else order="nbdcopy sendense"; fi
  for tool in $order; do eval "c_$tool=\$(copy_once $tool)"; done
  r=$(echo "$c_sendense / $c_nbdcopy" | bc -l)
  ratios+=("$r")
  printf 'run %d: sendense %.2f s (%.0f MiB/s)  nbdcopy %.2f s (%.0f MiB/s)  sendense/nbdcopy %.2f\n' "$i" \
    "$c_sendense" "$(echo "$SIZE / $c_sendense" | bc -l)" "$c_nbdcopy" "$(echo "$SIZE / $c_nbdcopy" | bc -l)" "$r"
done
median=$(printf '%s\n' "${ratios[@]}" | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}')
printf 'median sendense/nbdcopy time ratio: %.2f (below 1: the engine is faster)\n' "$median"
