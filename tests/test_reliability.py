"""Sweeps under stress: kill -9 and resume (real processes), two sweeps on one directory, worker
processes and GPU pinning, failure isolation (NaN, out of memory, data), the Ray executor against
the local one, `sam-peft status`, and bad input for all of it."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from filelock import FileLock

import sam_peft.run
from sam_peft import cli, executors
from sam_peft.identity import run_id
from sam_peft.loader import build_config
from sam_peft.sweep_expand import load_sweep

import util
from util import results_of

# Tiny runs that still checkpoint (every evaluation) and log often, so a kill can land anywhere.
TINY = util.tiny_sweep({"max_steps": 24, "eval_every": 4, "min_steps": 0, "patience": 100, "max_seq_len": 64,
                        "eval_batch_size": 64, "log_every": 2}, threads=1)
METHODS = ["bitfit", {"name": "sam", "density": 0.01, "burnin_steps": 2}]
NAN_METHOD = {"name": "full", "label": "Full lr=1e6", "train": {"lr": 1.0e6, "grad_clip": 0}}


pytestmark = pytest.mark.usefixtures("keep_torch_threads")


def write_sweep(path: Path, output_dir: Path, **keys) -> Path:
    return util.write_sweep(path, output_dir, TINY, **{"tasks": ["rte", "cb"], "seeds": 2, "methods": METHODS, **keys})


def check_files_whole(root: Path, finished: bool) -> None:
    """Every json and yaml file parses; every jsonl line too (but a last line cut short by a kill,
    unless the sweep has finished); no temporary file survives a finished sweep."""
    for path in root.rglob("*.json"):
        json.loads(path.read_text())
    for path in root.rglob("config.yaml"):
        assert isinstance(yaml.safe_load(path.read_text()), dict), path
    for path in root.rglob("*.jsonl"):
        text = path.read_text()
        lines = text.split("\n")
        for n, line in enumerate(lines, 1):
            if line and (finished or n < len(lines)):
                json.loads(line)
    if finished:
        assert not [p for p in root.rglob(".*tmp*")], "temporary files left behind"


# ---------------------------------------------------------------- kill -9 and resume


def launch(sweep: Path, log: Path, *args: str) -> subprocess.Popen:
    """`sam-peft sweep` in a process of its own, its messages (one "start <run_id>" per run) into `log`."""
    with open(log, "w") as f:  # the child has its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "sam_peft.cli", "sweep", str(sweep), "--no-progress", *args],
                                stdout=subprocess.DEVNULL, stderr=f)


def wait_until(proc: subprocess.Popen, condition, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, "the sweep ended before the kill point"
        assert time.time() < deadline, "kill point not reached in time"
        time.sleep(0.02)


def n_done(root: Path) -> int:
    return sum(r.get("status") == "done" for r in results_of(root).values())


def started_pids(log: Path) -> set[int]:
    return {int(m) for m in re.findall(r"^start \S+ \(pid (\d+)", log.read_text(), re.M)}


@pytest.mark.slow
def test_sigkill_at_several_points_then_resume(tmp_path):
    """kill -9 a real sweep process: in its first run, after k runs, and with two workers (one of
    them killed first) at a random moment; each rerun picks up where it stopped, and the end
    result equals an uninterrupted sweep's, run by run, with no run missing or duplicated and no
    broken file."""
    ref_dir, out = tmp_path / "ref", tmp_path / "out"
    assert cli.main(["sweep", str(write_sweep(tmp_path / "ref.yaml", ref_dir)), "--no-progress"]) == 0
    reference = results_of(ref_dir)
    assert len(reference) == 8
    sweep = write_sweep(tmp_path / "sweep.yaml", out)

    # 1. in the first run, once it has saved a checkpoint (its result.json says "running")
    proc = launch(sweep, tmp_path / "1.log")
    wait_until(proc, lambda: any(out.glob("*/checkpoint.pt")))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    check_files_whole(out, finished=False)
    interrupted = [rid for rid, r in results_of(out).items() if r["status"] == "running"]
    assert interrupted
    resumable = [rid for rid in interrupted if (out / rid / "checkpoint.pt").exists()]

    # 2. once three more runs are done; the interrupted run went on from its checkpoint
    proc = launch(sweep, tmp_path / "2.log")
    target = n_done(out) + 3
    wait_until(proc, lambda: n_done(out) >= target)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    check_files_whole(out, finished=False)
    for rid in resumable:
        assert re.search(rf"{rid}: resuming from step \d+", (tmp_path / "2.log").read_text())
        assert results_of(out)[rid]["resumed_from_step"] is not None  # finished from its checkpoint

    # 3. two worker processes: one is killed in its run (that run fails, a new worker takes over),
    #    then the sweep itself at a random moment, and no worker outlives it
    log = tmp_path / "3.log"
    proc = launch(sweep, log, "--workers", "2")
    wait_until(proc, lambda: len(started_pids(log)) == 2)
    os.kill(min(started_pids(log)), signal.SIGKILL)
    wait_until(proc, lambda: "WorkerDied" in log.read_text())
    time.sleep(random.Random(6).uniform(0.0, 0.6))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    died = re.search(r"^FAILED (\S+): (WorkerDied: worker process \d+ exited with code -9 during the run)$",
                     log.read_text(), re.M)
    assert died, log.read_text()
    assert (results_of(out)[died.group(1)]["status"], results_of(out)[died.group(1)]["reason"]) == \
           ("failed", died.group(2))
    workers = started_pids(log)
    deadline = time.time() + 10
    while any(_alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in workers), "a worker outlived its killed sweep"
    check_files_whole(out, finished=False)

    # the rerun finishes the rest, the run whose worker died included: every planned run exactly
    # once, each equal to the reference
    assert cli.main(["sweep", str(sweep), "--no-progress"]) == 1  # a failed run is not rerun by default
    assert cli.main(["sweep", str(sweep), "--no-progress", "--retry-failed"]) == 0
    planned = {r.run_id for r in load_sweep(sweep).runs}
    assert {p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")} == planned
    results = results_of(out)
    assert set(results) == set(reference) == planned
    for rid, result in results.items():
        assert result["status"] == "done"
        assert result["metrics"] == reference[rid]["metrics"], rid
        assert result["steps"] == reference[rid]["steps"]
    for name in ("metrics.jsonl", "train_log.jsonl"):  # no log line lost or written twice
        assert all((out / rid / name).read_text() == (ref_dir / rid / name).read_text() for rid in planned)
    check_files_whole(out, finished=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead but not yet reaped by its new parent
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


@pytest.mark.slow
def test_two_sweeps_on_one_directory_execute_each_run_once(tmp_path):
    out = tmp_path / "out"
    sweep = write_sweep(tmp_path / "sweep.yaml", out, tasks=["rte", "cb", "cola"])
    procs = [launch(sweep, tmp_path / f"{i}.log") for i in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    starts = [line.split()[1] for i in range(2) for line in (tmp_path / f"{i}.log").read_text().splitlines()
              if line.startswith("start ")]
    planned = {r.run_id for r in load_sweep(sweep).runs}
    assert sorted(starts) == sorted(planned)  # each run executed by exactly one of the two
    assert {r["status"] for r in results_of(out).values()} == {"done"} and set(results_of(out)) == planned
    check_files_whole(out, finished=True)


# ---------------------------------------------------------------- worker processes, packing


def test_workers_are_pinned_to_gpus_round_robin(tmp_path, monkeypatch):
    """Packing: G GPUs x runs_per_gpu workers, worker j on cuda:(j % G), each with its share of cores."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(os, "cpu_count", lambda: 12)
    executor, how = executors.make_executor("local", runs_per_gpu=3)
    assert executor.func is executors.execute_processes
    assert executor.keywords["workers"] == 6 and executor.keywords["devices"] == ["cuda:0", "cuda:1"]
    assert how == "local: 6 worker processes on 2 GPU(s), up to 3 runs per GPU"
    assert executors.make_executor("local", workers=4)[0].keywords["workers"] == 4

    # What a worker does with its device, without spawning one: run its loop here, with plain queues.
    import queue

    seen = []
    monkeypatch.setattr(sam_peft.run, "run", lambda cfg, **kw: seen.append((cfg.device, cfg.threads)))
    monkeypatch.setattr(executors, "_exit_with_parent", lambda pid: None)  # no watcher thread in pytest
    monkeypatch.setattr(executors.signal, "signal", lambda *args: None)  # and pytest keeps its Ctrl-C
    tasks, results = queue.Queue(), queue.Queue()
    base = util.tiny_run("rte", "sam", tmp_path)
    for seed, device in enumerate(("auto", "cuda", "cpu")):
        tasks.put(build_config({**base, "seed": seed, "device": device}))
    tasks.put(build_config({**base, "seed": 3, "threads": 5}))
    tasks.put(None)
    executors._worker_main(1, os.getpid(), "cuda:1", 2, False, tasks, results)
    # auto and cuda go to the worker's GPU; an explicit device stays; a run's own threads win
    assert seen == [("cuda:1", 2), ("cuda:1", 2), ("cpu", 2), ("cuda:1", 5)]
    kinds = [results.get()[0] for _ in range(results.qsize())]
    assert kinds.count("outcome") == 4 and kinds.count("took") == 4


