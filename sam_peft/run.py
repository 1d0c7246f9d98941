"""One run: validate everything, build the model, train, evaluate, write the run directory.

Everything that can be wrong with the input (config, task, method, data files, labels, model)
is checked before the run directory is created, so bad input leaves nothing behind.

It writes `<output_dir>/<run_id>/` through rundir.RunDir (the files and the result record's
states are described there).
"""

from __future__ import annotations

import json
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
from sam_peft import checkpoint as ckpt_lib
from sam_peft import delta as delta_lib
from sam_peft import metrics as metrics_lib
from sam_peft.checkpoint import CheckpointMismatch
from sam_peft.config import RunConfig, config_dict
from sam_peft.data import TaskData, check_text, drop_examples, encode, load_splits, resolve_data_dir, texts_of
from sam_peft.device import machine, resolve_device, resolved_precision
from sam_peft.engine import Trainer
from sam_peft.errors import UserError
from sam_peft.identity import config_hash
from sam_peft.io import append_jsonl, atomic_torch_save, unwritable_folder_reason
from sam_peft.methods import build_method
from sam_peft.methods.base import Method
from sam_peft.model import TaskModel, load_backbone
from sam_peft.params import GROUPS, eligible_names, head_names, param_group, param_kinds
from sam_peft.rundir import RunDir
from sam_peft.tasks import TaskSpec, get_task


# Encoders whose position table starts at padding_idx + 1 (RoBERTa's scheme, from fairseq): that
# many rows are never used for a token position.
PADDING_OFFSET_TYPES = ("roberta", "xlm-roberta", "camembert", "roberta-prelayernorm", "data2vec-text", "xmod",
                        "longformer")


def position_limit(encoder) -> tuple[int, int, int] | None:
    """(usable positions, rows in the position table, offset) of an encoder with absolute
    positions, from its config; None when it declares no position table."""
    config = getattr(encoder, "config", None)
    rows = getattr(config, "max_position_embeddings", None)
    if isinstance(rows, bool) or not isinstance(rows, int) or rows <= 0:
        return None
    table = getattr(getattr(encoder, "embeddings", None), "position_embeddings", None)
    if isinstance(table, torch.nn.Embedding):
        offset = table.padding_idx + 1 if table.padding_idx is not None else 0
    elif getattr(config, "model_type", None) in PADDING_OFFSET_TYPES:
        offset = (getattr(config, "pad_token_id", None) or 0) + 1
    else:
        offset = 0
    return rows - offset, rows, offset


def check_max_seq_len(cfg: RunConfig, encoder) -> None:
    """A train.max_seq_len beyond the encoder's position table would crash at the first long batch."""
    limit = position_limit(encoder)
    if limit is not None and cfg.train.max_seq_len > limit[0]:
        usable, rows, offset = limit
        table = f"{rows} position embeddings" + (f" less RoBERTa's offset of {offset}" if offset else "")
        raise UserError(f"train.max_seq_len {cfg.train.max_seq_len}: the encoder '{cfg.model}' takes at most "
                        f"{usable} tokens ({table}); set train.max_seq_len to {usable} or less")


