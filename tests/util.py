"""Shared helpers for the engine tests: a hand-made encoder and synthetic task data.

The hand-made encoder has the attributes TaskModel needs from a Hugging Face encoder (a
`config` with hidden_size, and outputs with last_hidden_state / pooler_output), with an
embedding, a dense layer with bias and a LayerNorm, so every parameter kind is present.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors import safe_open
from torch import nn

import sam_peft.engine as engine
from sam_peft.data import TaskData
from sam_peft.engine import Trainer
from sam_peft.loader import build_config
from sam_peft.methods import build_method
from sam_peft.model import TaskModel
from sam_peft.params import eligible_names
from sam_peft.run import run, seed_everything
from sam_peft.rundir import RunDir
from sam_peft.tasks import get_task


def paper_splits_dir() -> Path:
    """The authors' split files (jiant layout): $SAM_PEFT_PAPER_SPLITS if set, else
    ../shared/data/paper_splits beside the repository. Tests that need them skip when absent."""
    env = os.environ.get("SAM_PEFT_PAPER_SPLITS")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data" / "paper_splits"


PAPER_SPLITS = paper_splits_dir()
SPLITS_MISSING = (f"the authors' splits are not at {PAPER_SPLITS}: set SAM_PEFT_PAPER_SPLITS to a folder that "
                  "holds them (`sam-peft data prepare --out DIR`)")


# ---------------------------------------------------------------- tiny configs (one place for every test's)

# The shortest run that trains, evaluates and writes everything: two steps, one evaluation.
SHORT = {"max_steps": 2, "eval_every": 2, "min_steps": 0, "max_seq_len": 32, "precision": "fp32"}


def tiny_run(task: str = "rte", method: str | dict = "bitfit", output_dir=None, train: dict | None = None,
             **keys) -> dict:
    """A run config tree: the offline `tiny` model on the built-in data, `task` and `method` (a
    name or a mapping), `train` as the whole train section (None: the defaults), `keys` on top."""
    tree = {"model": "tiny", "data_dir": "demo", "task": task,
            "method": {"name": method} if isinstance(method, str) else method}
    if output_dir is not None:
        tree["output_dir"] = str(output_dir)
    if train is not None:
        tree["train"] = train
    return {**tree, **keys}


def tiny_sweep(train: dict | None = None, **keys) -> dict:
    """The base of a sweep file on the offline `tiny` model and the built-in data: `train` as its
    train section, `keys` (threads, device, tasks, methods...) on top."""
    return {"model": "tiny", "data_dir": "demo", **({"train": train} if train is not None else {}), **keys}


def write_sweep(path: Path, output_dir: Path, base: dict, **keys) -> Path:
    """A sweep file: `base` (model, data, train keys...) with output_dir and `keys` on top."""
    tree = {**base, "output_dir": str(output_dir), **keys}
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def results_of(root: Path) -> dict[str, dict]:
    """Every run's result.json under a sweep's output folder, by run id."""
    return {p.parent.name: json.loads(p.read_text()) for p in root.glob("*/result.json")}


class HandEncoder(nn.Module):
    def __init__(self, vocab: int = 30, hidden: int = 8):
        super().__init__()
        self.config = SimpleNamespace(hidden_size=hidden, initializer_range=0.5, hidden_dropout_prob=0.0,
                                      type_vocab_size=1)
        self.embeddings = nn.Embedding(vocab, hidden)
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden)
        with torch.no_grad():  # non-trivial LayerNorm so its gradients are not degenerate
            self.LayerNorm.weight.uniform_(0.5, 1.5)
            self.LayerNorm.bias.uniform_(-0.5, 0.5)

    def forward(self, input_ids, attention_mask, **_):
        h = self.LayerNorm(torch.tanh(self.dense(self.embeddings(input_ids))))
        m = attention_mask.unsqueeze(-1).float()
        pooled = (h * m).sum(1) / m.sum(1)
        return SimpleNamespace(last_hidden_state=h, pooler_output=pooled)


def synthetic_data(task: str = "cb", n: int = 48, vocab: int = 30, seed: int = 0) -> TaskData:
    """Random token sequences whose label depends on the first token (learnable)."""
    spec = get_task(task)
    g = torch.Generator().manual_seed(seed)
    n_labels = len(spec.labels) if spec.labels else 1
    feats = {}
    for split, count in (("train", n), ("val", n // 2), ("test", n // 2)):
        rows = []
        for _ in range(count):
            length = int(torch.randint(3, 9, (1,), generator=g))
            ids = torch.randint(2, vocab, (length,), generator=g).tolist()
            label = ids[0] % n_labels
            rows.append({"input_ids": ids, "label": float(label) if spec.kind == "regression" else label})
        feats[split] = rows
    return TaskData(spec=spec, features=feats, pad_id=0)


def hand_config(method: dict, task: str = "cb", seed: int = 0, **train):
    # fp32 stated: these trainers are checked against computations made by hand in fp32, and `auto`
    # is bf16 autocast on a CPU with AVX512-BF16 or AMX.
    protocol = {"max_steps": 30, "eval_every": 10, "patience": 100, "min_steps": 0, "batch_size": 8,
                "eval_batch_size": 16, "lr": 1e-2, "warmup": 0.0, "precision": "fp32"}
    protocol.update(train)
    return build_config(tiny_run(task, method, "/nonexistent", protocol, seed=seed, data_dir="data"))


def hand_trainer(method: dict, task: str = "cb", seed: int = 0, log_eval=None, **train):
    """A Trainer on the hand-made encoder, with the method wrapped in, ready to fit()."""
    cfg = hand_config(method, task, seed, **train)
    seed_everything(seed)
    model = TaskModel(HandEncoder(), get_task(task))
    m = build_method(cfg.method)
    eligible = eligible_names(model, cfg.method["embeddings"], cfg.method["layernorm"])
    m.wrap(model)
    data = synthetic_data(task)
    return Trainer(cfg, model, m, data, "cpu", eligible, log_eval=log_eval, progress=False)


# ---------------------------------------------------------------- kill and resume (test_resume, the method contract)

CHECKPOINT = RunDir(".").checkpoint.name

PROTOCOL = {"max_steps": 40, "eval_every": 10, "patience": 100, "min_steps": 0, "max_seq_len": 64, "lr": 5e-3,
            "log_every": 5, "checkpoint_every": 10}

class Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so run() writes no 'failed' status."""


