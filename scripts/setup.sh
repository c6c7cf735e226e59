#!/usr/bin/env bash
# Complete set-up on a fresh Debian 12 machine: host packages (QEMU 10 from
# bookworm-backports, mkfs, busybox, mmdebstrap), the static agent, the hearth binary,
# the guest kernel, the initramfs and the base root filesystems.
#   scripts/setup.sh            busybox base only
#   scripts/setup.sh --debian   also the debian-bookworm base
set -euo pipefail
cd "$(dirname "$0")/.."
export HEARTH_HOME="${HEARTH_HOME:-$([ "$(id -u)" -eq 0 ] && echo /var/lib/hearth || echo "$HOME/.local/share/hearth")}"

./scripts/setup-host.sh
command -v cargo >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs) first" >&2; exit 1; }
./scripts/build-agent.sh >/dev/null
cargo build --locked --release -p hearth
./target/release/hearth setup --agent target/x86_64-unknown-linux-gnu/agent/hearth-agent "$@"
