#!/bin/sh
# /init of the test's PV dom0 (run-xen-test.sh): Xen kernel modules, the real
# xenstored + xenconsoled, then the driver (xen_driver.py dom0), which starts
# PulseAudio and qvaudio-dom0, creates the domU "qvtest" and runs every check.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin:/usr/lib/xen-4.17/bin PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
mark() { echo "@@MARK $1 dom0-uptime=$(cut -d' ' -f1 /proc/uptime)"; }
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts; mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs tmpfs /run; mkdir -p /run/xen /run/xenstored
mark dom0-init
M=/lib/modules/$(uname -r)/kernel/drivers/xen
for m in xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xenfs/xenfs; do insmod $M/$m.ko || echo "insmod $m failed"; done
mount -t xenfs xenfs /proc/xen
xenstored --pid-file /run/xenstored.pid || echo "xenstored failed"
xen-init-dom0 > /dev/null || echo "xen-init-dom0 failed"
xenconsoled --pid-file=/run/xenconsoled.pid --log=guest --log-dir=/var/log/xen || echo "xenconsoled failed"
mark xenstored-up
python3 /opt/qvtest/xen_driver.py dom0; echo "@@MARK driver-exit rc=$?"
sync; poweroff -f
