#!/bin/bash
# fwd+bwd 64k beside the dense baselines (medians over >= 7 calls), then the small groups
set -u
export PYTHONUNBUFFERED=1 NSAGEN_CACHE_DIR=/tmp/nsc
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
L=$OUT/all.log
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >> $L 2>&1; echo "pip rc=$?"
export PYTHONPATH=.:/tmp/site
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee -a $L
echo "######## d128-fwdbwd64k" >> $L
timeout 230 python -m nsagen.cli bench nsa-d128 --seq-len 65536 --backward --breakdown --json $OUT/d128-fwdbwd64k.json 2>&1 | grep -v "Warn\|warn_once" >> $L; echo "== fwdbwd at $(el)"
grep -E "T=65536,|^\| 65536" $L | cut -c1-400
for s in nsa-g16 nsa-g1 nsa-g2 nsa-g4; do
  LEFT=$(( 420 - $(el) )); [ $LEFT -lt 30 ] && break
  echo "######## $s" >> $L
  timeout $LEFT python -m nsagen.cli bench $s --seq-len 65536 --no-baselines 2>&1 | grep -E "T=65536," | tee -a $L | cut -c1-100
done
echo "done at $(el)"
