#!/usr/bin/env bash
# Table 2 on the stand-in (data perturbation): 5 of Table 1's rows on STS-B x 5 training sets, each
# the train split less a seeded random 10%, = 25 runs with the stand-in's encoder and protocol
# (configs/standin_table2.yaml), two at once. Writes $OUT (default results/standin_table2):
# runs/, table.md, table.csv, stats.md (every row against SAM). Extra arguments are sweep
# overrides (e.g. grid.data.drop_seed=[0,1]); DATA=DIR as in scripts/standin.sh. Rerunning resumes.
source "$(dirname "$0")/_sweep.sh"
link_standin_encoder

run_sweep configs/standin_table2.yaml results/standin_table2 --workers 2 "${data_args[@]}" "$@"
sam-peft table "$out/runs" --format md -o "$out/table.md"
sam-peft table "$out/runs" --format csv -o "$out/table.csv"
write_stats
cat "$out/table.md"
exit "$status"
