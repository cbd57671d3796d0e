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
