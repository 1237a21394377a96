#!/usr/bin/env bash
# On a CUDA machine: run the GPU test modules in bf16, then the benchmarks; results go to $OUT
# (default ./gpu-results). Uses the source tree; fla-core is picked up from .fla/*.whl if present.
set -u
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NSAGEN_CACHE_DIR=/tmp/nsagen-cache
if ls .fla/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/fla .fla/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/fla
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
TESTS=${TESTS:-tests/test_kernels_gpu.py}
if [ "$TESTS" != none ]; then
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -x --timeout 280 $TESTS 2>&1 | tee "$OUT/gpu-tests.log" | tail -25
fi
for s in ${BENCH_SPECS:-nsa-d128 nsa-fla}; do
  timeout ${BENCH_TIMEOUT:-200} python3 -c "
import sys, json, nsagen
from nsagen import bench
spec = nsagen.load_spec('$s')
doc = bench.bench_forward(spec, [int(t) for t in '${BENCH_TS:-8192,16384,32768,65536}'.split(',')], breakdown=True)
bench.write_results(doc, __import__('pathlib').Path('$OUT/bench-$s.json'))
print(bench.format_table(doc))
" 2>&1 | tee "$OUT/bench-$s.log" | grep -v Warning
done
if [ -n "${SWEEP_SPEC:-}" ]; then
  timeout ${SWEEP_TIMEOUT:-280} python3 -c "
import json, torch, nsagen
from nsagen import autotune
spec = nsagen.load_spec('$SWEEP_SPEC'); op = nsagen.build(spec)
T = ${SWEEP_T:-32768}; dt = torch.bfloat16; torch.manual_seed(0)
x = dict(q=torch.randn(1, T, spec.heads_q, spec.dim_qk, dtype=dt, device='cuda'),
         k=torch.randn(1, T, spec.heads_kv, spec.dim_qk, dtype=dt, device='cuda'),
         v=torch.randn(1, T, spec.heads_kv, spec.dim_v, dtype=dt, device='cuda'),
         gates=torch.rand(1, T, spec.heads_q, 3, dtype=dt, device='cuda'))
rep = autotune.search_forward(op, x, kernels='${SWEEP_KERNELS:-slc_attention cmp_attention select_blocks win_attention}'.split())
json.dump(rep, open('$OUT/sweep-$SWEEP_SPEC.json', 'w'), indent=1)
for k, r in rep.items(): print(k, r)
" 2>&1 | tee "$OUT/sweep.log" | grep -v "^  "
fi
