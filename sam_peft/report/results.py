"""Load a results directory: every run's result.json (and config.yaml), plus the sweeps' plans.

RESULTS_DIR is searched recursively for `result.json` files (one per run directory) and for
`sweep.json` files (written by `sam-peft sweep`).

- A sweep.json governs the run directories below its own folder: only the runs it lists count
  (other results there, e.g. from an earlier shrunken trial of the same sweep, are ignored with
  a warning), and its plan gives the rows, the columns and how many runs each cell should have.
- A result.json that is not valid JSON is an error (results are written atomically, so a broken
  one means something is wrong). Valid JSON that lacks the keys every sam-peft result has
  (run_id, task, method, status) is clearly not ours: it is skipped with a warning.
- A run's row label: its sweep.json label, else its config.yaml `label`, else the paper's name
  of its method. A cell is (label, task); its values are the runs with status "done".
- A jsonl log (metrics.jsonl, train_log.jsonl) may end in a line cut short by a kill: that last
  line is ignored. Any other line that is not a JSON object is an error naming file:line.
"""

from __future__ import annotations

import functools
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sam_peft.errors import UserError
from sam_peft.io import read_json
from sam_peft.report.names import method_display, paper_label_order, paper_task_order
from sam_peft.rundir import OUR_KEYS, RunDir, is_result


def warn(msg: str) -> None:
    print(f"sam-peft: warning: {msg}", file=sys.stderr)


@dataclass
class RunRecord:
    run_id: str
    dir: Path
    task: str
    method: str
    label: str
    seed: int | None
    status: str
    result: dict
    config: dict | None = None
    grid: dict = field(default_factory=dict)
    row: str = ""  # the sweep's method entry label without grid values (default: label)

    def metric(self, split: str = "test") -> float | None:
        """The major metric on a split (None unless the run is done)."""
        if self.status != "done":
            return None
        return self.result["metrics"][split]["major"]

    def trivial(self, split: str = "test") -> float | None:
        """The split's score of a constant prediction (metrics.trivial): from result.json, or, for
        runs made before it was recorded, computed from the data its config names when that is
        at hand (None otherwise)."""
        recorded = self.result.get("trivial")
        if isinstance(recorded, dict) and isinstance(recorded.get(split), (int, float)):
            return float(recorded[split])
        config = self.config or {}
        limit = (config.get("train") or {}).get("train_eval_subset") if split == "train" else None
        drop = config.get("data") or {}
        return _trivial_from_data(config.get("data_dir"), self.task, split, limit,
                                  drop.get("drop_fraction") or 0.0, drop.get("drop_seed") or 0)

    def at_trivial(self, split: str = "test") -> bool:
        """Whether this finished run scored its split's trivial score (to float noise)."""
        value, trivial = self.metric(split), self.trivial(split)
        return value is not None and trivial is not None and abs(value - trivial) < 1e-6

    def machine(self) -> str:
        """The machine a run computed on ("unknown" for runs made before result.json recorded it)."""
        machine = self.result.get("machine")
        return machine.get("device") or "unknown" if isinstance(machine, dict) else "unknown"

    def precision(self) -> str:
        return self.result.get("precision") or "unknown"

    def option(self, key: str):
        """A method option of this run (e.g. density), from result.json or config.yaml."""
        opts = self.result.get("method_options") or (self.config or {}).get("method") or {}
        return opts.get(key)


@dataclass
class Results:
    root: Path
    runs: list[RunRecord]
    planned: list[dict]  # the run entries of every sweep.json found, in order
    ignored: int = 0  # results below a sweep.json that its plan does not list

    def done(self) -> list[RunRecord]:
        return [r for r in self.runs if r.status == "done"]

    def failed(self) -> list[RunRecord]:
        return [r for r in self.runs if r.status == "failed"]

    def labels(self) -> list[str]:
        """Row order: the sweeps' method order, else the paper's."""
        planned = list(dict.fromkeys(p["label"] for p in self.planned))
        rest = [lb for lb in dict.fromkeys(r.label for r in self.runs) if lb not in planned]
        return planned + paper_label_order(rest)

    def tasks(self) -> list[str]:
        """Column order: the paper's."""
        return paper_task_order(set(p["task"] for p in self.planned) | set(r.task for r in self.runs))

    def expected(self) -> dict[tuple[str, str], int]:
        """(label, task) -> planned number of runs (empty without a sweep.json)."""
        return dict(Counter((p["label"], p["task"]) for p in self.planned))

    def cells(self, split: str = "test") -> dict[tuple[str, str], list[float]]:
        """(label, task) -> the major metric of its finished runs, in run-directory order."""
        out: dict[tuple[str, str], list[float]] = {}
        for r in self.done():
            out.setdefault((r.label, r.task), []).append(r.metric(split))
        return out

    def failed_counts(self) -> dict[tuple[str, str], int]:
        """(label, task) -> how many of its runs failed."""
        return dict(Counter((r.label, r.task) for r in self.failed()))

    def trivial_cells(self, split: str = "test") -> set[tuple[str, str]]:
        """(label, task) cells whose every finished run sits at the trivial score."""
        runs: dict[tuple[str, str], list[RunRecord]] = {}
        for r in self.done():
            runs.setdefault((r.label, r.task), []).append(r)
        return {cell for cell, rs in runs.items() if all(r.at_trivial(split) for r in rs)}

    def mixed_provenance(self) -> list[str]:
        """One line per cell whose finished runs came from more than one machine or precision."""
        runs: dict[tuple[str, str], list[RunRecord]] = {}
        for r in self.done():
            runs.setdefault((r.label, r.task), []).append(r)
        out = []
        for (label, task), rs in runs.items():
            for what, values in (("machines", Counter(r.machine() for r in rs)),
                                 ("precisions", Counter(r.precision() for r in rs))):
                if len(values) > 1:
                    listed = ", ".join(f"{n} on {v}" for v, n in values.items())
                    out.append(f"{label} / {task} mixes {what}: {listed}")
        return out

    def warn_mixed_provenance(self) -> None:
        for line in self.mixed_provenance():
            warn(line)

    def method_of(self, label: str) -> set[str]:
        return {r.method for r in self.runs if r.label == label} | {
            p["method"] for p in self.planned if p["label"] == label}


