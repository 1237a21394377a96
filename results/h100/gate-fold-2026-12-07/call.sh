#!/bin/bash
# minimal: GPU tests of the working tree (backward, decode), A/B of the backward against HEAD
# .ab/head: `git archive 8462df5 nsagen templates specs pyproject.toml autotune generated` unpacked;
# the working tree: 8462df5 plus the trial (gates folded into the dk/dv step) and the decode append change
set -u
export PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader | tee $OUT/gpu.txt
timeout 120 env PYTHONPATH=. python -m pytest -q -x tests/test_backward_gpu.py > $OUT/tests-bwd.log 2>&1; echo "tests bwd rc=$?" | tee -a $OUT/tests-bwd.log; tail -n 1 $OUT/tests-bwd.log
echo "bwd tests at $(el) s"
for t in head new; do
  if [ $t = head ]; then P=.ab/head; else P=.; fi
  timeout 60 env PYTHONPATH=$P python -m nsagen.cli bench nsa-d128 --seq-len 65536 --backward --breakdown --no-baselines --json $OUT/$t-nsa-d128.json > $OUT/$t-nsa-d128.log 2>&1
  python .ab/show.py $OUT/$t-nsa-d128.json $t nsa-d128 | tee -a $OUT/ab.txt
done
echo "ab at $(el) s"
timeout 80 env PYTHONPATH=. python -m pytest -q -x tests/test_decode_gpu.py > $OUT/tests-decode.log 2>&1; echo "tests decode rc=$?" | tee -a $OUT/tests-decode.log; tail -n 1 $OUT/tests-decode.log
echo "all done at $(el) s"
