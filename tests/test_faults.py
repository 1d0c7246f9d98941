"""Faults of the machine rather than of the input: a full disk while a run saves its checkpoint, its
delta, its result or a log line; temporary files left by killed processes; standard JSON after a
divergent run; the closing summary of two sweeps on one directory."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import sam_peft.delta
import sam_peft.io
from sam_peft import cli
from sam_peft.executors import Outcome
from sam_peft.io import append_jsonl, atomic_write_text
from sam_peft.sweep import run_sweep
from sam_peft.sweep_expand import load_sweep

import util
from util import results_of, tiny_sweep

TINY = tiny_sweep({"max_steps": 12, "eval_every": 4, "min_steps": 0, "patience": 100, "max_seq_len": 64,
                   "log_every": 2}, threads=1)
NO_SPACE = os.strerror(errno.ENOSPC)


pytestmark = pytest.mark.usefixtures("keep_torch_threads")


def write_sweep(path: Path, output_dir: Path, **keys) -> Path:
    return util.write_sweep(path, output_dir, TINY, **{"tasks": ["rte"], "seeds": 2, "methods": ["bitfit"], **keys})


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*tmp*")]


def no_space() -> OSError:
    return OSError(errno.ENOSPC, NO_SPACE)


class FullDisk:
    """Makes the n-th write of one kind of file in one run directory fail for want of space, the way
    the code that writes it fails: torch.save with a RuntimeError whose context is the OSError,
    plain writes (text files, and the delta's bytes, which delta.save writes itself) with the
    OSError itself."""

    def __init__(self, monkeypatch, run_dir: Path, name: str, nth: int = 1, then_everything: bool = False):
        self.run_dir, self.name, self.nth = run_dir, name, nth
        self.then_everything = then_everything  # afterwards every write in run_dir fails too
        self.seen = 0
        self.fired = False
        real_save, real_open = torch.save, open

        def save(obj, f, *args, **kwargs):
            if self.hits(Path(getattr(f, "name", f))):
                f.write(b"\0" * 4096)  # a part gets written before the disk is full
                try:
                    raise no_space()
                except OSError:
                    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 598")
            return real_save(obj, f, *args, **kwargs)

        def open_(path, mode="r", *args, **kwargs):
            f = real_open(path, mode, *args, **kwargs)
            # text writes only: torch.save's binary file is save()'s to fail
            return FullFile(f) if "w" in mode and "b" not in mode and self.hits(Path(path)) else f

        def open_binary(path, mode="r", *args, **kwargs):  # delta.save's own write of the file's bytes
            f = real_open(path, mode, *args, **kwargs)
            return FullFile(f) if "w" in mode and self.hits(Path(path)) else f

        monkeypatch.setattr(torch, "save", save)
        monkeypatch.setattr(sam_peft.delta, "open", open_binary, raising=False)
        monkeypatch.setattr(sam_peft.io, "open", open_, raising=False)

    def hits(self, path: Path) -> bool:
        if path.parent != self.run_dir:
            return False
        if self.fired and self.then_everything:
            return True
        if not path.name.startswith(f".{self.name}.tmp"):
            return False
        self.seen += 1
        if self.seen == self.nth:
            self.fired = True
            return True
        return False


class FullFile:
    """A file whose disk fills up after the first few characters."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[:10])
        self.f.flush()
        raise no_space()

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("name, nth", [("checkpoint.pt", 2), ("delta.safetensors", 1), ("result.json", 2)])
def test_a_full_disk_fails_that_run_only_and_a_rerun_finishes_it(tmp_path, monkeypatch, capsys, name, nth):
    """ENOSPC while saving the second checkpoint, the delta, or the final result.json (its first
    write says "running", the second "done"): that run fails with a one-line reason, the sweep goes
    on, no temporary file keeps the space, and a rerun with space finishes it."""
    out = tmp_path / "out"
    sweep = write_sweep(tmp_path / "sweep.yaml", out)
    first, second = (r.run_id for r in load_sweep(sweep).runs)
    FullDisk(monkeypatch, out / first, name, nth)
    assert cli.main(["sweep", str(sweep), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    results = results_of(out)
    assert results[second]["status"] == "done"
    assert results[first]["status"] == "failed"
    assert results[first]["reason"] == f"WriteError: {out / first / name}: cannot write ({NO_SPACE})"
    assert f"FAILED {first}: WriteError: " in err
    assert not temporaries(out)
    assert not (out / first / "error.log").exists()  # the one line says it all
    for line in (out / first / "metrics.jsonl").read_text().splitlines():
        json.loads(line)
    monkeypatch.undo()

    assert cli.main(["sweep", str(sweep), "--no-progress", "--retry-failed"]) == 0
    results = results_of(out)
    assert {r["status"] for r in results.values()} == {"done"}
    if name == "checkpoint.pt":
        assert results[first]["resumed_from_step"] == 4  # from the checkpoint saved before the disk filled
        # and to the result of a run that never met a full disk (same data and seed as the second, but seed 0)
        reference = tmp_path / "ref"
        assert cli.main(["sweep", str(write_sweep(tmp_path / "ref.yaml", reference, seeds=[0])), "--no-progress"]) == 0
        assert results_of(reference)[first]["metrics"] == results[first]["metrics"]
    assert not temporaries(out)


def test_when_even_the_failure_cannot_be_recorded_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    sweep = write_sweep(tmp_path / "sweep.yaml", out)
    first, second = (r.run_id for r in load_sweep(sweep).runs)
    FullDisk(monkeypatch, out / first, "checkpoint.pt", 2, then_everything=True)
    assert cli.main(["sweep", str(sweep), "--no-progress"]) == 1  # a run failed, though its result says running
    captured = capsys.readouterr()
    err = captured.err + captured.out  # messages on stderr, the summary on stdout
    assert "Traceback" not in err
    assert f"{first}: could not record the failure (WriteError: {out / first / 'result.json'}: cannot write" in err
    assert f"failed {first}: WriteError: {out / first / 'checkpoint.pt'}: cannot write ({NO_SPACE})" in err
    assert results_of(out)[second]["status"] == "done"
    assert results_of(out)[first]["status"] == "running"  # interrupted: the next sweep resumes it
    assert not temporaries(out)
    monkeypatch.undo()
    assert cli.main(["sweep", str(sweep), "--no-progress"]) == 0
    assert results_of(out)[first]["status"] == "done" and results_of(out)[first]["resumed_from_step"] == 4


def test_a_log_line_that_does_not_fit_is_undone(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"step": 1, "loss": 0.5})
    real_write = os.write

    def write(fd, data):
        real_write(fd, bytes(data[:7]))
        raise no_space()

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(sam_peft.io.WriteError, match=f"{path}: cannot write \\({NO_SPACE}\\)"):
        append_jsonl(path, {"step": 2, "loss": 0.25})
    monkeypatch.undo()
    assert path.read_text() == '{"step": 1, "loss": 0.5}\n'


def _can_mount_tmpfs(where: Path) -> bool:
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or not shutil.which("mount"):
        return False
    where.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def test_a_real_full_disk(tmp_path, capsys):
    """A 1 MB tmpfs: the plan, configs and results fit, the full method's checkpoints do not. Every run
    fails alone, nothing half-written holds the space, and after the disk grows a rerun finishes."""
    disk = tmp_path / "disk"
    if not _can_mount_tmpfs(disk):
        pytest.skip("cannot mount a tmpfs here (needs root on Linux); the injected faults above cover it")
    try:
        out = disk / "out"
        short = {**TINY["train"], "max_steps": 4, "eval_every": 2}
        sweep = write_sweep(tmp_path / "sweep.yaml", out, methods=["full"], train=short)
        assert cli.main(["sweep", str(sweep), "--no-progress"]) == 1
        captured = capsys.readouterr()
        assert "Traceback" not in captured.out + captured.err
        results = results_of(out)
        assert len(results) == 2 and {r["status"] for r in results.values()} == {"failed"}
        for rid, r in results.items():
            assert r["reason"] == f"WriteError: {out / rid / 'checkpoint.pt'}: cannot write ({NO_SPACE})"
        assert not temporaries(out)
        assert sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) < 100_000
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        assert cli.main(["sweep", str(sweep), "--no-progress", "--retry-failed"]) == 0
        assert {r["status"] for r in results_of(out).values()} == {"done"}
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# ---------------------------------------------------------------- temporary files of killed processes


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_are_removed_by_the_next_writer_of_their_file(tmp_path, capsys):
    table = tmp_path / "t.md"
    stale = tmp_path / f".t.md.tmp{dead_pid()}"
    live = tmp_path / f".t.md.tmp{os.getppid()}"  # a process that runs: maybe writing it right now
    other = tmp_path / f".u.md.tmp{dead_pid()}"  # another file's: not this writer's business
    for path in (stale, live, other):
        path.write_text("half")
    atomic_write_text(table, "| a |\n")
    assert table.read_text() == "| a |\n"
    assert not stale.exists() and live.exists() and other.exists()


def test_a_finished_runs_stale_result_temporary_goes_with_the_next_command(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "task": "rte", "method": {"name": "bitfit"},
                                   "output_dir": str(tmp_path / "out")}))
    assert cli.main(["run", str(cfg), "--no-progress"]) == 0
    run_dir = next((tmp_path / "out").iterdir())
    stale = run_dir / f".result.json.tmp{dead_pid()}"  # a kill during the result's last write
    stale.write_text('{"status": "do')
    assert cli.main(["run", str(cfg), "--no-progress"]) == 0
    assert "already done" in capsys.readouterr().out
    assert not stale.exists()


