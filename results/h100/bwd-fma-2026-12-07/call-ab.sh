#!/bin/bash
# A/B: backward scaling + LSE subtraction as one FMA (head = main before the change).
set -u
export PYTHONUNBUFFERED=1
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
L=$OUT/all.log
GPU=$(nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader); echo "$GPU" | tee -a $L
python -c "import torch,triton;print(torch.__version__,triton.__version__)" | tee -a $L
ab() { t=$1; lim=$2; shift 2; LEFT=$(( $lim - $(el) )); [ $LEFT -lt 30 ] && { echo "skip $t $*"; return; }
  if [ $t = head ]; then P=.ab/head; else P=.; fi
  echo "######## $t: $*" >> $L
  (cd $P && NSAGEN_CACHE_DIR=/tmp/nsc-$t PYTHONPATH=. timeout $LEFT python -m nsagen.cli bench "$@" --no-baselines 2>&1) | tee -a $L | grep -E "^\||Error|T=|bwd|_attention" | cut -c1-150
  echo "== $t at $(el)"; }
for t in head new head new; do ab $t 240 nsa-d128 --backward --seq-len 65536 --breakdown; done
LEFT=$(( 460 - $(el) ))
echo "######## tests at $(el)" >> $L
NSAGEN_CACHE_DIR=/tmp/nsc-new PYTHONPATH=. timeout $LEFT python -m pytest -q tests/test_backward_gpu.py -k "d128_bf16 or small_groups or fla_shaped or varlen or selected_dq" 2>&1 | tail -12 | tee $OUT/backward-tests.log | tee -a $L
LEFT=$(( 560 - $(el) ))
[ $LEFT -gt 30 ] && NSAGEN_CACHE_DIR=/tmp/nsc-new PYTHONPATH=. timeout $LEFT python -m pytest -q tests/test_dsa_kernels_gpu.py -k "backward_and_indexer_loss" 2>&1 | tail -6 | tee $OUT/dsa-tests.log | tee -a $L
echo "done at $(el)"
