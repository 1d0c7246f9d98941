"""Mid-run resume: a run killed after a checkpoint restarts from it and ends exactly like an
uninterrupted run (CPU). The kill here is an exception raised inside the training step; real
processes killed with SIGKILL (a sweep, its workers, the runs in them) and resumed are
test_reliability.py's test_sigkill_at_several_points_then_resume."""

import json

import pytest
import torch

from sam_peft.run import run
from util import CHECKPOINT, cfg_for, check_resume

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