# ---------------------------------------------------------------- standard JSON


def test_non_finite_numbers_are_written_as_null_and_read_back(tmp_path, capsys):
    run_dir = tmp_path / "runs" / "cb-full-s0-x"
    run_dir.mkdir(parents=True)
    (run_dir / "result.json").write_text(json.dumps({"run_id": "cb-full-s0-x", "task": "cb", "method": "full",
                                                     "status": "failed"}))
    for step, loss in ((2, 0.7), (4, float("nan")), (6, float("inf"))):
        append_jsonl(run_dir / "train_log.jsonl", {"step": step, "loss": loss, "lr": torch.tensor(1e-4)})
    append_jsonl(run_dir / "metrics.jsonl", {"step": 4, "train_loss": float("nan"), "val": {"major": 50.0}})

    def strict(name):  # the standard: no NaN or Infinity tokens
        return [json.loads(line, parse_constant=lambda token: pytest.fail(f"{name}: {token}"))
                for line in (run_dir / name).read_text().splitlines()]

    assert [r["loss"] for r in strict("train_log.jsonl")] == [0.7, None, None]
    assert strict("metrics.jsonl")[0]["train_loss"] is None
    assert cli.main(["plot", "curve", str(run_dir), "-o", str(tmp_path / "curve.png")]) == 0
    assert "3 loss points" in capsys.readouterr().out


