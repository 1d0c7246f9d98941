#!/usr/bin/env bash
# Fig. 4: DiffPruning on CB with the mask re-projected every 600 steps; then the training-loss
# curve with the re-projections marked, $OUT/fig4.png (default results/projection).
# Extra arguments are sweep overrides, e.g. a quick offline trial:
#   OUT=results/trial_projection scripts/projection_plot.sh model=tiny data_dir=demo \
#       train.max_steps=200 train.min_steps=0 methods.diffprune.burnin_steps=20 \
#       methods.diffprune.remask_every=40
# With several seeds (seeds=3), pass one run directory to `sam-peft plot curve` yourself.
source "$(dirname "$0")/_sweep.sh"
run_sweep configs/projection.yaml results/projection "$@"

sam-peft plot curve "$out/runs" -o "$out/fig4.png"
exit "$status"
