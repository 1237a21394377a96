#!/bin/bash
# DSA forward's and backward's L2 prefetch distance (kernels alone), DSA GPU tests, DSA benches
set -u
export PYTHONUNBUFFERED=1 NSAGEN_CACHE_DIR=/tmp/nsc PYTHONPATH=.
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee $OUT/gpu.txt
timeout 170 python .ab/dsapf.py specs/dsa-v32.yaml fwd 16384 65536 > $OUT/pf-fwd.log 2>&1; echo "== pf fwd at $(el)"; grep -v -i warn $OUT/pf-fwd.log | tail -21
timeout 130 python -m pytest -q -rf tests/test_dsa_kernels_gpu.py > $OUT/tests.log 2>&1; echo "== tests at $(el)"; tail -3 $OUT/tests.log
timeout 150 python .ab/dsapf.py specs/dsa-v32.yaml bwd 16384 65536 > $OUT/pf-bwd.log 2>&1; echo "== pf bwd at $(el)"; grep -v -i warn $OUT/pf-bwd.log | tail -13
timeout 60 python -m nsagen.cli bench specs/dsa-v32-fp8.yaml --seq-len 65536 --breakdown --no-baselines --json $OUT/fwd64k-fp8.json > $OUT/fwd64k-fp8.log 2>&1; echo "== fwd fp8 at $(el)"; grep -iE "attention|indexer|T=" $OUT/fwd64k-fp8.log | tail -6
timeout 60 python -m nsagen.cli bench specs/dsa-v32-fp8.yaml --decode --batch 8 --seq-len 65536 --page-size 0 --breakdown --json $OUT/dec-b8-64k.json > $OUT/dec.log 2>&1; echo "== decode at $(el)"; tail -8 $OUT/dec.log