def cfg_for(tmp_path, method, **train):
    return build_config(tiny_run("cb", method, tmp_path, {**PROTOCOL, **train}, seed=3))


def outputs(run_dir):
    with safe_open(str(run_dir / "delta.safetensors"), framework="pt") as f:
        delta = {k: f.get_tensor(k) for k in f.keys()}
    result = json.loads((run_dir / "result.json").read_text())
    logs = {name: (run_dir / name).read_text() for name in ("metrics.jsonl", "train_log.jsonl")}
    return result, delta, logs


def check_resume(tmp_path, method, monkeypatch):
    """Kill a run after its checkpoint at step 20, rerun it: the result equals an uninterrupted run's."""
    ref = run(cfg_for(tmp_path / "ref", method), progress=False, log=lambda *a: None)
    ref_result, ref_delta, ref_logs = outputs(tmp_path / "ref" / ref["run_id"])

    cfg = cfg_for(tmp_path / "killed", method)
    real_step = engine.Trainer.train_step

    def dying_step(self, *args):
        if self.step == 26:  # after the checkpoint at step 20, before the one at 30
            raise Killed()
        return real_step(self, *args)

    monkeypatch.setattr(engine.Trainer, "train_step", dying_step)
    with pytest.raises(Killed):
        run(cfg, progress=False, log=lambda *a: None)
    run_dir = tmp_path / "killed" / ref["run_id"]
    assert json.loads((run_dir / "result.json").read_text())["status"] == "running"
    assert torch.load(run_dir / CHECKPOINT, weights_only=True)["step"] == 20

    monkeypatch.setattr(engine.Trainer, "train_step", real_step)
    said = []
    again = run(cfg, progress=False, log=said.append)
    assert any("resuming from step 20" in s for s in said)
    result, delta, logs = outputs(run_dir)
    assert again["resumed_from_step"] == 20
    assert result["metrics"] == ref_result["metrics"]
    assert result["best_step"] == ref_result["best_step"] and result["n_changed"] == ref_result["n_changed"]
    assert result["method_report"] == ref_result["method_report"]
    assert delta.keys() == ref_delta.keys() and all(torch.equal(delta[k], ref_delta[k]) for k in delta)
    assert logs == ref_logs  # no lost or duplicated log lines
    assert not (run_dir / CHECKPOINT).exists()  # removed once the run is done


# ---------------------------------------------------------------- fabricated results (the report tests)


def write_run(root: Path, method: str, task: str, seed: int, test: float, *, train: float = 90.0,
              label: str | None = None, status: str = "done", density: float | None = None,
              wall: float = 10.0, steps: int = 100, extra: dict | None = None) -> Path:
    """One run directory as run.run leaves it (only the fields the reports read)."""
    rid = f"{task}-{method}-s{seed}-" + hashlib.sha256(repr((label, density)).encode()).hexdigest()[:8]
    run_dir = root / rid
    run_dir.mkdir(parents=True)
    options = {"name": method, **({"density": density} if density is not None else {})}
    result = {"run_id": rid, "task": task, "method": method, "method_options": options, "seed": seed,
              "status": status, "wall_time_s": wall, "steps": steps, **(extra or {})}
    if status == "done":
        result["metrics"] = {"test": {"major": test}, "train": {"major": train}, "val": {"major": test}}
    (run_dir / "result.json").write_text(json.dumps(result))
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"task": task, "method": options, "seed": seed,
                                                         "label": label}))
    return run_dir


# ---------------------------------------------------------------- scripts/ and the schedule's trace


def load_script(name: str):
    """scripts/<name>.py as a module (scripts/ on sys.path too: a script may import a sibling)."""
    import importlib.util
    import sys

    scripts = Path(__file__).resolve().parents[1] / "scripts"
    if str(scripts) not in sys.path:
        sys.path.insert(0, str(scripts))
    spec = importlib.util.spec_from_file_location(name, scripts / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lr_trace(monkeypatch) -> list[float]:
    """The learning rate of every weight update of a fit (the PlanOptimizer's steps), as a list
    that fills while the fit runs."""
    import sam_peft.optim as optim

    seen = []
    orig = optim.PlanOptimizer.step

    def spy(self, lr):
        seen.append(lr)
        return orig(self, lr)

    monkeypatch.setattr(optim.PlanOptimizer, "step", spy)
    return seen
