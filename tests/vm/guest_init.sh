#!/bin/busybox sh
# PID 1 of the vm-test guest: load the 9p modules, mount the host's / read-only as the root
# (with the guest's own /proc, /sys, /dev and /tmp over it), mount the writable share at the
# same path as on the host (khshare= on the kernel command line), then run its agent.sh there.
# With khroot=initramfs (a guest of another architecture, or x86-64 with busybox only) it
# stays in the initramfs instead; khro then makes that root read-only, /dev/shm a tmpfs.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "KV: init uptime=$(cut -d' ' -f1 /proc/uptime)"
for m in $(cat /modules/order); do
    insmod /modules/$m.ko || echo "KV: insmod $m failed"
done
SHARE=$(tr ' ' '\n' < /proc/cmdline | sed -n 's/^khshare=//p')
i=0
while [ $i -lt 100 ] && ! grep -qs share /sys/bus/virtio/drivers/9pnet_virtio/virtio*/mount_tag; do
    sleep 0.05; i=$((i+1))
done
if grep -qw khroot=initramfs /proc/cmdline; then
    # A guest of another architecture: busybox in the initramfs is its userland; only the
    # share is mounted, and the host's "run N" comes over the virtio port named kcorectl.
    mkdir -p "$SHARE" /tmp
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 share "$SHARE" \
        || echo "KV: mount share failed"
    CTL=
    i=0
    while [ -z "$CTL" ] && [ $i -lt 100 ]; do
        for d in /sys/class/virtio-ports/*; do
            [ "$(cat "$d/name" 2>/dev/null)" = kcorectl ] && CTL=/dev/${d##*/}
        done
        [ -n "$CTL" ] && [ -e "$CTL" ] || { CTL=; sleep 0.05; i=$((i+1)); }
    done
    if grep -qw khro /proc/cmdline; then
        # A read-only root whose /tmp is read-only too; /dev/shm is the one writable tmpfs.
        mkdir -p /dev/shm && mount -t tmpfs -o mode=1777,size=256m tmpfs /dev/shm
        mount -o remount,ro / || echo "KV: remount / read-only failed"
    fi
    echo "KV: mounts done uptime=$(cut -d' ' -f1 /proc/uptime) ctl=$CTL"
    exec /bin/sh "$SHARE/agent.sh" "$SHARE" "$CTL"
fi
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro hostroot /newroot \
    || echo "KV: mount hostroot failed"
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mount --move /dev /newroot/dev
# The guest gets its own /tmp, but a checkout under the host's /tmp (a CI clone) stays visible.
REPO=$(tr ' ' '\n' < /newroot/proc/cmdline | sed -n 's/^khrepo=//p')
mkdir -p /hosttmp && mount --bind /newroot/tmp /hosttmp
mount -t tmpfs -o size=64m tmpfs /newroot/tmp
case "$REPO" in
    /tmp/?*) mkdir -p "/newroot$REPO" && mount --bind "/hosttmp${REPO#/tmp}" "/newroot$REPO" \
        || echo "KV: bind $REPO failed";;
esac
mkdir -p "/newroot$SHARE" 2>/dev/null
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 share "/newroot$SHARE" \
    || echo "KV: mount share failed"
echo "KV: mounts done uptime=$(cut -d' ' -f1 /newroot/proc/uptime)"
exec chroot /newroot /bin/sh "$SHARE/agent.sh" "$SHARE"
