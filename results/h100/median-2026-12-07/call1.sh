#!/bin/bash
# H200: the must-hold figures (decode, DSA, fla-shaped, nsa-d128 forward, small groups);
# H100: the 64k fwd+bwd gap diagnosis and breakdowns
set -u
export PYTHONUNBUFFERED=1 NSAGEN_CACHE_DIR=/tmp/nsc
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
L=$OUT/all.log
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >> $L 2>&1; echo "pip rc=$?"
export PYTHONPATH=.:/tmp/site
GPU=$(nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader); echo "$GPU" | tee -a $L
python -c "import torch,triton;print(torch.__version__,triton.__version__)" | tee -a $L
run() { name=$1; lim=$2; shift 2; LEFT=$(( 575 - $(el) )); [ $LEFT -lt 30 ] && { echo "skip $name"; return; }; [ $lim -gt $LEFT ] && lim=$LEFT
  echo "######## $name: $*" >> $L; timeout $lim python -m nsagen.cli bench "$@" --json $OUT/$name.json > /tmp/$name.log 2>&1; echo "== $name rc=$? at $(el) s"; grep -v "Warn\|warn_once" /tmp/$name.log >> $L; grep -E "^\||T=" /tmp/$name.log | tail -n 8 | cut -c1-400; }
if echo "$GPU" | grep -q H200; then
  run d128-decode 110 nsa-d128 --decode --batch 1 8 64 --seq-len 65536 --breakdown
  run dsa-fwd 80 specs/dsa-v32-fp8.yaml --seq-len 65536 --breakdown --no-baselines
  run dsa-dec 70 specs/dsa-v32-fp8.yaml --decode --batch 8 --seq-len 65536 --page-size 0 --breakdown
  run fla-fwd 70 nsa-fla --seq-len 65536
  run d128-fwd 150 nsa-d128 --seq-len 8192 16384 32768 65536
  for s in nsa-g16 nsa-g1 nsa-g2 nsa-g4; do
    LEFT=$(( 570 - $(el) )); [ $LEFT -lt 40 ] && break
    timeout $LEFT python -m nsagen.cli bench $s --seq-len 65536 --no-baselines >> $L 2>&1
    echo "$s at $(el): $(grep -E 'T=65536,' $L | tail -1 | cut -c1-100)"
  done
else
  timeout 130 python .ab/gap.py nsa-d128 65536 /tmp default >> $L 2>&1; echo "== gap default rc=$? at $(el)"
  grep -A30 "^== default" $L | head -40
  OUT=$OUT/tune SPECS="nsa-d128 nsa-fla" BUDGET=85 TOTAL=290 COLD=0 scripts/tune-shipped.sh >> $L 2>&1
  echo "== tune at $(el)"; cat $OUT/tune/tune-times.txt
  export NSAGEN_CACHE_DIR=/tmp/nscb; mkdir -p /tmp/nscb && cp -r $OUT/tune/autotune /tmp/nscb/
  for s in nsa-d128 nsa-fla; do for a in "" "--untuned"; do
    LEFT=$(( 585 - $(el) )); [ $LEFT -lt 25 ] && break
    echo "######## $s fwd 64k $a" >> $L
    timeout $LEFT python -m nsagen.cli bench $s --seq-len 65536 --no-baselines $a 2>&1 | grep -E "T=65536,|tuned" | tee -a $L | cut -c1-160
  done; done
fi
echo "done at $(el)"
