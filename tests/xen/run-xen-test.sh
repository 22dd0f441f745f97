#!/usr/bin/env bash
# run-xen-test.sh: prove qvaudio on real Xen. Boots Debian's Xen 4.17 under
# qemu-system-x86_64 (TCG, no KVM needed) with a PV dom0 running qvaudio-dom0
# and a PV domU ("qvtest") running qvaudio-guest, both from this working tree,
# talking over the real libxenvchan; the in-dom0 driver (xen_driver.py) runs
# every check and the host writes ONE JSON object with the results.
#
#   tests/xen/run-xen-test.sh            # results in results/xen/<timestamp>/
#
# Output: results/xen/<ts>/result.json, serial.log (Xen + dom0 + domU consoles,
# timestamped since QEMU start), build.log. Exit 0 = pass, 1 = fail,
# 77 = skipped because qemu-system-x86_64 cannot run here (result.json says so).
# Downloads (debs, wheels) and the base images are cached in .cache/xen-test/.
#
# env: QV_XEN_CACHE (.cache/xen-test)  QV_XEN_RESULTS (results/xen/<ts>)
#      QV_XEN_TIMEOUT (seconds for the boot, 480)  QEMU_MEM (2048)  DOM0_MEM (1024)
#      DOMU_MEM (512)  QEMU_CPU (max)  QEMU_ACCEL (tcg)
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${QV_XEN_CACHE:-$REPO/.cache/xen-test}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${QV_XEN_RESULTS:-$REPO/results/xen/$STAMP}
TIMEOUT=${QV_XEN_TIMEOUT:-480}
QEMU_MEM=${QEMU_MEM:-2048}; DOM0_MEM=${DOM0_MEM:-1024}; DOMU_MEM=${DOMU_MEM:-512}
# The agents' buffering (their ordinary settings; see docs/xen.md).
DOM0_LATENCY_MS=${QV_XEN_DOM0_LATENCY_MS:-60}; CAPTURE_PERIOD_MS=${QV_XEN_CAPTURE_PERIOD_MS:-10}
GUEST_PERIOD_MS=${QV_XEN_GUEST_PERIOD_MS:-10}
QEMU_CPU=${QEMU_CPU:-max}; QEMU_ACCEL=${QEMU_ACCEL:-tcg}; QEMU_ICOUNT=${QEMU_ICOUNT-shift=0,sleep=off}
# spec-ctrl=eager-fpu: without it Xen switches FPU state lazily on this (AMD-looking)
# emulated CPU and QEMU's TCG ignores CR0.TS for XSAVE/XRSTOR, so XMM registers
# leak between processes and domains (see docs/xen.md). smap/smep=0: -cpu max needs it.
XENOPTS="console=com1 com1=115200,8n1 dom0_mem=${DOM0_MEM}M,max:${DOM0_MEM}M loglvl=all guest_loglvl=all smap=0 smep=0 spec-ctrl=eager-fpu"

mkdir -p "$OUT" "$CACHE"
OUT=$(cd "$OUT" && pwd)
HOSTPY=python3
[ -x "$REPO/.venv/bin/python" ] && HOSTPY=$REPO/.venv/bin/python
DRIVER=$HERE/xen_driver.py
T0=$(date +%s.%N)
: > "$OUT/host-phases.txt"
exec 3>&2 2>> "$OUT/build.log"   # build chatter goes to build.log; progress marks to both
CURRENT_PHASE=start
say() { echo "$*" >&2; echo "$*" >&3; }
phase() {   # phase NAME: mark the start of a host phase (timings go into result.json)
    CURRENT_PHASE=$1
    echo "$1 $(date +%s.%N)" >> "$OUT/host-phases.txt"
    say "@@HOST $1 t=$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')s"
}
collect() {  # collect STATUS REASON: merge everything into result.json
    "$HOSTPY" "$DRIVER" collect --out "$OUT" --status "$1" --reason "$2" --t0 "$T0" >&2
}
on_exit() {
    local rc=$?
    if [ ! -s "$OUT/result.json" ]; then
        collect fail "host step '$CURRENT_PHASE' failed (exit $rc); see $OUT/build.log" || true
        rc=1
    fi
    "$HOSTPY" "$DRIVER" summary --out "$OUT" >&3 || true
    exit "$rc"
}
trap on_exit EXIT
skip() {
    say "SKIP: $1"
    collect skipped "$1"
    trap - EXIT
    "$HOSTPY" "$DRIVER" summary --out "$OUT" >&3 || true
    exit 77
}

