#!/usr/bin/env bash
# Table 2 (data perturbation: the Table 1 rows x 7 tasks x 10 training sets, each missing a random 10%):
# run the sweep, then write the table under $OUT (default results/table2) as table.md, table.tex
# and table.csv, and the significance tests and training times as stats.md.
# Extra arguments are sweep overrides, e.g. a quick offline trial:
#   OUT=results/trial_table2 scripts/reproduce_table2.sh model=tiny data_dir=demo grid.data.drop_seed=[0,1] \
#       train.max_steps=40 train.eval_every=20 train.min_steps=0 methods.sam.grid.method.burnin_steps=[10] \
#       methods.diffprune.burnin_steps=10 methods.childprune.burnin_steps=10
# Rerunning resumes: finished runs are skipped. If some runs fail, the table is still written
# (the cells show how many runs they have) and the script exits non-zero.
source "$(dirname "$0")/_sweep.sh"
# --authors (first): the paper authors' protocol as their code ran it (configs/table2_authors.yaml:
# the 10,000-epoch lr schedule, 500 val examples, every method's authors' reading), into results/table2_authors.
config=configs/table2.yaml default_out=results/table2
if [ "${1:-}" = "--authors" ]; then
    config=configs/table2_authors.yaml default_out=results/table2_authors
    shift
fi
run_sweep "$config" "$default_out" "$@"

write_tables --select-on val  # SAM's burn-in: the grid value with the best mean val score, per task
write_stats --select-on val
exit "$status"
