"""A run directory, `<output_dir>/<run_id>/`: the one module that knows its files and its states.

  config.yaml        the resolved config (defaults filled in)
  metrics.jsonl      one line per evaluation: step, train loss, lr, val metrics
  train_log.jsonl    mean training loss every `train.log_every` steps (learning curves, Fig. 4)
  result.json        the result record (below)
  delta.safetensors  what changed (delta.py)
  checkpoint.pt      the training state, while the run is unfinished (checkpoint.py)
  error.log          the traceback of a run that failed for another reason than its input
  tb/                tensorboard curves (train.tensorboard)

The result record: `base_record(cfg)` says which run it is; then status "running" (with the
process's pid and host), and at the end "done" (with what the run measured) or "failed" (with a
one-line reason). Records are written whole (atomically). Reading is strict where a broken file
must stop the caller (planning a sweep, building a report: UserError naming the file) and
lenient where the caller holds the run's lock and will rewrite it anyway.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from sam_peft.errors import UserError
from sam_peft.io import (atomic_write_json, atomic_write_text, atomic_write_yaml, make_folder, read_json,
                         remove_stale_temps, truncate_jsonl)

if TYPE_CHECKING:
    from sam_peft.config import RunConfig

STATUSES = ("running", "done", "failed")
OUR_KEYS = ("run_id", "task", "method", "status")  # every sam-peft result record has these


def one_line(e: BaseException) -> str:
    """'Type: first line of the message': the reason stored for a failed run."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def base_record(cfg) -> dict:
    """Which run a result record is about (the start of every record)."""
    from sam_peft.identity import config_hash, run_id

    return {"run_id": run_id(cfg), "task": cfg.task, "method": cfg.method["name"], "method_options": cfg.method,
            "seed": cfg.seed, "model": cfg.model, "config_hash": config_hash(cfg)}


