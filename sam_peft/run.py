"""One run: validate everything, build the model, train, evaluate, write the run directory.

Everything that can be wrong with the input (config, task, method, data files, labels, model)
is checked before the run directory is created, so bad input leaves nothing behind.

Run directory `<output_dir>/<run_id>/`:
  config.yaml        the resolved config (defaults filled in)
  metrics.jsonl      one line per evaluation: step, train loss, lr, val metrics
  train_log.jsonl    mean training loss every `train.log_every` steps (learning curves, Fig. 4)
  result.json        status, metrics (val/test/train), counts, steps, timings
  delta.safetensors  what changed (see delta.py)
"""

from __future__ import annotations

import os
import platform
import random
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

import sam_peft
from sam_peft import delta as delta_lib
from sam_peft.config import RunConfig, config_dict, config_hash, run_id
from sam_peft.data import Example, check_text, demo_data_dir, encode, load_splits
from sam_peft.engine import CHECKPOINT_FORMAT, CheckpointMismatch, TaskData, Trainer, eligible_names, head_names
from sam_peft.errors import UserError
from sam_peft.io import append_jsonl, atomic_torch_save, atomic_write_json, atomic_write_yaml, truncate_jsonl
from sam_peft.methods import build_method
from sam_peft.methods.base import Method
from sam_peft.model import TaskModel, load_backbone
from sam_peft.params import GROUPS, param_group, param_kinds
from sam_peft.tasks import TaskSpec, get_task


def resolve_data_dir(data_dir: str) -> Path:
    return demo_data_dir() if data_dir == "demo" else Path(data_dir).expanduser()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"device '{device}': not a device (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{device}': no CUDA device is available")
    return dev


def drop_examples(train: list[Example], fraction: float, seed: int) -> list[Example]:
    """Table 2's perturbation: remove a seeded random `fraction` of the train split."""
    if not fraction:
        return train
    n_drop = int(round(fraction * len(train)))
    rng = np.random.default_rng(seed)
    drop = set(rng.choice(len(train), size=n_drop, replace=False).tolist())
    return [ex for i, ex in enumerate(train) if i not in drop]


def texts_of(examples: list[Example], spec: TaskSpec) -> list[str]:
    """Every string in the inputs (for training the `tiny` model's tokenizer)."""
    out = []

    def walk(x):
        if isinstance(x, str):
            out.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)

    for ex in examples:
        walk(ex.inputs)
    if spec.prompts:
        out.extend(spec.prompts.values())
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Built:
    """Everything a run needs, built and checked before anything is written."""

    cfg: RunConfig
    spec: TaskSpec
    method: Method
    model: TaskModel
    data: TaskData
    tokenizer: object
    eligible: list[str]
    base_names: set[str]
    device: torch.device


def build(cfg: RunConfig, splits=("train", "val", "test")) -> Built:
    """Load data and model, wrap it with the method: the shared part of `run` and `eval`."""
    spec = get_task(cfg.task)
    method = build_method(cfg.method)
    device = resolve_device(cfg.device)
    data_dir = resolve_data_dir(cfg.data_dir)
    examples = load_splits(data_dir, spec, splits=tuple(dict.fromkeys(("train",) + tuple(splits))))
    # The tiny model's tokenizer sees the whole train split, before any perturbation, so that
    # every run on a task shares one "pretrained" base.
    texts = texts_of(examples["train"], spec) if cfg.model == "tiny" else None
    examples["train"] = drop_examples(examples["train"], cfg.data.drop_fraction, cfg.data.drop_seed)
    if not examples["train"]:
        raise UserError(f"{data_dir}: task '{spec.name}' has no training examples left")
    encoder, tokenizer = load_backbone(cfg.model, texts, cfg.train.max_seq_len)
    features = {s: encode(spec, examples[s], tokenizer, cfg.train.max_seq_len) for s in splits}
    # Before anything trains: the tokenizer must read the text (the split trained on, else the one evaluated).
    checked = "train" if "train" in features else splits[0]
    check_text(features[checked], tokenizer, cfg.model, f"{spec.name} {checked}")
    seed_everything(cfg.seed)
    model = TaskModel(encoder, spec, cfg.train.dropout, cfg.train.head_init)
    eligible = eligible_names(model, cfg.method.get("embeddings", True), cfg.method.get("layernorm", True))
    base_names = {n for n, _ in model.named_parameters() if n.startswith("encoder.")}
    method.wrap(model)
    model.to(device)
    data = TaskData(spec=spec, features=features, pad_id=tokenizer.pad_token_id)
    return Built(cfg, spec, method, model, data, tokenizer, eligible, base_names, device)