def check_density(cfg: RunConfig, model, eligible: list[str]) -> None:
    """floor(density * m) entries train: none at all is a run that trains only its head."""
    from sam_peft.selection import zero_budget

    density = cfg.method.get("density")
    if density is None:
        return
    params = dict(model.named_parameters())
    message = zero_budget("method.density", density, sum(params[n].numel() for n in eligible), cfg.model)
    if message:
        raise UserError(message)


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
    n_train = len(examples["train"])
    examples["train"] = drop_examples(examples["train"], cfg.data.drop_fraction, cfg.data.drop_seed)
    if not examples["train"]:
        raise UserError(f"data.drop_fraction {cfg.data.drop_fraction}: no training examples left (it removes "
                        f"round({cfg.data.drop_fraction} x {n_train}) = {n_train} of the {n_train} of task "
                        f"'{spec.name}'); at most {n_train - 1} can be removed")
    encoder, tokenizer = load_backbone(cfg.model, texts, cfg.train.max_seq_len)
    check_max_seq_len(cfg, encoder)
    features = {s: encode(spec, examples[s], tokenizer, cfg.train.max_seq_len) for s in splits}
    # Before anything trains: the tokenizer must read the text (the split trained on, else the one evaluated).
    checked = "train" if "train" in features else splits[0]
    check_text(features[checked], tokenizer, cfg.model, f"{spec.name} {checked}")
    seed_everything(cfg.seed)
    model = TaskModel(encoder, spec, cfg.train.dropout, cfg.train.head_init)
    eligible = eligible_names(model, cfg.method.get("embeddings", True), cfg.method.get("layernorm", True))
    check_density(cfg, model, eligible)
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


