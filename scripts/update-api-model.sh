#!/usr/bin/env bash
# Refreshes crates/api/model/ from botocore on PyPI (the Lambda MicroVMs service model,
# documentation stripped). Usage: scripts/update-api-model.sh [BOTOCORE_VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-1.44.8}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps "botocore==$version" -d "$work"
python3 - "$work"/botocore-*.whl <<'PY'
import gzip, json, sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
model = json.loads(gzip.decompress(z.read("botocore/data/lambda-microvms/2025-09-09/service-2.json.gz")))
def strip(o):
    if isinstance(o, dict):
        return {k: strip(v) for k, v in o.items() if k != "documentation"}
    if isinstance(o, list):
        return [strip(x) for x in o]
    return o
with open("crates/api/model/lambda-microvms-2025-09-09.json", "w") as f:
    json.dump(strip(model), f, indent=1, sort_keys=True)
PY
echo "crates/api/model/lambda-microvms-2025-09-09.json updated from botocore $version"