@functools.lru_cache(maxsize=None)
def _trivial_from_data(data_dir, task: str, split: str, limit, drop_fraction: float, drop_seed: int) -> float | None:
    """metrics.trivial from a task's split files, or None when they cannot be read."""
    from sam_peft import metrics
    from sam_peft.data import drop_examples, load_splits, resolve_data_dir

    if not isinstance(data_dir, str):
        return None
    try:
        splits = load_splits(resolve_data_dir(data_dir), task, ("train", split) if split != "train" else ("train",))
    except (UserError, OSError):
        return None
    train = drop_examples(splits["train"], drop_fraction, drop_seed)
    labels = [ex.label for ex in (train if split == "train" else splits[split])][:limit]
    return metrics.trivial(task, [ex.label for ex in train], labels)


def read_jsonl(path: Path) -> list[dict]:
    """The records of a jsonl log (see the module docstring for a cut-short last line)."""
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    lines = text.split("\n")
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):  # no newline after it: an append cut short, not a broken file
                break
            raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise UserError(f"{path}:{n}: expected a JSON object")
        records.append(rec)
    return records


def read_sweep(path: Path) -> dict[str, dict] | None:
    """run_id -> plan entry, or None if the file is not a sam-peft sweep plan."""
    plan = read_json(path)
    runs = plan.get("runs") if isinstance(plan, dict) else None
    if not isinstance(runs, list) or not all(
            isinstance(e, dict) and all(k in e for k in ("run_id", "task", "method", "label")) for e in runs):
        warn(f"{path}: not a sam-peft sweep plan; ignored")
        return None
    return {e["run_id"]: e for e in runs}


def _check_done(path: Path, result: dict) -> None:
    metrics = result.get("metrics")
    for split in ("test", "train", "val"):
        of_split = metrics.get(split) if isinstance(metrics, dict) else None
        value = of_split.get("major") if isinstance(of_split, dict) else None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise UserError(f"{path}: status 'done' but no number at metrics.{split}.major")


def _read_config(run_dir: Path) -> dict | None:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raise UserError(f"{path}: not valid YAML") from None
    return config if isinstance(config, dict) else None


def load_results(root: str | Path) -> Results:
    """Every run under `root` (see the module docstring). Raises UserError on broken files."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such results directory")
    sweeps: dict[Path, dict[str, dict]] = {}
    for path in sorted(root.rglob("sweep.json")):
        plan = read_sweep(path)
        if plan is not None:
            sweeps[path.parent] = plan

    runs: list[RunRecord] = []
    ignored = 0
    for path in sorted(root.rglob("result.json")):
        result = RunDir(path.parent).read()
        if not is_result(result):
            warn(f"{path}: not a sam-peft result (no {', '.join(OUR_KEYS)}); ignored")
            continue
        # The nearest sweep.json above this run decides whether it counts.
        plan = next((sweeps[d] for d in path.parents if d in sweeps), None)
        entry = plan.get(result["run_id"]) if plan is not None else None
        if plan is not None and entry is None:
            ignored += 1
            continue
        if result["status"] == "done":
            _check_done(path, result)
        config = _read_config(path.parent)
        label = (entry or {}).get("label") or (config or {}).get("label") or method_display(result["method"])
        runs.append(RunRecord(
            run_id=result["run_id"], dir=path.parent, task=result["task"], method=result["method"],
            label=label, seed=result.get("seed"), status=result["status"], result=result, config=config,
            grid=(entry or {}).get("grid") or {}, row=(entry or {}).get("row") or label,
        ))
    if ignored:
        warn(f"{root}: {ignored} result(s) not in their directory's sweep.json (an earlier sweep?) are ignored")
    planned = [e for plan in sweeps.values() for e in plan.values()]
    return Results(root=root, runs=runs, planned=planned, ignored=ignored)
