#!/usr/bin/env bash
# Set up nlgraph from scratch and run the main job on the embedded default.
#
#   bash scripts/setup.sh            # venv + install + main job
#   bash scripts/setup.sh --no-run   # venv + install only (used by scripts/test.sh)
#
# Creates .venv (or $NLGRAPH_VENV) with $PYTHON (default python3). Installs torch 2.13.0 (a CPU
# build here) only when the environment has no torch, so an existing CUDA build is kept; then the
# package with its test, docs and viz extras.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${NLGRAPH_VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "==> installing torch 2.13.0"
  "${PIP[@]}" install "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import torch" || { echo "torch did not install" >&2; exit 1; }
fi
echo "==> installing nlgraph[test,docs,viz]"
"${PIP[@]}" install -e ".[test,docs,viz]" 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/nlgraph" --version >/dev/null || { echo "nlgraph did not install" >&2; exit 1; }

[ "${1:-}" = "--no-run" ] && exit 0

# Main job on the embedded default: validate the whole spec library, then show HOPE and draw its
# level graph.
echo "==> nlgraph validate (every library spec)"
for spec in $("$VENV/bin/python" -c "import nlgraph; print(' '.join(nlgraph.library_specs()))"); do
  "$VENV/bin/nlgraph" validate "$spec"
done
mkdir -p runs
echo "==> nlgraph show hope --graph runs/hope.png"
"$VENV/bin/nlgraph" show hope --graph runs/hope.png
