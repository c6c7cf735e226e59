#!/usr/bin/env bash
# Installs what Hearth needs on a Debian 12 host: QEMU 10 (x86-64 and ARM64 system
# emulators) and qemu-utils from bookworm-backports, plus the tools used to build root
# filesystems. The arm64 architecture is added to dpkg so apt can download the ARM64
# guests' kernel (downloaded and unpacked, never installed).
# The minimal base's busybox is compiled from Debian's source package: a bookworm deb-src
# entry and gcc/make/libc6-dev/dpkg-dev are added for it, and the arm64 cross toolchain
# (gcc-aarch64-linux-gnu, libc6-dev-arm64-cross) for the ARM64 guests' minimal base.
# The backports and deb-src entries are derived from the machine's existing Debian apt
# source, so whatever mirror the machine already uses is the one we use.
set -euo pipefail

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null; then exec sudo -E "$0" "$@"; fi
        echo "setup-host.sh must run as root (or with sudo available)" >&2
        exit 1
    fi
}
need_root "$@"

qemu_ok() {
    local q v
    for q in qemu-system-x86_64 qemu-system-aarch64; do
        command -v "$q" >/dev/null 2>&1 || return 1
        v=$("$q" --version | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -1)
        [ "${v:-0}" -ge 10 ] || return 1
    done
}

all_ok() {
    qemu_ok && command -v qemu-img >/dev/null && command -v mkfs.ext4 >/dev/null \
        && [ -x /bin/busybox ] && command -v mmdebstrap >/dev/null \
        && command -v cpio >/dev/null && command -v xz >/dev/null \
        && command -v python3 >/dev/null \
        && command -v nft >/dev/null && command -v ip >/dev/null \
        && command -v curl >/dev/null \
        && command -v docker-registry >/dev/null && command -v skopeo >/dev/null \
        && command -v htpasswd >/dev/null \
        && command -v chromium >/dev/null && command -v certutil >/dev/null \
        && command -v gcc >/dev/null && command -v make >/dev/null \
        && command -v dpkg-source >/dev/null && [ -f /usr/lib/x86_64-linux-gnu/libc.a ] \
        && command -v aarch64-linux-gnu-gcc >/dev/null && [ -f /usr/aarch64-linux-gnu/lib/libc.a ] \
        && python3 -c 'import ensurepip' 2>/dev/null
}

# The minimal base's busybox is built from Debian's source package (`apt-get source`).
source_known() {
    apt-cache showsrc busybox 2>/dev/null | grep -q '^Package: busybox'
}

kernel_known() {
    apt-cache show --no-all-versions linux-image-cloud-amd64/bookworm-backports >/dev/null 2>&1 \
        && apt-cache show --no-all-versions linux-image-cloud-arm64:arm64/bookworm-backports >/dev/null 2>&1
}

if all_ok && kernel_known && source_known; then
    echo "host set-up: already complete"
    exit 0
fi

# Find the URI of the Debian archive the machine already uses (deb822 or one-line format).
mirror=""
if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    mirror=$(awk '
        /^URIs:/ { uri=$2 }
        /^Suites:/ { for (i=2;i<=NF;i++) if ($i=="bookworm") found=1 }
        /^$/ { if (found && uri!="") { print uri; exit } ; uri=""; found=0 }
        END { if (found && uri!="") print uri }' /etc/apt/sources.list.d/debian.sources | head -1)
fi
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
    mirror=$(awk '$1=="deb" && $3=="bookworm" { print $2; exit }' /etc/apt/sources.list)
fi
if [ -z "$mirror" ]; then
    echo "could not find a Debian bookworm apt source to derive bookworm-backports from;" >&2
    echo "add a bookworm-backports entry to /etc/apt/sources.list.d/ and rerun" >&2
    exit 1
fi

list=/etc/apt/sources.list.d/hearth-backports.sources
if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    cat > "$list" <<SRC
Types: deb
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    echo "added bookworm-backports from $mirror"
fi

# A deb-src entry for bookworm, from the same mirror: busybox's source for the minimal base.
src_list=/etc/apt/sources.list.d/hearth-src.sources
if ! grep -rqsE "^(Types:.*deb-src|deb-src .* bookworm )" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    cat > "$src_list" <<SRC
Types: deb-src
URIs: $mirror
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    echo "added a bookworm deb-src entry from $mirror"
fi

dpkg --print-foreign-architectures | grep -qx arm64 || dpkg --add-architecture arm64

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
if ! all_ok; then
    apt-get install -y -qq -t bookworm-backports qemu-system-x86 qemu-utils >/dev/null
    # ARM64 guests boot their kernel directly on `virt`: no firmware package needed.
    apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-arm >/dev/null
    apt-get install -y -qq e2fsprogs busybox-static mmdebstrap cpio xz-utils zstd python3 \
        python3-venv iproute2 nftables procps curl >/dev/null
    # The registry tests (crates/cli/tests/registry.rs): a real OCI registry, the tool that
    # pushes to it, and htpasswd for the one behind basic auth.
    apt-get install -y -qq docker-registry skopeo apache2-utils >/dev/null
    # The origin rule's browser test (crates/cli/tests/browser.rs): headless Chromium, and
    # certutil to trust the daemon's CA in the test's own NSS database. Recommends (sandbox
    # helper, desktop services) are not needed headless.
    apt-get install -y -qq --no-install-recommends chromium libnss3-tools >/dev/null
    # The minimal base: busybox compiled static from Debian's source (base/busybox.rs),
    # natively and, for ARM64 guests, with the cross toolchain (base_arm64.rs).
    apt-get install -y -qq --no-install-recommends gcc make libc6-dev dpkg-dev \
        gcc-aarch64-linux-gnu libc6-dev-arm64-cross >/dev/null
fi
source_known || { echo "apt has no source for busybox: add a deb-src entry for bookworm" >&2; exit 1; }
qemu_ok || { echo "QEMU 10 did not install" >&2; exit 1; }
# The guest kernel is fetched later with `apt-get download` from bookworm-backports.
kernel_known || { echo "apt does not list linux-image-cloud-amd64 and linux-image-cloud-arm64:arm64 in bookworm-backports" >&2; exit 1; }
echo "host set-up: $(qemu-system-x86_64 --version | head -1)"
