#!/bin/sh
# Run in a busybox-only guest: read regions of the real /proc/kcore with dd, page by page.
# Usage: guest_read.sh REGIONS OUTDIR.  REGIONS has one "OFFSET PAGES ZERO" line per region
# (decimal; OFFSET page-aligned; ZERO 0, or the kcore offset of a page of zeros below OFFSET):
# with ZERO each page is read right after that zero page, through the same open file,
# because 6.1's read_kcore() keeps one bounce page per open file and vread() leaves it
# untouched where no vmap area is (busybox dd skips with SEEK_CUR, hence "below").
# Writes OUTDIR/N.bin for the Nth region, then OUTDIR/done.
set -e
OUT=$2
mkdir -p "$OUT"
n=0
while read -r off pages zero; do
    if [ "$zero" = 0 ]; then
        dd if=/proc/kcore of="$OUT/$n.bin" bs=4096 skip=$((off / 4096)) count="$pages" \
            2>/dev/null
    else
        : > "$OUT/$n.bin"
        i=0
        while [ $i -lt "$pages" ]; do
            { dd bs=4096 skip=$((zero / 4096)) count=1 of=/dev/null 2>/dev/null
              dd bs=4096 skip=$(((off - zero) / 4096 - 1 + i)) count=1 2>/dev/null; } \
                < /proc/kcore >> "$OUT/$n.bin"
            i=$((i + 1))
        done
    fi
    n=$((n + 1))
done < "$1"
: > "$OUT/done"
