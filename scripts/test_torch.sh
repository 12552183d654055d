#!/usr/bin/env bash
# Run tests under another torch release, in a venv of its own: the package asks for torch>=2.6, CI
# runs 2.13 (the CPU build on disk), and the GPU machine runs 2.11, whose `scan` differentiated the
# chunk loop wrongly where 2.13's did not (docs/benchmarks.md, "The chunk loop's scan on torch 2.11").
#   bash scripts/test_torch.sh 2.11.0 tests/compilers/test_scan.py
#   bash scripts/test_torch.sh 2.11.0                       # the default suite
# The venv is .venv-torch-VERSION (NLGRAPH_TORCH_VENV overrides). A release other than the CPU build
# on disk comes from PyPI as a CUDA build (about 4.6 GB installed; the tests run on the CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:?usage: bash scripts/test_torch.sh TORCH_VERSION [PYTEST ARGS...]}
shift
venv=${NLGRAPH_TORCH_VENV:-.venv-torch-$version}
if [ ! -x "$venv/bin/python" ]; then
  python3.11 -m venv "$venv"
  "$venv/bin/pip" install -q "torch==$version"
  "$venv/bin/pip" install -q -e '.[test,viz]' numpy
  # CUDA builds bring the triton they were built with; the CPU build none: then the GPU machine's
  "$venv/bin/python" -c 'import triton' 2>/dev/null || "$venv/bin/pip" install -q triton==3.6.0
fi
have=$("$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')
if [ "$have" != "$version" ]; then
  echo "$venv has torch $have, not $version: remove it or set NLGRAPH_TORCH_VENV" >&2
  exit 1
fi
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
# -P: the source tree's nlgraph/ holds no compilers/, which the installed package maps in
exec "$venv/bin/python" -P -m pytest -p no:cacheprovider "$@"
