#!/usr/bin/env bash
# Time two source trees of nsagen side by side on one GPU, alternating per spec and mode, so a
# change can be checked for regressions kernel by kernel. Results (JSON and logs) go to $OUT.
#   OLD=path/to/old/tree      the tree to compare against (holds nsagen/, templates/, ...)
#   SPECS="nsa-d128 nsa-fla"  specs to time (default nsa-d128 nsa-fla nsa-paper)
#   MODES="forward backward decode"
#   TS="8192 65536"           sequence lengths (forward, backward); decode uses DECODE_T, B 1 8
set -u
OUT=${OUT:-ab-results}
OLD=$(cd "${OLD:?set OLD to the tree to compare against}" && pwd)
OUT=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 NSAGEN_CACHE_DIR=${NSAGEN_CACHE_DIR:-/tmp/nsagen-ab-cache}
NEW=$PWD
for s in ${SPECS:-nsa-d128 nsa-fla nsa-paper}; do
  for m in ${MODES:-forward backward decode}; do
    case $m in
      forward) args="--seq-len ${TS:-8192 65536}" ;;
      backward) args="--seq-len ${TS:-8192 65536} --backward" ;;
      decode) args="--decode --batch 1 8 --seq-len ${DECODE_T:-65536}" ;;
    esac
    for side in old new; do
      tree=$NEW; [ $side = old ] && tree=$OLD
      (cd "$tree" && PYTHONPATH=$tree timeout ${BENCH_TIMEOUT:-150} python3 -m nsagen.cli bench $s \
        $args --no-baselines --breakdown --json "$OUT/$side-$s-$m.json") > "$OUT/$side-$s-$m.log" 2>&1
      echo "$side $s $m rc=$? $(grep -E '^\| [0-9]' "$OUT/$side-$s-$m.log" | tr -s ' ' | tr '\n' ' ')"
    done
  done
done
