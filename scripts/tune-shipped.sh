#!/usr/bin/env bash
# Tune every shipped spec (specs/*.yaml) on this GPU from the source tree, then time a cold
# `nsagen build` of each with its new table. Needs no network.
#   $OUT/autotune/<gpu>/<module>.json   the tables, laid out like the repository's autotune/
#   $OUT/tune-times.txt                 per spec: tune seconds, cold build seconds, exit codes
#   $OUT/tune-summary.md                the summary tables (default vs best, per kernel)
#   $OUT/tune-<spec>.log                each run's full output
# Knobs: SPECS="nsa-g4 ..." (default: all shipped), BUDGET (search seconds per spec, default
# 20), TOTAL (seconds for the whole run, default 420: later specs get less if earlier ones ran
# long), TUNE_ARGS (extra `nsagen tune` arguments), COLD=0 (skip the cold builds). Each command
# runs under `timeout`.
set -u
OUT=${OUT:-tune-results}
mkdir -p "$OUT/autotune"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
SPECS=${SPECS:-$(for f in specs/*.yaml; do basename "$f" .yaml; done)}
BUDGET=${BUDGET:-20}
TOTAL=${TOTAL:-420}
WORK=$(mktemp -d /tmp/nsagen-tune.XXXXXX)
export TRITON_CACHE_DIR=$WORK/triton
start=$(date +%s)
n_left=$(echo $SPECS | wc -w)
{
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "spec tune_s tune_rc build_s build_rc budget_s"
} > "$OUT/tune-times.txt"
: > "$OUT/tune-summary.md"
for s in $SPECS; do
  now=$(date +%s)
  left=$((TOTAL - (now - start)))
  # share what is left among the remaining specs (about 45 s of each goes to start-up, the
  # reference checks and the cold build)
  share=$((left / n_left - 45))
  b=$BUDGET; [ "$share" -lt "$b" ] && b=$share; [ "$b" -lt 5 ] && b=5
  lim=$((b + 60)); [ "$lim" -gt $((left - 20)) ] && lim=$((left - 20))
  if [ "$lim" -lt 20 ]; then
    echo "$s skipped: the run's $TOTAL s are spent" | tee -a "$OUT/tune-times.txt"
    n_left=$((n_left - 1)); continue
  fi
  t0=$(date +%s.%N)
  NSAGEN_CACHE_DIR=$WORK/cache timeout -k 5 $lim python3 -m nsagen.cli tune "$s" --budget "$b" \
    --out-dir "$OUT/autotune" ${TUNE_ARGS:-} > "$OUT/tune-$s.log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  # cold build: empty module cache and Triton cache, the new tables installed as shipped ones
  brc=skipped
  if [ "${COLD:-1}" != 0 ]; then
    cold=$WORK/cold-$s
    mkdir -p "$cold/autotune"
    cp -r "$OUT"/autotune/*/ "$cold/autotune/" 2>/dev/null
    NSAGEN_CACHE_DIR=$cold TRITON_CACHE_DIR=$cold/triton PYTHONFAULTHANDLER=1 timeout -k 5 60 \
      python3 -m nsagen.cli build "$s" >> "$OUT/tune-$s.log" 2>&1
    brc=$?
  fi
  t2=$(date +%s.%N)
  dt=$(awk -v a="$t1" -v b="$t0" 'BEGIN { printf "%.1f", a - b }')
  db=$(awk -v a="$t2" -v b="$t1" 'BEGIN { printf "%.1f", a - b }')
  echo "$s $dt $rc $db $brc $b" | tee -a "$OUT/tune-times.txt"
  { echo "## $s (tune $dt s, exit $rc; cold build $db s, exit $brc)"; echo;
    grep "^|" "$OUT/tune-$s.log"; grep "budget\|tuned table written" "$OUT/tune-$s.log"; echo; } \
    >> "$OUT/tune-summary.md"
  n_left=$((n_left - 1))
done
echo "total $(( $(date +%s) - start )) s" | tee -a "$OUT/tune-times.txt"
rm -rf "$WORK"
