"""Snapshots of trained weights and the training state a killed run resumes from.

- `snapshot` / `restore`: copies of everything the main phase can change (the plan's tensors,
  its chosen entries, own groups, the head, the method's state): early stopping keeps the best.
- `capture`: the whole training state of a Trainer at a step (its state_dict: weights, optimizer
  moments, data position, every random generator, the unlogged train losses; and the
  early-stopping counters), so that a resumed run ends with the result of an uninterrupted one. The method's
  selection is not stored: it is replayed (burn-ins are deterministic) and checked against the
  saved plan.
"""

from __future__ import annotations

import copy
import random

import numpy as np
import torch

from sam_peft.methods.base import TrainPlan
from sam_peft.params import head_names

FORMAT = "sam-peft-checkpoint/2"


class CheckpointMismatch(Exception):
    """A checkpoint that does not belong to this run (the caller then starts afresh)."""


# ------------------------------------------------------------------------ best-weight snapshots


def snapshot(model, params: dict, plan: TrainPlan, method) -> dict:
    dense = list(plan.dense) + (head_names(model) if plan.train_head else [])
    return {
        "dense": {n: params[n].detach().clone() for n in dense},
        "sparse": {n: params[n].detach().reshape(-1)[idx].clone() for n, idx in plan.sparse.items()},
        "groups": {n: params[n].detach().clone() for n in plan.group_names()},
        "method": copy.deepcopy(method.state_dict()),
    }


@torch.no_grad()
def restore(params: dict, plan: TrainPlan, snap: dict, method) -> None:
    for n, v in snap["dense"].items():
        params[n].copy_(v)
    for n, v in snap["sparse"].items():
        params[n].reshape(-1).index_copy_(0, plan.sparse[n].to(v.device), v)
    for n, v in snap.get("groups", {}).items():
        params[n].copy_(v)
    method.load_state_dict(snap["method"])


# ------------------------------------------------------------------------ random generators


def rng_state(device: torch.device) -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    s = state["numpy"]
    np.random.set_state((s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["gauss"]))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


# ------------------------------------------------------------------------ a trainer's state


def capture(trainer_state: dict, stopping) -> dict:
    """A checkpoint: the trainer's state (engine.Trainer.state_dict) and the early-stopping counters."""
    return {"format": FORMAT, **trainer_state, "early_stopping": stopping.state_dict()}


def plan_record(plan: TrainPlan) -> dict:
    return {"dense": list(plan.dense), "sparse": {n: i.cpu() for n, i in plan.sparse.items()},
            "train_head": plan.train_head, "groups": plan.group_names()}


def check_plan(saved: dict, plan: TrainPlan) -> None:
    """Raises CheckpointMismatch if the replayed selection is not the one a checkpoint saved."""
    now = plan_record(plan)
    same = (saved["dense"] == now["dense"] and saved["train_head"] == now["train_head"]
            and saved.get("groups", []) == now["groups"] and saved["sparse"].keys() == now["sparse"].keys()
            and all(torch.equal(saved["sparse"][n], now["sparse"][n]) for n in now["sparse"]))
    if not same:
        raise CheckpointMismatch("the replayed selection differs from the checkpoint's")


def load(path, config_hash: str, log) -> dict | None:
    """The checkpoint at `path` if it is one of this very config, else None (absent, unreadable,
    or another config's: the run then starts afresh, and says why)."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a foreign or damaged file: the run starts afresh
        log(f"{path}: unreadable checkpoint ({type(e).__name__}); starting the run afresh")
        return None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or ckpt.get("config_hash") != config_hash:
        log(f"{path}: checkpoint of another config; starting the run afresh")
        return None
    return ckpt
