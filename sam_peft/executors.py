"""Executors: how a sweep's pending runs get executed.

An executor is a function `executor(runs, progress=True) -> list[Outcome]`: it takes the
PlannedRuns still to do and returns one Outcome per run. Builders are registered by name
(`@register_executor("local")`, `sam-peft sweep --executor NAME`); make_executor calls one.
Three ways of running exist:

- sequential: each run in this process, one after another (the default on a CPU-only machine);
- processes:  N worker processes ("spawn") pulling runs from a queue, worker j pinned to GPU
              j % G when GPUs are visible (G GPUs x runs_per_gpu workers by default), or
              `--workers N` CPU workers with cpu_count // N threads each;
- ray:        one Ray task per run, asking for 1/runs_per_gpu of a GPU (or 1 CPU).

All three execute a run through execute_run(), in whatever process it lands in:
  1. take the run's lock (<output_dir>/.locks/<run_id>.lock); held by someone else -> "busy";
  2. under the lock, read result.json again: another sweep may have finished it meanwhile;
  3. run it (sam_peft.run.run, which resumes from a checkpoint of an interrupted run);
  4. any exception fails this run only: result.json gets status "failed" and a one-line reason,
     the traceback goes to <run_dir>/error.log, and the sweep goes on.
So the output directory ends up the same whichever executor ran the runs, and two sweeps on one
directory never execute the same run twice.
"""

from __future__ import annotations

import gc
import os
import queue
import signal
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

from sam_peft.config import RunConfig
from sam_peft.errors import UserError
from sam_peft.identity import run_id
from sam_peft.io import write_error
from sam_peft.locks import RUN_LOCK_WAIT_S, hold, lock_path
from sam_peft.rundir import PlannedRun, RunDir, one_line

@dataclass
class Outcome:
    run_id: str
    # done / failed: executed now; busy: another process holds its lock;
    # skipped: finished by another process since this sweep started (reason says how)
    status: str
    reason: str | None = None
    seconds: float = 0.0


# ---------------------------------------------------------------- one run, in any process


def is_out_of_memory(e: BaseException) -> bool:
    return type(e).__name__ == "OutOfMemoryError" or (isinstance(e, RuntimeError) and "out of memory" in str(e))


def record_failure(cfg: RunConfig, rid: str, reason: str, trace: str | None = None,
                   log: Callable[[str], Any] = print) -> None:
    """Mark a run failed in its result record, keeping what the run already wrote there.

    When even that cannot be written (a full disk), the sweep goes on: the run keeps its last
    status and the message says why it was not updated."""
    try:
        RunDir(Path(cfg.output_dir) / rid, rid).fail(cfg, reason, trace)
    except Exception as e:  # noqa: BLE001 - one run's bookkeeping must not stop the sweep
        log(f"{rid}: could not record the failure ({one_line(e)})")


def mark_failed_if_free(cfg: RunConfig, reason: str) -> None:
    """Record the failure of a run whose executing process died: only if nobody has taken the run
    up since (its lock is free) and it did not finish."""
    rid = run_id(cfg)
    with hold(lock_path(cfg.output_dir, rid), RUN_LOCK_WAIT_S) as mine:
        if mine and RunDir(Path(cfg.output_dir) / rid, rid).status_lenient() not in ("done", "failed"):
            record_failure(cfg, rid, reason, log=_say)


def _free_gpu_memory() -> None:
    """After a failed run, give its CUDA memory back before the next run in this process."""
    gc.collect()
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def execute_run(cfg: RunConfig, retry_failed: bool = False, run_fn: Callable | None = None,
                log: Callable[[str], Any] = print) -> Outcome:
    """Lock, re-check, run, record: one run of a sweep (see the module docstring)."""
    if run_fn is None:
        import sam_peft.run

        run_fn = sam_peft.run.run  # looked up now, so that tests can stand in for it
    rid = run_id(cfg)
    try:
        return _execute_locked(cfg, rid, retry_failed, run_fn, log)
    except OSError as e:  # e.g. its lock file could not be created: no space or no permission
        reason = one_line(write_error(e.filename or lock_path(cfg.output_dir, rid), e))
        log(f"FAILED {rid}: {reason}")
        return Outcome(rid, "failed", reason)


