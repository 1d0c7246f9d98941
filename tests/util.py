"""Shared helpers for the engine tests: a hand-made encoder and synthetic task data.

The hand-made encoder has the attributes TaskModel needs from a Hugging Face encoder (a
`config` with hidden_size, and outputs with last_hidden_state / pooler_output), with an
embedding, a dense layer with bias and a LayerNorm, so every parameter kind is present.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml
from torch import nn

from sam_peft.config import build_config
from sam_peft.engine import TaskData, Trainer, eligible_names
from sam_peft.methods import build_method
from sam_peft.model import TaskModel
from sam_peft.run import seed_everything
from sam_peft.tasks import get_task


def paper_splits_dir() -> Path:
    """The authors' split files (jiant layout): $SAM_PEFT_PAPER_SPLITS if set, else
    ../shared/data/paper_splits beside the repository. Tests that need them skip when absent."""
    env = os.environ.get("SAM_PEFT_PAPER_SPLITS")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data" / "paper_splits"


PAPER_SPLITS = paper_splits_dir()
SPLITS_MISSING = (f"the authors' splits are not at {PAPER_SPLITS}: set SAM_PEFT_PAPER_SPLITS to a folder that "
                  "holds them (`sam-peft data prepare --out DIR`)")


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
    return build_config({"model": "tiny", "task": task, "method": method, "seed": seed,
                         "output_dir": "/nonexistent", "train": protocol})


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
