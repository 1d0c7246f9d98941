"""One run: validate everything, build the model, train, evaluate, write the run directory.

Everything that can be wrong with the input (config, task, method, data files, labels, model)
is checked before the run directory is created, so bad input leaves nothing behind.

It writes `<output_dir>/<run_id>/` through rundir.RunDir (the files and the result record's
states are described there).
"""

from __future__ import annotations

import platform
import random
import time
from dataclasses import dataclass
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
from sam_peft.model import TaskModel, check_max_seq_len, load_backbone
from sam_peft.params import eligible_names
from sam_peft.rundir import RunDir, done_record, result_warnings
from sam_peft.tasks import TaskSpec, get_task
from sam_peft.telemetry import Curves, PeakMemory


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
    check_max_seq_len(encoder, cfg.model, cfg.train.max_seq_len)
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


def _frozen_fingerprint(model, names) -> str:
    return delta_lib.base_fingerprint({n: p for n, p in model.named_parameters() if n in names})


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
    selection = trainer.selection or {}
    run_warnings = result_warnings(selection, metrics, trivial)
    for w in run_warnings:
        log(f"{rd.path}: warning: {w}")

    tensors, counts = delta_lib.build(model, trainer.theta0, built.base_names)
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
    result = done_record(base, model, trainer.theta0, fit, metrics=metrics, trivial=trivial,
                         n_changed=counts["n_changed"], method_report=method.report(), selection=selection,
                         warnings=run_warnings, delta_bytes=delta_bytes,
                         wall_time_s=round(elapsed_before + time.time() - started, 3), final_eval_s=eval_final_s,
                         memory=memory.report())
    rd.write(result)
    rd.checkpoint.unlink(missing_ok=True)  # the run is done: nothing to resume
    return result


def rebuild_run(run_dir: str | Path, split: str = "test") -> tuple["Built", dict]:
    """A finished run's model rebuilt from base + method structure + delta, with `split` loaded:
    (the built run, its result.json or {})."""
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
    delta_lib.check_delta_belongs(delta_path, delta_lib.read_metadata(delta_path), cfg, result)
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
    return built, result


def evaluate_run(run_dir: str | Path, split: str = "test") -> tuple[dict, dict]:
    """Rebuild base + method structure + delta and evaluate: (metrics, result.json or {})."""
    built, result = rebuild_run(run_dir, split)
    trainer = Trainer(built.cfg, built.model, built.method, built.data, built.device, built.eligible, progress=False)
    return trainer.evaluate(split), result
