#!/bin/sh
# The guest's command loop (runs as PID 1 inside the host-root chroot): for each number N the
# host writes to /dev/ttyS1 (or the device in $2), run SHARE/cmd/N.sh; write N.out, N.err and, last, N.rc
# (atomically) for the host to collect. Blocking on the serial port keeps an idle guest idle.
S=$1
CTL=${2:-/dev/ttyS1}
cd /tmp || exit 1
export PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=/tmp LANG=C.UTF-8
[ "$CTL" != /dev/ttyS1 ] || stty -F "$CTL" raw -echo
exec 3< "$CTL"
echo "KV: agent ready uptime=$(cut -d' ' -f1 /proc/uptime)" > /dev/console
echo ready > "$S/ready"
while read -r n <&3; do
    case "$n" in ''|*[!0-9]*) continue;; esac
    t=$(cat "$S/cmd/$n.timeout" 2>/dev/null || echo 120)
    timeout -k 5 "$t" /bin/sh "$S/cmd/$n.sh" > "$S/cmd/$n.out" 2> "$S/cmd/$n.err" < /dev/null
    echo $? > "$S/cmd/$n.rc.tmp"
    mv "$S/cmd/$n.rc.tmp" "$S/cmd/$n.rc"
done
echo "KV: agent: $CTL closed" > /dev/console