def provenance(cfg: RunConfig, device: torch.device) -> dict:
    """What a result depends on beyond its config: the precision `train.precision` resolved to,
    the machine (device, CPU model, cores, threads) and the versions of the software."""
    return {
        "device": str(device),
        "precision": resolved_precision(cfg.train.precision, device),
        "machine": machine(device),
        "versions": {"sam_peft": sam_peft.__version__, "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__, "python": platform.python_version()},
    }


def run(cfg: RunConfig, progress: bool = True, force: bool = False, log=print) -> dict:
    """Train one configuration; returns result.json's content.

    A run directory holding a checkpoint of the same config (a run that was killed) resumes
    from it, and ends with the same result as an uninterrupted run. A run that fails after its
    start was recorded (at any point: training, the final evaluation, writing the delta or the
    result, e.g. on a full disk) has status "failed" with a one-line reason.
    """
    try:
        return _run(cfg, progress, force, log)
    except Exception as e:
        try:
            rd = RunDir.of(cfg)
        except Exception:  # noqa: BLE001 - no run id (e.g. no data): nothing was started
            rd = None
        if rd is not None:
            rd.fail_mine(e, log)
        raise


def _run(cfg: RunConfig, progress: bool, force: bool, log) -> dict:
    if cfg.threads:  # set by the executors: float results can depend on the number of threads
        torch.set_num_threads(cfg.threads)
    rd = RunDir.of(cfg)
    if not force:
        prev = rd.read_lenient()
        if prev.get("status") == "done":
            rd.remove_stale_result_temps()  # a kill during its last write left one
            log(f"{rd.path}: already done (use --force to run it again)")
            return prev

    unwritable = unwritable_folder_reason(cfg.output_dir)
    if unwritable:
        raise UserError(f"output_dir '{cfg.output_dir}': {unwritable}")
    started = time.time()
    built = build(cfg)  # all input errors surface here, before anything is written
    model, method, device = built.model, built.method, built.device
    frozen = built.base_names - set(built.eligible)
    frozen_before = _frozen_fingerprint(model, frozen)
    chash = config_hash(cfg)
    resume = None if force else ckpt_lib.load(rd.checkpoint, chash, log)
    base = rd.start(cfg, provenance(cfg, device))  # the folder, config.yaml and the "running" record
    if resume is None:
        rd.clear_for_a_fresh_start()
    else:
        log(f"{rd.path}: resuming from step {resume['step']}")
        rd.rewind_logs(resume["step"])

    curves = Curves(rd.tensorboard if cfg.train.tensorboard else None)

    def log_eval(rec):
        append_jsonl(rd.metrics, rec)
        curves.add({"val/major": rec["val"]["major"], "train/loss_eval_interval": rec["train_loss"]}, rec["step"])

    def log_train(rec):
        append_jsonl(rd.train_log, rec)
        curves.add({"train/loss": rec["loss"], "train/lr": rec["lr"]}, rec["step"])

    elapsed_before = float(resume.get("elapsed_s", 0.0)) if resume else 0.0  # time spent before a restart

    def save_checkpoint(state):
        elapsed = elapsed_before + time.time() - started
        atomic_torch_save(rd.checkpoint, {**state, "config_hash": chash, "elapsed_s": elapsed})

    trainer = Trainer(cfg, model, method, built.data, device, built.eligible, log_eval=log_eval,
                      log_train=log_train, checkpoint=save_checkpoint, progress=progress,
                      desc=f"{cfg.task}/{cfg.method['name']}/s{cfg.seed}")
    memory = PeakMemory(device)
    try:
        with memory:
            fit = trainer.fit(resume=resume)
    except CheckpointMismatch as e:
        curves.close()
        log(f"{rd.checkpoint}: {e}; starting the run afresh")
        rd.checkpoint.unlink(missing_ok=True)
        return _run(cfg, progress=progress, force=True, log=log)
    except Exception as e:
        rd.fail_mine(e, log, wall_time_s=round(time.time() - started, 3))
        raise
    finally:
        curves.close()

    if _frozen_fingerprint(model, frozen) != frozen_before:
        raise RuntimeError("a frozen pretrained tensor changed during training (bug)")
    t_eval = time.perf_counter()
    metrics = {"val": trainer.evaluate("val"), "test": trainer.evaluate("test"),
               "train": trainer.evaluate("train", cfg.train.train_eval_subset)}
    eval_final_s = time.perf_counter() - t_eval
    train_labels = built.data.labels("train")
    trivial = {split: metrics_lib.trivial(built.spec, train_labels,
                                          built.data.labels(split)[:cfg.train.train_eval_subset if split == "train"
                                                                   else None])
               for split in metrics}
    run_warnings = []
    selection = trainer.selection or {}
    if selection.get("n_chosen_without_positive_score"):
        run_warnings.append(f"{selection['n_chosen_without_positive_score']:,} of the k = {selection['k']:,} chosen "
                            f"entries had no positive score ({selection['n_positive_scores']:,} eligible entries "
                            "scored above 0): top-k filled them by position")
    if all(abs(metrics[split]["major"] - trivial[split]) < 1e-6 for split in ("val", "test")):
        run_warnings.append(f"val and test scored the trivial score ({trivial['test']:.2f} on test: a constant "
                            "prediction, the majority class or no correlation): the run learned nothing the "
                            "metric sees")
    for w in run_warnings:
        log(f"{rd.path}: warning: {w}")

    tensors, counts = delta_lib.build(model, trainer.theta0, built.base_names)
    plan = fit.plan
    params = dict(model.named_parameters())
    heads = set(head_names(model))
    # The head trains whole, or (DiffPruning's gate_head) at chosen entries of its tensors.
    n_head = (sum(params[n].numel() for n in heads) if plan.train_head
              else sum(int(i.numel()) for n, i in plan.sparse.items() if n in heads))
    n_dense_eligible = sum(params[n].numel() for n in plan.dense if n in trainer.theta0)
    n_added = sum(params[n].numel() for n in plan.dense if n not in trainer.theta0 and n not in heads)
    n_sparse = sum(int(i.numel()) for n, i in plan.sparse.items() if n not in heads)
    meta = {
        "base_model": cfg.model,
        "task": cfg.task,
        "method": cfg.method,
        "run_id": rd.run_id,
        "config": config_dict(cfg),
        "eligible": built.eligible,
        "base_fingerprint": delta_lib.base_fingerprint(trainer.theta0),
        "tokenizer_fingerprint": delta_lib.tokenizer_fingerprint(built.tokenizer),
        "sam_peft_version": sam_peft.__version__,
    }
    delta_bytes = delta_lib.save(rd.delta, tensors, meta)
    full_bytes = sum(p.numel() * 4 for p in model.parameters())

    result = {
        **base,
        "status": "done",
        "metrics": metrics,
        "trivial": trivial,  # each split's score of a constant prediction (metrics.trivial)
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
        "n_positive_scores": selection.get("n_positive_scores"),  # None: the method chose no top-k
        "n_chosen_without_positive_score": selection.get("n_chosen_without_positive_score"),
        "warnings": run_warnings,
        "mask_share": mask_share(model, plan, trainer.theta0),
        "optimizer_state_bytes": fit.optimizer_state_bytes,
        "delta_bytes": delta_bytes,
        "full_fp32_bytes": full_bytes,
        **memory.report(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    rd.write(result)
    rd.checkpoint.unlink(missing_ok=True)  # the run is done: nothing to resume
    return result


def evaluate_run(run_dir: str | Path, split: str = "test") -> tuple[dict, dict]:
    """Rebuild base + method structure + delta and evaluate: (metrics, result.json or {})."""
    from sam_peft.loader import load_config

    rd = RunDir(run_dir)
    if not rd.path.is_dir():
        raise UserError(f"{rd.path}: no such run directory")
    if not rd.config.is_file():
        runs = sorted(p.parent for p in rd.path.rglob("result.json"))
        if runs:
            raise UserError(f"{rd.path}: this is a results folder ({len(runs)} runs); name one run, e.g. "
                            f"sam-peft eval {runs[0]}")
    cfg = load_config(rd.config)
    record = rd.read()  # strict: a result.json that does not parse is an error naming it
    result = record if isinstance(record, dict) else {}
    delta_path = rd.delta
    check_delta_belongs(delta_path, delta_lib.read_metadata(delta_path), cfg, result)
    if cfg.train.precision == "auto" and result.get("precision") in ("fp32", "bf16"):
        # Evaluate in the precision the run trained in, which `auto` may not resolve to here.
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"precision": result["precision"]})})
    built = build(cfg, splits=(split,))
    theta0 = {n: p.detach().clone() for n, p in built.model.named_parameters() if n in set(built.eligible)}
    delta_lib.apply(built.model, delta_path, tokenizer=built.tokenizer)
    # The rebuilt model holds plain weights; a method whose final evaluations see other weights
    # (Mixout's eval_reset) sets that up from the pretrained values and the run's seed.
    params = dict(built.model.named_parameters())
    built.method.attach_for_eval(built.model, {n: params[n] for n in built.eligible}, theta0, cfg.seed, built.device)
    trainer = Trainer(cfg, built.model, built.method, built.data, built.device, built.eligible, progress=False)
    metrics = trainer.evaluate(split)
    return metrics, result


