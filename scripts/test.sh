#!/usr/bin/env bash
# Run the test suite (and the strict docs build) in the project's venv, setting it up first.
#   bash scripts/test.sh [PYTEST ARGS...]
# Hypothesis runs its derandomised `ci` profile unless HYPOTHESIS_PROFILE says otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --no-run
VENV=${NLGRAPH_VENV:-.venv}
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/.cache/inductor}
"$VENV/bin/python" -m pytest "$@"
site=$(mktemp -d)
"$VENV/bin/mkdocs" build --strict -q -d "$site"
rm -rf "$site"
echo "docs: mkdocs build --strict ok"
