"""Sweeps: run the runs of a sweep (sweep_expand.py expands the YAML file into them), locally or
on Ray, resumable after any crash.

Resuming: a run's result.json says "running" (written at its start), "done" or "failed" (with a
one-line "reason"). Running a sweep again skips the done runs and, unless --retry-failed, the
failed ones; a "running" run whose lock is free was interrupted (a kill, a crash, a lost node)
and runs again, from its last checkpoint. Whoever executes a run holds its lock
(<output_dir>/.locks/<run_id>.lock, see locks.py), so sweeps started side by side on one directory
share the work and never execute a run twice. A result.json that does not parse or is not its
run's is an error naming the file, before anything is written.

Execution: executors.py. An executor takes the list of pending runs and returns one Outcome per
run; `execute_local` runs them in this process, in order, and the process and Ray executors
spread them over workers. They all end in the same run directories with the same results.
"""

from __future__ import annotations

from typing import Callable

from sam_peft.errors import UserError
from sam_peft.io import atomic_write_json, make_folder
from sam_peft.locks import hold, lock_path
from sam_peft.rundir import PlannedRun, RunDir
# load_sweep: scripts (an older scripts/lr_study.py of a running study among them) import it from here.
from sam_peft.sweep_expand import ORDER, Sweep, load_sweep, show_value  # noqa: F401


def check_data(runs: list[PlannedRun]) -> None:
    """Read every (data_dir, task) the runs need once, so missing or malformed data stops the
    sweep before its first run instead of failing every run of that task."""
    from sam_peft.data import load_splits, resolve_data_dir

    for data_dir, task in dict.fromkeys((r.cfg.data_dir, r.cfg.task) for r in runs):
        load_splits(resolve_data_dir(data_dir), task)


def check_models(runs: list[PlannedRun]) -> None:
    """Check every distinct model of the runs once, before the first run: a model that is not a
    saved folder, not in the Hugging Face cache and not reachable on the hub would fail each of
    its runs in turn. One line naming every such model."""
    from sam_peft.model import check_model

    problems = []
    for model in dict.fromkeys(r.cfg.model for r in runs):
        try:
            check_model(model)
        except UserError as e:
            problems.append(str(e))
    if problems:
        raise UserError("; ".join(problems))


def write_plan(sweep: Sweep) -> None:
    """sweep.json, under a lock: a concurrent sweep may be writing it too, and a write cut short by
    a kill left a temporary file that only a writer holding the lock may remove."""
    path = sweep.output_dir / "sweep.json"
    lock = lock_path(sweep.output_dir, "sweep.json")
    with hold(lock, wait=60) as mine:
        if not mine:
            raise UserError(f"{lock}: held by another process for a minute; is a sweep stuck writing its plan?")
        for stale in sweep.output_dir.glob(".sweep.json.tmp*"):
            stale.unlink(missing_ok=True)
        atomic_write_json(path, sweep.plan())


def run_sweep(sweep: Sweep, progress: bool = True, executor: Callable | None = None, log=print,
              retry_failed: bool = False, how: str | None = None) -> int:
    """Resume a validated sweep: write sweep.json, run what is not done, print a summary.

    Done runs are skipped; failed runs too unless `retry_failed`; runs whose result.json says
    "running" were interrupted (or are running elsewhere, which their lock tells). Returns the
    exit status: 0 when every run is done, 1 when any run of the sweep is failed.
    """
    from sam_peft.executors import execute_local

    check_data(sweep.runs)
    check_models(sweep.runs)
    status = {r.run_id: r.status() for r in sweep.runs}  # every result.json checked before writing
    make_folder(sweep.output_dir)
    write_plan(sweep)
    not_again = ("done",) if retry_failed else ("done", "failed")
    pending = [r for r in sweep.runs if status[r.run_id] not in not_again]
    old_failed = [r for r in sweep.runs if status[r.run_id] == "failed" and not retry_failed]
    skipped = sum(s == "done" for s in status.values())
    log(f"sweep {sweep.source}: {len(sweep.runs)} runs ({ORDER}), {skipped} already done, "
        f"{len(pending)} to run -> {sweep.output_dir}")
    if pending and how:
        log(f"  {how}")
    executor = executor or execute_local
    outcomes = executor(pending, progress=progress) if pending else []
    count = {k: sum(o.status == k for o in outcomes) for k in ("done", "failed", "busy", "skipped")}
    summary = f"{count['done']} done now, {skipped} skipped (already done), {count['failed']} failed"
    if old_failed:
        summary += f", {len(old_failed)} failed earlier (not rerun; --retry-failed reruns them)"
    if count["busy"]:
        summary += "".join(f", {n} {state}" for state, n in _busy_now(sweep, outcomes).items())
    if count["skipped"]:
        summary += f", {count['skipped']} finished by another process meanwhile"
    log(f"sweep {sweep.source}: {summary}")
    for o in outcomes:
        if o.status == "failed":
            log(f"  failed {o.run_id}: {o.reason}")
    for r in old_failed:
        log(f"  failed earlier {r.run_id}")
    # The exit status covers the whole sweep: failures of this process (also one whose result.json
    # could not say so, the disk being full), earlier ones, and those of a concurrent sweep that ran
    # some of these runs.
    failed_now = any(o.status == "failed" for o in outcomes)
    return 1 if failed_now or any(RunDir(r.run_dir, r.run_id).status_lenient() == "failed" for r in sweep.runs) else 0


def _busy_now(sweep: Sweep, outcomes) -> dict[str, int]:
    """Where the runs that another process held when this one reached them stand now: it may
    have finished them since (the summary must not call a finished run running)."""
    from sam_peft.locks import is_held

    by_id = {r.run_id: r for r in sweep.runs}
    states: dict[str, int] = {}
    for o in outcomes:
        if o.status != "busy":
            continue
        r = by_id[o.run_id]
        status = RunDir(r.run_dir, r.run_id).status_lenient()
        if status == "done":
            state = "done by another process"
        elif status == "failed":
            state = "failed in another process"
        elif is_held(lock_path(sweep.output_dir, r.run_id)):
            state = "still running in another process"
        else:
            state = "interrupted in another process (a rerun resumes them)"
        states[state] = states.get(state, 0) + 1
    return states


def describe(sweep: Sweep) -> list[str]:
    """The --dry-run listing: one line per run, then the count."""
    lines = []
    width = len(str(len(sweep.runs)))
    status = {r.run_id: r.status() for r in sweep.runs}
    for n, r in enumerate(sweep.runs, 1):
        grid = [f"{k}={show_value(v)}" for k, v in r.grid.items()]
        lines.append("  ".join([f"{n:>{width}}", r.run_id, r.label, *grid, f"[{status[r.run_id]}]"]))
    done = sum(s == "done" for s in status.values())
    lines.append(f"{len(sweep.runs)} runs ({ORDER}): {done} done, {len(sweep.runs) - done} to run "
                 f"-> {sweep.output_dir}")
    return lines
