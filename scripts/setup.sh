#!/usr/bin/env bash
# Installs what Sendense's demo and tests need from Debian, and starts MariaDB.
# Idempotent: safe to run again; installs only what is missing. Needs root.
# `setup.sh packages` installs packages only; without argument it also starts MariaDB and prints
# the test server's URL (mysql://sendense:PW@127.0.0.1:3306) on stdout.
set -euo pipefail
mode=${1:-all}

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have qemu-system-x86_64 || need+=(qemu-system-x86)
have nbdcopy || need+=(libnbd-bin)
have nbdkit || need+=(nbdkit)
have sshd || [ -x /usr/sbin/sshd ] || need+=(openssh-server)
have ssh || need+=(openssh-client)
[ -x /usr/sbin/mariadbd ] || need+=(mariadb-server)
have tmux || need+=(tmux)
have aha || need+=(aha)
have curl || need+=(curl)
# The vSphere client's TLS tests make their certificates with openssl.
have openssl || need+=(openssl)
# The vSphere tests: a launcher of govmomi's simulator (tests/vcsim), built in GOPATH mode.
have go || need+=(golang-go)
[ -d /usr/share/gocode/src/github.com/vmware/govmomi/simulator ] || need+=(golang-github-vmware-govmomi-dev)
# The real test guest (scripts/guest.sh): Debian's kernel and initramfs, busybox as its userland,
# qemu-ga as its agent, and mkfs.ext4/debugfs/e2fsck to build and check its disks without mounting.
ls /boot/vmlinuz-* >/dev/null 2>&1 || need+=(linux-image-amd64)
[ -x /bin/busybox ] || need+=(busybox-static)
[ -x /usr/sbin/qemu-ga ] || need+=(qemu-guest-agent)
have mkfs.ext4 || [ -x /usr/sbin/mkfs.ext4 ] || need+=(e2fsprogs)

if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  extra=()
  # Debian 12 ships qemu-system-x86 7.2; a preinstalled qemu-utils from backports (10.x) blocks it.
  # Both must come from the same release, in one command, or qemu-img/qemu-nbd vanish.
  if [[ " ${need[*]} " == *" qemu-system-x86 "* ]]; then
    v=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/{print $2}')
    extra+=("qemu-utils=$v")
  fi
  apt-get install -y -qq --no-install-recommends --allow-downgrades "${need[@]}" "${extra[@]}" >&2
fi
for t in qemu-img qemu-nbd qemu-system-x86_64 nbdcopy; do
  have "$t" || { echo "setup: $t still missing after install" >&2; exit 1; }
done

[ "$mode" = packages ] && exit 0

# MariaDB: the production database; the database tests run against a real server.
if ! mariadb -e 'select 1' >/dev/null 2>&1; then
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- --user=mysql
  for _ in $(seq 1 60); do mariadb -e 'select 1' >/dev/null 2>&1 && break; sleep 0.5; done
  mariadb -e 'select 1' >/dev/null || { echo "setup: MariaDB did not start" >&2; exit 1; }
fi
pw_file=/var/lib/sendense-test/mysql-password
mkdir -p "$(dirname "$pw_file")"
[ -s "$pw_file" ] || head -c 18 /dev/urandom | base64 | tr -d '/+=' > "$pw_file"
chmod 600 "$pw_file"
pw=$(cat "$pw_file")
mariadb <<SQL
CREATE USER IF NOT EXISTS 'sendense'@'127.0.0.1' IDENTIFIED BY '$pw';
ALTER USER 'sendense'@'127.0.0.1' IDENTIFIED BY '$pw';
GRANT ALL ON *.* TO 'sendense'@'127.0.0.1';
SQL
echo "mysql://sendense:${pw}@127.0.0.1:3306"
