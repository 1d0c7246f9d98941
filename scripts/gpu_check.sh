#!/usr/bin/env bash
# The GPU check: on a machine with one CUDA GPU, in one call of under 8 minutes,
#   1. tests  the CUDA tests (tests/test_cuda.py, marker `cuda`): bf16 autocast trains every method,
#             the sparse optimizer on CUDA against the CPU one, fused AdamW against the unfused one,
#             a packed sweep against one run at a time, peak memory in result.json;
#   2. bench  scripts/bench.py at RoBERTa-base's shape: every method against the naive mode, packed
#             runs, MFU and the projected Table 1 GPU-hours, then the three targets' verdicts;
#   3. study  configs/gpu_study.yaml: all-MiniLM-L6-v2 on the authors' splits, 7 tasks x 10 methods
#             x 3 seeds, packed runs, the paper's protocol scaled down;
# and it writes 8 files to $OUT (the device tool brings them back).
#
#   scripts/gpu_check.sh --prepare [--no-wheels] [--no-model] [--demo-data]   here: build the carried folder
#                                 (--demo-data: the built-in demo data instead of the splits, for a dry run)
#   scripts/gpu_check.sh                                         on the GPU machine (the tool sets $OUT)
#   scripts/gpu_check.sh --cpu-dry-run                           here: the same at toy size on the CPU
#
# Settings (environment variables; defaults in brackets):
#   GPU_CHECK_CARRY               the carried folder [.gpu_carry]
#   GPU_CHECK_DATA                --prepare: the authors' splits [../shared/data/paper_splits]
#   GPU_CHECK_PYTHON_VERSION      --prepare: the GPU machine's Python, for the wheels [3.12]
#   GPU_CHECK_WORK                scratch folder [a new temporary folder]
#   GPU_CHECK_BUDGET_S            the parts stop by then; packing the results follows [440; dry run 300]
#   GPU_CHECK_PARTS               which parts run [tests bench study]
#   GPU_CHECK_TESTS_S, GPU_CHECK_BENCH_S   caps of the first two parts [90, 150; dry run 60, 120];
#                                 the study gets the rest of the budget
#   GPU_CHECK_BENCH_STEPS, GPU_CHECK_BENCH_RUNS_PER_GPU   timed steps, packed runs [20, 8]
#   GPU_CHECK_STUDY_SEEDS, GPU_CHECK_STUDY_TASKS, GPU_CHECK_STUDY_RUNS_PER_GPU   the study's size
#                                 [3, all 7 (comma-separated names), 16; dry run 1, cb,copa]
#   GPU_CHECK_STUDY_OVERRIDES     extra key=value overrides of the study, e.g. "train.max_steps=200"
#   PYTHON                        the interpreter [python3]
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
bad_usage() { echo "gpu_check.sh: $1 (see --help)" >&2; exit 2; }

mode=device
prepare_flags=()
while (($#)); do
    case "$1" in
        --prepare) [ "$mode" = device ] || bad_usage "--prepare and --cpu-dry-run exclude each other"; mode=prepare ;;
        --cpu-dry-run) [ "$mode" = device ] || bad_usage "--prepare and --cpu-dry-run exclude each other"; mode=dry ;;
        --no-wheels | --no-model | --demo-data) prepare_flags+=("$1") ;;
        -h | --help) usage; exit 0 ;;
        *) bad_usage "unknown argument '$1'" ;;
    esac
    shift
