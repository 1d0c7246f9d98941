"""The paper's figures from result directories (matplotlib, no display needed).

- sparsity (Fig. 3a): one method (SAM by default) at several densities: the mean and the std of
  the test and train major metric against the density p (log scale), one line per task.
- stability (Fig. 3b): one point per (method, task) cell with at least two runs: its performance
  rank (rank of the mean within its task; 1 = best) against its stability rank (rank of the std;
  1 = most stable), the same ranks as the table; Spearman's rho over all cells (scipy).
- curve (Fig. 4): one run's training loss (train_log.jsonl) against the step, the method's
  re-projection steps (result.json method_report.projections) and the end of the burn-in as
  vertical lines, and the validation metric (metrics.jsonl) on a second axis.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from sam_peft.errors import UserError
from sam_peft.io import atomic_path, make_folder
from sam_peft.report.names import method_display, task_display
from sam_peft.report.results import Results, load_results, read_json, read_jsonl
from sam_peft.report.table import AVG, build_table, mean_std

FORMATS = {".png": "png", ".pdf": "pdf"}


def check_output(path: str | Path) -> str:
    """The image format for an output file name; an unknown extension is an input error."""
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise UserError(f"{path}: the output must end in .png or .pdf")
    return fmt


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> None:
    """Write the figure whole or not at all (temporary name, then rename)."""
    fmt = check_output(path)
    path = Path(path)
    try:
        make_folder(path.parent)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=150, bbox_inches="tight")
    finally:
        _pyplot().close(fig)


# ---------------------------------------------------------------- Fig. 3a


def sparsity_points(results: Results, method: str = "sam") -> dict[str, dict[float, dict[str, list[float]]]]:
    """task -> density -> {"test": [...], "train": [...]} over the finished runs of `method`."""
    points: dict[str, dict[float, dict[str, list[float]]]] = {}
    for r in results.done():
        density = r.option("density")
        if r.method != method or density is None:
            continue
        cell = points.setdefault(r.task, {}).setdefault(float(density), {"test": [], "train": []})
        cell["test"].append(r.metric("test"))
        cell["train"].append(r.metric("train"))
    if not points:
        raise UserError(f"{results.root}: no finished '{method}' runs with a density")
    return points


def plot_sparsity(results: Results, out: str | Path, method: str = "sam", ddof: int = 1) -> None:
    check_output(out)
    points = sparsity_points(results, method)
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for task in [t for t in results.tasks() if t in points]:
        densities = sorted(points[task])
        for col, split in enumerate(("test", "train")):
            stats = [mean_std(points[task][d][split], ddof) for d in densities]
            means = np.array([m for m, _ in stats])
            stds = np.array([np.nan if s is None else s for _, s in stats])
            line, = axes[0, col].plot(densities, means, marker="o", label=task_display(task))
            axes[0, col].fill_between(densities, means - stds, means + stds, color=line.get_color(), alpha=0.15)
            axes[1, col].plot(densities, stds, marker="o", color=line.get_color(), label=task_display(task))
    for col, split in enumerate(("test", "train")):
        axes[0, col].set_title(f"{split}: mean (band: ±std)")
        axes[1, col].set_title(f"{split}: std over runs")
        axes[1, col].set_xlabel("density p (log scale)")
        for row in range(2):
            axes[row, col].set_xscale("log")
            axes[row, col].grid(alpha=0.3)
    axes[0, 0].set_ylabel("major metric")
    axes[1, 0].set_ylabel("std")
    axes[0, 1].legend(fontsize=8)
    fig.suptitle(f"{method_display(method)}: performance and stability against sparsity (Fig. 3a)")
    _save(fig, out)


# ---------------------------------------------------------------- Fig. 3b


def stability_ranks(results: Results, split: str = "test", ddof: int = 1):
    """(labels, tasks, performance ranks, stability ranks) of every cell that has both ranks."""
    table = build_table(results, split, ddof)
    cells = [(row, task, table.cells[(row, task)]) for row in table.rows for task in table.tasks
             if task != AVG]
    cells = [(row, task, c) for row, task, c in cells if c.mean_rank is not None and c.std_rank is not None]
    if len(cells) < 3:
        raise UserError(f"{results.root}: Fig. 3b needs at least 3 (method, task) cells with 2 or more "
                        f"finished runs; found {len(cells)}")
    return ([row for row, _, _ in cells], [task for _, task, _ in cells],
            [c.mean_rank for _, _, c in cells], [c.std_rank for _, _, c in cells])


def plot_stability(results: Results, out: str | Path, split: str = "test", ddof: int = 1) -> tuple[float, float, int]:
    """Draw Fig. 3b; returns (Spearman rho, its p-value, number of cells)."""
    check_output(out)
    _, tasks, perf, stab = stability_ranks(results, split, ddof)
    rho, p = spearmanr(perf, stab)
    rho, p = float(rho), float(p)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    order = list(dict.fromkeys(tasks))
    for i, task in enumerate(order):
        # Ranks are integers, so cells of different tasks would hide each other: each task's
        # points are shifted sideways by a small fixed amount (the correlation uses the ranks).
        shift = (i - (len(order) - 1) / 2) * 0.5 / max(len(order), 1)
        xs = [x + shift for x, t in zip(perf, tasks) if t == task]
        ys = [y for y, t in zip(stab, tasks) if t == task]
        ax.scatter(xs, ys, alpha=0.8, s=24, label=task_display(task))
    ax.set_xlabel("performance rank (rank of the mean; 1 = best; tasks side by side)")
    ax.set_ylabel("stability rank (rank of the std; 1 = most stable)")
    ax.set_title(f"Stability vs performance (Fig. 3b)\nSpearman rho = {rho:.4f}, p = {p:.3g}, {len(perf)} cells")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, out)
    return rho, p, len(perf)


# ---------------------------------------------------------------- Fig. 4


def find_curve_run(path: str | Path) -> Path:
    """The run directory to plot: `path` itself, or the one run below it that has a training log."""
    path = Path(path)
    if (path / "train_log.jsonl").is_file() or (path / "result.json").is_file():
        return path
    results = load_results(path)
    runs = [r.dir for r in results.runs if (r.dir / "train_log.jsonl").is_file()]
    if not runs:
        raise UserError(f"{path}: no run with a train_log.jsonl (set train.log_every > 0)")
    if len(runs) > 1:
        raise UserError(f"{path}: {len(runs)} runs have training curves; name one run directory, e.g. {runs[0]}")
    return runs[0]


def projection_steps(result: dict) -> list[int]:
    """Re-projection steps from result.json's method_report: a list of steps or of {"step": ...}."""
    raw = (result.get("method_report") or {}).get("projections") or []
    steps = []
    for item in raw if isinstance(raw, list) else []:
        step = item.get("step") if isinstance(item, dict) else item
        if isinstance(step, (int, float)) and not isinstance(step, bool):
            steps.append(int(step))
    return steps