def _execute_locked(cfg: RunConfig, rid: str, retry_failed: bool, run_fn: Callable,
                    log: Callable[[str], Any]) -> Outcome:
    rd = RunDir(Path(cfg.output_dir) / rid, rid)
    with hold(lock_path(cfg.output_dir, rid), RUN_LOCK_WAIT_S) as mine:
        if not mine:
            return Outcome(rid, "busy", "running in another process")
        status = rd.status_lenient()
        if status == "done" or (status == "failed" and not retry_failed):
            return Outcome(rid, "skipped", f"{status} by another process meanwhile")
        # Under the lock nobody else writes here: a temporary file is what a kill left behind,
        # and an error.log belongs to an earlier failure.
        rd.remove_temporaries()
        rd.error_log.unlink(missing_ok=True)
        log(f"start {rid} (pid {os.getpid()}, device {cfg.device}, threads {cfg.threads or 'default'})")
        started = time.time()
        try:
            run_fn(cfg, progress=False, log=log)
        except Exception as e:  # one run's failure must not stop the sweep
            reason = one_line(e)
            # A UserError is input that only shows at run time (e.g. data a method cannot use):
            # its one line says it all. Anything else keeps its traceback, in a file.
            record_failure(cfg, rid, reason, None if isinstance(e, UserError) else traceback.format_exc(), log)
            hint = " (fewer runs_per_gpu or a smaller train.batch_size may fit)" if is_out_of_memory(e) else ""
            del e  # its traceback holds the run's tensors
            _free_gpu_memory()
            log(f"FAILED {rid}: {reason}{hint}")
            return Outcome(rid, "failed", reason, time.time() - started)
        seconds = time.time() - started
        log(f"done {rid} in {seconds:.1f}s")
        return Outcome(rid, "done", None, seconds)


# ---------------------------------------------------------------- sequential, in this process


def _bar(total: int, progress: bool):
    from tqdm import tqdm

    # Where stderr is no terminal (a log file, CI) the start/done lines say it all: no carriage returns.
    return tqdm(total=total, desc="sweep", unit="run", disable=not progress or not sys.stderr.isatty(),
                dynamic_ncols=True)


def _say(msg: str) -> None:
    from tqdm import tqdm

    tqdm.write(msg, file=sys.stderr)  # above the progress bar, not through it


def _postfix(outcomes: list[Outcome]) -> str:
    failed = sum(o.status == "failed" for o in outcomes)
    busy = sum(o.status == "busy" for o in outcomes)
    return f"failed={failed}" + (f" busy={busy}" if busy else "")


def execute_local(runs: list[PlannedRun], run_fn: Callable | None = None, progress: bool = True,
                  log: Callable[[str], Any] | None = None, retry_failed: bool = False) -> list[Outcome]:
    """Run each pending run in turn in this process; a failed run is recorded and the rest go on."""
    say = log or _say
    outcomes: list[Outcome] = []
    with _bar(len(runs), progress) as bar:
        for r in runs:
            bar.set_postfix_str(f"{r.run_id} {_postfix(outcomes)}", refresh=True)
            outcomes.append(execute_run(r.cfg, retry_failed, run_fn, say))
            bar.update(1)
    return outcomes


# ---------------------------------------------------------------- worker processes


def _exit_with_parent(parent_pid: int) -> None:
    """A worker must not outlive its sweep: an orphan would hold a run's lock and keep writing
    its directory while a rerun of the sweep wants it. After a kill -9 of the sweep the worker
    is re-parented, which this thread notices within half a second."""

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _worker_main(slot: int, parent_pid: int, device: str | None, threads: int, retry_failed: bool,
                 tasks, results) -> None:
    """A worker process: take runs from `tasks` until a None, report on `results`."""
    _exit_with_parent(parent_pid)
    # Ctrl-C reaches the whole process group: the parent alone handles it, and ends the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import sam_peft.run

    def log(msg: str) -> None:
        results.put(("log", slot, msg))

    while True:
        cfg = tasks.get()
        if cfg is None:
            return
        update = {"threads": cfg.threads or threads}
        if device is not None and cfg.device in ("auto", "cuda"):  # an explicit device is kept
            update["device"] = device
        cfg = cfg.model_copy(update=update)
        results.put(("took", slot, run_id(cfg)))
        outcome = execute_run(cfg, retry_failed, sam_peft.run.run, log)
        results.put(("outcome", slot, asdict(outcome)))