done
if ((${#prepare_flags[@]})) && [ "$mode" != prepare ]; then bad_usage "${prepare_flags[0]} goes with --prepare"; fi

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)
PY=${PYTHON:-python3}
CARRY=${GPU_CHECK_CARRY:-.gpu_carry}
command -v "$PY" >/dev/null || bad_usage "PYTHON=$PY: no such interpreter"

whole_number() {  # whole_number NAME VALUE: a setting that must be a whole number
    [[ "$2" =~ ^[0-9]+$ ]] || bad_usage "$1='$2': expected a whole number"
}

if [ "$mode" = prepare ]; then
    exec "$PY" scripts/gpu_check.py prepare --carry "$CARRY" --data "${GPU_CHECK_DATA:-../shared/data/paper_splits}" \
        --python-version "${GPU_CHECK_PYTHON_VERSION:-3.12}" "${prepare_flags[@]}"
fi

# ------------------------------------------------------------------ settings of the check
if [ "$mode" = dry ]; then
    budget=${GPU_CHECK_BUDGET_S:-300} tests_cap=${GPU_CHECK_TESTS_S:-60} bench_cap=${GPU_CHECK_BENCH_S:-120}
    study_seeds=${GPU_CHECK_STUDY_SEEDS:-1} study_tasks=${GPU_CHECK_STUDY_TASKS:-cb,copa}
else
    budget=${GPU_CHECK_BUDGET_S:-440} tests_cap=${GPU_CHECK_TESTS_S:-90} bench_cap=${GPU_CHECK_BENCH_S:-150}
    study_seeds=${GPU_CHECK_STUDY_SEEDS:-3} study_tasks=${GPU_CHECK_STUDY_TASKS:-}
fi
bench_steps=${GPU_CHECK_BENCH_STEPS:-20} bench_k=${GPU_CHECK_BENCH_RUNS_PER_GPU:-8}
study_k=${GPU_CHECK_STUDY_RUNS_PER_GPU:-16} parts=${GPU_CHECK_PARTS:-tests bench study}
for setting in budget:"$budget" tests_cap:"$tests_cap" bench_cap:"$bench_cap" bench_steps:"$bench_steps" \
    bench_k:"$bench_k" study_k:"$study_k" study_seeds:"$study_seeds"; do
    whole_number "${setting%%:*}" "${setting#*:}"
done
for part in $parts; do
    case "$part" in tests | bench | study) ;; *) bad_usage "GPU_CHECK_PARTS: unknown part '$part' (tests, bench, study)" ;; esac
done
[[ "$study_tasks" =~ ^[a-z,]*$ ]] || bad_usage "GPU_CHECK_STUDY_TASKS='$study_tasks': expected task names separated by commas"

if [ "$mode" = device ]; then
    [ -n "${OUT:-}" ] || bad_usage "OUT is not set (the device tool sets it; for a rehearsal here use --cpu-dry-run)"
else
    OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_out.XXXXXX")}
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
[ -z "$(ls -A "$OUT")" ] || bad_usage "OUT=$OUT is not empty (at most 8 files come back: start from an empty folder)"
[ -f "$CARRY/MANIFEST.json" ] || bad_usage "$CARRY/MANIFEST.json is missing: run scripts/gpu_check.sh --prepare here and carry $CARRY"
if [ "$mode" = device ] && grep -q "built-in demo data" "$CARRY/MANIFEST.json"; then
    bad_usage "$CARRY holds the demo data (--prepare --demo-data is for --cpu-dry-run): prepare it with the splits"
fi
WORK=${GPU_CHECK_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)

START=$SECONDS
DEADLINE=$((START + budget))
LOG=$OUT/gpu_check.log
PARTS_TSV=$WORK/parts.tsv
: >"$PARTS_TSV"

log() {
    local line
    line="[$(date -u +%H:%M:%S) +$(printf '%3d' $((SECONDS - START)))s] $*"
    echo "$line"
    echo "$line" >>"$LOG"
}

# run_part NAME LOGFILE CAP COMMAND...: run COMMAND with a limit of CAP seconds or what is left of
# the budget, whichever is less, its output in LOGFILE; record how it ended in $PARTS_TSV.
# A part that times out gets SIGINT (sweeps end their workers on it), then SIGKILL 15 s later.
run_part() {
    local name=$1 logfile=$2 cap=$3 left limit t0 rc=0 status took
    shift 3
    left=$((DEADLINE - SECONDS))
    limit=$((cap < left ? cap : left))
    if ((limit < 15)); then
        log "$name: skipped, ${left} s of the budget left"
        printf '%s\t%s\t%s\t%s\t%s\n' "$name" skipped 0 0 "$limit" >>"$PARTS_TSV"
        return 0
    fi
    log "$name: start (limit ${limit} s): $*"
    echo "### $name: $*" >>"$logfile"
    t0=$SECONDS
    timeout -s INT -k 15 "$limit" "$@" >>"$logfile" 2>&1 || rc=$?
    took=$((SECONDS - t0))
    status=passed
    if ((rc == 124 || rc == 137)); then status="timed out"; elif ((rc != 0)); then status=failed; fi
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$took" "$limit" >>"$PARTS_TSV"
    log "$name: $status (exit $rc) in ${took} s; the end of $(basename "$logfile"):"
    tail -n 6 "$logfile" | sed 's/^/        /' | tee -a "$LOG"
}

