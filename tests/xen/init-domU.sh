#!/bin/sh
# /init of the test's PV domU "qvtest" (run-xen-test.sh): Xen kernel modules,
# then the helper (xen_driver.py domu), which starts PulseAudio and does what
# dom0's driver asks through XenStore (start/kill qvaudio-guest, play, record).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts; mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs tmpfs /run
echo "@@UMARK domU-init domU-uptime=$(cut -d' ' -f1 /proc/uptime)"
M=/lib/modules/$(uname -r)/kernel/drivers/xen
for m in xen-evtchn xen-gntdev xen-gntalloc; do insmod $M/$m.ko || echo "insmod $m failed"; done
# A name the guest might claim: dom0 must show the name from the xl config instead.
hostname imposter
python3 /opt/qvtest/xen_driver.py domu; echo "@@UMARK helper-exit rc=$?"
while true; do sleep 100; done