class Curves:
    """Optional tensorboard scalars (train loss, lr, val major) under <run_dir>/tb."""

    def __init__(self, logdir: Path | None):
        self.writer = None
        if logdir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(logdir))

    def add(self, scalars: dict, step: int) -> None:
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def mask_share(model, plan, theta0: dict) -> dict:
    """Where the trained entries of the eligible parameters are, per parameter group
    (params.GROUPS): how many were chosen, of how many, and their share of all chosen ones."""
    kinds = param_kinds(model)
    params = dict(model.named_parameters())
    chosen = {n: int(i.numel()) for n, i in plan.sparse.items()}
    chosen.update({n: params[n].numel() for n in plan.dense if n in theta0})
    groups = {g: {"chosen": 0, "total": 0} for g in GROUPS}
    for n, t0 in theta0.items():
        g = groups[param_group(n, kinds.get(n))]
        g["total"] += t0.numel()
        g["chosen"] += chosen.get(n, 0)
    k = sum(g["chosen"] for g in groups.values())
    for g in groups.values():
        g["share_of_chosen"] = round(g["chosen"] / k, 6) if k else 0.0
        g["density"] = round(g["chosen"] / g["total"], 6) if g["total"] else 0.0
    top = max(chosen.items(), key=lambda kv: kv[1], default=None)
    return {"groups": {n: g for n, g in groups.items() if g["total"]},
            "largest_tensor": {"name": top[0], "chosen": top[1], "share_of_chosen": round(top[1] / k, 6),
                               "density": round(top[1] / params[top[0]].numel(), 6)} if top and k else None}


def _frozen_fingerprint(model, names) -> str:
    return delta_lib.base_fingerprint({n: p for n, p in model.named_parameters() if n in names})


