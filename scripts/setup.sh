#!/usr/bin/env bash
# Complete set-up on a fresh Debian 12 machine: host packages (QEMU 10 from
# bookworm-backports, mkfs, busybox, mmdebstrap), the static agents (x86-64 and ARM64),
# the hearth binary, the guest kernels, the initramfs and the base root filesystems.
#   scripts/setup.sh                busybox (minimal) base only
#   scripts/setup.sh --debian       also the debian-bookworm base
#   scripts/setup.sh --base python  also the python base (repeatable: nodejs, …); bases
#                                   not built here are built on their first use
set -euo pipefail
cd "$(dirname "$0")/.."
export HEARTH_HOME="${HEARTH_HOME:-$([ "$(id -u)" -eq 0 ] && echo /var/lib/hearth || echo "$HOME/.local/share/hearth")}"

./scripts/setup-host.sh
command -v cargo >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs) first" >&2; exit 1; }
./scripts/build-agent.sh >/dev/null
cargo build --locked --release -p hearth
./target/release/hearth setup --agent target/x86_64-unknown-linux-gnu/agent/hearth-agent "$@"
# ARM64 guests (emulated on x86-64 hosts): their agent, kernel, initramfs and busybox base.
./scripts/build-agent.sh --arm64 >/dev/null
./target/release/hearth setup --arch arm64 --agent target/aarch64-unknown-linux-musl/agent/hearth-agent
