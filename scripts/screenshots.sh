#!/usr/bin/env bash
# Regenerates screenshots/: one PNG (and the plain-text capture) of every console view, taken
# from the real demo stack (hub + node + 2-disk QEMU VM + 2-disk vSphere VM in govmomi's
# simulator, see demo.sh) while a backup runs; two more on a wide screen ($WIDE columns): the VMs
# view with its Source column, and a vSphere CBT incremental's detail with its change ids.
#
#   sudo ./scripts/screenshots.sh
#
# How: the console runs in a tmux pane of its own (own tmux server socket) at $COLS×$ROWS; keys
# go in with `tmux send-keys`; `tmux capture-pane -e -p` gives the screen with its colours;
# `aha` turns that into HTML; headless Chromium renders the HTML to PNG. Before the captures the
# stack gets some history: a completed full backup, an incremental after guest writes, the same
# for the vSphere VM (a CBT incremental), a cancelled full backup, a backup policy over the demo
# VMs; then a full backup runs (the copy is throttled so that it is still running while every view
# is captured). The Policies view, a policy's detail and the prune preview are captured when the
# hub serves policies (a hub without them answers 404 to `policy create`: those three are skipped).
set -euo pipefail
# shellcheck source=scripts/demo.sh
source "$(dirname "${BASH_SOURCE[0]}")/demo.sh"

COLS=${COLS:-100}
ROWS=${ROWS:-30}
# The console's wide layout starts at 120 columns inside the frame.
WIDE=${WIDE:-130}
out=$demo_root/screenshots
throttle=$((3 << 20))
tmux_sock=sendense-screens-$$

shots_cleanup() {
  tmux -L "$tmux_sock" kill-server 2>/dev/null || true
  demo_cleanup
}
trap shots_cleanup EXIT
trap 'exit 130' INT TERM

if ! command -v chromium >/dev/null; then
  say "installing chromium (headless renderer of the captures)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >&2
fi
command -v aha >/dev/null || bash "$demo_root/scripts/setup.sh" packages
demo_build
demo_stack "$throttle"
[ -n "$vsphere" ] || { say "the screenshots show a vSphere VM: the demo could not start one (see above)"; exit 1; }

# Waits until `console backups list --json` shows backup $1 in a status matching $2.
wait_status() {
  for _ in $(seq 1 600); do
    console backups list --json | python3 -c '
import json, re, sys
bs = [b for b in json.load(sys.stdin) if b["backup_id"] == sys.argv[1]]
sys.exit(0 if bs and re.fullmatch(sys.argv[2], bs[0]["status"]) else 1)' "$1" "$2" && return 0
    sleep 0.2
  done
  say "backup $1 never reached $2"; exit 1
}