def _flat(tree: dict, prefix: str = "") -> dict:
    """Nested keys as dotted ones: {"train": {"lr": x}} -> {"train.lr": x}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_delta_belongs(delta_path: Path, meta: dict, cfg: RunConfig, result: dict) -> None:
    """The delta must be this run folder's own: another run's delta of the same base (another
    seed, method or density, copied in) would load and evaluate without a word.

    Its metadata records the run id and the resolved config: the config must agree with the
    folder's config.yaml on every key both have that changes what a run computes (a key only one has
    comes from another sam-peft version; data_dir is compared through the run id), and the run id
    with the folder's result.json."""
    from sam_peft.identity import PRESENTATION_KEYS

    theirs_id = meta.get("run_id")
    try:
        theirs = json.loads(meta.get("config", "null"))
    except ValueError:
        theirs = None
    if isinstance(theirs, dict):
        mine, other = _flat(config_dict(cfg)), _flat(theirs)
        for key in [k for k in mine if k in other and k not in PRESENTATION_KEYS and k != "data_dir"]:
            if mine[key] != other[key]:
                raise UserError(f"{delta_path}: the delta of another run ({theirs_id}): its {key} is "
                                f"{json.dumps(other[key])}, this folder's config.yaml has {json.dumps(mine[key])}")
    ours_id = result.get("run_id") if isinstance(result, dict) else None
    if theirs_id and ours_id and theirs_id != ours_id:
        raise UserError(f"{delta_path}: the delta of run {theirs_id}, but this folder holds run {ours_id} "
                        "(result.json)")
