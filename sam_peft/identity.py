"""Run identity: which run a config is, as `<task>-<method>-s<seed>-<hash>`.

The hash covers what a run computes: the resolved config without the keys that only say where
results go or how they are shown, the results version, the data identified by the content of
its split files and a local model folder by its files, and the precision `auto` resolves to on
this CPU. It names the run directory, so a finished run is found again and never run twice.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from sam_peft import device as device_lib
from sam_peft.config import RunConfig, config_dict
from sam_peft.data import split_fingerprint
from sam_peft.io import folder_fingerprint


# Keys that change where results go or how they are shown, not what is computed.
PRESENTATION_KEYS = ("output_dir", "device", "threads", "label", "train.log_every", "train.tensorboard",
                     "train.checkpoint_every")


# Enters every run id. Bumped when what a config computes changes, so that results of older
# versions are never taken for results of this one (2: burn-in outside the training schedule,
# shuffled batches, the methods as their originals; 3: each seed its own data order, where
# seed k's order had been seed 0's without its first k epochs).
RESULTS_VERSION = 3

# Keys added since results version 3, each with the value at which a run computes what it
# computed before the key existed. At that value the key is left out of the run id, so a new
# option never renames finished runs (resuming a study across versions of the code). A method
# option is written `method.<option>` and counts for the methods that have it.
NEUTRAL_DEFAULTS: dict[str, Any] = {"train.schedule_epochs": None, "method.gate_head": False, "method.mix_head": False}


def config_hash(cfg: RunConfig, n: int = 8) -> str:
    """Stable id of what a run computes: the resolved config minus PRESENTATION_KEYS, and the
    results version, with the data (and a model given as a local folder) identified by content,
    not by the path's spelling: `data` and `/abs/path/to/data` holding the same files are the
    same run."""
    d = config_dict(cfg)
    d["results_version"] = RESULTS_VERSION
    for key in PRESENTATION_KEYS:
        node = d
        *parents, last = key.split(".")
        for part in parents:
            node = node.get(part, {})
        node.pop(last, None)
    for key, neutral in NEUTRAL_DEFAULTS.items():
        *parents, last = key.split(".")
        node = d
        for part in parents:
            node = node.get(part, {})
        if last in node and node[last] == neutral:
            del node[last]
    if cfg.train.precision == "auto" and _runs_on_cpu(cfg.device):
        # On a CPU with native bf16, `auto` computes what `bf16` does: it gets bf16's id, so that
        # a results folder never mixes them with the fp32 runs `auto` makes on other CPUs (whose
        # ids stay as they were before `auto` chose bf16 anywhere on a CPU).
        if device_lib.cpu_has_native_bf16():  # looked up now: tests stand in for the CPU's flags
            d["train"]["precision"] = "bf16"
    d["data_dir"] = split_fingerprint(cfg.data_dir, cfg.task)
    local_model = Path(cfg.model).expanduser()
    if cfg.model != "tiny" and local_model.is_dir():
        d["model"] = folder_fingerprint(local_model)
    blob = json.dumps(d, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def _runs_on_cpu(device: str) -> bool:
    """Whether a run with this `device` setting trains on the CPU of this machine."""
    if device == "auto":
        return not torch.cuda.is_available()
    return device == "cpu"


def run_id(cfg: RunConfig) -> str:
    return f"{cfg.task}-{cfg.method['name']}-s{cfg.seed}-{config_hash(cfg)}"
