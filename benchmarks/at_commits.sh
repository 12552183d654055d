#!/usr/bin/env bash
# One command run at several commits on one machine. GPU machines of the same card type differ by
# more than many changes do, so a change's cost on the GPU is measured by running the commits before
# and after it in one device call, one after another. Two steps:
#
#   bash benchmarks/at_commits.sh prepare 1eb9264 d0dabb5          # here: each commit's package into .at_commits/
#   bash benchmarks/at_commits.sh run 1eb9264 d0dabb5 -- python -P -m nlgraph bench hope_large_chunk \
#       --lengths 2048 --anchor none --json '$OUT/bench_{}.json'   # through the device tool, carry [".whl", ".at_commits"]
#
# `prepare` writes each commit's nlgraph/, compilers/ and specs/ (git archive) laid out as they
# install (compilers/ -> nlgraph/compilers, specs/ -> nlgraph/specs) into .at_commits/SHA (ignored
# by git; AT_COMMITS_DIR moves it). `run` installs the carried wheels (.whl/, when there are any and
# AT_COMMITS_INSTALL is not 0: the GPU machine's, built for its Python),
# then runs the command once per commit, in the order given, with that commit's package first on
# PYTHONPATH, `{}` in the command replaced by the commit and `$OUT` by the output folder; each run
# gets at most AT_COMMITS_LIMIT seconds (default 200). Written to $OUT: at_commits.txt (a line per
# commit: exit status, seconds, the package's path as Python imported it) and results.tar.gz (every
# SHA.log and what the commands wrote to $OUT; the device tool brings back at most 8 files).
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=${AT_COMMITS_DIR:-.at_commits}

usage() { echo "usage: $0 prepare SHA... | run SHA... -- COMMAND..." >&2; exit 2; }
[ $# -ge 2 ] || usage
mode=$1; shift

if [ "$mode" = "prepare" ]; then
  for c in "$@"; do
    full=$(git rev-parse --verify --quiet "$c^{commit}") || { echo "not a commit: $c" >&2; exit 1; }
    rm -rf "$DIR/$c.tmp" && mkdir -p "$DIR/$c.tmp"
    git archive "$full" nlgraph compilers specs | tar -x -C "$DIR/$c.tmp" || exit 1
    mv "$DIR/$c.tmp/compilers" "$DIR/$c.tmp/nlgraph/compilers" && mv "$DIR/$c.tmp/specs" "$DIR/$c.tmp/nlgraph/specs"
    rm -rf "$DIR/$c" && mv "$DIR/$c.tmp" "$DIR/$c"
    echo "$c -> $DIR/$c ($full)"
  done
  exit 0
fi

[ "$mode" = "run" ] || usage
commits=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do commits+=("$1"); shift; done
[ $# -ge 2 ] && [ ${#commits[@]} -ge 1 ] || usage
shift
for c in "${commits[@]}"; do
  [ -d "$DIR/$c/nlgraph" ] || { echo "$DIR/$c is missing: run '$0 prepare $c' first (and carry $DIR)" >&2; exit 1; }
done
OUT=${OUT:-/tmp/at_commits}
mkdir -p "$OUT"
SITE=/tmp/site
if [ "${AT_COMMITS_INSTALL:-1}" = "1" ] && compgen -G ".whl/*.whl" > /dev/null; then
  python -m pip install --quiet --no-deps --no-index --target "$SITE" .whl/*.whl > "$OUT/install.log" 2>&1 \
    || { echo "install failed: $OUT/install.log"; exit 1; }
fi
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt"
: > "$OUT/at_commits.txt"
rc_all=0
for c in "${commits[@]}"; do
  pkg=$(cd "$DIR/$c" && pwd)
  args=()
  for a in "$@"; do a=${a//\{\}/$c}; args+=("${a//\$OUT/$OUT}"); done
  where=$(PYTHONPATH="$pkg:$SITE" python -P -c "import nlgraph.compilers as m; print(m.__file__)" 2>&1 | tail -1)
  start=$(date +%s)
  PYTHONPATH="$pkg:$SITE" timeout "${AT_COMMITS_LIMIT:-200}" "${args[@]}" > "$OUT/$c.log" 2>&1
  rc=$?
  [ $rc -eq 0 ] || rc_all=$rc
  echo "$c rc=$rc $(( $(date +%s) - start ))s $where" | tee -a "$OUT/at_commits.txt"
done
(cd "$OUT" && find . -maxdepth 1 -type f \( -name '*.log' -o -name '*.json' -o -name '*.txt' \) -printf '%P\0' \
   | tar -czf results.tar.gz --null -T -) || true
exit $rc_all
