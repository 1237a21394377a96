#!/usr/bin/env bash
# On a CUDA machine: run the GPU test modules in bf16, then the benchmarks; results go to $OUT
# (default ./gpu-results). Uses the source tree; fla-core (.fla/*.whl) and the FlashAttention-3
# forward wheel (.whl/fa3_fwd-*.whl) are installed from the tree when present.
#   TESTS=none            skip the tests
#   BENCH_SPECS="a b"     specs benchmarked with baselines at BENCH_TS (default 8k..64k)
#   EXTRA_SPECS="c d"     specs benchmarked alone at EXTRA_TS (default 64k)
#   BWD_SPECS="a"         specs benchmarked forward+backward with baselines at BENCH_TS
#   DECODE_SPECS="a"      specs benchmarked in decoding (B 1, 8, 64; caches 8k..128k)
#   (DSA specs work in each list: `nsagen bench` times their prefill, backward and decode)
set -u
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NSAGEN_CACHE_DIR=/tmp/nsagen-cache
if ls .fla/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/fla .fla/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/fla
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/whl .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/whl
fi
nsagen() { python3 -m nsagen.cli "$@"; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
TESTS=${TESTS:-tests/test_kernels_gpu.py tests/test_backward_gpu.py tests/test_decode_gpu.py tests/test_tune_gpu.py tests/test_nn_gpu.py tests/test_dsa_kernels_gpu.py}
if [ "$TESTS" != none ]; then
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q --maxfail=${MAXFAIL:-8} $TESTS 2>&1 | tee "$OUT/gpu-tests.log" | tail -25
fi
TS=$(echo ${BENCH_TS:-8192,16384,32768,65536} | tr , ' ')
for s in ${BENCH_SPECS:-nsa-d128 nsa-fla}; do
  timeout ${BENCH_TIMEOUT:-200} python3 -m nsagen.cli bench $s --seq-len $TS --breakdown \
    --json "$OUT/bench-$s.json" 2>&1 | grep -v Warn | tee "$OUT/bench-$s.log" | grep -v "^   T=\|^\[" 
done
for s in ${BWD_SPECS:-}; do
  timeout ${BENCH_TIMEOUT:-200} python3 -m nsagen.cli bench $s --seq-len $TS --backward --breakdown \
    --json "$OUT/bench-$s-bwd.json" 2>&1 | grep -v Warn | tee "$OUT/bench-$s-bwd.log" | grep -v "^   T=\|^\["
done
for s in ${DECODE_SPECS:-}; do
  timeout ${BENCH_TIMEOUT:-200} python3 -m nsagen.cli bench $s --decode --batch 1 8 64 --breakdown \
    --json "$OUT/bench-$s-decode.json" 2>&1 | grep -v Warn | tee "$OUT/bench-$s-decode.log" | grep "^|"
done
for s in ${EXTRA_SPECS:-}; do
  echo "== $s"
  timeout ${BENCH_TIMEOUT:-200} python3 -m nsagen.cli bench $s --seq-len ${EXTRA_TS:-65536} \
    --no-baselines --json "$OUT/bench-$s.json" 2>&1 | grep -v Warn | tee "$OUT/bench-$s.log" | grep "^| [0-9]"
done
