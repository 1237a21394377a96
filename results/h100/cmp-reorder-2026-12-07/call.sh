#!/bin/bash
# one call: bf16 GPU tests (four groups side by side), forward A/B at 64k and decode A/B
# (the 8462df5 tree in .ab/head against the working tree), then forward+backward 64k; time-guarded
set -u
export PYTHONUNBUFFERED=1
T0=$(date +%s)
CUT=${CUT:-360}
el() { echo $(( $(date +%s) - T0 )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > /tmp/pip.log 2>&1; echo "pip rc=$?"
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader | tee $OUT/gpu.txt
python -c "import torch,triton;print(torch.__version__,triton.__version__)" | tee -a $OUT/gpu.txt
B=tests/test_backward_gpu.py
H="$B::test_d128_bf16 $B::test_d128_bf16_16k $B::test_fla_shaped_bf16 $B::test_paper_learned_compression_bf16"
D=""; for t in $H; do D="$D --deselect $t"; done
pt() { n=$1; shift; ( timeout ${TT:-200} env PYTHONPATH=. python -m pytest -q -rf "$@" > /tmp/$n.log 2>&1; echo "rc=$?" >> /tmp/$n.log ) & }
pt t1 $B $D
pt t2 $H
pt t3 tests/test_kernels_gpu.py tests/test_decode_gpu.py
wait
cat /tmp/t1.log /tmp/t2.log /tmp/t3.log > $OUT/tests.log
for f in t1 t2 t3; do echo "== $f"; grep -E "passed|failed|error|FAILED|ERROR|rc=" /tmp/$f.log | tail -n 8; done
echo "tests at $(el) s"
for t in head new; do
  if [ $(el) -gt $(( CUT - 60 )) ]; then echo "skip cmp $t"; continue; fi
  if [ $t = head ]; then P=.ab/head; else P=.; fi
  if [ $t = head ]; then C="{}"; else C='{} {"num_stages":2} {"BC":64}'; fi
  timeout 75 env PYTHONPATH=$P python .ab/cmpab.py $t nsa-d128 65536 $C 2>&1 | grep -E "^(head|new) "
  timeout 30 env PYTHONPATH=$P python .ab/cmpab.py $t nsa-fla 65536 '{}' 2>&1 | grep -E "^(head|new) "
  echo "cmp $t at $(el) s"
done | tee -a $OUT/bench.log
for t in head new; do
  if [ $(el) -gt $(( CUT - 45 )) ]; then echo "skip decode $t"; continue; fi
  if [ $t = head ]; then P=.ab/head; else P=.; fi
  timeout 45 env PYTHONPATH=$P python -m nsagen.cli bench nsa-d128 --decode --batch 1 8 --seq-len 65536 --no-baselines --json /tmp/dec-$t.json > /tmp/dec-$t.log 2>&1
  echo "decode $t rc=$? at $(el) s"
  python -c "
import json
for r in json.load(open('/tmp/dec-$t.json'))['rows']: print('$t', {k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items() if k.endswith('us') or k in ('B', 'L', 'batch')})" 2>&1 | tail -n 4
done | tee -a $OUT/bench.log
echo "decode ab at $(el) s"
export PYTHONPATH=.:/tmp/site
run() { name=$1; lim=$2; shift 2; if [ $(el) -lt $(( CUT - lim )) ]; then timeout $lim python -m nsagen.cli bench "$@" --json $OUT/$name.json > /tmp/$name.log 2>&1; echo "== $name rc=$? at $(el) s"; cat /tmp/$name.log >> $OUT/bench.log; grep -v Warn /tmp/$name.log | tail -n 7; else echo "skip $name"; fi; }
run fwdbwd-64k 60 nsa-d128 --seq-len 65536 --backward --breakdown --no-baselines
echo "all done at $(el) s"
