#!/bin/bash
# Must-holds, one call, default (tuned) tables: decode nsa-d128 with SDPA, paged and contiguous;
# DSA forward FP8 64k, DSA decode B=8; NSA forward and fwd+bwd 64k with SDPA; G=1 against G=16.
set -u
export PYTHONUNBUFFERED=1 NSAGEN_CACHE_DIR=/tmp/nsc-new PYTHONPATH=.
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee $OUT/gpu.txt
python -c "import torch,triton;print(torch.__version__,triton.__version__)" | tee -a $OUT/gpu.txt
b() { name=$1; lim=$2; shift 2; LEFT=$(( ${END:-560} - $(el) )); [ $LEFT -lt 30 ] && { echo "skip $name"; return; }; [ $lim -gt $LEFT ] && lim=$LEFT
  timeout $lim python -m nsagen.cli bench "$@" --json $OUT/$name.json > $OUT/$name.log 2>&1; echo "== $name rc=$? at $(el)"; grep -E "^\| [0-9]|T=" $OUT/$name.log | cut -c1-260 | tail -n 8; }
b decode 150 nsa-d128 --decode --batch 1 8 64 --seq-len 65536 --breakdown
b dsa-fwd 70 specs/dsa-v32-fp8.yaml --seq-len 65536 --breakdown --no-baselines
b dsa-dec 60 specs/dsa-v32-fp8.yaml --decode --batch 8 --seq-len 65536 --page-size 0 --breakdown
b fwd 90 nsa-d128 --seq-len 8192 65536 --breakdown
b fwdbwd 110 nsa-d128 --seq-len 65536 --backward
for s in nsa-g16 nsa-g1 nsa-g16 nsa-g1; do b $s-$(el) 60 $s --seq-len 65536 --no-baselines; done
echo "done at $(el)"
