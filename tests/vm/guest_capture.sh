#!/bin/sh
# Run in a busybox-only guest (another architecture than the host's): what guest_capture.py
# records, with dd instead of Python.  Usage: guest_capture.sh OUTDIR.  Writes OUTDIR/root/
# (the /proc and /sys files a userspace kcore reads, kallsyms with kptr_restrict=1 so root
# sees real addresses), OUTDIR/kcore-head.bin (the real /proc/kcore's first 64 KiB: ELF
# header, program headers, notes) and OUTDIR/kcore-size (its st_size); the host parses them.
set -e
OUT=$1
mkdir -p "$OUT/root/proc/sys/kernel" "$OUT/root/sys/kernel"
saved=$(cat /proc/sys/kernel/kptr_restrict)
echo 1 > /proc/sys/kernel/kptr_restrict
for f in proc/iomem proc/kallsyms proc/cmdline proc/meminfo proc/modules proc/vmallocinfo \
         proc/version proc/slabinfo proc/sys/kernel/osrelease proc/sys/kernel/arch \
         sys/kernel/vmcoreinfo; do
    cat "/$f" > "$OUT/root/$f"
done
echo "$saved" > /proc/sys/kernel/kptr_restrict
# the kernel's and the loaded modules' BTF: dumps made from this root keep them (issue 22)
if [ -d /sys/kernel/btf ]; then
    mkdir -p "$OUT/root/sys/kernel/btf"
    for f in /sys/kernel/btf/*; do
        cat "$f" > "$OUT/root/sys/kernel/btf/${f##*/}"
    done
fi
mem=sys/devices/system/memory
mkdir -p "$OUT/root/$mem"
cat "/$mem/block_size_bytes" > "$OUT/root/$mem/block_size_bytes"
for b in /$mem/memory*; do
    mkdir -p "$OUT/root/$mem/${b##*/}"
    cat "$b/state" > "$OUT/root/$mem/${b##*/}/state"
done
dd if=/proc/kcore of="$OUT/kcore-head.bin" bs=4096 count=16 2>/dev/null
stat -c %s /proc/kcore > "$OUT/kcore-size"
