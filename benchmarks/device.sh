#!/usr/bin/env bash
# Run a command on the GPU machine of the `device` tool (torch preinstalled, no package registry):
# install the wheels carried in .whl/ (fetched here by benchmarks/fetch_wheels.sh: pydantic,
# omegaconf, fla, titans-pytorch ...) into /tmp/site,
# lay the package out as it installs (compilers/ -> nlgraph/compilers, specs/ -> nlgraph/specs),
# then run the arguments with both on PYTHONPATH. Example:
#   bash benchmarks/device.sh python benchmarks/speed.py --json "$OUT/speed.json"
set -euo pipefail
python -m pip install --quiet --no-deps --no-index --target /tmp/site .whl/*.whl
rm -rf /tmp/pkg && mkdir -p /tmp/pkg
cp -r nlgraph /tmp/pkg/ && cp -r compilers /tmp/pkg/nlgraph/compilers && cp -r specs /tmp/pkg/nlgraph/specs
export PYTHONPATH=/tmp/pkg:/tmp/site
"$@"
