#!/usr/bin/env bash
# Builds the guest agent as a static binary (it is the guest's PID 1 and runs on any rootfs).
#   scripts/build-agent.sh           x86-64 guests (glibc, statically linked)
#   scripts/build-agent.sh --arm64   ARM64 guests (musl, linked by rust-lld: no cross C
#                                    toolchain needed; the target comes from rustup)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--arm64" ]; then
    shift
    target=aarch64-unknown-linux-musl
    if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
        rustup target add "$target" >&2
    fi
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=rust-lld RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --locked --profile agent -p hearth-agent --target "$target" "$@"
    echo "target/$target/agent/hearth-agent"
    exit 0
fi
RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --locked --profile agent -p hearth-agent --target x86_64-unknown-linux-gnu "$@"
echo "target/x86_64-unknown-linux-gnu/agent/hearth-agent"