# ---- 0. can QEMU run at all? (the only reason to skip) ----
phase check-qemu
command -v qemu-system-x86_64 > /dev/null ||
    skip "qemu-system-x86_64 is not installed (Debian: apt-get install qemu-system-x86)"
if ! QOUT=$(echo quit | timeout 60 qemu-system-x86_64 -M none -accel "$QEMU_ACCEL" -display none \
        -nodefaults -monitor stdio -serial none 2>&1); then
    skip "qemu-system-x86_64 cannot run here: $(echo "$QOUT" | tail -3 | tr '\n' ' ')"
fi
for tool in cpio gzip dpkg-deb apt-get apt-cache ldd chroot; do
    command -v "$tool" > /dev/null || { echo "missing host tool: $tool" >&2; exit 1; }
done

# ---- 1. packages: extracted into the cache, never installed on the host ----
phase downloads
KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
if [ -z "$KPKG" ]; then
    [ "$(id -u)" = 0 ] && apt-get update -qq >&2
    KPKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
fi
KV=${KPKG#linux-image-}
DEBS=(xen-hypervisor-4.17-amd64 xen-utils-4.17 xen-utils-common xenstore-utils libxenmisc4.17
      libxencall1 libxenevtchn1 libxenforeignmemory1 libxengnttab1 libxentoollog1 libxentoolcore1
      libxendevicemodel1 libxenstore4 libyajl2 busybox-static "$KPKG"
      python3.11-minimal libpython3.11-minimal libpython3.11-stdlib)
D=$CACHE/debs-$KV
if [ ! -f "$D/.done" ]; then
    rm -rf "$D"; mkdir -p "$D/debs" "$D/x" "$D/xpy"
    if ! (cd "$D/debs" && apt-get download -q "${DEBS[@]}" >&2); then
        [ "$(id -u)" = 0 ] && apt-get update -qq >&2
        (cd "$D/debs" && apt-get download -q "${DEBS[@]}" >&2)
    fi
    for f in "$D"/debs/*.deb; do
        case $f in *linux-image*) ;; *python3.11*) dpkg-deb -x "$f" "$D/xpy" ;; *) dpkg-deb -x "$f" "$D/x" ;; esac
    done
    dpkg-deb --fsys-tarfile "$D"/debs/"${KPKG}"_*.deb | tar -C "$D/x" -x "./boot/vmlinuz-$KV" \
        ./lib/modules/"$KV"/kernel/drivers/xen/{xen-evtchn.ko,xen-gntdev.ko,xen-gntalloc.ko,xen-privcmd.ko,xenfs/xenfs.ko}
    zcat "$D/x/boot/xen-4.17-amd64.gz" > "$D/xen-4.17"   # QEMU multiboot wants the plain ELF
    touch "$D/.done"
fi
X=$D/x; XPY=$D/xpy; LIBP=$X/usr/lib/x86_64-linux-gnu

# The same versions the project's venv tests with, as cp311 manylinux wheels.
pin() { "$HOSTPY" -c "import importlib.metadata as m, sys; print(sys.argv[1] + '==' + m.version(sys.argv[1]))" "$1" 2>/dev/null || echo "$1"; }
REQ_BASE="$(pin cffi) $(pin pycparser) $(pin pyxs) $(pin pulsectl) $(pin PyYAML)"
REQ_NUMPY=$(pin numpy)
WKEY=$(echo "$REQ_BASE $REQ_NUMPY" | sha256sum | cut -c1-12)
WH=$CACHE/wheels-$WKEY
if [ ! -f "$WH/.done" ]; then
    rm -rf "$WH"; mkdir -p "$WH"
    PIPPLAT=(--only-binary=:all: --python-version 3.11 --implementation cp --abi cp311
             --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
    # shellcheck disable=SC2086
    "$HOSTPY" -m pip download -q --disable-pip-version-check "${PIPPLAT[@]}" -d "$WH/wheels" $REQ_BASE $REQ_NUMPY >&2
    # shellcheck disable=SC2086
    "$HOSTPY" -m pip install -q --disable-pip-version-check --no-index --find-links "$WH/wheels" \
        "${PIPPLAT[@]}" --target "$WH/site" $REQ_BASE >&2
    "$HOSTPY" -m pip install -q --disable-pip-version-check --no-index --find-links "$WH/wheels" \
        "${PIPPLAT[@]}" --no-deps --target "$WH/site-numpy" "$REQ_NUMPY" >&2
    rm -rf "$WH/site/bin" "$WH/site-numpy/bin"
    touch "$WH/.done"
fi

# ---- 2. base images (busybox, Xen tools, Python, PulseAudio): cached ----
phase base-images
PAMOD=$(dirname "$(dpkg -L pulseaudio | grep '/module-null-sink.so$')")
copy_with_libs() {   # copy_with_libs ROOT FILE...: binaries from the debs (or host) + their ldd libs
    local R=$1 b src; shift
    for b in "$@"; do
        src=$X$b; [ -e "$src" ] || src=$XPY$b; [ -e "$src" ] || src=$b
        mkdir -p "$R$(dirname "$b")"; [ "$src" -ef "$R$b" ] || cp -L "$src" "$R$b"
        add_libs_of "$R" "$src"
    done
}
add_libs_of() {
    local R=$1 f=$2 l d
    LD_LIBRARY_PATH=$LIBP ldd "$f" 2>/dev/null |
        awk '/=> not found/ {print "MISSING:" $1; next} /=>/ {print $3} /ld-linux/ {print $1}' |
        while read -r l; do
            case $l in
                "") continue ;;
                MISSING:*) echo "WARNING: $f needs ${l#MISSING:} (not on the host)" >&2; continue ;;
                "$WH"/*) continue ;;                 # bundled in a wheel: already in the image
                "$X"/*) d=${l#"$X"} ;;
                *) d=$l ;;
            esac
            mkdir -p "$R$(dirname "$d")"; [ -e "$R$d" ] || cp -L "$l" "$R$d"
        done
}
base_root() {
    local R=$1 a
    rm -rf "$R"; mkdir -p "$R"/{bin,etc,proc,sys,dev,run,tmp,var/log/xen,var/lib/xen,var/lock,root,opt}
    chmod 1777 "$R/tmp"; ln -s ../run "$R/var/run"
    echo 'root:x:0:0:root:/root:/bin/sh' > "$R/etc/passwd"; echo 'root:x:0:' > "$R/etc/group"
    cp "$X/bin/busybox" "$R/bin/"
    for a in $("$X/bin/busybox" --list); do [ "$a" = busybox ] || ln -sf busybox "$R/bin/$a"; done
    mkdir -p "$R/lib"; cp -a "$X/lib/modules" "$R/lib/"
    copy_with_libs "$R" /usr/bin/xenstore
    for a in read write ls list rm exists watch chmod; do ln -sf xenstore "$R/usr/bin/xenstore-$a"; done
    mkdir -p "$R/lib/x86_64-linux-gnu"
    cp -L /lib/x86_64-linux-gnu/libgcc_s.so.1 /lib/x86_64-linux-gnu/librt.so.1 "$R/lib/x86_64-linux-gnu/"
    copy_with_libs "$R" /usr/lib/x86_64-linux-gnu/libxenvchan.so.4.17
}
add_python() {   # add_python ROOT SITE...
    local R=$1 f s; shift
    mkdir -p "$R/usr/lib/python3/dist-packages"
    cp -a "$XPY/usr/lib/python3.11" "$R/usr/lib/"
    (cd "$R/usr/lib/python3.11/lib-dynload" &&
        rm -f _sqlite3.* _dbm.* _gdbm.* _curses* readline.* _test* _ctypes_test.* xxlimited* _xxtestfuzz.*)
    rm -rf "$R/usr/lib/python3.11"/{sqlite3,curses,dbm/gnu.py,dbm/ndbm.py,pydoc_data,ensurepip,test,idlelib,tkinter,lib2to3}
    copy_with_libs "$R" /usr/bin/python3.11; ln -sf python3.11 "$R/usr/bin/python3"
    for s in "$@"; do cp -a "$s/." "$R/usr/lib/python3/dist-packages/"; done
    find "$R/usr/lib/python3.11/lib-dynload" "$R/usr/lib/python3/dist-packages" -name '*.so*' -type f |
        while read -r f; do add_libs_of "$R" "$f"; done
    chroot "$R" /usr/bin/python3.11 -m compileall -q --invalidation-mode unchecked-hash \
        /usr/lib/python3.11 /usr/lib/python3/dist-packages > /dev/null || true
}
add_pulse() {
    local R=$1
    copy_with_libs "$R" /usr/bin/pulseaudio /usr/bin/pacat /usr/bin/pactl \
        /usr/lib/x86_64-linux-gnu/libpulse-simple.so.0 \
        "$PAMOD/module-null-sink.so" "$PAMOD/module-native-protocol-unix.so" \
        "$PAMOD/module-remap-source.so" "$PAMOD/module-remap-sink.so" "$PAMOD/module-loopback.so"
    ln -sf pacat "$R/usr/bin/parec"
}
mkcpio() { (cd "$1" && find . | cpio -o -H newc --quiet | gzip -1) > "$2"; }
# the base is rebuilt whenever its recipe (these functions) or an input changes
BKEY=$( { declare -f copy_with_libs add_libs_of base_root add_python add_pulse mkcpio; echo "$KV $WKEY $PAMOD"; ls "$D/debs"; } | sha256sum | cut -c1-12)
B=$CACHE/base-$BKEY
if [ ! -f "$B/.done" ]; then
    rm -rf "$CACHE"/base-*; mkdir -p "$B"
    base_root "$B/rootU"; add_python "$B/rootU" "$WH/site"; add_pulse "$B/rootU"
    base_root "$B/root0"; add_python "$B/root0" "$WH/site" "$WH/site-numpy"; add_pulse "$B/root0"
    copy_with_libs "$B/root0" /usr/lib/xen-4.17/bin/xl /usr/lib/xen-4.17/bin/xenstored \
        /usr/lib/xen-4.17/bin/xenconsoled /usr/lib/xen-4.17/bin/xen-init-dom0 /usr/lib/xen-4.17/bin/xenconsole
    cp -a "$X/etc/xen" "$B/root0/etc/"
    mkdir -p "$B/root0/guest"; cp "$X/boot/vmlinuz-$KV" "$B/root0/guest/vmlinuz"
    mkcpio "$B/rootU" "$B/base-domU.cpio.gz"
    mkcpio "$B/root0" "$B/base-dom0.cpio.gz"
    touch "$B/.done"
fi

# ---- 3. this working tree's qvaudio + the test's init scripts, as overlay archives ----
phase overlay-images
RUN=$CACHE/run; rm -rf "$RUN"; mkdir -p "$RUN"
stage_overlay() {   # stage_overlay STAGE BASE INIT ROLE: qvaudio compiled by the image's own python
    local S=$1 BASE=$2 INIT=$3 ROLE=$4 SP=/usr/lib/python3/dist-packages
    mkdir -p "$S$SP" "$S/opt/qvtest" "$S/etc/qvaudio"
    (cd "$REPO" && tar -c --exclude=__pycache__ --exclude='*.pyc' qvaudio) | tar -C "$S$SP" -x
    cp "$REPO/qvaudio.yaml" "$S/etc/qvaudio/qvaudio.yaml"
    cp "$DRIVER" "$S/opt/qvtest/"
    printf '{"dom0_latency_ms": %d, "dom0_capture_period_ms": %d, "guest_period_ms": %d}\n' \
        "$DOM0_LATENCY_MS" "$CAPTURE_PERIOD_MS" "$GUEST_PERIOD_MS" > "$S/opt/qvtest/settings.json"
    cp "$HERE/$INIT" "$S/init"; chmod 755 "$S/init"
    # compile and smoke-test inside the cached base root, with the overlay's package
    rm -rf "$BASE$SP/qvaudio" "$BASE/opt/qvtest"
    cp -a "$S$SP/qvaudio" "$BASE$SP/"; cp -a "$S/opt/qvtest" "$BASE/opt/"
    chroot "$BASE" /usr/bin/python3 -m compileall -q --invalidation-mode unchecked-hash \
        "$SP/qvaudio" /opt/qvtest > /dev/null
    rm -rf "$S$SP/qvaudio" "$S/opt/qvtest"; cp -a "$BASE$SP/qvaudio" "$S$SP/"; cp -a "$BASE/opt/qvtest" "$S/opt/"
    chroot "$BASE" /usr/bin/python3 /opt/qvtest/xen_driver.py smoke "$ROLE" >&2
    chroot "$BASE" /usr/bin/pulseaudio --version > /dev/null 2>&1
    chroot "$BASE" /usr/bin/pacat --version > /dev/null 2>&1
}
stage_overlay "$RUN/overU" "$B/rootU" init-domU.sh domU
(cd "$RUN/overU" && find . | cpio -o -H newc --quiet | gzip -1) > "$RUN/over-domU.cpio.gz"
cat "$B/base-domU.cpio.gz" "$RUN/over-domU.cpio.gz" > "$RUN/initrd-domU.gz"
stage_overlay "$RUN/over0" "$B/root0" init-dom0.sh dom0
mkdir -p "$RUN/over0/etc/qvaudio/policy.d" "$RUN/over0/etc/xen" "$RUN/over0/guest"
cp "$REPO"/policy/*.yaml "$RUN/over0/etc/qvaudio/policy.d/"
chmod 755 "$RUN/over0/etc/qvaudio" "$RUN/over0/etc/qvaudio/policy.d"
chmod 644 "$RUN"/over0/etc/qvaudio/policy.d/*.yaml
cp "$RUN/initrd-domU.gz" "$RUN/over0/guest/initrd.gz"
cat > "$RUN/over0/etc/xen/qvtest.cfg" <<EOF
name = "qvtest"
type = "pv"
kernel = "/guest/vmlinuz"
ramdisk = "/guest/initrd.gz"
extra = "console=hvc0"
memory = $DOMU_MEM
vcpus = 1
on_crash = "preserve"
EOF
(cd "$RUN/over0" && find . | cpio -o -H newc --quiet | gzip -1) > "$RUN/over-dom0.cpio.gz"
cat "$B/base-dom0.cpio.gz" "$RUN/over-dom0.cpio.gz" > "$RUN/initrd-dom0.gz"
say "images: domU $(du -h "$RUN/initrd-domU.gz" | cut -f1), dom0 $(du -h "$RUN/initrd-dom0.gz" | cut -f1)"

# ---- 4. boot Xen; dom0's /init runs the driver, which powers off when done ----
phase boot
START=$(date +%s.%N)
echo "$START" > "$OUT/qemu-start.txt"
ICOUNT=()
[ -n "$QEMU_ICOUNT" ] && ICOUNT=(-icount "$QEMU_ICOUNT")
qemu-system-x86_64 -accel "$QEMU_ACCEL" "${ICOUNT[@]}" -cpu "$QEMU_CPU" -m "$QEMU_MEM" -smp 2 -display none \
    -monitor none -nodefaults -serial stdio -no-reboot \
    -kernel "$D/xen-4.17" -append "$XENOPTS" \
    -initrd "$X/boot/vmlinuz-$KV console=hvc0,$RUN/initrd-dom0.gz" < /dev/null \
    > >("$HOSTPY" -u "$DRIVER" stamp --t0 "$START" > "$OUT/serial.log") 2>&1 &
QPID=$!
HWM=0; DEADLINE=$(( $(date +%s) + TIMEOUT )); TIMED_OUT=0
while kill -0 "$QPID" 2>/dev/null; do
    h=$(awk '/VmHWM/{print $2}' "/proc/$QPID/status" 2>/dev/null || echo 0)
    [ "${h:-0}" -gt "$HWM" ] && HWM=$h
    if [ "$(date +%s)" -gt "$DEADLINE" ]; then
        say "boot timed out after ${TIMEOUT}s: killing QEMU $QPID"; TIMED_OUT=1
        kill "$QPID" 2>/dev/null || true; sleep 2; kill -9 "$QPID" 2>/dev/null || true
    fi
    sleep 1
done
QRC=0; wait "$QPID" || QRC=$?
sleep 0.5   # let the stamping filter write its last lines
echo "qemu_rc=$QRC qemu_peak_rss_kib=$HWM timed_out=$TIMED_OUT" > "$OUT/qemu.txt"
phase collect

# ---- 5. one JSON object ----
REASON=""
[ "$TIMED_OUT" = 1 ] && REASON="QEMU did not finish within ${TIMEOUT}s"
RC=0
collect pass "$REASON" || RC=$?
trap - EXIT
"$HOSTPY" "$DRIVER" summary --out "$OUT" >&3 || true
exit "$RC"
