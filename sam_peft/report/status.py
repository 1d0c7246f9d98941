"""`sam-peft status RESULTS_DIR`: where the sweeps below a results directory stand.

Each sweep.json found below RESULTS_DIR is one sweep; its planned runs are counted by state:
  done         result.json says "done"
  failed       result.json says "failed" (with the reason)
  running      a process holds the run's lock right now (see sam_peft/locks.py)
  interrupted  result.json says "running" but nobody holds the lock: the process was killed or
               crashed; the next sweep reruns it from its last checkpoint
  missing      planned, but no result.json yet
Runs with a result.json that no sweep plans are counted under "other" (nothing plans them, so
nothing is missing there). Foreign and broken files are treated as by the table (results.py): a
result.json that is not JSON is an error naming it, one that is not a sam-peft result a warning.
Runs started with `sam-peft run` hold no lock, so while they train they show as interrupted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sam_peft.errors import UserError
from sam_peft.locks import is_held, lock_path
from sam_peft.io import read_json
from sam_peft.report.results import read_sweep, warn
from sam_peft.rundir import OUR_KEYS, RunDir, is_result

STATES = ("done", "failed", "running", "interrupted", "missing")
OTHER = "other"


@dataclass
class Group:
    name: str  # the sweep's folder, or "other"
    source: str | None = None  # the sweep config it was run from
    runs: dict[str, list[tuple[str, str | None]]] = field(default_factory=lambda: {s: [] for s in STATES})

    def add(self, rid: str, state: str, reason: str | None = None) -> None:
        self.runs[state].append((rid, reason))

    def count(self, state: str) -> int:
        return len(self.runs[state])


def _state(run_dir: Path, rid: str | None = None) -> tuple[str, str, str | None] | None:
    """(run id, state, reason) of one run directory; None for a result.json that is not a
    sam-peft result. `rid`: the planned run id (else the one result.json names)."""
    rd = RunDir(run_dir)
    path = rd.result
    result = rd.read()
    if result is not None and not is_result(result):
        warn(f"{path}: not a sam-peft result (no {', '.join(OUR_KEYS)}); ignored")
        return None
    rid = rid or str(result["run_id"])
    status = result["status"] if result is not None else None
    if status == "done":  # a done run is never executed again, so its lock needs no look
        return rid, "done", None
    if is_held(lock_path(run_dir.parent, rid)):
        return rid, "running", None
    if status is None:
        return rid, "missing", None
    if status == "failed":
        return rid, "failed", str(result.get("reason") or "no reason recorded")
    if status == "running":
        return rid, "interrupted", None
    raise UserError(f"{path}: unknown status {status!r} (expected running, done or failed)")


def sweep_status(root: str | Path) -> list[Group]:
    """One Group per sweep.json below `root`, then "other" if any run belongs to none."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such results directory")
    groups: list[Group] = []
    planned_dirs: set[Path] = set()
    for path in sorted(root.rglob("sweep.json")):
        plan = read_sweep(path)  # None (with a warning) for a foreign sweep.json
        if plan is None:
            continue
        source = read_json(path).get("sweep")
        group = Group(str(path.parent), source if isinstance(source, str) else None)
        for rid in plan:
            planned_dirs.add(path.parent / rid)
            # a foreign result.json where a planned run belongs: warned about, and the run is missing
            group.add(*(_state(path.parent / rid, rid) or (rid, "missing", None)))
        groups.append(group)
    other = Group(OTHER)
    for path in sorted(root.rglob("result.json")):
        if path.parent not in planned_dirs and (state := _state(path.parent)) is not None:
            other.add(*state)
    if any(other.count(s) for s in STATES):
        groups.append(other)
    if not groups:
        raise UserError(f"{root}: no sweeps or runs (no sweep.json or result.json below it)")
    return groups


def render_status(groups: list[Group], root: str | Path, listing: str | None = None) -> str:
    """The counts as an aligned table with a total line; with `listing`, the runs in that state."""
    header = ["sweep", "planned", *STATES]
    rows = []
    for g in groups:
        name = g.name if g.source is None else f"{g.name} ({g.source})"
        planned = str(sum(g.count(s) for s in STATES)) if g.name != OTHER else "-"
        missing = str(g.count("missing")) if g.name != OTHER else "-"
        rows.append([name, planned, *(str(g.count(s)) for s in STATES[:-1]), missing])
    totals = [sum(g.count(s) for g in groups) for s in STATES]
    rows.append(["total", str(sum(sum(g.count(s) for s in STATES) for g in groups if g.name != OTHER)),
                 *map(str, totals)])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in [header] + rows]
    if listing:
        for g in groups:
            if g.runs[listing]:
                lines += ["", f"{listing} in {g.name}:"]
                lines += [f"  {rid}" + (f"  {reason}" if reason else "") for rid, reason in g.runs[listing]]
        if not any(g.runs[listing] for g in groups):
            lines += ["", f"no {listing} runs below {root}"]
    return "\n".join(lines)
