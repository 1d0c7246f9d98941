"""`sam-peft` command line.

Bad input of any kind is a UserError: printed as one line, exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _cmd_run(args) -> int:
    from sam_peft.loader import load_config
    from sam_peft.run import run
    from sam_peft.rundir import counts_line

    cfg = load_config(args.config, args.overrides)
    result = run(cfg, progress=not args.no_progress, force=args.force)
    print(counts_line(result))
    print(f"  -> {os.path.join(cfg.output_dir, result['run_id'])}")
    return 0


def _cmd_eval(args) -> int:
    from sam_peft.run import evaluate_run

    metrics, result = evaluate_run(args.run_dir, args.split)
    print(json.dumps({args.split: metrics}, indent=2))
    saved = result.get("metrics", {}).get(args.split)
    if saved is not None:
        same = all(abs(saved.get(k, float("nan")) - v) < 1e-9 for k, v in metrics.items())
        print(f"result.json {args.split} metrics: {'identical' if same else 'DIFFERENT: ' + json.dumps(saved)}")
        return 0 if same else 1
    return 0


def _cmd_export(args) -> int:
    from sam_peft.export import merged, peft_shira

    if args.merged:
        out = merged(args.delta, args.merged, base=args.base)
        print(f"{out}: a Hugging Face checkpoint (base + delta); load it with its Auto class's from_pretrained")
    else:
        out = peft_shira(args.delta, args.peft, base=args.base)
        print(f"{out}: a PEFT SHiRA adapter; load it with PeftModel.from_pretrained(base_model, '{out}')")
    return 0


def _cmd_data_prepare(args) -> int:
    from sam_peft.prepare import prepare_data

    out = prepare_data(args.out, source=args.source, tasks=args.tasks, seed=args.seed,
                       base_url=args.base_url, force=args.force, progress=not args.no_progress)
    print(f"data ready in {out}")
    return 0


def _cmd_list(args) -> int:
    if args.what == "methods":
        from sam_peft.methods import list_methods, method_class

        for name in list_methods():
            doc = (method_class(name).__doc__ or sys.modules[method_class(name).__module__].__doc__ or "").strip()
            print(f"{name:12s} {doc.splitlines()[0] if doc else ''}")
    else:
        from sam_peft.tasks import TASKS

        for name, spec in TASKS.items():
            print(f"{name:6s} {spec.kind:16s} metric={spec.metric}")
    return 0


def _cmd_sweep(args) -> int:
    from sam_peft.executors import check_kind, make_executor, positive_int
    from sam_peft.sweep import describe, run_sweep
    from sam_peft.sweep_expand import load_sweep

    check_kind(args.executor, args.address)
    workers = positive_int(args.workers, "--workers")
    runs_per_gpu = positive_int(args.runs_per_gpu, "--runs-per-gpu")
    sweep = load_sweep(args.config, args.overrides)  # validates every run; writes nothing
    for notice in sweep.notices:
        print(f"sam-peft: note: {notice}", file=sys.stderr)
    if args.dry_run:
        print("\n".join(describe(sweep)))
        return 0
    executor, how = make_executor(args.executor, args.address, workers, runs_per_gpu or sweep.runs_per_gpu or 1,
                                  retry_failed=args.retry_failed)
    return run_sweep(sweep, progress=not args.no_progress, executor=executor, retry_failed=args.retry_failed,
                     how=how)


def _cmd_status(args) -> int:
    from sam_peft.report.status import render_status, sweep_status

    groups = sweep_status(args.results_dir)
    print(render_status(groups, args.results_dir, listing=args.list))
    return 0


def _write_or_print(text: str, out: str | None) -> None:
    from pathlib import Path

    from sam_peft.io import atomic_write_text, make_folder

    if out is None:
        sys.stdout.write(text)
        return
    make_folder(Path(out).parent)
    atomic_write_text(out, text)
    print(f"wrote {out}")


def _select(results, args):
    """--select-on SPLIT [--select-seeds SEEDS]: one grid point per row and task."""
    from sam_peft.report.select import parse_seeds, select_on

    seeds = parse_seeds(args.select_seeds) if args.select_seeds else None
    return select_on(results, args.select_on, seeds)


def _check_select_seeds(args) -> None:
    from sam_peft.errors import UserError

    if args.select_seeds and not args.select_on:
        raise UserError("--select-seeds chooses among grid points: give --select-on too")


def _cmd_table(args) -> int:
    from sam_peft.errors import UserError
    from sam_peft.report.results import load_results, warn
    from sam_peft.report.select import render_choices
    from sam_peft.report.table import RENDERERS, build_table

    _check_select_seeds(args)

    results = load_results(args.results_dir)
    if not results.runs and not results.planned:
        raise UserError(f"{args.results_dir}: no results (no result.json or sweep.json below it)")
    if results.failed():
        warn(f"{len(results.failed())} failed run(s) are not counted")
    notes = ""
    if args.select_on:
        results, choices = _select(results, args)
        notes = render_choices(choices, args.select_on)
        if args.format == "latex":
            notes = "".join(f"% {line}\n" for line in notes.strip().splitlines())
        elif args.format == "csv":
            if notes:
                print(notes.strip(), file=__import__("sys").stderr)
            notes = ""
    results.warn_mixed_provenance()
    table = build_table(results, split=args.split, ddof=args.ddof)
    _write_or_print(RENDERERS[args.format](table) + notes, args.output)
    return 0


def _cmd_plot(args) -> int:
    from sam_peft.report import plot

    plot.check_output(args.output)  # before any work
    if args.figure == "curve":
        drawn = plot.plot_curve(args.path, args.output)
        marks = f", re-projections at {drawn['projections']}" if drawn["projections"] else ""
        print(f"{drawn['run_dir']}: {drawn['points']} loss points{marks}")
    else:
        from sam_peft.report.results import load_results

        results = load_results(args.path)
        if args.figure == "sparsity":
            plot.plot_sparsity(results, args.output, method=args.method, ddof=args.ddof)
        else:
            st = plot.plot_stability(results, args.output, split=args.split, ddof=args.ddof,
                                     keep_trivial=args.keep_trivial)
            print("\n".join(st.lines()))
            if st.ties_dominate:
                from sam_peft.report.results import warn

                warn("most cells share a rank with another cell of their task (equal means or stds, e.g. runs "
                     "that all predict one class): Spearman's p-value overstates the evidence; Kendall's tau-b "
                     "accounts for the ties")
    print(f"wrote {args.output}")
    return 0


def _cmd_stats(args) -> int:
    from sam_peft.report.results import load_results, warn
    from sam_peft.report.stats import filled_by_position, read_contrasts, render_stats

    _check_select_seeds(args)
    contrasts = read_contrasts(args.contrasts) if args.contrasts else None
    results = load_results(args.results_dir)
    notes = ""
    if args.select_on:
        from sam_peft.report.select import render_choices

        results, choices = _select(results, args)
        notes = render_choices(choices, args.select_on)
    results.warn_mixed_provenance()
    for line in filled_by_position(results):
        warn(f"top-k filled by position: {line}")
    text = render_stats(results, method=args.method, split=args.split, contrasts=contrasts)
    _write_or_print(text + notes, args.output)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sam-peft", description="Sparse and parameter-efficient fine-tuning.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="train one configuration")
    r.add_argument("config", help="YAML run config")
    r.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. method.density=0.01")
    r.add_argument("--force", action="store_true", help="run again even if a finished result exists")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.set_defaults(func=_cmd_run)

    e = sub.add_parser("eval", help="rebuild a run's model from base + delta and evaluate it")
    e.add_argument("run_dir")
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.set_defaults(func=_cmd_eval)

    x = sub.add_parser("export", help="a Trainer delta as a merged HF checkpoint or a PEFT SHiRA adapter")
    x.add_argument("delta", help="a delta.safetensors, or the folder holding it")
    what = x.add_mutually_exclusive_group(required=True)
    what.add_argument("--merged", metavar="OUT", help="a new folder: config, weights, tokenizer")
    what.add_argument("--peft", metavar="OUT", help="a new folder: a PEFT SHiRA adapter (Linear-weight deltas)")
    x.add_argument("--base", help="the base model's path or hub name, where it is not the one the delta records")
    x.set_defaults(func=_cmd_export)

    d = sub.add_parser("data", help="task data")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dp = dsub.add_parser("prepare", help="download the 7 tasks in jiant's layout")
    dp.add_argument("--out", required=True, help="target folder (becomes data_dir)")
    dp.add_argument("--source", default="paper", choices=["paper", "hub"],
                    help="paper: the authors' exact splits (default); hub: GLUE/SuperGLUE with a seeded 90/10 split")
    dp.add_argument("--tasks", nargs="+", default=None, help="subset of tasks (default: all 7)")
    dp.add_argument("--seed", type=int, default=0, help="split seed for --source hub")
    dp.add_argument("--base-url", default=None, help="mirror of the authors' data/tasks/ folder (URL or path)")
    dp.add_argument("--force", action="store_true", help="download again even if files are present")
    dp.add_argument("--no-progress", action="store_true")
    dp.set_defaults(func=_cmd_data_prepare)

    sw = sub.add_parser("sweep", help="expand a sweep config into runs and run those not done yet")
    sw.add_argument("config", help="YAML sweep config (tasks, methods, seeds, grid + run config keys)")
    sw.add_argument("overrides", nargs="*",
                    help="key=value edits of the sweep config, e.g. seeds=2 tasks=[rte] train.max_steps=40 "
                         "methods.sam.burnin_steps=5 grid.method.density=[0.01]")
    sw.add_argument("--executor", default="local", metavar="local|ray",
                    help="local (default): worker processes, one per GPU x runs-per-gpu, or one run after another "
                         "on a CPU; ray: one Ray task per run")
    sw.add_argument("--address", default=None,
                    help="ray: the cluster to join ('auto': the one running here); default: start a local instance")
    sw.add_argument("--runs-per-gpu", default=None, metavar="K",
                    help="runs sharing one GPU at a time (default: the sweep's runs_per_gpu, else 1)")
    sw.add_argument("--workers", default=None, metavar="N",
                    help="local: N worker processes (on a CPU: each with cpu_count/N threads); "
                         "ray: CPUs of the local instance")
    sw.add_argument("--retry-failed", action="store_true", help="run the failed runs again too")
    sw.add_argument("--dry-run", action="store_true", help="list the runs and their number; run and write nothing")
    sw.add_argument("--no-progress", action="store_true", help="no progress bar")
    sw.set_defaults(func=_cmd_sweep)

    stt = sub.add_parser("status", help="per sweep: how many runs are done, failed, running, interrupted, missing")
    stt.add_argument("results_dir", help="a sweep's output_dir, or a folder above several")
    stt.add_argument("--list", default=None, choices=["failed", "missing", "running", "interrupted"],
                     help="also print the run ids in that state (failed: with the reason)")
    stt.set_defaults(func=_cmd_status)

    splits = ["test", "val", "train"]
    t = sub.add_parser("table", help="Table 1/2: mean±std over seeds per method and task, with ranks")
    t.add_argument("results_dir")
    t.add_argument("--format", default="md", choices=["md", "latex", "csv"])
    t.add_argument("--split", default="test", choices=splits, help="which split's major metric")
    t.add_argument("--ddof", type=int, default=1, choices=[0, 1], help="std: 1 = sample std (default), 0 = population")
    t.add_argument("--select-on", default=None, choices=splits,
                   help="per row and task, keep the grid point (e.g. SAM's burnin_steps) with the best mean "
                        "score on this split, and list the choices")
    t.add_argument("--select-seeds", default=None, metavar="SEEDS",
                   help="with --select-on: choose on these seeds' runs only, e.g. 0-4 (a study's tuning seeds); "
                        "the chosen grid point's other seeds are reported too")
    t.add_argument("-o", "--output", default=None, help="write to this file instead of stdout")
    t.set_defaults(func=_cmd_table)

    pl = sub.add_parser("plot", help="Fig. 3a (sparsity), Fig. 3b (stability) or Fig. 4 (curve)")
    pl.add_argument("figure", choices=["sparsity", "stability", "curve"])
    pl.add_argument("path", help="results directory (curve: a run directory, or a results dir holding one run)")
    pl.add_argument("-o", "--output", required=True, help="image file, .png or .pdf")
    pl.add_argument("--method", default="sam", help="sparsity: the method whose densities to plot")
    pl.add_argument("--split", default="test", choices=splits, help="stability: which split's major metric")
    pl.add_argument("--ddof", type=int, default=1, choices=[0, 1])
    pl.add_argument("--keep-trivial", action="store_true",
                    help="stability: keep the cells whose every run scored the trivial score (left out by default)")
    pl.set_defaults(func=_cmd_plot)

    st = sub.add_parser("stats", help="significance tests against one method, and the training-time table")
    st.add_argument("results_dir")
    st.add_argument("--method", default="sam", help="reference row: a label, a paper name or a method name")
    st.add_argument("--split", default="test", choices=splits)
    st.add_argument("--select-on", default=None, choices=splits,
                    help="as for table: one grid point per row and task, chosen on this split")
    st.add_argument("--select-seeds", default=None, metavar="SEEDS", help="as for table, e.g. 0-4")
    st.add_argument("--contrasts", default=None, metavar="FILE",
                    help="a YAML list of pre-registered comparisons, {a: ROW, b: ROW, tasks: [...]}: test exactly "
                         "these, Holm-adjusted over them (instead of --method against every row)")
    st.add_argument("-o", "--output", default=None, help="write to this file instead of stdout")
    st.set_defaults(func=_cmd_stats)

    ls = sub.add_parser("list", help="list methods or tasks")
    ls.add_argument("what", choices=["methods", "tasks"])
    ls.set_defaults(func=_cmd_list)
    return p


def main(argv=None) -> int:
    from sam_peft.errors import UserError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after flags (`run cfg.yaml --force seed=3`)
    if extra:
        if hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except UserError as e:
        print(f"sam-peft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sam-peft: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`sam-peft sweep x --dry-run | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