def test_runs_per_gpu_from_the_sweep_file_and_bad_values(tmp_path, capsys):
    path = write_sweep(tmp_path / "sweep.yaml", tmp_path / "out", runs_per_gpu=4)
    assert load_sweep(path).runs_per_gpu == 4
    assert load_sweep(path, ["runs_per_gpu=2"]).runs_per_gpu == 2
    # runs_per_gpu is how runs are placed, not what they compute: the same run ids
    assert [r.run_id for r in load_sweep(path).runs] == [r.run_id for r in load_sweep(path, ["runs_per_gpu=1"]).runs]
    bad = write_sweep(tmp_path / "bad.yaml", tmp_path / "out", runs_per_gpu=0)
    line = next(i for i, x in enumerate(bad.read_text().splitlines(), 1) if x.startswith("runs_per_gpu"))
    assert cli.main(["sweep", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"sam-peft: error: {bad}:{line}: runs_per_gpu: expected a whole number, at least 1")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- failure isolation


def test_nan_loss_fails_its_run_only_and_the_reports_show_it(tmp_path, capsys):
    out = tmp_path / "out"
    sweep = write_sweep(tmp_path / "sweep.yaml", out, tasks=["rte"], seeds=1, methods=[NAN_METHOD, "bitfit"])
    assert cli.main(["sweep", str(sweep), "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    by_method = {r["method"]: r for r in results_of(out).values()}
    assert by_method["bitfit"]["status"] == "done"
    failed = by_method["full"]
    assert failed["status"] == "failed" and re.fullmatch(r"FloatingPointError: training loss is nan at step \d+",
                                                         failed["reason"])
    assert "FloatingPointError" in (out / failed["run_id"] / "error.log").read_text()

    assert cli.main(["table", str(out)]) == 0
    assert "| Full lr=1e6 | failed | n/a |" in capsys.readouterr().out
    assert cli.main(["table", str(out), "--format", "csv"]) == 0
    rows = {r.split(",")[0]: r.split(",") for r in capsys.readouterr().out.splitlines()}
    header = rows["method"]
    assert rows["Full lr=1e6"][header.index("RTE_failed")] == "1" and rows["BitFit"][header.index("RTE_failed")] == "0"
    assert cli.main(["status", str(out), "--list", "failed"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^total\s+2\s+1\s+1\s+0\s+0\s+0$", text, re.M), text
    assert f"  {failed['run_id']}  {failed['reason']}" in text


@pytest.mark.parametrize("error, reason", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail"),
     "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"),
    (RuntimeError("CUDA error: out of memory"), "RuntimeError: CUDA error: out of memory"),
])
def test_out_of_memory_fails_its_run_only(tmp_path, monkeypatch, capsys, error, reason):
    sweep = write_sweep(tmp_path / "sweep.yaml", tmp_path / "out", tasks=["rte"], seeds=2, methods=["bitfit"])
    first = load_sweep(sweep).runs[0].run_id
    real = sam_peft.run.run

    def run(cfg, **kw):
        if run_id(cfg) == first:
            raise error
        return real(cfg, **kw)

    monkeypatch.setattr(sam_peft.run, "run", run)
    assert cli.main(["sweep", str(sweep), "--no-progress"]) == 1
    results = results_of(tmp_path / "out")
    assert results[first]["status"] == "failed" and results[first]["reason"] == reason
    assert [r["status"] for rid, r in results.items() if rid != first] == ["done"]
    assert "smaller train.batch_size may fit" in capsys.readouterr().err


def test_data_error_at_run_time_fails_its_run_only(tmp_path, capsys):
    """Data that loads but leaves a run nothing to train on: that run fails with the one-line reason."""
    methods = ["bitfit", {"name": "bitfit", "label": "BitFit no data", "data": {"drop_fraction": 0.999}}]
    out = tmp_path / "out"
    sweep = write_sweep(tmp_path / "sweep.yaml", out, tasks=["cb"], seeds=1, methods=methods)
    assert cli.main(["sweep", str(sweep), "--no-progress"]) == 1
    status = sorted((r["status"], r.get("reason", "")) for r in results_of(out).values())
    assert status[0] == ("done", "")
    assert status[1][0] == "failed" and status[1][1].startswith("UserError: ")
    assert "no training examples left" in status[1][1]
    assert not list(out.glob("*/error.log"))  # bad input needs no traceback


# ---------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance with 2 CPUs for this module's Ray tests (starting one takes seconds)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_sweep_equals_the_local_one(tmp_path, ray_instance, capsys):
    """The same sweep on Ray and locally (same threads): the same result.json, run by run, a NaN
    failure included, in the same layout."""
    methods = ["bitfit", NAN_METHOD]
    local = write_sweep(tmp_path / "local.yaml", tmp_path / "local", tasks=["rte"], methods=methods)
    on_ray = write_sweep(tmp_path / "ray.yaml", tmp_path / "ray", tasks=["rte"], methods=methods)
    assert cli.main(["sweep", str(local), "--no-progress"]) == 1
    assert cli.main(["sweep", str(on_ray), "--no-progress", "--executor", "ray"]) == 1
    assert ray_instance.is_initialized()  # the sweep used this instance and left it running
    assert "ray: 4 tasks on 2 CPUs, 0 GPUs" in capsys.readouterr().err
    a, b = results_of(tmp_path / "local"), results_of(tmp_path / "ray")
    assert set(a) == set(b) and len(a) == 4
    for rid in a:
        assert (a[rid]["status"], a[rid].get("metrics"), a[rid].get("reason")) == \
               (b[rid]["status"], b[rid].get("metrics"), b[rid].get("reason")), rid
    assert sorted(r["status"] for r in b.values()) == ["done", "done", "failed", "failed"]
    layout = {p.relative_to(tmp_path / "local") for p in (tmp_path / "local").rglob("*")}
    assert layout == {p.relative_to(tmp_path / "ray") for p in (tmp_path / "ray").rglob("*")}


def test_ray_missing_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    sweep = write_sweep(tmp_path / "sweep.yaml", tmp_path / "out")
    assert cli.main(["sweep", str(sweep), "--executor", "ray"]) == 2
    assert capsys.readouterr().err.strip() == "sam-peft: error: --executor ray needs ray: pip install -e '.[ray]'"
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- status


def fake_result(root: Path, rid: str, status: str, **extra) -> None:
    (root / rid).mkdir(parents=True, exist_ok=True)
    (root / rid / "result.json").write_text(json.dumps({"run_id": rid, "task": "rte", "method": "bitfit",
                                                        "status": status, **extra}))


def test_status_counts_each_state(tmp_path, capsys):
    root = tmp_path / "results"
    runs = [{"run_id": f"rte-bitfit-s{i}-x", "task": "rte", "method": "bitfit", "label": "BitFit", "seed": i}
            for i in range(6)]
    (root / "a").mkdir(parents=True)
    (root / "a" / "sweep.json").write_text(json.dumps({"sweep": "a.yaml", "runs": runs}))
    fake_result(root / "a", "rte-bitfit-s0-x", "done", metrics={})
    fake_result(root / "a", "rte-bitfit-s1-x", "failed", reason="FloatingPointError: training loss is nan at step 4")
    fake_result(root / "a", "rte-bitfit-s2-x", "running")  # interrupted: its lock is free
    fake_result(root / "a", "rte-bitfit-s3-x", "running")  # running: its lock is held (here)
    (root / "a" / ".locks").mkdir()
    (root / "a" / ".locks" / "rte-bitfit-s2-x.lock").touch()
    fake_result(root / "b", "cb-sam-s0-y", "done")  # no sweep plans it
    with FileLock(root / "a" / ".locks" / "rte-bitfit-s3-x.lock"):
        assert cli.main(["status", str(root), "--list", "interrupted"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["sweep", "planned", "done", "failed", "running", "interrupted", "missing"]
    assert lines[1].split() == [str(root / "a"), "(a.yaml)", "6", "1", "1", "1", "1", "2"]
    assert lines[2].split() == ["other", "-", "1", "0", "0", "0", "-"]
    assert lines[3].split() == ["total", "6", "2", "1", "1", "1", "2"]
    assert lines[4:] == ["", f"interrupted in {root / 'a'}:", "  rte-bitfit-s2-x"]
    # the lock is free again: the same run now counts as interrupted
    assert cli.main(["status", str(root), "--list", "running"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"no running runs below {root}"


# ---------------------------------------------------------------- bad input


def _one_line_error(argv, capsys) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("flags, message", [
    (["--executor", "bogus"], "--executor 'bogus': expected one of local, ray"),
    (["--runs-per-gpu", "0"], "--runs-per-gpu '0': expected a whole number, at least 1"),
    (["--workers", "two"], "--workers 'two': expected a whole number, at least 1"),
    (["--address", "auto"], "--address auto: only for --executor ray"),
])
def test_bad_sweep_flags(tmp_path, capsys, flags, message):
    sweep = write_sweep(tmp_path / "sweep.yaml", tmp_path / "out")
    assert _one_line_error(["sweep", str(sweep), *flags], capsys) == f"sam-peft: error: {message}"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, message", [
    ('{"run_id": "x", "status": "do', "not valid JSON, truncated or corrupt"),
    ('{"accuracy": 0.9}', "not the result of run"),
])
def test_a_broken_result_in_the_sweep_directory_stops_it_before_anything_is_written(tmp_path, capsys, content,
                                                                                    message):
    sweep = write_sweep(tmp_path / "sweep.yaml", tmp_path / "out")
    rid = load_sweep(sweep).runs[1].run_id
    (tmp_path / "out" / rid).mkdir(parents=True)
    (tmp_path / "out" / rid / "result.json").write_text(content)
    for argv in (["sweep", str(sweep)], ["sweep", str(sweep), "--dry-run"]):
        err = _one_line_error(argv, capsys)
        assert f"{tmp_path / 'out' / rid / 'result.json'}: {message}" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [rid]  # no sweep.json, no lock


def test_status_of_broken_and_foreign_results(tmp_path, capsys):
    root = tmp_path / "r"
    fake_result(root, "rte-bitfit-s0-x", "done")
    (root / "foreign").mkdir()
    (root / "foreign" / "result.json").write_text('{"accuracy": 0.9}')
    assert cli.main(["status", str(root)]) == 0
    captured = capsys.readouterr()
    assert "foreign/result.json: not a sam-peft result" in captured.err
    assert captured.out.splitlines()[1].split() == ["other", "-", "1", "0", "0", "0", "-"]

    (root / "foreign" / "result.json").write_text('{"run_id": "rte-bitfit-s1-x", "sta')
    assert f"{root / 'foreign' / 'result.json'}: not valid JSON" in _one_line_error(["status", str(root)], capsys)
    (root / "foreign" / "result.json").unlink()
    (root / "sweep.json").write_text('{"runs": [{"run_id": ')
    assert f"{root / 'sweep.json'}: not valid JSON" in _one_line_error(["status", str(root)], capsys)
    fake_result(root, "rte-bitfit-s2-x", "paused")
    (root / "sweep.json").unlink()
    assert "unknown status 'paused'" in _one_line_error(["status", str(root)], capsys)
    assert "no such results directory" in _one_line_error(["status", str(tmp_path / "none")], capsys)


def test_a_jsonl_line_cut_short_by_a_kill_is_ignored_and_others_are_errors(tmp_path, capsys):
    run_dir = tmp_path / "runs" / "cb-full-s0-x"
    fake_result(tmp_path / "runs", "cb-full-s0-x", "running")
    lines = [json.dumps({"step": s, "loss": 1.0 / s, "lr": 1e-4}) for s in (2, 4, 6)]
    (run_dir / "train_log.jsonl").write_text("\n".join(lines) + '\n{"step": 8, "lo')  # an append cut short
    assert cli.main(["plot", "curve", str(run_dir), "-o", str(tmp_path / "curve.png")]) == 0
    assert "3 loss points" in capsys.readouterr().out
    (run_dir / "train_log.jsonl").write_text(lines[0] + '\n{"step": 4, "lo\n' + lines[2] + "\n")
    err = _one_line_error(["plot", "curve", str(run_dir), "-o", str(tmp_path / "curve.png")], capsys)
    assert f"{run_dir / 'train_log.jsonl'}:2: not valid JSON" in err
