#!/usr/bin/env bash
# One prepared GPU session for the device tool (no Ray there): the device check, then the seed
# reproduction (ES tf-ftz), and the ablation rows (ES linear, backprop), all in-process.
# Dry run on CPU first: SMALL=1 OUT=/tmp/devout bash benchmarks/device_session.sh
# SETS="es.pop_size=4096 es.batch_size=256" adds --set overrides to every training run.
# A run dir carried in .devdata/seed_tfftz (untar the last session's seed_tfftz.tgz there) is resumed.
# COMPARE_SETS="es.rank=1 es.pop_size=8192" trains runs/compare alongside the main run (same GPU, same
# budget; SETS apply first). SIDE=0 skips the linear and backprop rows (already in docs/results).
# INIT_FROM=.devdata/theta.pt starts the main run at that checkpoint's theta (es-service train --init-from;
# it skips a config's warm_start). CONFIG=configs/mnist_es_finetune.yaml without INIT_FROM runs the whole
# hybrid there: its warm_start backprop epochs on the GPU, then ES (--time-budget bounds the ES stage only).
set -uo pipefail
OUT=${OUT:-/tmp/devout}
mkdir -p "$OUT" runs
export ES_DATA_DIR=${ES_DATA_DIR:-$PWD/.devdata/mnist}
# No install there: the workers/ folder is imported as es_workers (pyproject's package-dir) through a link.
SHIM=${TMPDIR:-/tmp}/es-shim
mkdir -p "$SHIM" && ln -sfn "$PWD/workers" "$SHIM/es_workers"
export PYTHONPATH=$PWD:$SHIM PYTHONUNBUFFERED=1 XDG_CACHE_HOME=${XDG_CACHE_HOME:-/tmp/es-cache}
PY=${PY:-python3}
MAIN_BUDGET=${MAIN_BUDGET:-300}
SIDE_BUDGET=${SIDE_BUDGET:-110}
CONFIG=${CONFIG:-configs/mnist_seed.yaml}
SMALL_ARGS=()
CHECK_ARGS=()
for item in ${SETS:-}; do SMALL_ARGS+=(--set "$item"); done
if [ "${SMALL:-0}" = 1 ]; then
  SMALL_ARGS+=(--set es.pop_size=16 --set es.batch_size=64 --set es.batch_size_final=128
              --set noise.table_size=2097152 --set eval.train_size=2000 --set eval.every=5)
  CHECK_ARGS=(--small)
fi
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/log.txt"; }
{
  log "start"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  $PY -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available())"
  THETA=()
  [ -f .devdata/theta_checkpoint.pt ] && THETA=(--theta .devdata/theta_checkpoint.pt)
  timeout 290 $PY -m benchmarks.device_check "${CHECK_ARGS[@]}" "${THETA[@]}" --json "$OUT/device_check.json"
  log "device check exit $?"
  COMPARE=()
  if [ -n "${COMPARE_SETS:-}" ]; then
    for item in $COMPARE_SETS; do COMPARE+=(--set "$item"); done
    $PY -m es_service.cli train --config "$CONFIG" --executor local --run-dir runs/compare --force \
        --time-budget "$MAIN_BUDGET" --quiet "${SMALL_ARGS[@]}" "${COMPARE[@]}" > "$OUT/compare.log" 2>&1 &
    COMPARE_PID=$!
  fi
  if [ -d .devdata/seed_tfftz ]; then  # a run brought back from an earlier session: continue it bitwise
    rm -rf runs/seed_tfftz && cp -r .devdata/seed_tfftz runs/seed_tfftz
    $PY -m es_service.cli resume runs/seed_tfftz --executor local --time-budget "$MAIN_BUDGET"
  else
    INIT=()
    [ -n "${INIT_FROM:-}" ] && INIT=(--init-from "$INIT_FROM")
    $PY -m es_service.cli train --config "$CONFIG" --executor local --run-dir runs/seed_tfftz --force \
        --time-budget "$MAIN_BUDGET" "${INIT[@]}" "${SMALL_ARGS[@]}"
  fi
  log "main run exit $?"
  if [ -n "${COMPARE_PID:-}" ]; then wait "$COMPARE_PID"; log "compare run exit $?"; fi
  RUNS="runs/seed_tfftz"
  [ -n "${COMPARE_PID:-}" ] && RUNS="$RUNS runs/compare"
  if [ "${SIDE:-1}" = 1 ]; then
  RUNS="$RUNS runs/seed_linear runs/seed_backprop"
  $PY -m es_service.cli train --config "$CONFIG" --executor local --run-dir runs/seed_linear --force \
      --set network.arithmetic=linear --time-budget "$SIDE_BUDGET" --quiet "${SMALL_ARGS[@]}" &
  LINEAR=$!
  $PY -m es_service.cli backprop --config "$CONFIG" --run-dir runs/seed_backprop --force --epochs 30 \
      --time-budget "$SIDE_BUDGET" "${SMALL_ARGS[@]}" &
  BACKPROP=$!
  wait $LINEAR; log "linear run exit $?"
  wait $BACKPROP; log "backprop run exit $?"
  fi
  echo "$RUNS" > "$OUT/runs.txt"
} 2>&1 | grep -v "cpp_extension.py" | tee -a "$OUT/session.log"
RUNS=$(cat "$OUT/runs.txt")
$PY -m es_service.cli report $RUNS --plot "$OUT/report.png" > "$OUT/report.md" 2>&1
cat "$OUT/report.md"
tar czf "$OUT/seed_tfftz.tgz" -C runs seed_tfftz
[ -d runs/compare ] && tar czf "$OUT/compare.tgz" -C runs compare
[ -d runs/seed_linear ] && tar czf "$OUT/ablation.tgz" -C runs --exclude=checkpoint.pt seed_linear seed_backprop
ls -la "$OUT"
