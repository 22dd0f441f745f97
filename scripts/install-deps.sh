#!/usr/bin/env bash
# Install the Debian/Ubuntu packages that qvaudio's tests and demo need.
# Idempotent and quick when everything is already there: apt is only touched
# for packages that are missing. Needs root (or sudo).
set -euo pipefail

packages=(
    # build and run the Python package
    python3 python3-venv python3-dev gcc make
    # the guest's and the host's audio servers, and their client tools
    pulseaudio pulseaudio-utils libpulse0 libpulse-dev pipewire pipewire-pulse wireplumber dbus dbus-user-session
    # libxenvchan (runtime + header, for the struct-layout check) and the real xenstored
    libxenmisc4.17 libxen-dev xen-utils-4.17 xenstore-utils
    # packaging
    rpm rpmlint
    # measuring audio by hand
    sox
    # the real-Xen test bed (tests/xen/run-xen-test.sh): Xen under QEMU, initramfs images
    qemu-system-x86 cpio
)

missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null; then
    # Not Debian: trust the system if the programs the tests run are there.
    need=(python3 gcc pulseaudio pactl pipewire pipewire-pulse wireplumber dbus-run-session rpmbuild)
    absent=()
    for c in "${need[@]}"; do command -v "$c" >/dev/null || absent+=("$c"); done
    if [ ${#absent[@]} -eq 0 ] && [ -e /usr/include/libxenvchan.h ]; then exit 0; fi
    echo "install-deps: no apt-get here, and missing: ${absent[*]} (or libxenvchan.h)" >&2
    echo "install-deps: on Fedora: sudo dnf install python3-devel gcc make pulseaudio pulseaudio-utils pipewire pipewire-pulseaudio wireplumber dbus-daemon xen-libs xen-devel xen-runtime rpm-build rpmlint sox" >&2
    exit 1
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "install-deps: installing ${missing[*]}" >&2
$sudo apt-get update -q
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${missing[@]}"
