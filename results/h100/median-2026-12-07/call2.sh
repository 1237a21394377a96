#!/bin/bash
# the README table again with medians over >= 7 calls (default configs), one run
set -u
export PYTHONUNBUFFERED=1 NSAGEN_CACHE_DIR=/tmp/nsc
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
L=$OUT/all.log
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >> $L 2>&1; echo "pip rc=$?"
export PYTHONPATH=.:/tmp/site
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee -a $L
python -c "import torch,triton;print(torch.__version__,triton.__version__)" | tee -a $L
run() { name=$1; lim=$2; shift 2; LEFT=$(( 580 - $(el) )); [ $LEFT -lt 30 ] && { echo "skip $name"; return; }; [ $lim -gt $LEFT ] && lim=$LEFT
  echo "######## $name: $*" >> $L; timeout $lim python -m nsagen.cli bench "$@" --json $OUT/$name.json > /tmp/$name.log 2>&1; echo "== $name rc=$? at $(el) s"; grep -v "Warn\|warn_once" /tmp/$name.log >> $L; grep -E "^\|" /tmp/$name.log | tail -n 6; }
run d128-fwd 150 nsa-d128 --seq-len 8192 16384 32768 65536
run d128-fwdbwd 150 nsa-d128 --seq-len 8192 65536 --backward --breakdown
run fla-fwd 60 nsa-fla --seq-len 65536
run d128-decode 100 nsa-d128 --decode --batch 1 8 64 --seq-len 65536 --breakdown
run fla-fwdbwd 120 nsa-fla --seq-len 65536 --backward
echo "all done at $(el) s"
