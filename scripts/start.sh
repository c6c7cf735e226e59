#!/usr/bin/env bash
# Sets Hearth up if needed, then boots a microVM on the embedded defaults and runs a
# command in it (default: uname -a; pass your own after the script name).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh >&2
if [ $# -eq 0 ]; then set -- uname -a; fi
exec ./target/release/hearth vm run -- "$@"
