#!/bin/bash
# Issue 15's GPU part as one device command: the host-sync check of every method, then every MNIST paper
# recipe through `dfkd-bench reproduce` (seed 0 first; sliced with --stop-after so the whole fits the
# per-command limit; an unfinished cell comes back as a checkpoint in results.tgz and continues when the
# folder is carried back).  Prepare with scripts/gpu/fetch_wheels.sh; then, through the device tool:
#   run(command="bash scripts/gpu/check.sh", carry=[".whl", ".mnist"], timeout_s=600)
# Try it on CPU first (10 iterations per cell, tiny batch):   SMOKE=1 bash scripts/gpu/check.sh
# Env: SYNC=0 skips the sync check; BUDGET_S (seconds for the whole script, default 540), SEEDS (default 0), METHODS, RESULTS_IN (a
# results.tgz from an earlier call, to continue), OUT (where the files to bring back go).
# Read what comes back here under the same path (MLflow keeps absolute artifact paths):
#   mkdir -p /tmp/gpu-check-results && tar xzf results.tgz -C /tmp/gpu-check-results
#   dfkd-bench reproduce --method dfad --dataset mnist --seeds 0 --results /tmp/gpu-check-results --no-train-teachers
set -u
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
start=$(date +%s)
END=$(( start + ${BUDGET_S:-540} ))
OUT=${OUT:-/tmp/gpu-check-out}; mkdir -p "$OUT"
PY=${PYTHON:-python3}
. scripts/gpu/env.sh /tmp/gpu-check-data
R=${RESULTS:-/tmp/gpu-check-results}; mkdir -p "$R"
[ -n "${RESULTS_IN:-}" ] && tar xzf "$RESULTS_IN" -C "$R"
if [ -n "${SMOKE:-}" ]; then
  # --iterations sets a recipe's main stage only: HiDFD's 10,000-iteration GAN stage stays, so no HiDFD here
  DEVICE=${DEVICE:-cpu}; extra="--iterations 10 --batch-size 16"; sync="--profile quick --stage-iterations 2"
  METHODS=${METHODS:-kd-real dfad cgdd cpsc dafl zskt}
else
  DEVICE=${DEVICE:-cuda}; extra=""; sync="--profile paper --stage-iterations 4"
fi
{ echo "start $(date -u +%FT%TZ) device $DEVICE"; nvidia-smi -L 2>/dev/null; $PY -c "import torch; print('torch', torch.__version__)"; } > "$OUT/log.txt"
if [ "${SYNC:-1}" = 0 ]; then
  echo "sync_check skipped (SYNC=0)" >> "$OUT/log.txt"
else
  timeout $(( ${BUDGET_S:-540} / 5 )) $PY -m benchmark.sync_check --device "$DEVICE" $sync --results "$R" --json \
    > "$OUT/sync.json" 2>> "$OUT/log.txt"
  echo "sync_check rc=$? after $(( $(date +%s) - start )) s" >> "$OUT/log.txt"
fi
# cheapest first (spec §6: DFAD/CGDD < 1 min, CPSC ~2, DAFL ~2.5, HiDFD ~9 min of H200 compute)
for m in ${METHODS:-kd-real dfad cgdd cpsc dafl hidfd zskt}; do
  left=$(( END - $(date +%s) - 45 ))  # keep time to pack the results
  [ $left -ge 30 ] || { echo "$m: no time left" >> "$OUT/log.txt"; continue; }
  t0=$(date +%s)
  $PY -m benchmark reproduce --method "$m" --dataset mnist --seeds "${SEEDS:-0}" --device "$DEVICE" --results "$R" \
     --stop-after "${left}s" --json $extra >> "$OUT/reproduce.jsonl" 2>> "$OUT/log.txt"
  echo "reproduce $m rc=$? in $(( $(date +%s) - t0 )) s" >> "$OUT/log.txt"
done
tar czf "$OUT/results.tgz" -C "$R" .
echo "done $(date -u +%FT%TZ) in $(( $(date +%s) - start )) s; results.tgz $(du -h "$OUT/results.tgz" | cut -f1)" >> "$OUT/log.txt"
cat "$OUT/log.txt"
