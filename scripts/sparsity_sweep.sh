#!/usr/bin/env bash
# Fig. 3a: SAM at the paper's 10 sparsities on the 7 tasks, 10 seeds each; then the figure
# $OUT/fig3a.png (default results/sparsity) and the table of every sparsity, $OUT/table.md.
# Extra arguments are sweep overrides, e.g. a quick offline trial:
#   OUT=results/trial_sparsity scripts/sparsity_sweep.sh model=tiny data_dir=demo seeds=2 tasks=[rte,cb] \
#       train.max_steps=40 train.eval_every=20 train.min_steps=0 methods.sam.burnin_steps=10 \
#       methods.diffprune.burnin_steps=10 methods.childprune.burnin_steps=10
# Rerunning resumes; if some runs fail, the outputs are still written and the script exits non-zero.
source "$(dirname "$0")/_sweep.sh"
run_sweep configs/sparsity.yaml results/sparsity "$@"

sam-peft plot sparsity "$out/runs" -o "$out/fig3a.png"
sam-peft table "$out/runs" --format md -o "$out/table.md"
exit "$status"
