"""Mid-run resume: a run killed after a checkpoint restarts from it and ends exactly like an
uninterrupted run (CPU)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from sam_peft.config import config_dict
from sam_peft.run import run
from util import CHECKPOINT, PROTOCOL, Killed, cfg_for, check_resume, outputs  # noqa: F401

# Resume for every registered method is in test_method_contract.py; these are variants with
# state that evolves in the main phase.
METHODS = [
    {"name": "diffprune", "density": 0.01, "burnin_steps": 4, "remask_every": 7},
    {"name": "mixout", "p": 0.5, "mode": "eval_reset"},
]


@pytest.mark.parametrize("method", METHODS, ids=lambda m: "-".join(map(str, m.values())))
def test_killed_run_resumes_to_the_same_result(tmp_path, method, monkeypatch):
    check_resume(tmp_path, method, monkeypatch)


def test_checkpoint_of_another_config_is_ignored(tmp_path, monkeypatch):
    method = {"name": "bitfit"}
    cfg = cfg_for(tmp_path, method)
    ref = run(cfg, progress=False, log=lambda *a: None)
    run_dir = tmp_path / ref["run_id"]
    torch.save({"format": "sam-peft-checkpoint/1", "config_hash": "other", "step": 10}, run_dir / CHECKPOINT)
    (run_dir / "result.json").write_text(json.dumps({"status": "running"}))
    said = []
    again = run(cfg, progress=False, log=said.append)
    assert any("another config" in s for s in said) and again["metrics"] == ref["metrics"]
    assert again["resumed_from_step"] is None


def test_damaged_checkpoint_starts_afresh(tmp_path):
    cfg = cfg_for(tmp_path, {"name": "bitfit"})
    ref = run(cfg, progress=False, log=lambda *a: None)
    run_dir = tmp_path / ref["run_id"]
    (run_dir / CHECKPOINT).write_bytes(b"\x00garbage")
    (run_dir / "result.json").write_text(json.dumps({"status": "running"}))
    said = []
    again = run(cfg, progress=False, log=said.append)
    assert any("unreadable checkpoint" in s for s in said) and again["metrics"] == ref["metrics"]


def test_sigkill_of_a_real_run_then_resume(tmp_path):
    """A real `sam-peft run` process killed with SIGKILL after a checkpoint, then rerun."""
    method = {"name": "sam", "density": 0.01, "burnin_steps": 3}
    train = {**PROTOCOL, "max_steps": 160, "eval_every": 20, "checkpoint_every": 20}
    ref = run(cfg_for(tmp_path / "ref", method, **train), progress=False, log=lambda *a: None)

    cfg = cfg_for(tmp_path / "killed", method, **train)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config_dict(cfg)))
    run_dir = tmp_path / "killed" / ref["run_id"]
    proc = subprocess.Popen([sys.executable, "-m", "sam_peft.cli", "run", str(path), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait for a checkpoint at step 40 or later
        ckpt = run_dir / CHECKPOINT
        if ckpt.exists():
            try:
                if torch.load(ckpt, weights_only=True)["step"] >= 40:
                    break
            except Exception:
                pass  # being replaced right now
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.skip("the run finished before it could be killed (machine too fast for this timing)")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((run_dir / "result.json").read_text())["status"] == "running"

    again = run(cfg, progress=False, log=lambda *a: None)
    assert not list(run_dir.glob(".*tmp*"))  # a save cut short by the kill leaves nothing behind
    assert again["resumed_from_step"] is not None and again["resumed_from_step"] >= 40
    assert again["metrics"] == ref["metrics"]
    for name in ("metrics.jsonl", "train_log.jsonl"):
        assert (run_dir / name).read_text() == (tmp_path / "ref" / ref["run_id"] / name).read_text()
