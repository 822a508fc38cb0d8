#!/usr/bin/env bash
# Held-out ablations behind the `cpu` preset (see ablations.md): each variant trains on
# the training set minus a seeded 10% held out (train --holdout 0.1), and is evaluated on
# those held-out images only (eval --split holdout): the test set plays no part.
# Resumable: rerun to continue; finished runs are skipped by --resume auto.
#   bash docs/results/cpu/ablations.sh [OUT_DIR] [EPOCHS]
set -euo pipefail
OUT=${1:-runs/ablations}
EPOCHS=${2:-8}
DATA=${DATA:-../shared/data/cifar10-jpeg}
HAHNET=${HAHNET:-.venv/bin/hahnet}
COMMON=(--data "$DATA" --width 0.25 --epochs "$EPOCHS" --holdout 0.1 --limit-train 20000
        --threads 1 --resume auto)

declare -A VARIANTS=(
  [standard]="--no-hah"
  [hah]="--hah"
  [hah-demote0.1]="--hah --demote 0.1"
  [hah-no-cost]="--hah --alphas 0,0,0,0,0,0"
  [hah-alpha2x]="--hah --alphas 0.009,0.005,0.0026,0.002,0.0016,0.001"
  [hah-no-threshold]="--hah --keep 1.0"
  [hah-sigma1]="--hah --sigma 1.0"
)
ORDER=(standard hah hah-demote0.1 hah-no-cost hah-alpha2x hah-no-threshold hah-sigma1)

mkdir -p "$OUT"
# two trainings at a time, one thread each (this machine has 2 cores)
for ((i = 0; i < ${#ORDER[@]}; i += 2)); do
  for name in "${ORDER[@]:i:2}"; do
    # shellcheck disable=SC2086
    "$HAHNET" train "${COMMON[@]}" ${VARIANTS[$name]} --out "$OUT/$name" \
      > "$OUT.$name.log" 2>&1 &
  done
  wait
done

runs=()
for name in "${ORDER[@]}"; do runs+=("$OUT/$name"); done
"$HAHNET" eval "${runs[@]}" --data "$DATA" --split holdout --noise 0.05,0.1,0.2 \
  --noise-draws 1 --attack-limit 200 --pgd-steps 0 --square-limit 0 --out "$OUT/report"
