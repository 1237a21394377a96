#!/bin/bash
# H200: DSA figures (forward 64k FP8 keys, forward+backward 64k, decode B=8 64k), the retrieval
# step eager and compiled at 16k, then the small groups at 64k with what time is left
set -u
export PYTHONUNBUFFERED=1 NSAGEN_CACHE_DIR=/tmp/nsc PYTHONPATH=.
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee $OUT/gpu.txt
timeout 60 python -m nsagen.cli bench specs/dsa-v32-fp8.yaml --seq-len 65536 --breakdown --no-baselines --json $OUT/fwd64k-fp8.json > $OUT/fwd64k-fp8.log 2>&1; echo "== fwd fp8 at $(el)"; grep -E "T=65536," $OUT/fwd64k-fp8.log
timeout 90 python -m nsagen.cli bench specs/dsa-v32.yaml --seq-len 65536 --backward --breakdown --no-baselines --json $OUT/bwd64k.json > $OUT/bwd64k.log 2>&1; echo "== bwd at $(el)"; grep -E "T=65536," $OUT/bwd64k.log
timeout 60 python -m nsagen.cli bench specs/dsa-v32-fp8.yaml --decode --batch 8 --seq-len 65536 --page-size 0 --breakdown --json $OUT/dec-b8-64k.json > $OUT/dec.log 2>&1; echo "== decode at $(el)"; tail -3 $OUT/dec.log
mkdir -p $OUT/r; timeout 230 python .ab/retrc.py $OUT/r > $OUT/retrc.log 2>&1; echo "== retrc at $(el)"; grep -E "round|compiled|Error" $OUT/retrc.log | tail -12
for s in nsa-g16 nsa-g1 nsa-g2 nsa-g4; do
  LEFT=$(( 570 - $(el) )); [ $LEFT -lt 40 ] && break
  timeout $LEFT python -m nsagen.cli bench $s --seq-len 65536 --no-baselines --json $OUT/$s.json > $OUT/$s.log 2>&1
  echo "$s at $(el): $(grep -E 'T=65536,' $OUT/$s.log | cut -c1-120)"
done
