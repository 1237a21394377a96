#!/bin/bash
# A/B against .ab/head (main before the change), alternating, then GPU tests, then (H200) status:
#  1) select_blocks' pass 1 as a max per element (nsa-g1 and nsa-d128 forward 64k, breakdown)
#  2) the online softmax scaling after the row max (one FMA a score)
#  3) decode_combine on two warps by default (decode steps, default configs)
set -u
export PYTHONUNBUFFERED=1
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
L=$OUT/all.log
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >> $L 2>&1; echo "pip rc=$?"
GPU=$(nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader); echo "$GPU" | tee -a $L
python -c "import torch,triton;print(torch.__version__,triton.__version__)" | tee -a $L
ab() { t=$1; lim=$2; shift 2; LEFT=$(( $lim - $(el) )); [ $LEFT -lt 30 ] && { echo "skip $t $*"; return; }
  if [ $t = head ]; then P=.ab/head; else P=.; fi
  echo "######## $t: $*" >> $L
  (cd $P && NSAGEN_CACHE_DIR=/tmp/nsc-$t PYTHONPATH=. timeout $LEFT python -m nsagen.cli bench "$@" --no-baselines 2>&1) | tee -a $L | grep -E "^\||Error|T=|select_blocks|decode_combine|_attention|decode_" | cut -c1-150
  echo "== $t at $(el)"; }
for t in head new head new; do ab $t 150 nsa-g1 --seq-len 65536 --breakdown; done
for t in head new; do ab $t 200 nsa-d128 --seq-len 65536 --breakdown; done
for t in head new; do ab $t 275 nsa-d128 --decode --batch 1 8 64 --seq-len 65536 --untuned --page-size 0 --breakdown; done
LEFT=$(( 420 - $(el) ))
echo "######## tests" >> $L
NSAGEN_CACHE_DIR=/tmp/nsc-new PYTHONPATH=. timeout $LEFT python -m pytest -q tests/test_kernels_gpu.py tests/test_decode_gpu.py 2>&1 | tail -12 | tee -a $L
echo "== tests at $(el)"
export PYTHONPATH=.:/tmp/site NSAGEN_CACHE_DIR=/tmp/nsc-new
run() { name=$1; lim=$2; shift 2; LEFT=$(( 440 - $(el) )); [ $LEFT -lt 30 ] && { echo "skip $name"; return; }; [ $lim -gt $LEFT ] && lim=$LEFT
  echo "######## $name: $*" >> $L; timeout $lim python -m nsagen.cli bench "$@" --json $OUT/$name.json > /tmp/$name.log 2>&1; echo "== $name rc=$? at $(el) s"; grep -v "Warn\|warn_once" /tmp/$name.log >> $L; grep -E "^\||T=" /tmp/$name.log | tail -n 8 | cut -c1-300; }
if echo "$GPU" | grep -q H200; then
  run d128-decode 110 nsa-d128 --decode --batch 1 8 64 --seq-len 65536 --breakdown
  run dsa-fwd 80 specs/dsa-v32-fp8.yaml --seq-len 65536 --breakdown --no-baselines
fi
echo "done at $(el)"