def execute_processes(runs: list[PlannedRun], progress: bool = True, workers: int = 2,
                      devices: list[str] | None = None, retry_failed: bool = False,
                      log: Callable[[str], Any] | None = None) -> list[Outcome]:
    """Run the runs in `workers` spawned processes; worker j uses devices[j % len(devices)].

    A worker that dies during a run (killed by the out-of-memory killer, a crash in native code)
    fails that run and is replaced; the parent shows one progress bar over all runs.
    """
    import multiprocessing as mp

    say = log or _say
    ctx = mp.get_context("spawn")  # CUDA cannot be used in forked children
    tasks, results = ctx.Queue(), ctx.Queue()
    for r in runs:
        tasks.put(r.cfg)
    workers = max(1, min(workers, len(runs)))
    for _ in range(workers):
        tasks.put(None)
    threads = max(1, (os.cpu_count() or 1) // workers)
    by_id = {r.run_id: r for r in runs}
    procs: dict[int, Any] = {}
    current: dict[int, str | None] = {}  # slot -> the run it is executing

    def start(slot: int) -> None:
        device = devices[slot % len(devices)] if devices else None
        procs[slot] = ctx.Process(target=_worker_main, name=f"sam-peft-worker-{slot}", daemon=True,
                                  args=(slot, os.getpid(), device, threads, retry_failed, tasks, results))
        procs[slot].start()
        current[slot] = None

    outcomes: dict[str, Outcome] = {}

    def handle(msg) -> None:
        kind, slot, payload = msg
        if kind == "log":
            say(payload)
        elif kind == "took":
            current[slot] = payload
        else:
            outcomes[payload["run_id"]] = Outcome(**payload)
            current[slot] = None
            bar.update(1)
            bar.set_postfix_str(_postfix(list(outcomes.values())), refresh=True)

    def check_workers() -> None:
        for slot, proc in list(procs.items()):
            if proc.is_alive() or proc.exitcode == 0:
                continue
            proc.join()
            while True:  # what it said before dying comes first
                try:
                    handle(results.get_nowait())
                except queue.Empty:
                    break
            rid = current.get(slot)
            if rid is None:
                raise RuntimeError(f"worker process {proc.pid} exited with code {proc.exitcode} outside a run; "
                                   "see the messages above")
            reason = f"WorkerDied: worker process {proc.pid} exited with code {proc.exitcode} during the run"
            mark_failed_if_free(by_id[rid].cfg, reason)
            say(f"FAILED {rid}: {reason}")
            handle(("outcome", slot, asdict(Outcome(rid, "failed", reason))))
            start(slot)  # its replacement takes the next run from the queue

    with _bar(len(runs), progress) as bar:
        try:
            for slot in range(workers):
                start(slot)
            next_check = time.time() + 1.0
            while len(outcomes) < len(runs):
                try:
                    handle(results.get(timeout=1.0))
                except queue.Empty:
                    pass
                if time.time() >= next_check:  # not only when all is quiet: busy workers talk a lot
                    check_workers()
                    next_check = time.time() + 1.0
        finally:
            tasks.cancel_join_thread()  # runs left in the queue (an interrupt) must not block the exit
            for proc in procs.values():
                proc.join(timeout=5 if len(outcomes) == len(runs) else 0)  # done: they are reading their None
                if proc.is_alive():
                    proc.terminate()
                    proc.join()
    return [outcomes[r.run_id] for r in runs]


# ---------------------------------------------------------------- Ray


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs ray: pip install -e '.[ray]'") from None
    return ray


def _ray_task(cfg: RunConfig, cwd: str, retry_failed: bool) -> tuple[dict, list[str]]:
    """One run inside a Ray worker: the same execute_run as everywhere; its messages travel back."""
    if os.path.isdir(cwd):
        os.chdir(cwd)  # relative output_dir and data_dir mean what they mean to the driver
    messages: list[str] = []
    outcome = execute_run(cfg, retry_failed, None, messages.append)
    return asdict(outcome), messages


def execute_ray(runs: list[PlannedRun], progress: bool = True, address: str | None = None,
                num_cpus: int | None = None, runs_per_gpu: int = 1, retry_failed: bool = False,
                log: Callable[[str], Any] | None = None) -> list[Outcome]:
    """One Ray task per run. Joins the cluster at `address` ("auto": the one running on this
    node), uses a Ray instance already initialised in this process, or starts a local one.

    The tasks write to the same paths as local runs: on a cluster, output_dir and data_dir must
    be on a file system that every node sees at the same path.
    """
    ray = import_ray()
    say = log or _say
    started_here = not ray.is_initialized()
    if started_here:
        try:
            if address:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False)
        except ConnectionError as e:
            raise UserError(f"--address {address}: cannot join a Ray cluster ({one_line(e)})") from None
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        resources = {"num_gpus": 1 / runs_per_gpu} if gpus else {"num_cpus": 1}
        # No automatic retries: a run that crashed its worker is recorded failed, like elsewhere.
        task = ray.remote(_ray_task).options(max_retries=0, **resources)
        cwd = os.getcwd()
        # One CPU per task: one thread, unless the run config says otherwise.
        refs = {task.remote(r.cfg.model_copy(update={"threads": r.cfg.threads or 1}), cwd, retry_failed): r
                for r in runs}
        say(f"ray: {len(refs)} tasks on {ray.cluster_resources().get('CPU', 0):g} CPUs, {gpus:g} GPUs"
            + (f" ({runs_per_gpu} runs per GPU)" if gpus else ""))
        outcomes: dict[str, Outcome] = {}
        waiting = list(refs)
        with _bar(len(runs), progress) as bar:
            while waiting:
                ready, waiting = ray.wait(waiting, num_returns=1)
                r = refs[ready[0]]
                try:
                    payload, messages = ray.get(ready[0])
                    for msg in messages:
                        say(msg)
                    outcomes[r.run_id] = Outcome(**payload)
                except Exception as e:  # the task itself died (worker crash, node lost)
                    reason = f"RayTaskError: {one_line(e)}"
                    mark_failed_if_free(r.cfg, reason)
                    say(f"FAILED {r.run_id}: {reason}")
                    outcomes[r.run_id] = Outcome(r.run_id, "failed", reason)
                bar.update(1)
                bar.set_postfix_str(_postfix(list(outcomes.values())), refresh=True)
    finally:
        if started_here:
            ray.shutdown()
    return [outcomes[r.run_id] for r in runs]


