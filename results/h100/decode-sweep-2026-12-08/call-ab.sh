#!/bin/bash
# A/B decode, alternating: head = main (.ab/head), new = main with select-ranked-merge.patch,
# static = the patch with its chunk loop fully unrolled (.ab/static); then the decode GPU tests
# (bf16) on the new tree; on an H200 also `nsagen tune nsa-d128` and the must-hold benches.
set -u
export PYTHONUNBUFFERED=1
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
L=$OUT/all.log; R=/tmp/res; mkdir -p $R
GPU=$(nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader); echo "$GPU" | tee -a $L
python -c "import torch,triton;print(torch.__version__,triton.__version__)" | tee -a $L
ab() { t=$1; lim=$2; shift 2; LEFT=$(( $lim - $(el) )); [ $LEFT -lt 30 ] && { echo "skip $t $*"; return; }
  if [ $t = new ]; then P=.; else P=.ab/$t; fi
  echo "######## $t: $*" >> $L
  (cd $P && NSAGEN_CACHE_DIR=/tmp/nsc-$t PYTHONPATH=. timeout $LEFT python -m nsagen.cli bench "$@" --no-baselines 2>&1) | tee -a $L | grep -E "^\| [0-9]|Error|B=[0-9]+, T=" | cut -c1-230
  echo "== $t at $(el)"; }
for t in head new static head new static; do ab $t 240 nsa-d128 --decode --batch 1 8 64 --seq-len 65536 --page-size 0 --breakdown; done
echo "######## tests at $(el)" >> $L
NSAGEN_CACHE_DIR=/tmp/nsc-new PYTHONPATH=. timeout 200 python -m pytest -q tests/test_decode_gpu.py 2>&1 | tail -8 | tee -a $L
echo "== tests at $(el)" | tee -a $L
export NSAGEN_CACHE_DIR=/tmp/nsc-new PYTHONPATH=.
b() { name=$1; lim=$2; shift 2; LEFT=$(( 575 - $(el) )); [ $LEFT -lt 30 ] && { echo "skip $name"; return; }; [ $lim -gt $LEFT ] && lim=$LEFT
  echo "######## $name: $*" >> $L
  timeout $lim python -m nsagen.cli bench "$@" --json $R/$name.json > $R/$name.log 2>&1; echo "== $name rc=$? at $(el)" | tee -a $L
  cat $R/$name.log >> $L; grep -E "^\| [0-9]|T=" $R/$name.log | cut -c1-200 | tail -n 8; }
if echo "$GPU" | grep -q H200; then
  echo "######## tune at $(el)" >> $L
  timeout 170 python -m nsagen.cli tune nsa-d128 2>&1 | tail -30 | tee -a $L
  echo "== tune at $(el)" | tee -a $L
  cp -r /tmp/nsc-new/autotune $R/ 2>/dev/null
  b decode 60 nsa-d128 --decode --batch 1 8 64 --seq-len 65536
  b fwd 60 nsa-d128 --seq-len 8192 65536
  b fwdbwd 60 nsa-d128 --seq-len 65536 --backward
else
  b decode 60 nsa-d128 --decode --batch 1 8 64 --seq-len 65536
fi
tar -czf $OUT/res.tgz -C $R .
echo "done at $(el)" | tee -a $L
