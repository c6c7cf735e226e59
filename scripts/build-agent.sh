#!/usr/bin/env bash
# Builds the guest agent as a static binary (it is the guest's PID 1 and runs on any rootfs).
set -euo pipefail
cd "$(dirname "$0")/.."
RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --locked --profile agent -p hearth-agent --target x86_64-unknown-linux-gnu "$@"
echo "target/x86_64-unknown-linux-gnu/agent/hearth-agent"