def plot_curve(path: str | Path, out: str | Path) -> dict:
    """Draw Fig. 4 for one run; returns what was drawn (run dir, number of points, marked steps)."""
    check_output(out)
    run_dir = find_curve_run(path)
    log_path = run_dir / "train_log.jsonl"
    if not log_path.is_file():
        raise UserError(f"{run_dir}: no train_log.jsonl (set train.log_every > 0)")
    log = [r for r in read_jsonl(log_path) if "step" in r and "loss" in r]
    if not log:
        raise UserError(f"{log_path}: no training-loss records")
    result = read_json(run_dir / "result.json") if (run_dir / "result.json").is_file() else {}
    if not isinstance(result, dict):
        raise UserError(f"{run_dir / 'result.json'}: expected a JSON object")
    evals = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    evals = [e for e in evals if "step" in e and isinstance(e.get("val"), dict) and "major" in e["val"]]
    projections = projection_steps(result)
    burnin = result.get("burnin_steps") or 0

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot([r["step"] for r in log], [r["loss"] for r in log], color="tab:blue", lw=1, label="training loss")
    for i, step in enumerate(projections):
        ax.axvline(step, color="tab:red", ls="--", lw=0.8, label="(re-)projection" if i == 0 else None)
    if burnin:
        ax.axvline(burnin, color="gray", ls=":", lw=1, label="end of burn-in")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if evals:
        ax2 = ax.twinx()
        ax2.plot([e["step"] for e in evals], [e["val"]["major"] for e in evals], color="tab:green", marker=".",
                 lw=1, label="val major")
        ax2.set_ylabel("validation major metric")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, fontsize=8, loc="upper right")
    who = f"{task_display(result.get('task', ''))} / {method_display(result.get('method', ''))}"
    ax.set_title(f"{who} / seed {result.get('seed', '?')}: training loss (Fig. 4)" if result else str(run_dir))
    _save(fig, out)
    return {"run_dir": run_dir, "points": len(log), "projections": projections, "burnin_steps": burnin}