def done_record(base: dict, model, theta0: dict, fit, *, metrics: dict, trivial: dict, n_changed: int,
                method_report, selection: dict, warnings: list[str], delta_bytes: int, wall_time_s: float,
                final_eval_s: float, memory: dict) -> dict:
    """The record of a finished run: `base` (which run, provenance, start) with what it measured.
    `fit` is the engine's FitResult, `theta0` the eligible pretrained tensors, `memory` the peak
    memory report (telemetry.PeakMemory)."""
    # Here, not at the top: the reports read run directories without loading torch.
    from sam_peft.params import head_names

    plan = fit.plan
    params = dict(model.named_parameters())
    heads = set(head_names(model))
    # The head trains whole, or (DiffPruning's gate_head) at chosen entries of its tensors.
    n_head = (sum(params[n].numel() for n in heads) if plan.train_head
              else sum(int(i.numel()) for n, i in plan.sparse.items() if n in heads))
    n_dense_eligible = sum(params[n].numel() for n in plan.dense if n in theta0)
    n_added = sum(params[n].numel() for n in plan.dense if n not in theta0 and n not in heads)
    n_sparse = sum(int(i.numel()) for n, i in plan.sparse.items() if n not in heads)
    return {
        **base,
        "status": "done",
        "metrics": metrics,
        "trivial": trivial,  # each split's score of a constant prediction (metrics.trivial)
        "n_params": sum(p.numel() for p in theta0.values()),
        "n_trainable": n_dense_eligible + n_sparse + n_added,
        "n_trainable_eligible": n_dense_eligible + n_sparse,
        "n_added": n_added,
        "n_head": n_head,
        "n_changed": n_changed,
        "steps": fit.steps,  # training steps (weight updates), burn-in training steps included
        "training_steps": fit.steps,
        "burnin_steps": fit.burnin_steps,  # training steps before the main phase
        "scoring_steps": fit.scoring_steps,  # gradient-accumulation batches without an update
        "best_step": fit.best_step,
        "n_evals": fit.n_evals,
        "stopped": fit.stopped,
        "resumed_from_step": fit.resumed_from,
        "wall_time_s": wall_time_s,
        "timings": {**{k: round(v, 3) for k, v in fit.timings.items()}, "final_eval_s": round(final_eval_s, 3)},
        "method_report": method_report,
        "n_positive_scores": selection.get("n_positive_scores"),  # None: the method chose no top-k
        "n_chosen_without_positive_score": selection.get("n_chosen_without_positive_score"),
        "warnings": warnings,
        "mask_share": mask_share(model, plan, theta0),
        "optimizer_state_bytes": fit.optimizer_state_bytes,
        "delta_bytes": delta_bytes,
        "full_fp32_bytes": sum(p.numel() * 4 for p in model.parameters()),
        **memory,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def result_warnings(selection: dict, metrics: dict, trivial: dict) -> list[str]:
    """What the "done" record warns about: chosen entries without a positive score, and a run
    that scored the trivial score on val and test."""
    warnings = []
    if selection.get("n_chosen_without_positive_score"):
        warnings.append(f"{selection['n_chosen_without_positive_score']:,} of the k = {selection['k']:,} chosen "
                        f"entries had no positive score ({selection['n_positive_scores']:,} eligible entries "
                        "scored above 0): top-k filled them by position")
    if all(abs(metrics[split]["major"] - trivial[split]) < 1e-6 for split in ("val", "test")):
        warnings.append(f"val and test scored the trivial score ({trivial['test']:.2f} on test: a constant "
                        "prediction, the majority class or no correlation): the run learned nothing the "
                        "metric sees")
    return warnings


def mask_share(model, plan, theta0: dict) -> dict:
    """Where the trained entries of the eligible parameters are, per parameter group
    (params.GROUPS): how many were chosen, of how many, and their share of all chosen ones."""
    from sam_peft.params import GROUPS, param_group, param_kinds

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


def is_result(record) -> bool:
    return isinstance(record, dict) and all(k in record for k in OUR_KEYS)


def counts_line(result: dict) -> str:
    """One line on a finished run: its metrics, counts, steps and time."""
    m = result["metrics"]
    added = result.get("n_added") or 0
    if added and not result["n_changed"]:
        # Adapters and LoRA train added weights: the pretrained encoder stays as it was, by design.
        changed = f"{added:,} added weights trained, encoder unchanged"
    else:
        changed = f"changed {result['n_changed']:,}" + (f" (+{added:,} added weights)" if added else "")
    return (f"{result['run_id']}: val {m['val']['major']:.2f}  test {m['test']['major']:.2f}  "
            f"train {m['train']['major']:.2f}  | trainable {result['n_trainable']:,} of {result['n_params']:,}"
            f" (+{result['n_head']:,} head), {changed}, steps {result['steps']}"
            f" (best {result['best_step']}), {result['wall_time_s']:.1f}s")


class RunDir:
    """The files of one run directory and its result record."""

    def __init__(self, path: str | Path, run_id: str | None = None):
        self.path = Path(path)
        self.run_id = run_id or self.path.name

    @classmethod
    def of(cls, cfg) -> "RunDir":
        from sam_peft.identity import run_id

        rid = run_id(cfg)
        return cls(Path(cfg.output_dir) / rid, rid)

    # -------------------------------------------------------------- the files
    result = property(lambda self: self.path / "result.json")
    config = property(lambda self: self.path / "config.yaml")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    train_log = property(lambda self: self.path / "train_log.jsonl")
    delta = property(lambda self: self.path / "delta.safetensors")
    checkpoint = property(lambda self: self.path / "checkpoint.pt")
    error_log = property(lambda self: self.path / "error.log")
    tensorboard = property(lambda self: self.path / "tb")

    # -------------------------------------------------------------- reading the record
    def read(self) -> dict | None:
        """The record, strictly: None if there is none; a file that does not parse is a UserError."""
        return read_json(self.result) if self.result.is_file() else None

    def read_lenient(self) -> dict:
        """The record, or {} when it is missing, unreadable or not a mapping."""
        try:
            record = json.loads(self.result.read_text())
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def status(self) -> str:
        """done / failed / running, or "pending" when there is no record.

        Records are written atomically, so a file that does not parse, or is not this run's, was
        not written by a sam-peft run: an error naming the file, not a run to redo silently.
        """
        record = self.read()
        if record is None:
            return "pending"
        if not isinstance(record, dict) or record.get("run_id") != self.run_id:
            raise UserError(f"{self.result}: not the result of run {self.run_id} (a foreign file?); "
                            "move it away and run the sweep again")
        status = record.get("status")
        if status not in STATUSES:
            raise UserError(f"{self.result}: unknown status {status!r} (expected one of {', '.join(STATUSES)})")
        return status

    def status_lenient(self) -> str:
        """As status(), but anything unreadable counts as "pending" (for a caller holding the
        run's lock: it will rewrite the record)."""
        try:
            return self.status()
        except UserError:
            return "pending"

    # -------------------------------------------------------------- writing the record
    def write(self, record: dict) -> None:
        atomic_write_json(self.result, record)

    def start(self, cfg, provenance: dict | None = None) -> dict:
        """Create the folder, write the config and the "running" record; returns the base record.
        `provenance` (precision, machine, versions) enters every record from here on, a failed
        run's included."""
        from sam_peft.config import config_dict

        make_folder(self.path)
        self.remove_temporaries()
        atomic_write_yaml(self.config, config_dict(cfg))
        base = {**base_record(cfg), **(provenance or {}),
                "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self.write({**base, "status": "running", "pid": os.getpid(), "host": platform.node()})
        return base

    def fail_mine(self, e: BaseException, log, **extra) -> None:
        """Mark the run this process started failed, with a one-line reason: only if its record
        says "running" with this process's pid (bad input found before the start leaves an
        earlier, interrupted attempt as it was). Best effort: when even this cannot be written
        (a full disk), the run stays "running" with a free lock, i.e. interrupted."""
        record = self.read_lenient()
        if record.get("status") != "running" or record.get("pid") != os.getpid():
            return
        try:
            self.write({**record, **extra, "status": "failed", "reason": one_line(e)})
        except Exception as failure:  # noqa: BLE001 - the run's own error is the one to report
            log(f"{self.result}: could not record the failure ({failure})")

    def fail(self, cfg, reason: str, trace: str | None = None) -> None:
        """Mark the run failed (an executor's view: whoever ran it), keeping what the run wrote;
        `trace` goes to error.log."""
        prev = self.read_lenient()
        prev = prev if prev.get("run_id") == self.run_id else {}
        make_folder(self.path)
        if trace:
            atomic_write_text(self.error_log, trace)
        self.write({**base_record(cfg), **prev, "status": "failed", "reason": reason})

    # -------------------------------------------------------------- the rest of the folder
    def remove_temporaries(self) -> None:
        """Temporary files a write cut short left (atomic writes: never the real file). Only for
        the run's owner: whoever executes a run holds its lock, so nobody else writes here."""
        for stale in self.path.glob(".*.tmp*"):
            stale.unlink(missing_ok=True)

    def remove_stale_result_temps(self) -> None:
        """The result record's temporaries whose writer no longer runs (any caller)."""
        remove_stale_temps(self.result)

    def clear_for_a_fresh_start(self) -> None:
        for path in (self.metrics, self.train_log, self.checkpoint):
            path.unlink(missing_ok=True)

    def rewind_logs(self, step: int) -> None:
        """Keep the log lines up to `step` (a run resuming from a checkpoint taken there)."""
        for path in (self.metrics, self.train_log):
            truncate_jsonl(path, step)


# ------------------------------------------------------------------------ a sweep's runs


@dataclass
class PlannedRun:
    """One run of a sweep: its resolved config, id and table row (sweep.py plans them, the
    executors run them, the reports read them back from sweep.json)."""
    cfg: "RunConfig"
    run_id: str
    label: str
    grid: dict = field(default_factory=dict)  # this run's grid values, by dotted key
    entry: int = 0  # index of its method entry in the sweep's `methods`
    row: str = ""  # its method entry's label without grid values

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.output_dir) / self.run_id

    def record(self) -> dict:
        """This run's line in sweep.json."""
        return {"run_id": self.run_id, "task": self.cfg.task, "method": self.cfg.method["name"],
                "label": self.label, "row": self.row or self.label, "seed": self.cfg.seed, "grid": self.grid}

    def status(self) -> str:
        """done / failed / running / pending, from result.json (a foreign or broken one: UserError)."""
        return RunDir(self.run_dir, self.run_id).status()
