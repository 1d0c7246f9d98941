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
