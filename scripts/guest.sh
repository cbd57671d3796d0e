#!/usr/bin/env bash
# Builds the tests' real Linux guest into OUT (a new directory), without mounting anything:
#   OUT/vmlinuz, OUT/initrd.img   Debian's kernel and initramfs (linux-image-amd64)
#   OUT/root.qcow2                ext4 (mkfs.ext4 -d): busybox, qemu-ga + its libraries,
#                                 virtio_console, the init and the writer below
#   OUT/data.qcow2                an empty ext4 data disk (/dev/vdb in the guest)
#   OUT/inputs                    what was built from (kernel version, tool versions)
# The tests' harness (tests/src/guest.rs) calls it once per hash of its inputs and caches OUT
# under the target directory. Needs scripts/setup.sh's packages; no root.
#
# The guest's init: mounts proc/sys/dev, loads virtio_console, starts qemu-ga on the virtio port
# (unless the kernel command line says sendense.qga=off), with an fsfreeze hook that prints
# "FREEZE" / "THAW" on the serial console, mounts /dev/vdb on /data and runs the writer: record
# N is the line "R <N, 8 digits> <payload> <first 16 hex digits of sha256 of 'R N payload'>",
# appended to /data/records, fsynced, and then "ACK N" printed on the serial console.
set -euo pipefail
out=${1:?usage: guest.sh OUT}
[ ! -e "$out" ] || { echo "guest.sh: $out exists" >&2; exit 1; }

kernel=$(ls /boot/vmlinuz-* | sort -V | tail -1)
kver=${kernel#/boot/vmlinuz-}
initrd=/boot/initrd.img-$kver
moddir=/lib/modules/$kver
for f in "$kernel" "$initrd" /bin/busybox /usr/sbin/qemu-ga "$moddir/kernel/drivers/char/virtio_console.ko"; do
  [ -r "$f" ] || { echo "guest.sh: $f missing (run scripts/setup.sh)" >&2; exit 1; }
done

mkdir -p "$out"
work=$(mktemp -d "$out/.build-XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root"/{bin,sbin,etc/qemu,proc,sys,dev,run,tmp,data,lib/modules,var/run}
cp /bin/busybox "$root/bin/busybox"
for applet in $(/bin/busybox --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
done

# qemu-ga and every library ldd names, at the same paths.
cp /usr/sbin/qemu-ga "$root/sbin/qemu-ga"
for lib in $(ldd /usr/sbin/qemu-ga | grep -o '/[^ ]*'); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
# Modules the initramfs does not hold: virtio_console and what it depends on (insmod in order;
# the ones the initramfs loaded already answer "File exists").
for m in virtio virtio_ring virtio_console; do
  f=$(modinfo -k "$kver" -n "$m" 2>/dev/null || true)
  case "$f" in /*) cp "$f" "$root/lib/modules/$m.ko" ;; esac
done
[ -e "$root/lib/modules/virtio_console.ko" ] || { echo "guest.sh: virtio_console.ko not found" >&2; exit 1; }

cat > "$root/etc/qemu/fsfreeze-hook" <<'EOF'
#!/bin/sh
# qemu-ga runs this with "freeze" before freezing and "thaw" after thawing.
case "$1" in
  freeze) echo "FREEZE" > /dev/ttyS0 ;;
  thaw) echo "THAW" > /dev/ttyS0 ;;
esac
exit 0
EOF

cat > "$root/sbin/writer" <<'EOF'
#!/bin/sh
# Appends numbered, checksummed records to /data/records; each is fsynced before its ACK.
f=/data/records
n=$(wc -l < "$f" 2>/dev/null || echo 0)
while :; do
  n=$((n + 1))
  body=$(printf 'R %08d payload-%08d-sendense' "$n" "$n")
  sum=$(printf '%s' "$body" | sha256sum | cut -c1-16)
  printf '%s %s\n' "$body" "$sum" >> "$f" || { echo "WRITER FAILED $n" > /dev/ttyS0; exit 1; }
  sync "$f" || { echo "WRITER FSYNC FAILED $n" > /dev/ttyS0; exit 1; }
  echo "ACK $n" > /dev/ttyS0
  sleep 0.2
done
EOF

cat > "$root/sbin/init" <<'EOF'
#!/bin/sh
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys 2>/dev/null
mount -t devtmpfs dev /dev 2>/dev/null
mount -t tmpfs tmp /run
mount -t tmpfs tmp /tmp
mkdir -p /run/qga
echo "INIT uptime $(cut -d' ' -f1 /proc/uptime)" > /dev/ttyS0
for m in virtio virtio_ring virtio_console; do
  [ -e /lib/modules/$m.ko ] && insmod /lib/modules/$m.ko 2>/dev/null
done
port=/dev/virtio-ports/org.qemu.guest_agent.0
if ! grep -q 'sendense.qga=off' /proc/cmdline; then
  for _ in $(seq 1 50); do
    [ -e $port ] && break
    # No udev: the port's /dev/vportNpM exists; the name is in sysfs.
    for p in /sys/class/virtio-ports/*; do
      [ "$(cat $p/name 2>/dev/null)" = org.qemu.guest_agent.0 ] || continue
      mkdir -p /dev/virtio-ports
      ln -sf /dev/$(basename $p) $port
    done
    sleep 0.1
  done
  qemu-ga -m virtio-serial -p $port -t /run/qga \
    -F/etc/qemu/fsfreeze-hook -l /run/qga/log &
  # qemu-ga writes its pid file only when it daemonizes; a test stops it with
  # guest-exec "kill $(cat /run/qga/pid)".
  echo $! > /run/qga/pid
  echo "QGA started pid $!" > /dev/ttyS0
else
  echo "QGA off" > /dev/ttyS0
fi
if mount -t ext4 /dev/vdb /data; then
  echo "DATA mounted" > /dev/ttyS0
  setsid /sbin/writer < /dev/null > /dev/null 2>&1 &
else
  echo "DATA mount failed" > /dev/ttyS0
fi
# PID 1 must not exit.
while :; do sleep 3600; done
EOF
chmod 755 "$root/sbin/init" "$root/sbin/writer" "$root/etc/qemu/fsfreeze-hook"

truncate -s 96M "$work/root.raw"
mkfs.ext4 -q -L sdroot -d "$root" "$work/root.raw"
truncate -s 64M "$work/data.raw"
mkfs.ext4 -q -L sddata "$work/data.raw"
qemu-img convert -q -f raw -O qcow2 "$work/root.raw" "$out/root.qcow2"
qemu-img convert -q -f raw -O qcow2 "$work/data.raw" "$out/data.qcow2"
cp "$kernel" "$out/vmlinuz"
cp "$initrd" "$out/initrd.img"
{
  echo "kernel $kver"
  # Not "busybox | head -1": with pipefail, head closing the pipe early fails the build
  # (exit 141, SIGPIPE) whenever busybox is still writing its applet list.
  banner=$(/bin/busybox 2>&1 || true)
  echo "${banner%%$'\n'*}"
  dpkg-query -W qemu-guest-agent e2fsprogs 2>/dev/null || true
  echo
} > "$out/inputs"
echo "guest.sh: built $out ($kver)" >&2
