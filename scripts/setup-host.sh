#!/usr/bin/env bash
# Installs what Hearth needs on a Debian 12 host: QEMU 10 and qemu-utils from
# bookworm-backports, plus the tools used to build root filesystems.
# The backports entry is derived from the machine's existing Debian apt source,
# so whatever mirror the machine already uses is the one we use.
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
    command -v qemu-system-x86_64 >/dev/null 2>&1 || return 1
    local v
    v=$(qemu-system-x86_64 --version | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -1)
    [ "${v:-0}" -ge 10 ]
}

all_ok() {
    qemu_ok && command -v qemu-img >/dev/null && command -v mkfs.ext4 >/dev/null \
        && [ -x /bin/busybox ] && command -v mmdebstrap >/dev/null \
        && command -v cpio >/dev/null && command -v xz >/dev/null \
        && command -v python3 >/dev/null \
        && command -v nft >/dev/null && command -v ip >/dev/null \
        && command -v curl >/dev/null \
        && python3 -c 'import ensurepip' 2>/dev/null
}

kernel_known() {
    apt-cache show --no-all-versions linux-image-cloud-amd64/bookworm-backports >/dev/null 2>&1
}

if all_ok && kernel_known; then
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

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
if ! all_ok; then
    apt-get install -y -qq -t bookworm-backports qemu-system-x86 qemu-utils >/dev/null
    apt-get install -y -qq e2fsprogs busybox-static mmdebstrap cpio xz-utils zstd python3 \
        python3-venv iproute2 nftables procps curl >/dev/null
fi
qemu_ok || { echo "QEMU 10 did not install" >&2; exit 1; }
# The guest kernel is fetched later with `apt-get download` from bookworm-backports.
kernel_known || { echo "apt does not list linux-image-cloud-amd64 in bookworm-backports" >&2; exit 1; }
echo "host set-up: $(qemu-system-x86_64 --version | head -1)"
