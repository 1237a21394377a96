#!/usr/bin/env bash
# Small GQA groups against G=16 at one sequence length, in one run on this GPU: tune the
# forward kernels of the specs in TUNE_SPECS (tables go to the user cache and, copied, to
# $OUT/autotune), then time every spec's forward with a per-kernel breakdown.
#   SPECS="nsa-g16 nsa-g8 nsa-g4 nsa-g2 nsa-g1"   specs timed, in this order
#   TUNE_SPECS="..."                               specs tuned first (default: none)
#   T=65536  BUDGET=50                             sequence length; search seconds per spec
set -u
OUT=${OUT:-small-groups}
OUT=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NSAGEN_CACHE_DIR=${NSAGEN_CACHE_DIR:-/tmp/nsagen-small}
T=${T:-65536}
for s in ${TUNE_SPECS:-}; do
  timeout $((${BUDGET:-50} + 100)) python3 -m nsagen.cli tune $s --seq-len $T --no-decode \
    --no-backward --budget ${BUDGET:-50} > "$OUT/tune-$s.log" 2>&1
  echo "tune $s rc=$?"
done
[ -d "$NSAGEN_CACHE_DIR/autotune" ] && cp -r "$NSAGEN_CACHE_DIR/autotune" "$OUT/"
for s in ${SPECS:-nsa-g16 nsa-g8 nsa-g4 nsa-g2 nsa-g1}; do
  timeout 150 python3 -m nsagen.cli bench $s --seq-len $T --no-baselines --breakdown \
    --json "$OUT/$s.json" > "$OUT/$s.log" 2>&1
  echo "$s rc=$? $(grep -E 'nsagen_ms|tuned' "$OUT/$s.log" | tr -s ' ' | cut -c1-200 | tr '\n' ' ')"
done
