#!/usr/bin/env bash
# The paper-scale run in ONE device command (docs/gpu.md): install torchattacks from the
# carried wheel, unpack the carried CIFAR-10 JPEG pack, time the training steps (hahnet
# bench, steps a-d at width 1), then `hahnet reproduce --preset paper` with a time budget
# computed from the minutes left (evaluated with the adaptive suite: BPDA, margin,
# transfer, eps sweeps, worst case per image), and leave at most 8 result files in $OUT.
# The bench is optional (a failure is logged, training goes on), and results reach $OUT
# while the run goes on (runs.tar.gz every EXPORT_SECONDS, each network's evaluation in it
# as soon as it is written), so a run killed at the device's time limit still returns what
# it finished.
#
#   bash benchmarks/gpu_paper.sh                      # on the GPU machine (cuda)
#   bash benchmarks/gpu_paper.sh --device cpu --tiny  # CPU rehearsal, same script, tiny scale
#
# Environment: OUT (results; default out/gpu-paper), PYTHON (python3), PACK
# (.gpu/cifar10-jpeg.npz), WHL_DIR (.whl), TOTAL_SECONDS (540: the whole script, start to
# end), RESERVE_SECONDS (40: kept after reproduce for copying results), EXPORT_SECONDS
# (15), BENCH_SECTIONS (steps: hahnet bench --sections; empty: no bench), WORK (scratch).
set -euo pipefail
START=$(date +%s)
DEVICE=cuda
TINY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --tiny) TINY=1; shift ;;
    *) echo "gpu_paper.sh: unknown argument $1 (use --device cpu|cuda, --tiny)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
OUT=${OUT:-out/gpu-paper}
PACK=${PACK:-.gpu/cifar10-jpeg.npz}
WHL_DIR=${WHL_DIR:-.whl}
TOTAL=${TOTAL_SECONDS:-540}
RESERVE=${RESERVE_SECONDS:-40}
EXPORT_EVERY=${EXPORT_SECONDS:-15}
SECTIONS=${BENCH_SECTIONS-steps}
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)
LOG="$WORK/log.txt"
step() { echo "[gpu_paper $(( $(date +%s) - START ))s] $*" | tee -a "$LOG" >&2; }

# Results only (no weights) into $OUT: the report's files once they exist, and runs.tar.gz
# (the log; each run's metrics, settings, time budget and evaluation so far). Each file is
# written beside its final name, then renamed, so $OUT always holds whole files.
export_results() {
  local f members=(-C "$WORK" log.txt) runs=()
  for f in report.md results.json noise.png sparsity.png snr.png filters.png; do
    if [ -f "$WORK/paper/$f" ]; then
      cp "$WORK/paper/$f" "$OUT/$f.part" && mv -f "$OUT/$f.part" "$OUT/$f"
    fi
  done
  if [ -d "$WORK/paper" ]; then
    mapfile -t runs < <(cd "$WORK/paper" && ls -A)
  fi
  if [ "${#runs[@]}" -gt 0 ]; then
    members+=(-C "$WORK/paper" "${runs[@]}")
  fi
  # tar exits 1 when a file grows while read (metrics.jsonl): the archive is still whole
  if tar czf "$WORK/runs.tar.gz" --exclude='*.safetensors' --exclude='*.pt' \
      --exclude='*.png' "${members[@]}" 2>/dev/null || [ $? -eq 1 ]; then
    cp "$WORK/runs.tar.gz" "$OUT/runs.tar.gz.part" && mv -f "$OUT/runs.tar.gz.part" "$OUT/runs.tar.gz"
  fi
}

step "device $DEVICE, tiny $TINY, work $WORK, out $OUT"
# 1. torchattacks from the carried wheel, into a temporary target (the image lacks it)
if ! "$PY" -c "import torchattacks" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --target "$WORK/site" "$WHL_DIR"/torchattacks-*.whl
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-20}  # progress bars: a line every 20 s, not a flood
"$PY" -c "import torch, torchattacks; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')" 2>&1 | tee -a "$LOG"

# 2. the data
DATA="$WORK/cifar10-jpeg"
"$PY" -c "import sys; from hahnet.data import jpeg_pack; print('unpacked', jpeg_pack.unpack(sys.argv[1], sys.argv[2]), 'files')" "$PACK" "$DATA" 2>&1 | tee -a "$LOG"
step "data unpacked"
STOP="$WORK/export.stop"
( while [ ! -e "$STOP" ]; do  # results leave while the bench and the networks run
    export_results
    for _ in $(seq "$EXPORT_EVERY"); do [ -e "$STOP" ] && break; sleep 1; done
  done ) &
EXPORTER=$!

# 3. the training steps (a)-(d)
if [ "$TINY" = 1 ]; then
  BENCH=(--width 0.0625 --batch-size 16 --repeats 2 --warmup 1 --precision fp32)
else
  BENCH=(--width 1 --batch-size 128 --repeats 20 --warmup 3 --precision fp32,bf16 --channels-last on,off)
fi
if [ -z "$SECTIONS" ]; then
  step "bench skipped"
elif "$PY" -m hahnet bench --device "$DEVICE" --sections "$SECTIONS" "${BENCH[@]}" \
    --out "$OUT/bench.json" 2>&1 | tee -a "$LOG"; then
  step "bench done"
else  # optional: its failure must not cost the paper run
  step "bench failed (see the log above); training goes on without it"
fi

# 4. both networks trained within the minutes left, evaluated, reported
LEFT=$(( TOTAL - ($(date +%s) - START) - RESERVE ))
MINUTES=$("$PY" -c "import sys; print(round(max(float(sys.argv[1]), 60.0) / 60, 2))" "$LEFT")
if [ "$TINY" = 1 ]; then
  REPRO=(--width 0.0625 --epochs 1 --batch-size 32 --limit-train 256 --limit 100 --attack-limit 20
         --apgd-steps 2 --noise 0.1 --noise-draws 1 --square-limit 0 --eval-batch-size 50
         --attacks adaptive --adaptive-limit 10 --restarts 1)
else
  REPRO=(--attack-limit 1000 --square-limit 100 --eval-batch-size 500 --attacks adaptive
         --adaptive-limit 500)
fi
step "reproduce --preset paper --time-budget $MINUTES"
set +e
timeout $(( LEFT + RESERVE / 2 )) "$PY" -m hahnet reproduce --preset paper --data "$DATA" \
  --cache-dir "$WORK/cache" --out "$WORK/paper" --device "$DEVICE" --time-budget "$MINUTES" \
  "${REPRO[@]}" 2>&1 | tee -a "$LOG"
STATUS=${PIPESTATUS[0]}
set -e
step "reproduce exit $STATUS"

# 5. the final results: the report's files and the archive, once more (bench.json is there)
touch "$STOP"
wait "$EXPORTER" || true
export_results
ls -la "$OUT" >&2
step "done"
exit "$STATUS"
