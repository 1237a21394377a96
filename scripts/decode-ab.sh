#!/usr/bin/env bash
# On a CUDA machine: time decode steps of SPEC (default nsa-d128) at B=1 and B=8, 64k cache, with
# and without programmatic dependent launch, alternating ROUNDS times (default 2), no baselines.
# Results: $OUT/ab-<label>-<round>-{pdl,serial}.json and the tables on stdout.
set -u
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
SPEC=${SPEC:-nsa-d128}
LABEL=${LABEL:-ab}
for r in $(seq 1 "${ROUNDS:-2}"); do
  for mode in pdl serial; do
    flag=""; [ $mode = serial ] && flag="--no-pdl"
    timeout ${BENCH_TIMEOUT:-150} python3 -m nsagen.cli bench "$SPEC" --decode --batch 1 8 \
      --seq-len 65536 --no-baselines --breakdown $flag ${BENCH_ARGS:-} \
      --json "$OUT/$LABEL-$r-$mode.json" 2>&1 | grep "^|\|decode_\|nsa-" | grep -v "^| B\|---"
  done
done
