#!/usr/bin/env bash
# The adaptive-attack study of the committed `cpu` checkpoints (docs/evaluation.md,
# "Adaptive attacks"), in four parts that each take an hour or more on one CPU core:
# {hah, standard} x {Linf, L2}, every part saved when it finishes, so that the study can
# be stopped and resumed (finished parts are kept; an unfinished one starts again).
# Then `hahnet report` joins the parts into one report in $OUT.
#
#   bash benchmarks/adaptive_cpu.sh                 # writes runs/adaptive, then $OUT
#
# Environment: PARTS (runs/adaptive), OUT (docs/results/cpu/adaptive), HAHNET
# (.venv/bin/hahnet), THREADS (1), LIMIT (1000 test images), ADAPTIVE_LIMIT (500:
# margin, BPDA and transfer), SWEEP_LIMIT (200: the eps sweeps), EXTRA (more eval flags).
set -euo pipefail
cd "$(dirname "$0")/.."
PARTS=${PARTS:-runs/adaptive}
OUT=${OUT:-docs/results/cpu/adaptive}
HAHNET=${HAHNET:-.venv/bin/hahnet}
NETS=${NETS:-docs/results/cpu}
for norm in Linf L2; do
  for net in hah standard; do
    other=$([ "$net" = hah ] && echo standard || echo hah)
    part=$PARTS/$net-$norm
    [ -f "$part/results.json" ] && { echo "kept: $part"; continue; }
    rm -rf "$part.part"
    # shellcheck disable=SC2086
    $HAHNET eval "$NETS/$net" --attacks all --norms "$norm" --limit "${LIMIT:-1000}" \
      --attack-limit "${LIMIT:-1000}" --adaptive-limit "${ADAPTIVE_LIMIT:-500}" \
      --sweep-limit "${SWEEP_LIMIT:-200}" --transfer-from "$NETS/$other" \
      --threads "${THREADS:-1}" --out "$part.part" ${EXTRA:-}
    mv "$part.part" "$part"
  done
done
$HAHNET report "$PARTS"/standard-Linf "$PARTS"/hah-Linf "$PARTS"/standard-L2 "$PARTS"/hah-L2 \
  --out "$OUT" --title "Adaptive attacks on the cpu checkpoints"
