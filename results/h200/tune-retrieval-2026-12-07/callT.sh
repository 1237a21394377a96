#!/bin/bash
# tune the retrieval example's spec (B=2 x 16384 and 8 x 4096) and measure the layer and the
# training step before and after; then the torch.compile comparison with the tuned table
set -u
export PYTHONUNBUFFERED=1
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
nvidia-smi --query-gpu=name --format=csv,noheader
export NSAGEN_CACHE_DIR=/tmp/nsc
mkdir -p $OUT/u $OUT/t
PYTHONPATH=. timeout 80 python results/h100/inverse-map-2026-12-07/layer.py $OUT/u 16384 > $OUT/layer-untuned.log 2>&1; echo "== layer untuned at $(el)"; grep -E "nsagen|full|==" $OUT/layer-untuned.log | grep -v -i warn | head -14
PYTHONPATH=. timeout 80 python results/h100/inverse-map-2026-12-07/retr3.py $OUT/u untuned > $OUT/retr-untuned.log 2>&1; echo "== step untuned at $(el)"; grep round $OUT/retr-untuned.log
PYTHONPATH=. timeout 230 python -m nsagen.cli tune results/h100/compile-2026-12-07/retr.yaml --seq-len 4096 16384 --batch 2 --no-decode --budget 140 > $OUT/tune.log 2>&1; echo "== tune rc=$? at $(el)"; tail -40 $OUT/tune.log
cp -r $NSAGEN_CACHE_DIR/autotune $OUT/ 2>/dev/null
PYTHONPATH=. timeout 80 python results/h100/inverse-map-2026-12-07/layer.py $OUT/t 16384 > $OUT/layer-tuned.log 2>&1; echo "== layer tuned at $(el)"; grep -E "nsagen|full|==" $OUT/layer-tuned.log | grep -v -i warn | head -14
PYTHONPATH=. timeout 80 python results/h100/inverse-map-2026-12-07/retr3.py $OUT/t tuned > $OUT/retr-tuned.log 2>&1; echo "== step tuned at $(el)"; grep round $OUT/retr-tuned.log
LEFT=$(( 585 - $(el) ))
[ $LEFT -gt 60 ] && { PYTHONPATH=. timeout $LEFT python results/h100/compile-2026-12-07/retrc.py $OUT/t > $OUT/retrc.log 2>&1; echo "== retrc at $(el)"; grep -E "round|compiled|Error" $OUT/retrc.log | tail -12; }
