#!/usr/bin/env bash
# Fig. 3a on the stand-in: SAM at 5 sparsities on STS-B x 3 seeds = 15 runs with the stand-in's
# encoder and protocol (configs/standin_sparsity.yaml), two at once. Writes $OUT (default
# results/standin_sparsity): runs/, fig3a.png, table.md. Extra arguments are sweep overrides
# (e.g. seeds=[0]); DATA=DIR as in scripts/standin.sh. Rerunning resumes.
source "$(dirname "$0")/_sweep.sh"
link_standin_encoder

run_sweep configs/standin_sparsity.yaml results/standin_sparsity --workers 2 "${data_args[@]}" "$@"
sam-peft plot sparsity "$out/runs" -o "$out/fig3a.png"
sam-peft table "$out/runs" --format md -o "$out/table.md"
cat "$out/table.md"
exit "$status"