say "history: a full backup, guest writes, an incremental, a cancelled full backup"
console backup start "$vm" --type full --wait >/dev/null 2>"$demo/full.log"
guest_writes
console backup start "$vm" --type incremental --wait >/dev/null 2>"$demo/incr.log"
say "history: a full backup of $vsphere_vm, guest writes, a CBT incremental"
console backup start "$vsphere_vm" --type full --wait >/dev/null 2>"$demo/vsphere-full.log"
vsphere_guest_writes
console backup start "$vsphere_vm" --type incremental --wait >/dev/null 2>"$demo/vsphere-incr.log"
vsphere_incr=$(console backups list --json | python3 -c '
import json, sys
print([b for b in json.load(sys.stdin) if b["vm_name"] == sys.argv[1] and b["status"] == "completed"
       and b["backup_type"] == "incremental"][0]["backup_id"])' "$vsphere_vm")
id=$(console backup start "$vm" --type full 2>/dev/null)
wait_status "$id" running
console backup cancel "$id" >/dev/null 2>&1
wait_status "$id" cancelled

say "history: a backup policy over the demo VMs"
policy=$(console policy create demo-nightly --vm "$vm" --vm "$vsphere_vm" --schedule '0 1 * * *' \
  --timezone Europe/London --weekly-full-on sun --keep-last 1 --keep-daily 7 --keep-weekly 4 \
  --max-chain-length 14 2>"$demo/policy.log") || {
  say "the hub has no policies ($(tail -1 "$demo/policy.log")): the Policies captures are skipped"
  policy=""
}

say "a full backup that runs while the views are captured"
id=$(console backup start "$vm" --type full 2>/dev/null)
# The console starts with the job, so that its throughput history covers the whole copy.
t() { tmux -L "$tmux_sock" "$@"; }
t -f /dev/null new-session -d -s ui -x "$COLS" -y "$ROWS" -e TERM=xterm-256color \
  "$bin/sendense-console --hub http://$hub_addr --token-file $demo/token --log-file $demo/console.log"
wait_status "$id" running
# A quarter done (bytes_transferred counts only what the node wrote, so the disks' progress is
# summed): the gauges and the throughput sparklines have something to show.
for _ in $(seq 1 300); do
  console backups list --json | python3 -c '
import json, sys
b = [b for b in json.load(sys.stdin) if b["backup_id"] == sys.argv[1]][0]
done = sum(d["bytes_done"] for d in b["disk_results"])
sys.exit(0 if b["total_bytes"] and done * 4 >= b["total_bytes"] else 1)' "$id" && break
  sleep 0.2
done

# Waits until the screen shows $1.
wait_screen() {
  for _ in $(seq 1 100); do t capture-pane -p -t ui | grep -qF -- "$1" && return 0; sleep 0.1; done
  say "the console never showed '$1':"; t capture-pane -p -t ui >&2; exit 1
}
# Sends keys, waits for $1 on the screen, then lets one refresh pass so gauges show data.
show() {
  local want=$1; shift
  [ $# -gt 0 ] && t send-keys -t ui "$@"
  wait_screen "$want"
  sleep 1.2
}
declare -a names=()
declare -A cols_of=()
capture() {
  t capture-pane -e -p -t ui >"$demo/$1.ansi"
  t capture-pane -p -t ui >"$out/$1.txt"
  names+=("$1")
  cols_of[$1]=$(t display-message -p -t ui '#{window_width}')
}

mkdir -p "$out"
rm -f "$out"/*.png "$out"/*.txt
wait_screen "◉ live"
show "${id:0:8}" 1;                          capture 01-jobs
show "targets" Enter;                        capture 02-job-detail
show "Disks of $vm" Escape 2
# The vSphere VM selected: its source (driver, CBT) goes in the title of its disks.
show "Disks of $vsphere_vm" j;               capture 03-vms
show "Start backup" s;                       capture 04-start-dialog
show "Disks of $vsphere_vm" Escape
show "NBD ports" 3;                          capture 05-ports
show "Forwards of" 4;                        capture 06-tunnel
show "Processes (" 5;                        capture 07-processes
show "Events (" 6;                           capture 08-events
show "${id:0:8}" 1
show "Cancel backup" c;                      capture 09-cancel-confirm
show "aborted" n
show "cancel job" '?';                       capture 10-help
t send-keys -t ui Escape
# An Escape with the next key right behind it reaches the console as Alt-<key>: wait until the
# help is gone.
for _ in $(seq 1 100); do t capture-pane -p -t ui | grep -qF "Keys (any of" || break; sleep 0.1; done
if [ -n "$policy" ]; then
  show "Policies (" 7;                       capture 13-policies
  show "Points of" Enter;                    capture 14-policy-detail
  show "Prune preview" x;                    capture 15-prune-preview
  t send-keys -t ui n
  wait_screen "Prune not started"
  t send-keys -t ui Escape
  wait_screen "Policies ("
fi

say "wide screen ($WIDE columns): the VMs' Source column, a vSphere incremental's change ids"
# The cancel dialog's notice (15 s) has nothing to do with these views: wait until it is gone.
for _ in $(seq 1 200); do t capture-pane -p -t ui | grep -qF "Cancel aborted" || break; sleep 0.1; done
t resize-window -t ui -x "$WIDE" -y "$ROWS"
show "Source" 2;                             capture 11-vms-wide
show "${id:0:8}" 1
show "${vsphere_incr:0:8}" / "${vsphere_incr:0:8}" Enter
show "Job $vsphere_incr" Enter
wait_screen "change id"
capture 12-vsphere-job-detail
t send-keys -t ui Escape Escape

# tmux writes reverse video as SGR 7, which aha turns into white on white (or black on black)
# when the colours are the defaults: resolve it into explicit colours first.
resolve_reverse() {
  python3 -c '
import re, sys
st = {"fg": None, "bg": None, "bold": False, "rev": False, "ul": False}
def apply(params):
    p = [int(x) if x else 0 for x in params.split(";")]
    i = 0
    while i < len(p):
        c = p[i]
        if c == 0: st.update(fg=None, bg=None, bold=False, rev=False, ul=False)
        elif c == 1: st["bold"] = True
        elif c == 22: st["bold"] = False
        elif c == 4: st["ul"] = True
        elif c == 24: st["ul"] = False
        elif c == 7: st["rev"] = True
        elif c == 27: st["rev"] = False
        elif 30 <= c <= 37: st["fg"] = c - 30
        elif 90 <= c <= 97: st["fg"] = c - 82
        elif c == 39: st["fg"] = None
        elif 40 <= c <= 47: st["bg"] = c - 40
        elif 100 <= c <= 107: st["bg"] = c - 92
        elif c == 49: st["bg"] = None
        elif c in (38, 48) and i + 2 < len(p) and p[i + 1] == 5:
            st["fg" if c == 38 else "bg"] = p[i + 2]; i += 2
        elif c in (38, 48) and i + 4 < len(p) and p[i + 1] == 2:
            i += 4
        i += 1
def code(n, base, bright):
    return str(base + n) if n < 8 else str(bright + n - 8) if n < 16 else "%d;5;%d" % (base + 8, n)
def sub(m):
    apply(m.group(1))
    fg, bg = st["fg"], st["bg"]
    if st["rev"]:
        fg, bg = (0 if bg is None else bg), (7 if fg is None else fg)
    out = ["0"] + (["1"] if st["bold"] else []) + (["4"] if st["ul"] else [])
    out += [code(fg, 30, 90)] if fg is not None else []
    out += [code(bg, 40, 100)] if bg is not None else []
    return "\x1b[" + ";".join(out) + "m"
sys.stdout.write(re.sub(r"\x1b\[([0-9;]*)m", sub, sys.stdin.read()))'
}

say "rendering ${#names[@]} captures with aha + headless chromium"
# Cell size of DejaVu Sans Mono at 15px with line-height 18px: about 9 × 18 px.
height=$((ROWS * 18 + 24))
for n in "${names[@]}"; do
  width=$((${cols_of[$n]} * 9 + 24))
  # aha draws black text as dim grey (for a black page); on a coloured background it is black.
  resolve_reverse <"$demo/$n.ansi" | aha --black --title "sendense-console: $n" |
    sed -e 's/\([";]\)color:dimgray;background-color:/\1color:black;background-color:/g' \
      -e 's/filter: contrast(70%) brightness(190%);color:black;background-color:black;/color:black;background-color:#8a8a8a;/g' \
      -e 's|</head>|<style>body{margin:12px;background:#000;} pre{margin:0;font-family:"DejaVu Sans Mono",monospace;font-size:15px;line-height:18px;}</style></head>|' \
      >"$demo/$n.html"
  chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --hide-scrollbars --user-data-dir="$demo/chromium" --window-size="$width,$height" \
    --screenshot="$out/$n.png" "file://$demo/$n.html" >/dev/null 2>&1
  [ -s "$out/$n.png" ] || { say "chromium wrote no $out/$n.png"; exit 1; }
done
ls -l "$out" >&2
say "done: $out"
