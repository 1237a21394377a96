#!/bin/bash
set -u
export PYTHONUNBUFFERED=1 NSAGEN_CACHE_DIR=/tmp/nsc
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
nvidia-smi --query-gpu=name --format=csv,noheader
mkdir -p $OUT/s $OUT/main $OUT/tiled
PYTHONPATH=. timeout 170 python results/h100/compile-2026-12-07/retrc.py $OUT/s > $OUT/retrc.log 2>&1; echo "== retrc at $(el)"; grep -E "round|compiled in|Error" $OUT/retrc.log | tail -12
for tag in main tiled; do
  LEFT=$(( 300 - $(el) )); [ $LEFT -lt 40 ] && break
  P=.; [ $tag = tiled ] && P=<a copy of 9007831>
  PYTHONPATH=$P timeout $LEFT python results/h100/inverse-map-2026-12-07/layer.py $OUT/$tag 16384 > $OUT/layer-$tag.log 2>&1; echo "== layer $tag at $(el)"; grep -v -i warn $OUT/layer-$tag.log | grep -E "== |inverse" | head -6
done
