#!/bin/bash
set -u
export PYTHONUNBUFFERED=1 NSAGEN_CACHE_DIR=/tmp/nsc
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
nvidia-smi --query-gpu=name --format=csv,noheader
mkdir -p $OUT/n $OUT/c
PYTHONPATH=. timeout 120 python results/h100/compile-2026-12-07/cdiag.py $OUT/n results/h100/compile-2026-12-07/retr.yaml 2 16384 inductor > $OUT/n16.log 2>&1; echo "== new 16k at $(el)"; grep -E " ok|FAILED" $OUT/n16.log
PYTHONPATH=<a copy of ea213c7> CUDA_LAUNCH_BLOCKING=1 timeout 130 python results/h100/compile-2026-12-07/cdiag.py $OUT/c results/h100/compile-2026-12-07/retr.yaml 2 4096 inductor > $OUT/c4.log 2>&1; echo "== cur 4k at $(el)"; grep -E " ok|FAILED" $OUT/c4.log; grep -A2 "File \"/tmp/torchinductor" $OUT/c4.log | grep -v "^\s*\^" | tail -8
PYTHONPATH=. timeout 220 python -m pytest -q -rf tests/test_nn_gpu.py tests/test_backward_gpu.py tests/test_dsa_kernels_gpu.py -k "compile or opcheck or registered or backward_and_indexer" > $OUT/t.log 2>&1; echo "== tests at $(el)"; tail -4 $OUT/t.log
LEFT=$(( 560 - $(el) ))
[ $LEFT -gt 90 ] && { PYTHONPATH=. timeout $LEFT python results/h100/compile-2026-12-07/retrc.py $OUT/n > $OUT/retrc.log 2>&1; echo "== retrc at $(el)"; grep -E "round|compiled|Error" $OUT/retrc.log | tail -12; }