class PeakMemory:
    """Peak memory of one run: CUDA's max allocated bytes, or on a CPU the peak resident set of
    the process sampled every 20 ms while the run trains (per run, also inside a sweep process)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0
        self._stop = threading.Event()
        self._thread = None

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif os.path.exists("/proc/self/statm"):
            self.peak = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.peak = max(self.peak, self._rss())

    def report(self) -> dict:
        if self.device.type == "cuda":
            return {"peak_mem_bytes": int(torch.cuda.max_memory_allocated(self.device)),
                    "peak_mem_kind": "cuda_max_allocated"}
        if self._thread is not None:
            return {"peak_mem_bytes": int(self.peak), "peak_mem_kind": "process_rss_peak_during_run"}
        import resource

        return {"peak_mem_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
                "peak_mem_kind": "process_max_rss"}


CHECKPOINT = "checkpoint.pt"


def load_checkpoint(path: Path, chash: str, log) -> dict | None:
    """A checkpoint of this very config, or None (absent, unreadable, or another config's)."""
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a foreign or damaged file: the run starts afresh
        log(f"{path}: unreadable checkpoint ({type(e).__name__}); starting the run afresh")
        return None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or ckpt.get("config_hash") != chash:
        log(f"{path}: checkpoint of another config; starting the run afresh")
        return None
    return ckpt


def run(cfg: RunConfig, progress: bool = True, force: bool = False, log=print) -> dict:
    """Train one configuration; returns result.json's content.

    A run directory holding a checkpoint of the same config (a run that was killed) resumes
    from it, and ends with the same result as an uninterrupted run.
    """
    if cfg.threads:  # set by the executors: float results can depend on the number of threads
        torch.set_num_threads(cfg.threads)
    rid = run_id(cfg)
    run_dir = Path(cfg.output_dir) / rid
    result_path = run_dir / "result.json"
    if result_path.is_file() and not force:
        import json

        try:
            prev = json.loads(result_path.read_text())
        except (OSError, ValueError):
            prev = {}
        if prev.get("status") == "done":
            log(f"{run_dir}: already done (use --force to run it again)")
            return prev

    started = time.time()
    built = build(cfg)  # all input errors surface here, before anything is written
    model, method, device = built.model, built.method, built.device
    frozen = built.base_names - set(built.eligible)
    frozen_before = _frozen_fingerprint(model, frozen)
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.glob(".*.tmp*"):  # a write cut short by a kill (atomic writes: never the real file)
        stale.unlink(missing_ok=True)
    atomic_write_yaml(run_dir / "config.yaml", config_dict(cfg))
    chash = config_hash(cfg)
    ckpt_path = run_dir / CHECKPOINT
    resume = None if force else load_checkpoint(ckpt_path, chash, log)
    metrics_path = run_dir / "metrics.jsonl"
    train_log_path = run_dir / "train_log.jsonl"
    if resume is None:
        for path in (metrics_path, train_log_path, ckpt_path):
            path.unlink(missing_ok=True)
    else:
        log(f"{run_dir}: resuming from step {resume['step']}")
        for path in (metrics_path, train_log_path):
            truncate_jsonl(path, resume["step"])
    base = {
        "run_id": rid,
        "task": cfg.task,
        "method": cfg.method["name"],
        "method_options": cfg.method,
        "seed": cfg.seed,
        "model": cfg.model,
        "config_hash": config_hash(cfg),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_json(result_path, {**base, "status": "running", "pid": os.getpid(), "host": platform.node()})

    curves = Curves(run_dir / "tb" if cfg.train.tensorboard else None)

    def log_eval(rec):
        append_jsonl(metrics_path, rec)
        curves.add({"val/major": rec["val"]["major"], "train/loss_eval_interval": rec["train_loss"]}, rec["step"])

    def log_train(rec):
        append_jsonl(train_log_path, rec)
        curves.add({"train/loss": rec["loss"], "train/lr": rec["lr"]}, rec["step"])

    elapsed_before = float(resume.get("elapsed_s", 0.0)) if resume else 0.0  # time spent before a restart

    def save_checkpoint(state):
        elapsed = elapsed_before + time.time() - started
        atomic_torch_save(ckpt_path, {**state, "config_hash": chash, "elapsed_s": elapsed})

    trainer = Trainer(cfg, model, method, built.data, device, built.eligible, log_eval=log_eval,
                      log_train=log_train, checkpoint=save_checkpoint, progress=progress,
                      desc=f"{cfg.task}/{cfg.method['name']}/s{cfg.seed}")
    memory = PeakMemory(device)
    try:
        with memory:
            fit = trainer.fit(resume=resume)
    except CheckpointMismatch as e:
        curves.close()
        log(f"{ckpt_path}: {e}; starting the run afresh")
        ckpt_path.unlink(missing_ok=True)
        return run(cfg, progress=progress, force=True, log=log)
    except Exception as e:
        atomic_write_json(result_path, {**base, "status": "failed", "reason": f"{type(e).__name__}: {e}",
                                        "wall_time_s": round(time.time() - started, 3)})
        raise
    finally:
        curves.close()

    if _frozen_fingerprint(model, frozen) != frozen_before:
        raise RuntimeError("a frozen pretrained tensor changed during training (bug)")
    t_eval = time.perf_counter()
    metrics = {"val": trainer.evaluate("val"), "test": trainer.evaluate("test"),
               "train": trainer.evaluate("train", cfg.train.train_eval_subset)}
    eval_final_s = time.perf_counter() - t_eval

    tensors, counts = delta_lib.build(model, trainer.theta0, built.base_names)
    plan = fit.plan
    params = dict(model.named_parameters())
    heads = set(head_names(model))
    n_head = sum(params[n].numel() for n in heads) if plan.train_head else 0
    n_dense_eligible = sum(params[n].numel() for n in plan.dense if n in trainer.theta0)
    n_added = sum(params[n].numel() for n in plan.dense if n not in trainer.theta0 and n not in heads)
    n_sparse = sum(int(i.numel()) for i in plan.sparse.values())
    meta = {
        "base_model": cfg.model,
        "task": cfg.task,
        "method": cfg.method,
        "run_id": rid,
        "config": config_dict(cfg),
        "eligible": built.eligible,
        "base_fingerprint": delta_lib.base_fingerprint(trainer.theta0),
        "tokenizer_fingerprint": delta_lib.tokenizer_fingerprint(built.tokenizer),
        "sam_peft_version": sam_peft.__version__,
    }
    delta_bytes = delta_lib.save(run_dir / "delta.safetensors", tensors, meta)
    full_bytes = sum(p.numel() * 4 for p in model.parameters())

    result = {
        **base,
        "status": "done",
        "metrics": metrics,
        "n_params": sum(p.numel() for p in trainer.theta0.values()),
        "n_trainable": n_dense_eligible + n_sparse + n_added,
        "n_trainable_eligible": n_dense_eligible + n_sparse,
        "n_added": n_added,
        "n_head": n_head,
        "n_changed": counts["n_changed"],
        "steps": fit.steps,  # training steps (weight updates), burn-in training steps included
        "training_steps": fit.steps,
        "burnin_steps": fit.burnin_steps,  # training steps before the main phase
        "scoring_steps": fit.scoring_steps,  # gradient-accumulation batches without an update
        "best_step": fit.best_step,
        "n_evals": fit.n_evals,
        "stopped": fit.stopped,
        "resumed_from_step": fit.resumed_from,
        "wall_time_s": round(elapsed_before + time.time() - started, 3),
        "timings": {**{k: round(v, 3) for k, v in fit.timings.items()}, "final_eval_s": round(eval_final_s, 3)},
        "method_report": method.report(),
        "mask_share": mask_share(model, plan, trainer.theta0),
        "optimizer_state_bytes": fit.optimizer_state_bytes,
        "delta_bytes": delta_bytes,
        "full_fp32_bytes": full_bytes,
        **memory.report(),
        "device": str(device),
        "versions": {"sam_peft": sam_peft.__version__, "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__, "python": platform.python_version()},
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_json(result_path, result)
    ckpt_path.unlink(missing_ok=True)  # the run is done: nothing to resume
    return result


def evaluate_run(run_dir: str | Path, split: str = "test") -> tuple[dict, dict]:
    """Rebuild base + method structure + delta and evaluate: (metrics, result.json or {})."""
    import json

    from sam_peft.config import load_config

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    cfg = load_config(run_dir / "config.yaml")
    built = build(cfg, splits=(split,))
    theta0 = {n: p.detach().clone() for n, p in built.model.named_parameters() if n in set(built.eligible)}
    delta_lib.apply(built.model, run_dir / "delta.safetensors", tokenizer=built.tokenizer)
    # The rebuilt model holds plain weights; a method whose final evaluations see other weights
    # (Mixout's eval_reset) sets that up from the pretrained values and the run's seed.
    params = dict(built.model.named_parameters())
    built.method.attach_for_eval(built.model, {n: params[n] for n in built.eligible}, theta0, cfg.seed, built.device)
    trainer = Trainer(cfg, built.model, built.method, built.data, built.device, built.eligible, progress=False)
    metrics = trainer.evaluate(split)
    result = {}
    if (run_dir / "result.json").is_file():
        try:
            result = json.loads((run_dir / "result.json").read_text())
        except ValueError:
            raise UserError(f"{run_dir / 'result.json'}: not valid JSON") from None
    return metrics, result
