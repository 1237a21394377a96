#!/usr/bin/env bash
# The retrieval experiment's diagnostic arms (docs/layer.md), same data, schedule and seeds:
#   control   RoPE everywhere (the layer's default)
#   no-cmp    no RoPE in the compressed path and block scores (full attention keeps RoPE)
#   nope      no RoPE anywhere (the NoPE full-attention baseline beside it)
#   open      no-cmp with the compressed gate started open (sigmoid(2) = 0.88)
#   st        no-cmp with the straight-through selection gradient (beyond the paper)
#   distill   no-cmp with the distilled selection loss (beyond the paper)
#   nope-open       nope with the compressed gate started open
#   nope-distill    nope with the distilled selection loss (full attention's recall, H100)
#   control-distill RoPE everywhere with the distilled selection loss
# each with the curriculum 256 -> 1024 -> 2048 (the first sparse stage) -> 4k/8k/16k, for every
# seed in SEEDS. JSON per arm and seed in $OUT, then a plot of recall and needle-selected rate
# against steps (scripts/plot-retrieval.py, needs matplotlib).
#   OUT=results/retrieval ARMS="control no-cmp open" SEEDS="0 1" EXTRA="--time-limit 280" PYTHON=python3
set -u
OUT=${OUT:-retrieval-arms}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
common="--curriculum 256,1024,2048 --log-every 100"
for arm in ${ARMS:-control no-cmp nope open st distill nope-open nope-distill control-distill}; do
  case $arm in
    control) args="" ;;
    no-cmp) args="--rope no-cmp" ;;
    nope) args="--rope none" ;;
    open) args="--rope no-cmp --gate-bias-cmp 2" ;;
    st) args="--rope no-cmp --selection-grad straight-through" ;;
    distill) args="--rope no-cmp --selection-grad distill" ;;
    nope-open) args="--rope none --gate-bias-cmp 2" ;;
    nope-distill) args="--rope none --selection-grad distill" ;;
    control-distill) args="--selection-grad distill" ;;
    *) echo "unknown arm $arm"; exit 2 ;;
  esac
  for seed in ${SEEDS:-0 1}; do
    ${PYTHON:-python3} examples/retrieval.py "$OUT/$arm-seed$seed.json" --seed "$seed" $common $args \
      ${EXTRA:-} > "$OUT/$arm-seed$seed.log" 2>&1
    echo "$arm seed $seed rc=$? $(grep -E '^(nsagen|full):' "$OUT/$arm-seed$seed.log" | tr '\n' ' ')"
  done
done
${PYTHON:-python3} scripts/plot-retrieval.py "$OUT" || echo "no plot (matplotlib missing?)"
