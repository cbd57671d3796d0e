#!/usr/bin/env bash
# The Debian packages as an operator meets them: build them (scripts/build-debs.sh), lintian
# (no error allowed), `dpkg -i` on this machine, check users, directories, modes and the
# conffiles, start the hub from the installed unit's own ExecStart= line as the unit's User=
# (on a free port, so 127.0.0.1:8082 stays free for the rest of the suite), ask its /health,
# call it with the token the postinst made, read `man sendense-hub`, source the bash
# completion, check that the node's packaged config parses, stop the hub, `dpkg --purge`
# everything and leave the machine as it was (users and directories the test created are
# removed again).
#
#   scripts/test-debs.sh [--profile release|dev] [--no-build]
#
# Needs root (CI runs as root on a throwaway machine); prints "skipped" otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
build_args=("$@")

if [ "$(id -u)" != 0 ]; then
  echo "test-debs: skipped (needs root for dpkg -i)"
  exit 0
fi
packages=(sendense-console sendense-node sendense-hub)
for p in "${packages[@]}"; do
  if dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -qx 'install ok installed'; then
    echo "test-debs: $p is already installed here; refusing to replace it" >&2
    exit 1
  fi
done

for t in lintian man dpkg-shlibdeps curl python3 setpriv; do
  command -v "$t" >/dev/null || { echo "test-debs: $t missing: run scripts/setup.sh packages" >&2; exit 1; }
done

passed=0
failed=0
ok() { passed=$((passed + 1)); echo "  ok: $*"; }
fail() { failed=$((failed + 1)); echo "  FAILED: $*" >&2; }
check() { local what=$1; shift; if "$@" >/dev/null; then ok "$what"; else fail "$what"; fi; }
mode_of() { stat -c '%a %U:%G' "$1" 2>/dev/null || echo missing; }
expect_mode() { local got; got=$(mode_of "$1"); if [ "$got" = "$2" ]; then ok "$1 is $2"; else fail "$1 is $got, expected $2"; fi; }

# What existed before, so that cleanup removes only what this test made.
users=(sendense-hub sendense-node sendense-tunnel)
dirs=(/var/lib/sendense-hub /var/log/sendense-hub /var/lib/sendense-tunnel /run/sendense-nbd
  /var/lib/sendense-node /var/log/sendense-node /run/sendense-node /etc/sendense)
new_users=()
for u in "${users[@]}"; do getent passwd "$u" >/dev/null || new_users+=("$u"); done
new_group=0
getent group sendense-nbd >/dev/null || new_group=1
new_dirs=()
for d in "${dirs[@]}"; do [ -e "$d" ] || new_dirs+=("$d"); done

hub_pid=""
cleanup() {
  set +e
  if [ -n "$hub_pid" ] && kill -0 "$hub_pid" 2>/dev/null; then
    kill -TERM "$hub_pid"
    wait "$hub_pid" 2>/dev/null
  fi
  if [ -d /run/systemd/system ]; then
    rm -rf /run/systemd/system/sendense-hub.service.d
    systemctl daemon-reload 2>/dev/null
  fi
  for p in "${packages[@]}"; do
    dpkg-query -W "$p" >/dev/null 2>&1 && dpkg --purge "$p" >/dev/null
  done
  for d in "${new_dirs[@]}"; do rm -rf "$d"; done
  for u in "${new_users[@]}"; do getent passwd "$u" >/dev/null && userdel "$u"; done
  # userdel removes a user's own group; sendense-nbd is nobody's primary group.
  [ "$new_group" = 1 ] && getent group sendense-nbd >/dev/null && groupdel sendense-nbd
}
trap cleanup EXIT

echo "test-debs: building the packages"
start=$(date +%s)
mapfile -t debs < <(bash scripts/build-debs.sh "${build_args[@]}")
echo "test-debs: built ${debs[*]##*/} in $(( $(date +%s) - start )) s"
[ "${#debs[@]}" = 3 ] || { echo "test-debs: expected 3 packages" >&2; exit 1; }

