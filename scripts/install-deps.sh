#!/usr/bin/env bash
# Installs everything the tests and benchmarks need on a fresh Debian 12 machine (run as root):
# the reference NBD peers from Debian, qemu 10 from bookworm-backports unpacked beside them
# (extended headers), QEMU's system emulator (7.2 from Debian, 10.0 unpacked the same way: the
# running-VM tests drive both over QMP), a virtualenv with the project and its test extras, and
# the Node client's packages (tests/clients/node, from its package-lock.json; node and npm from
# Debian if missing), and Go with the gRPC sources and protoc plugins the Go client is built with.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
QEMU10_DIR=${NBDGW_QEMU10_DIR:-$ROOT/.cache/qemu10}
GUEST_DIR=${NBDGW_GUEST_DIR:-$ROOT/.cache/guest}
VENV=${NBDGW_VENV:-$ROOT/.venv}

need_apt=0
for p in qemu-img qemu-nbd qemu-io qemu-system-x86_64 nbdinfo nbdcopy nbdkit nbd-server openssl; do
    command -v "$p" >/dev/null 2>&1 || need_apt=1
done
[ -f /usr/lib/python3/dist-packages/nbd.py ] || need_apt=1
# libvirt for the libvirt host kind's tests: the daemons, virsh, and Debian's Python binding
# (built for this libvirt; the venv sees it through links, below).
for p in libvirtd virtlogd virsh; do
    command -v "$p" >/dev/null 2>&1 || [ -x "/usr/sbin/$p" ] || need_apt=1
done
[ -f /usr/lib/python3/dist-packages/libvirt.py ] || need_apt=1
# Debian's python3 has no venv/ensurepip without python3-venv.
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need_apt=1
need_node=0
{ command -v node && command -v npm; } >/dev/null 2>&1 || need_node=1

sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if [ "$need_apt" = 1 ] || [ "$need_node" = 1 ] || [ ! -x "$QEMU10_DIR/usr/bin/qemu-nbd" ] ||
    [ ! -x "$QEMU10_DIR/usr/bin/qemu-system-x86_64" ]; then
    if [ ! -f /etc/apt/sources.list.d/bookworm-backports.sources ]; then
        sudo_ tee /etc/apt/sources.list.d/bookworm-backports.sources >/dev/null <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    fi
    # Backports are never installed, only downloaded and unpacked: pin them low.
    if [ ! -f /etc/apt/preferences.d/nbdgw-backports ]; then
        printf 'Package: *\nPin: release a=bookworm-backports\nPin-Priority: 100\n' |
            sudo_ tee /etc/apt/preferences.d/nbdgw-backports >/dev/null
    fi
    sudo_ env DEBIAN_FRONTEND=noninteractive apt-get update -qq
fi
if [ "$need_apt" = 1 ]; then
    sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        qemu-utils qemu-system-x86 libnbd-bin python3-libnbd python3-venv nbdkit nbd-server \
        openssl libvirt-daemon-system libvirt-clients python3-libvirt >/dev/null
fi
if [ "$need_node" = 1 ]; then
    sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        nodejs npm >/dev/null
fi
if [ ! -x "$QEMU10_DIR/usr/bin/qemu-nbd" ]; then
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download -qq qemu-utils/bookworm-backports >/dev/null)
    mkdir -p "$QEMU10_DIR"
    dpkg -x "$tmp"/qemu-utils_*.deb "$QEMU10_DIR"
    rm -rf "$tmp"
fi
# QEMU 10's system emulator, unpacked beside its tools; it runs with the system's libraries
# (those of 7.2's package) and its firmware (the tests boot with -kernel, or no guest at all).
if [ ! -x "$QEMU10_DIR/usr/bin/qemu-system-x86_64" ]; then
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download -qq qemu-system-x86/bookworm-backports >/dev/null)
    mkdir -p "$QEMU10_DIR"
    dpkg -x "$tmp"/qemu-system-x86_*.deb "$QEMU10_DIR"
    rm -rf "$tmp"
fi
# A tiny real guest for the running-VM tests (tests/qemu_guest.py builds its initramfs): the
# Debian cloud kernel (virtio as modules) and a static busybox, unpacked; only what boots is kept.
if [ ! -f "$GUEST_DIR/vmlinuz" ] || [ ! -x "$GUEST_DIR/busybox" ]; then
    kernel=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download -qq "$kernel" busybox-static >/dev/null)
    mkdir -p "$tmp/x" "$GUEST_DIR/modules"
    for deb in "$tmp"/*.deb; do dpkg -x "$deb" "$tmp/x"; done
    cp "$tmp"/x/boot/vmlinuz-* "$GUEST_DIR/vmlinuz"
    cp "$tmp/x/bin/busybox" "$GUEST_DIR/busybox"
    for m in virtio virtio_ring virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
        find "$tmp/x/lib/modules" -name "$m.ko*" -exec cp {} "$GUEST_DIR/modules/" \;
    done
    rm -rf "$tmp"
fi
"$QEMU10_DIR/usr/bin/qemu-nbd" --version | head -1
"$QEMU10_DIR/usr/bin/qemu-system-x86_64" --version | head -1

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[dev]"
# Debian's libvirt binding, linked into the venv (not the whole dist-packages: only libvirt's
# modules). Same CPython minor version, and built against the libvirt that runs here; PyPI's
# libvirt-python would need libvirt-dev, pkg-config and a compiler for the same result.
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for f in /usr/lib/python3/dist-packages/libvirt.py /usr/lib/python3/dist-packages/libvirtaio.py \
    /usr/lib/python3/dist-packages/libvirt_qemu.py /usr/lib/python3/dist-packages/libvirtmod*.so; do
    [ -e "$f" ] && ln -sf "$f" "$SITE/"
done
"$VENV/bin/python" -c 'import libvirt' || { echo "install-deps: libvirt binding not importable"; exit 1; }
# The Node client: exactly the locked packages, no install scripts; again only when the lock
# file changed since the last install (the stamp is a copy of it).
NODE_DIR=$ROOT/tests/clients/node
if ! cmp -s "$NODE_DIR/package-lock.json" "$NODE_DIR/node_modules/.nbdgw-lock-stamp"; then
    (cd "$NODE_DIR" && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error)
    cp "$NODE_DIR/package-lock.json" "$NODE_DIR/node_modules/.nbdgw-lock-stamp"
fi
# The Go client (scripts/gen-clients, tests/clients/go): Debian's Go, the sources of its gRPC
# and protobuf libraries (built in GOPATH mode, offline) and the protoc plugins. protobuf 1.5
# replaces the 1.3 that grpc's package pulls in by default: 1.3's codec cannot marshal the
# messages protoc-gen-go 1.28 generates.
GO_PACKAGES=(golang-go golang-google-grpc-dev golang-google-genproto-dev golang-google-protobuf-dev
    golang-github-golang-protobuf-1-5-dev protoc-gen-go protoc-gen-go-grpc)
need_go=0
for p in "${GO_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -qx 'install ok installed' || need_go=1
done
if [ "$need_go" = 1 ]; then
    sudo_ env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${GO_PACKAGES[@]}" >/dev/null
fi
echo "install-deps: ok"
