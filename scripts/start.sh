#!/usr/bin/env bash
# Sets Hearth up if needed (host packages, kernel, agent, base images, release build), then
# runs its main job on the embedded defaults: `hearth serve`, the Lambda MicroVMs API on
# 127.0.0.1:8377 with its state in $HEARTH_HOME/api. On first start it prints an access
# key and how to use it. Extra arguments go to `hearth serve` (see `hearth serve --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --debian >&2
exec ./target/release/hearth serve "$@"