echo "test-debs: lintian"
start=$(date +%s)
lint_rc=0
lint=$(lintian --fail-on error --tag-display-limit 0 "${debs[@]}" 2>&1) || lint_rc=$?
lint=$(printf '%s\n' "$lint" | grep -v 'running with root privileges' || true)
[ -n "$lint" ] && printf '%s\n' "$lint" | sed 's/^/  /'
errors=$(printf '%s\n' "$lint" | grep -c '^E:' || true)
warnings=$(printf '%s\n' "$lint" | grep -c '^W:' || true)
echo "test-debs: lintian: $errors errors, $warnings warnings (exit $lint_rc, $(( $(date +%s) - start )) s)"
check "lintian reports no error" [ "$errors-$lint_rc" = 0-0 ]

echo "test-debs: dpkg -i"
dpkg -i "${debs[@]}" >"$root/target/test-debs-dpkg.log" 2>&1 || {
  cat "$root/target/test-debs-dpkg.log" >&2
  fail "dpkg -i"
  exit 1
}
ok "dpkg -i of the three packages"
for b in sendense-hub sendense-node sendense-console; do
  check "/usr/bin/$b --version names /usr/bin/$b" \
    sh -c "/usr/bin/$b --version | grep -q 'executable: /usr/bin/$b'"
done

echo "test-debs: users, directories, modes"
check "sendense-hub is in group sendense-nbd" sh -c 'id -nG sendense-hub | grep -qw sendense-nbd'
check "sendense-tunnel is in group sendense-nbd" sh -c 'id -nG sendense-tunnel | grep -qw sendense-nbd'
check "sendense-node exists" getent passwd sendense-node
expect_mode /var/lib/sendense-hub "700 sendense-hub:sendense-hub"
expect_mode /var/lib/sendense-hub/token "600 sendense-hub:sendense-hub"
expect_mode /var/log/sendense-hub "750 sendense-hub:sendense-hub"
expect_mode /run/sendense-nbd "750 sendense-hub:sendense-nbd"
expect_mode /etc/sendense/hub.toml "640 root:sendense-hub"
expect_mode /var/lib/sendense-node "750 sendense-node:sendense-node"
expect_mode /run/sendense-node "750 sendense-node:sendense-node"
expect_mode /etc/sendense/node.toml "640 root:sendense-node"
check "the token is 64 hex digits" grep -qxE '[0-9a-f]{64}' /var/lib/sendense-hub/token
check "hub.toml is a conffile" sh -c "dpkg-query -W -f='\${Conffiles}' sendense-hub | grep -q /etc/sendense/hub.toml"
check "node.toml is a conffile" sh -c "dpkg-query -W -f='\${Conffiles}' sendense-node | grep -q /etc/sendense/node.toml"

echo "test-debs: the hub from its unit's ExecStart"
unit=/lib/systemd/system/sendense-hub.service
# The unit's value of KEY (continuation lines joined), as systemd reads it.
unit_value() { sed -e ':a' -e '/\\$/N; s/\\\n//; ta' "$unit" | sed -n "s/^$1=//p" | tail -1; }
exec_start=$(unit_value ExecStart)
user=$(unit_value User)
group=$(unit_value Group)
workdir=$(unit_value WorkingDirectory)
umask_=$(unit_value UMask)
echo "  ExecStart=$exec_start (User=$user, Group=$group)"
read -r -a argv <<<"$exec_start"
check "ExecStart runs the packaged binary" [ "${argv[0]}" = /usr/bin/sendense-hub ]
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=$root/target/test-debs-hub.log
# SENDENSE_HUB_LISTEN: the flag's variable wins over hub.toml's listen (ExecStart has no
# --listen), so the hub leaves 8082 alone.
if [ "$(ps -p 1 -o comm=)" = systemd ] && [ -d /run/systemd/system ]; then
  mkdir -p /run/systemd/system/sendense-hub.service.d
  printf '[Service]\nEnvironment=SENDENSE_HUB_LISTEN=127.0.0.1:%s\n' "$port" \
    >/run/systemd/system/sendense-hub.service.d/test-port.conf
  systemctl daemon-reload
  systemctl restart sendense-hub.service
  started_by=systemd
else
  (
    cd "$workdir"
    umask "$umask_"
    # The unit's Environment= lines.
    while IFS= read -r kv; do export "${kv?}"; done < <(sed -n 's/^Environment=//p' "$unit")
    export SENDENSE_HUB_LISTEN=127.0.0.1:$port
    exec setpriv --reuid="$user" --regid="$group" --init-groups -- "${argv[@]}"
  ) >"$log" 2>&1 &
  hub_pid=$!
  started_by="setpriv (PID 1 is $(ps -p 1 -o comm=), not systemd)"
