#!/bin/bash
# H200: tune nsa-d128 (table into the user cache, copied to $OUT), then must-holds with it.
# H100: the decode split/config sweep at B=8 and B=1, then must-holds that changed nothing.
set -u
export PYTHONUNBUFFERED=1 NSAGEN_CACHE_DIR=/tmp/nsc PYTHONPATH=.
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
L=$OUT/all.log; R=/tmp/res; mkdir -p $R
GPU=$(nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader); echo "$GPU" | tee -a $L
python -c "import torch,triton;print(torch.__version__,triton.__version__)" | tee -a $L
b() { name=$1; lim=$2; shift 2; LEFT=$(( ${END:-570} - $(el) )); [ $LEFT -lt 30 ] && { echo "skip $name"; return; }; [ $lim -gt $LEFT ] && lim=$LEFT
  echo "######## $name: $*" >> $L
  timeout $lim python -m nsagen.cli bench "$@" --json $R/$name.json > $R/$name.log 2>&1; echo "== $name rc=$? at $(el)" | tee -a $L
  cat $R/$name.log >> $L; grep -E "^\| [0-9]|T=" $R/$name.log | cut -c1-200 | tail -n 8; }
if echo "$GPU" | grep -q H200; then
  echo "######## tune at $(el)" >> $L
  timeout 200 python -m nsagen.cli tune nsa-d128 2>&1 | tail -40 | tee -a $L
  echo "== tune at $(el)" | tee -a $L
  cp -r /tmp/nsc/autotune $R/ 2>/dev/null
  b decode 130 nsa-d128 --decode --batch 1 8 64 --seq-len 65536 --breakdown
  b fwd 80 nsa-d128 --seq-len 8192 65536 --breakdown
  b fwdbwd 90 nsa-d128 --seq-len 65536 --backward
  b dsa-fwd 60 specs/dsa-v32-fp8.yaml --seq-len 65536 --breakdown --no-baselines
else
  echo "######## sweep at $(el)" >> $L
  timeout 330 python scripts/decode-sweep.py nsa-d128 --batch 8 1 --cache 65536 --budget 300 --json $R/sweep.json 2>&1 | tee -a $L | grep -v "^ " | cut -c1-200
  echo "== sweep at $(el)" | tee -a $L
  b decode 130 nsa-d128 --decode --batch 1 8 64 --seq-len 65536 --breakdown
  b fwd 80 nsa-d128 --seq-len 8192 65536 --breakdown
fi
tar -czf $OUT/res.tgz -C $R .
echo "done at $(el)" | tee -a $L
