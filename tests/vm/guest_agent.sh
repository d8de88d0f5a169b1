#!/bin/sh
# The guest's command loop (runs as PID 1 inside the host-root chroot): run SHARE/cmd/N.sh in
# order, N = 1, 2, ...; write N.out, N.err and, last, N.rc (atomically) for the host to collect.
S=$1
cd /tmp || exit 1
export PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=/tmp LANG=C.UTF-8
echo "KV: agent ready uptime=$(cut -d' ' -f1 /proc/uptime)" > /dev/console
echo ready > "$S/ready"
n=1
while :; do
    if [ -e "$S/cmd/$n.sh" ]; then
        t=$(cat "$S/cmd/$n.timeout" 2>/dev/null || echo 120)
        timeout -k 5 "$t" /bin/sh "$S/cmd/$n.sh" > "$S/cmd/$n.out" 2> "$S/cmd/$n.err" < /dev/null
        echo $? > "$S/cmd/$n.rc.tmp"
        mv "$S/cmd/$n.rc.tmp" "$S/cmd/$n.rc"
        n=$((n+1))
    else
        sleep 0.1
    fi
done
