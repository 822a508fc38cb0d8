#!/usr/bin/env bash
# The adaptive-attack study of the committed `cpu` checkpoints (docs/evaluation.md,
# "Adaptive attacks"), in four parts that each take an hour or more on one CPU core:
# {hah, standard} x {Linf, L2}, every part saved when it finishes, so that the study can
# be stopped and resumed (finished parts are kept; an unfinished one resumes from the
# attack rows it finished, which `hahnet eval` keeps in its --out until the report).
# Each finished part's results.json is also copied to $OUT/parts/NAME.json, the record
# that is committed: a part found there is not run again, on this clone or any other.
# Then `hahnet report` joins the parts into one report in $OUT.
#
#   bash benchmarks/adaptive_cpu.sh                 # writes runs/adaptive, then $OUT
#   RUN="hah-Linf hah-L2" bash benchmarks/adaptive_cpu.sh &   # two processes, one part
#   RUN="standard-Linf standard-L2" bash benchmarks/adaptive_cpu.sh  # list each
#
# PGD-50x5 and the short Square (the paper suite's masking checks in `hahnet eval`) are
# left out: AutoAttack standard's Square-5000 and the adaptive attacks supersede them.
# The report is written once all four parts exist.
#
# Environment: PARTS (runs/adaptive), OUT (docs/results/cpu/adaptive), HAHNET
# (.venv/bin/hahnet), THREADS (1), LIMIT (1000 test images), ADAPTIVE_LIMIT (500:
# margin, BPDA and transfer), SWEEP_LIMIT (200: the eps sweeps), EXTRA (more eval flags),
# RUN (the parts this process runs, in order; default all four).
set -euo pipefail
cd "$(dirname "$0")/.."
PARTS=${PARTS:-runs/adaptive}
OUT=${OUT:-docs/results/cpu/adaptive}
HAHNET=${HAHNET:-.venv/bin/hahnet}
NETS=${NETS:-docs/results/cpu}
ALL="hah-Linf standard-Linf hah-L2 standard-L2"
for name in ${RUN:-$ALL}; do
  case " $ALL " in *" $name "*) ;; *) echo "RUN: unknown part $name; choose from $ALL" >&2; exit 2;; esac
done
for name in ${RUN:-$ALL}; do
    net=${name%-*} norm=${name#*-}
    other=$([ "$net" = hah ] && echo standard || echo hah)
    part=$PARTS/$name record=$OUT/parts/$name.json
    [ -f "$record" ] && { echo "kept: $record"; continue; }
    if [ -f "$part/results.json" ]; then
      echo "kept: $part"
    else
      # shellcheck disable=SC2086
      $HAHNET eval "$NETS/$net" --attacks all --norms "$norm" --limit "${LIMIT:-1000}" \
        --attack-limit "${LIMIT:-1000}" --adaptive-limit "${ADAPTIVE_LIMIT:-500}" \
        --sweep-limit "${SWEEP_LIMIT:-200}" --transfer-from "$NETS/$other" \
        --pgd-steps 0 --square-limit 0 --threads "${THREADS:-1}" --out "$part.part" ${EXTRA:-}
      mv "$part.part" "$part"
    fi
    mkdir -p "$OUT/parts" && cp "$part/results.json" "$record"
done
for name in $ALL; do
  [ -f "$OUT/parts/$name.json" ] || { echo "not all parts done yet ($name missing)"; exit 0; }
done
$HAHNET report "$OUT"/parts/standard-Linf.json "$OUT"/parts/hah-Linf.json \
  "$OUT"/parts/standard-L2.json "$OUT"/parts/hah-L2.json \
  --out "$OUT" --title "Adaptive attacks on the cpu checkpoints"