fi
echo "  started by $started_by on 127.0.0.1:$port"
health=""
for _ in $(seq 1 150); do
  health=$(curl -sf "http://127.0.0.1:$port/health" 2>/dev/null) && break
  if [ -n "$hub_pid" ] && ! kill -0 "$hub_pid" 2>/dev/null; then break; fi
  sleep 0.2
done
if [ -n "$health" ]; then ok "/health answers: $health"; else fail "/health did not answer"; tail -20 "$log" >&2; fi
check "/health names /usr/bin/sendense-hub" \
  sh -c "printf '%s' \"\$1\" | grep -q '\"executable\":\"/usr/bin/sendense-hub\"'" _ "$health"
hub_user=$(ps -o user= -p "$(printf '%s' "$health" | sed -n 's/.*"pid":\([0-9]*\).*/\1/p')" 2>/dev/null || true)
check "the hub runs as $user (ps: ${hub_user:-none})" [ "$hub_user" = "$user" ]
check "the console reaches the hub with the postinst's token" \
  /usr/bin/sendense-console --hub "http://127.0.0.1:$port" --token-file /var/lib/sendense-hub/token backups list --json
check "the hub logs into /var/log/sendense-hub" sh -c 'ls /var/log/sendense-hub/sendense-hub.log.* >/dev/null'
expect_mode /var/lib/sendense-hub/hub.db "600 sendense-hub:sendense-hub"

echo "test-debs: man pages and completions"
check "man -w sendense-hub" sh -c 'man -w sendense-hub | grep -q /usr/share/man/man1/sendense-hub.1.gz'
page=$(MANWIDTH=100 man -P cat sendense-hub 2>/dev/null || true)
printf '%s\n' "$page" | head -8 | sed 's/^/  | /'
check "man sendense-hub shows its name and subcommands" \
  sh -c "printf '%s' \"\$1\" | grep -q 'sendense-hub - ' && printf '%s' \"\$1\" | grep -q 'check-image'" _ "$page"
for m in sendense-hub-node-enroll sendense-node-copy sendense-console-backup-start; do
  check "man -w $m" man -w "$m"
done
check "bash completion of sendense-hub loads" \
  bash -c 'source /usr/share/bash-completion/completions/sendense-hub && complete -p sendense-hub'
check "zsh completion of sendense-console names backup" grep -q backup /usr/share/zsh/vendor-completions/_sendense-console
check "fish completion of sendense-node names copy" grep -q copy /usr/share/fish/vendor_completions.d/sendense-node.fish

echo "test-debs: the node's packaged config"
node_err=$(setpriv --reuid=sendense-node --regid=sendense-node --init-groups -- \
  /usr/bin/sendense-node --config /etc/sendense/node.toml --listen 127.0.0.1:0 2>&1 || true)
check "node.toml parses; the node asks for its credential in /etc/sendense/token" \
  sh -c "printf '%s' \"\$1\" | grep -q '/etc/sendense/token'" _ "$node_err"

echo "test-debs: stop and purge"
if [ "$started_by" = systemd ]; then
  systemctl stop sendense-hub.service
else
  kill -TERM "$hub_pid"
  wait "$hub_pid" || true
  hub_pid=""
fi
check "port $port is free again" sh -c "! curl -sf http://127.0.0.1:$port/health >/dev/null"
for p in "${packages[@]}"; do dpkg --purge "$p" >>"$root/target/test-debs-dpkg.log" 2>&1; done
check "dpkg --purge removed the binaries" sh -c '! [ -e /usr/bin/sendense-hub ] && ! [ -e /usr/bin/sendense-node ] && ! [ -e /usr/bin/sendense-console ]'
check "dpkg --purge removed the unit and the config" sh -c "! [ -e $unit ] && ! [ -e /etc/sendense/hub.toml ]"
check "dpkg --purge removed the mode overrides" sh -c '! dpkg-statoverride --list /etc/sendense/hub.toml >/dev/null'
check "dpkg --purge removed the token and the logs" sh -c '! [ -e /var/lib/sendense-hub/token ] && ! [ -e /var/log/sendense-hub ]'

echo "test-debs: $passed passed, $failed failed"
[ "$failed" = 0 ]
