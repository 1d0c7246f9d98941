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

import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sam_peft.errors import UserError
from sam_peft.report.names import method_display, paper_label_order, paper_task_order

OUR_KEYS = ("run_id", "task", "method", "status")


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

    def method_of(self, label: str) -> set[str]:
        return {r.method for r in self.runs if r.label == label} | {
            p["method"] for p in self.planned if p["label"] == label}


def read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON, truncated or corrupt ({e.msg} at line {e.lineno})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


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
        result = read_json(path)
        if not isinstance(result, dict) or not all(k in result for k in OUR_KEYS):
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
