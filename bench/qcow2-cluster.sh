#!/usr/bin/env bash
# Chooses the repository's QCOW2 cluster size by measurement (agent-hub/src/repository.rs).
# For each cluster size: a full backup (sequential 1 MiB writes into a fresh image) and an
# incremental (64 KiB writes, QEMU's dirty-bitmap granularity, every 256 KiB, into an image
# backed by a full one). Prints seconds, top-image size, and ratios against 64 KiB.
# Usage: bench/qcow2-cluster.sh [DIR] [SIZES...]   (DIR on the file system you care about)
set -euo pipefail
dir=${1:-$(mktemp -d)}
shift || true
sizes=("$@")
[ ${#sizes[@]} -gt 0 ] || sizes=(65536 262144 1048576)
mkdir -p "$dir"
trap 'rm -f "$dir"/cbench-*.qcow2' EXIT

secs() { qemu-img bench "$@" 2>&1 | sed -n 's/^Run completed in \([0-9.]*\) seconds\./\1/p'; }

declare -A full inc size
for cs in "${sizes[@]}"; do
    b="$dir/cbench-base-$cs.qcow2" t="$dir/cbench-top-$cs.qcow2" f="$dir/cbench-full-$cs.qcow2"
    qemu-img create -q -f qcow2 -o cluster_size="$cs" "$f" 4G
    full[$cs]=$(secs -w -c 4096 -s 1M -d 16 -t none -n "$f")
    qemu-img create -q -f qcow2 -o cluster_size="$cs" "$b" 4G
    secs -w -c 4096 -s 1M -d 16 -t none -n "$b" >/dev/null
    qemu-img create -q -f qcow2 -o cluster_size="$cs" -F qcow2 -b "$(basename "$b")" "$t" 4G
    inc[$cs]=$(secs -w -c 8192 -s 64k -S 256k -d 16 -t none -n "$t")
    size[$cs]=$(du -k "$t" | cut -f1)
    rm -f "$b" "$t" "$f"
done
ref=${sizes[0]}
printf '%-10s %14s %16s %16s %12s %10s\n' cluster full_4GiB_s incremental_s top_image_KiB full_ratio inc_ratio
for cs in "${sizes[@]}"; do
    printf '%-10s %14s %16s %16s %12.2f %10.2f\n' "$cs" "${full[$cs]}" "${inc[$cs]}" "${size[$cs]}" \
        "$(echo "${full[$cs]} / ${full[$ref]}" | bc -l)" "$(echo "${inc[$cs]} / ${inc[$ref]}" | bc -l)"
done