# ---------------------------------------------------------------- choosing one


def positive_int(value, where: str) -> int | None:
    """A command-line count (None stays None): a whole number of at least 1, else a UserError."""
    if value is None:
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or str(value).strip() != str(n):
        raise UserError(f"{where} '{value}': expected a whole number, at least 1")
    return n


# ---------------------------------------------------------------- the registry

# name -> builder(address, workers, runs_per_gpu, retry_failed) -> (executor, a line saying how it runs)
_BUILDERS: dict[str, Callable] = {}


def register_executor(name: str):
    """Register an executor builder under a name (`sam-peft sweep --executor NAME`)."""
    def deco(builder: Callable) -> Callable:
        _BUILDERS[name] = builder
        return builder
    return deco


def executor_names() -> list[str]:
    return list(_BUILDERS)


def check_kind(kind: str, address: str | None) -> None:
    if kind not in _BUILDERS:
        raise UserError(f"--executor '{kind}': expected one of {', '.join(_BUILDERS)}")
    if address and kind != "ray":
        raise UserError(f"--address {address}: only for --executor ray")


def make_executor(kind: str = "local", address: str | None = None, workers: int | None = None,
                  runs_per_gpu: int = 1, retry_failed: bool = False) -> tuple[Callable, str]:
    """(executor, a line saying how it will run) for the sweep command's options. Checks the
    options (and that the executor's libraries are installed) before anything is written."""
    check_kind(kind, address)
    return _BUILDERS[kind](address=address, workers=workers, runs_per_gpu=runs_per_gpu, retry_failed=retry_failed)


@register_executor("local")
def _local(address, workers, runs_per_gpu, retry_failed):
    """This machine: one worker process per GPU share, CPU worker processes, or this process."""
    import torch

    gpus = torch.cuda.device_count()
    if gpus:
        n = workers or gpus * runs_per_gpu
        devices = [f"cuda:{i}" for i in range(gpus)]
        return (partial(execute_processes, workers=n, devices=devices, retry_failed=retry_failed),
                f"local: {n} worker processes on {gpus} GPU(s), up to {-(-n // gpus)} runs per GPU")
    if workers:
        threads = max(1, (os.cpu_count() or 1) // workers)
        return (partial(execute_processes, workers=workers, devices=None, retry_failed=retry_failed),
                f"local: {workers} worker processes on the CPU, {threads} thread(s) each "
                f"where a run's config leaves threads unset")
    return partial(execute_local, retry_failed=retry_failed), "local: one run after another in this process (CPU)"


@register_executor("ray")
def _ray(address, workers, runs_per_gpu, retry_failed):
    """One Ray task per run, on a local instance or the cluster at `address`."""
    import_ray()
    where = f"the Ray cluster at {address}" if address else f"a local Ray instance ({workers or os.cpu_count()} CPUs)"
    return (partial(execute_ray, address=address, num_cpus=workers, runs_per_gpu=runs_per_gpu,
                    retry_failed=retry_failed), f"ray: one task per run on {where}")
