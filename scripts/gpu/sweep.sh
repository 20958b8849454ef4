#!/bin/bash
# One device command: many short `distill --json` runs side by side on the lent GPU, to measure what the
# quick profiles' knobs (length, batch, lr) buy on the default grid's pair (MNIST lenet5-bn -> lenet5-half)
# where the CPU cannot afford to look.  Jobs: scripts/gpu/sweep-jobs.txt, one per line,
#   NAME METHOD SEED PROFILE [distill options...]       (longest first; '#' lines ignored)
# The teacher travels in .teacher/ (a copy of <results>/teachers, git-ignored) so every run distils the very
# teacher the CPU runs use.  Prepare with scripts/gpu/fetch_wheels.sh, then through the device tool:
#   run(command="bash scripts/gpu/sweep.sh", carry=[".whl", ".mnist", ".teacher"], timeout_s=600)
# Try it on CPU first:  SMOKE=1 bash scripts/gpu/sweep.sh   (2 iterations per job, batch 16)
# Env: BUDGET_S (whole script, default 530), LANES (parallel runs, default 12), JOBS (job file), OUT.
# Brings back $OUT/sweep.tgz (one <NAME>.json and <NAME>.err per job) and $OUT/log.txt.
set -u
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
start=$(date +%s); END=$(( start + ${BUDGET_S:-530} ))
OUT=${OUT:-/tmp/sweep-out}; mkdir -p "$OUT"; W=/tmp/sweep-work; mkdir -p $W/res
PY=${PYTHON:-python3}
. scripts/gpu/env.sh $W/data
R=$W/results; mkdir -p $R/teachers; cp -r .teacher/* $R/teachers/
if [ -n "${SMOKE:-}" ]; then DEVICE=${DEVICE:-cpu}; extra="--iterations 2 --batch-size 16"; else DEVICE=${DEVICE:-cuda}; extra=""; fi
{ echo "start $(date -u +%FT%TZ) device $DEVICE"; nvidia-smi -L 2>/dev/null; $PY -c "import torch; print('torch', torch.__version__)"; } > "$OUT/log.txt"
export PY DEVICE R W END extra OUT
job() {  # NAME METHOD SEED PROFILE [options...]
  name=$1 m=$2 s=$3 p=$4; shift 4
  left=$(( END - $(date +%s) - 25 ))
  [ $left -ge 20 ] || { echo "$name: not started (no time left)" >> "$OUT/log.txt"; return 0; }
  t0=$(date +%s)
  OMP_NUM_THREADS=1 timeout ${left}s $PY -m benchmark distill --method "$m" --dataset mnist --teacher lenet5-bn \
    --student lenet5-half --seed "$s" --profile "$p" --device "$DEVICE" --amp off --results "$R" --json "$@" $extra \
    > $W/res/$name.json 2> $W/res/$name.err
  echo "$name rc=$? $(( $(date +%s) - t0 )) s" >> "$OUT/log.txt"
}
export -f job
grep -v '^\s*#' "${JOBS:-scripts/gpu/sweep-jobs.txt}" | grep -v '^\s*$' | xargs -P "${LANES:-12}" -L 1 bash -c 'job "$@"' _
tar czf "$OUT/sweep.tgz" -C $W/res .
echo "done $(date -u +%FT%TZ) in $(( $(date +%s) - start )) s" >> "$OUT/log.txt"