# ---------------------------------------------------------------- two sweeps on one directory


def test_the_summary_says_where_runs_another_process_held_stand_now(tmp_path):
    """A run is busy when this sweep reaches it; by the summary the other sweep may have finished it."""
    out = tmp_path / "out"
    sweep = load_sweep(write_sweep(tmp_path / "sweep.yaml", out, seeds=4))
    rids = [r.run_id for r in sweep.runs]
    other_sweep_did = {rids[0]: "done", rids[1]: "failed", rids[2]: "running"}

    def executor(runs, progress=True):
        for rid, status in other_sweep_did.items():  # what the other process did meanwhile
            (out / rid).mkdir(parents=True, exist_ok=True)
            (out / rid / "result.json").write_text(json.dumps({"run_id": rid, "status": status}))
        return [Outcome(r.run_id, "busy" if r.run_id in other_sweep_did else "done") for r in runs]

    lines = []
    assert run_sweep(sweep, progress=False, executor=executor, log=lines.append) == 1
    assert lines[-1] == (f"sweep {sweep.source}: 1 done now, 0 skipped (already done), 0 failed, 1 done by another "
                         "process, 1 failed in another process, 1 interrupted in another process (a rerun resumes "
                         "them)")


def test_an_output_dir_on_a_read_only_file_system(tmp_path, capsys):
    """Read-only binds root too (permission bits do not): one line before any work, nothing written."""
    disk = tmp_path / "disk"
    if not _can_mount_tmpfs(disk):
        pytest.skip("cannot mount a tmpfs here (needs root on Linux)")
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        cfg = tmp_path / "run.yaml"
        cfg.write_text(yaml.safe_dump({**TINY, "task": "rte", "method": {"name": "bitfit"},
                                       "output_dir": str(disk / "runs")}))
        assert cli.main(["run", str(cfg), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err == (f"sam-peft: error: output_dir '{disk / 'runs'}': {disk} is on a read-only file system, "
                       f"so {disk / 'runs'} cannot be created\n")
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