wants() { [[ " $parts " == *" $1 "* ]]; }

# ------------------------------------------------------------------ the environment
log "gpu_check.sh ($mode): budget ${budget} s, parts: $parts; OUT=$OUT; scratch $WORK"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export PYTHONDONTWRITEBYTECODE=1
# The project is not installed on the GPU machine: it runs from this checkout, with the wheels of
# packages the image lacks in $WORK/site, ahead of the image's own.
SITE=$WORK/site
"$PY" scripts/gpu_check.py wheels-to-install --carry "$CARRY" >"$WORK/wheels.txt" 2>>"$LOG" \
    || { log "FAILED: cannot read $CARRY/MANIFEST.json (see gpu_check.log)"; exit 1; }
mapfile -t wheels <"$WORK/wheels.txt"
if ((${#wheels[@]})); then
    log "installing ${#wheels[@]} carried wheel(s) into $SITE: $(basename -a "${wheels[@]}" | tr '\n' ' ')"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "${wheels[@]}" >>"$LOG" 2>&1 \
        || { log "FAILED: pip install of the carried wheels (see gpu_check.log)"; exit 1; }
    export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
else
    log "every carried package is present already; nothing installed"
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" scripts/gpu_check.py check-imports 2>&1 | tee -a "$LOG" || { log "FAILED: the check cannot run here"; exit 1; }
COMMIT=$(git rev-parse HEAD 2>/dev/null || "$PY" -c "import json; print(json.load(open('$CARRY/MANIFEST.json'))['sam_peft_commit'] or '')")
log "commit ${COMMIT:-unknown}"
if [ "$mode" = device ]; then
    "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
        || { log "FAILED: torch sees no CUDA GPU here (for a rehearsal without one: --cpu-dry-run)"; exit 1; }
    { command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv; } 2>&1 | tee -a "$LOG" || true
fi
"$PY" scripts/gpu_check.py restore --carry "$CARRY" --work "$WORK" 2>&1 | tee -a "$LOG" \
    || { log "FAILED: the carried data or model could not be restored"; exit 1; }
log "cpus: $(nproc); $("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)')"

# ------------------------------------------------------------------ 1. the CUDA tests
if wants tests; then
    # Without a GPU every test of the file skips: the dry run checks that they collect and import.
    run_part tests "$OUT/tests.log" "$tests_cap" "$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py
fi

# ------------------------------------------------------------------ 2. the benchmark
if wants bench; then
    if [ "$mode" = device ]; then
        bench_args=(--device cuda --shape roberta-base --runs-per-gpu "$bench_k" --steps "$bench_steps" --warmup 2)
    else
        bench_args=(--device cpu --shape small --steps 1 --warmup 1 --methods full sam lora --naive-methods full sam)
        # a bench.py that also times CPU bf16 by default: not needed for a rehearsal
        if "$PY" scripts/bench.py --help 2>/dev/null | grep -q -- --no-bf16; then bench_args+=(--no-bf16); fi
    fi
    run_part bench "$OUT/bench.log" "$bench_cap" "$PY" scripts/bench.py "${bench_args[@]}" --out "$OUT/bench.json"
    if [ -f "$OUT/bench.json" ]; then
        "$PY" scripts/gpu_check.py verdicts --bench "$OUT/bench.json" 2>&1 | tee -a "$LOG" || true
    fi
fi

# ------------------------------------------------------------------ 3. the study
RUNS=$WORK/study/runs
if wants study; then
    study_args=(configs/gpu_study.yaml "data_dir=$WORK/data" "output_dir=$RUNS" --runs-per-gpu "$study_k" --no-progress)
    if [ -d "$WORK/model" ]; then
        study_args+=("model=$WORK/model")
    elif [ "$mode" = dry ]; then
        study_args+=(model=tiny)
        log "study: no model was carried (--prepare --no-model): the dry run uses the tiny model"
    fi
    [ -z "$study_tasks" ] || study_args+=("tasks=[$study_tasks]")
    if [ "$mode" = dry ]; then  # a handful of steps of two methods: the rehearsal checks the plumbing
        study_args+=(train.max_steps=6 train.eval_every=3 train.min_steps=3 train.patience=1 train.max_seq_len=128
            train.train_eval_subset=32 "methods=[{name: full}, {name: sam, density: 0.005, burnin_steps: 2}]")
    fi
    read -r -a extra <<<"${GPU_CHECK_STUDY_OVERRIDES:-}"
    study_args+=("${extra[@]}")
    (
        while sleep 20; do
            done_n=$(grep -ls '"status": "done"' "$RUNS"/*/result.json 2>/dev/null | wc -l || true)
            failed_n=$(grep -ls '"status": "failed"' "$RUNS"/*/result.json 2>/dev/null | wc -l || true)
            log "study: ${done_n} runs done, ${failed_n} failed"
        done
    ) &
    progress_pid=$!
    # Seed 0 of every cell first: if time runs out later, the table still has every method and task.
    run_part "study seed 0" "$OUT/study.log" "$budget" "$PY" -m sam_peft.cli sweep "${study_args[@]}" "seeds=[0]"
    if ((study_seeds > 1)); then
        run_part "study all seeds" "$OUT/study.log" "$budget" "$PY" -m sam_peft.cli sweep "${study_args[@]}" "seeds=$study_seeds"
    fi
    kill "$progress_pid" 2>/dev/null || true
    wait "$progress_pid" 2>/dev/null || true
    # After the budget: the table, the status and the records (bounded, about 1 minute at most).
    if ! timeout -k 5 30 "$PY" -m sam_peft.cli table "$RUNS" --format md -o "$OUT/table.md" >>"$OUT/study.log" 2>&1; then
        echo "No table: \`sam-peft table\` failed on the study's runs (see study.log)." >"$OUT/table.md"
    fi
    timeout -k 5 20 "$PY" -m sam_peft.cli status "$RUNS" >>"$OUT/study.log" 2>&1 || true
    timeout -k 5 20 "$PY" scripts/gpu_check.py pack --runs "$RUNS" --out "$OUT/study_runs.tar.gz" \
        --counts "$WORK/study_counts.json" 2>&1 | tee -a "$LOG" || true
fi

# ------------------------------------------------------------------ summary and exit status
summary_args=(--out "$OUT/summary.json" --mode "$mode" --parts "$PARTS_TSV" --commit "$COMMIT")
[ ! -f "$OUT/bench.json" ] || summary_args+=(--bench "$OUT/bench.json")
[ ! -f "$WORK/study_counts.json" ] || summary_args+=(--counts "$WORK/study_counts.json")
"$PY" scripts/gpu_check.py summary "${summary_args[@]}"
log "done in $((SECONDS - START)) s. Parts:"
awk -F'\t' '{printf "        %-16s %-10s exit %-4s %4s s (limit %s s)\n", $1, $2, $3, $4, $5}' "$PARTS_TSV" | tee -a "$LOG"
if [ -f "$OUT/bench.json" ]; then "$PY" scripts/gpu_check.py verdicts --bench "$OUT/bench.json" || true; fi
[ ! -f "$WORK/study_counts.json" ] || log "study runs: $(cat "$WORK/study_counts.json")"
status=0
if ! "$PY" scripts/gpu_check.py check-out --out "$OUT"; then status=1; fi
if awk -F'\t' '$2 != "passed" {bad = 1} END {exit !bad}' "$PARTS_TSV"; then status=1; fi
if [ -f "$WORK/study_counts.json" ] && ! "$PY" -c "import json, sys; c = json.load(open(sys.argv[1])); sys.exit(0 if c['done'] and not (c['failed'] or c['running'] or c['other']) else 1)" "$WORK/study_counts.json"; then
    log "study: not every run finished (see study.log and study_runs.tar.gz)"
    status=1
fi
log "files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
log "$([ "$status" = 0 ] && echo "GPU CHECK PASSED" || echo "GPU CHECK FAILED (exit 1): see the parts above")"
exit "$status"
