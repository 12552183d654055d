#!/usr/bin/env bash
# Run a command on the GPU machine of the `device` tool (torch preinstalled, no package registry):
# install the wheels carried in .whl/ (fetched here by benchmarks/fetch_wheels.sh: pydantic,
# omegaconf, fla, titans-pytorch ...) into /tmp/site,
# lay the package out as it installs (compilers/ -> nlgraph/compilers, specs/ -> nlgraph/specs),
# then run the arguments with both on PYTHONPATH. Example:
#   bash benchmarks/device.sh python benchmarks/speed.py --json "$OUT/speed.json"
#
# Autotuning results: fla's and nlgraph's Triton autotuners keep their choices in Triton's cache
# (cache_results). A fresh machine has an empty one, so fla's first call tunes for a minute or more.
# With NLGRAPH_AUTOTUNE=FILE.tar.gz, the choices in FILE (if it exists) seed the cache before the
# command, and every choice in the cache afterwards (a few KiB of *.autotune.json, no binaries) is
# written to $OUT/autotune.tar.gz: copy that back to FILE and carry it to the next call.
set -euo pipefail
python -m pip install --quiet --no-deps --no-index --target /tmp/site .whl/*.whl
rm -rf /tmp/pkg && mkdir -p /tmp/pkg
cp -r nlgraph /tmp/pkg/ && cp -r compilers /tmp/pkg/nlgraph/compilers && cp -r specs /tmp/pkg/nlgraph/specs
export PYTHONPATH=/tmp/pkg:/tmp/site
if [ -n "${NLGRAPH_AUTOTUNE:-}" ]; then
  export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/triton_cache}"
  mkdir -p "$TRITON_CACHE_DIR"
  [ -f "$NLGRAPH_AUTOTUNE" ] && tar -xzf "$NLGRAPH_AUTOTUNE" -C "$TRITON_CACHE_DIR"
  rc=0
  "$@" || rc=$?
  (cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' -print0 \
     | tar -czf "${OUT:-/tmp}/autotune.tar.gz" --null -T -) || true
  exit $rc
fi
"$@"
