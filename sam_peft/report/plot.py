"""The paper's figures from result directories (matplotlib, no display needed).

- sparsity (Fig. 3a): one method (SAM by default) at several densities: the mean and the std of
  the test and train major metric against the density p (log scale), one line per task.
- stability (Fig. 3b): one point per (method, task) cell with at least two runs, labelled with its
  method: its performance rank (rank of the mean within its task; 1 = best) against its stability
  rank (rank of the std; 1 = most stable), ranked as the table ranks; Spearman's rho and Kendall's
  tau-b pooled, Spearman's rho per task, and the pooled rho without each task (scipy). Cells whose
  every run sat at the trivial score are left out unless asked for (then drawn with an x).
- curve (Fig. 4): one run's training loss (train_log.jsonl) against the step, the method's
  re-projection steps (result.json method_report.projections) and the end of the burn-in as
  vertical lines, and the validation metric (metrics.jsonl) on a second axis.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import kendalltau, rankdata, spearmanr

from sam_peft.errors import UserError
from sam_peft.io import atomic_path, make_folder
from sam_peft.report.names import method_display, metric_display, task_display
from sam_peft.report.results import Results, load_results, read_json, read_jsonl
from sam_peft.report.table import DECIMALS, build_table, mean_std

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


# One marker per task, drawn open: tasks whose lines coincide (the same scores) stay visible.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")


def plot_sparsity(results: Results, out: str | Path, method: str = "sam", ddof: int = 1) -> None:
    check_output(out)
    points = sparsity_points(results, method)
    plt = _pyplot()
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    tested: set[float] = set()
    for i, task in enumerate([t for t in results.tasks() if t in points]):
        densities = sorted(points[task])
        tested.update(densities)
        style = {"marker": MARKERS[i % len(MARKERS)], "fillstyle": "none", "markersize": 7}
        for col, split in enumerate(("test", "train")):
            stats = [mean_std(points[task][d][split], ddof) for d in densities]
            means = np.array([m for m, _ in stats])
            stds = np.array([np.nan if s is None else s for _, s in stats])
            line, = axes[0, col].plot(densities, means, label=task_display(task), **style)
            axes[0, col].fill_between(densities, means - stds, means + stds, color=line.get_color(), alpha=0.15)
            axes[1, col].plot(densities, stds, color=line.get_color(), **style)
    ticks = sorted(tested)
    for col, split in enumerate(("test", "train")):
        axes[0, col].set_title(f"{split}: mean (band: ±std)")
        axes[1, col].set_title(f"{split}: std over runs")
        axes[1, col].set_xlabel("density p (log scale; ticks at the densities run)")
        for row in range(2):
            ax = axes[row, col]
            ax.set_xscale("log")
            # Ticks where there are points, labelled plainly; log-scale minor labels (2x10^-3,
            # 3x10^-3, ...) print over each other when the densities span less than a decade.
            ax.xaxis.set_major_locator(FixedLocator(ticks))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.grid(alpha=0.3)
        axes[1, col].set_xticks(ticks, [f"{d:g}" for d in ticks], rotation=45 if len(ticks) > 4 else 0,
                                ha="right" if len(ticks) > 4 else "center")
    shown = [t for t in results.tasks() if t in points]
    axes[0, 0].set_ylabel("major metric x100\n" + "; ".join(f"{task_display(t)}: {metric_display(t)}" for t in shown),
                          fontsize=8 if len(shown) > 2 else None)
    axes[1, 0].set_ylabel("std")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), title="task")
    fig.suptitle(f"{method_display(method)}: performance and stability against sparsity (Fig. 3a)")
    fig.tight_layout()
    _save(fig, out)


# ---------------------------------------------------------------- Fig. 3b


@dataclass
class StabilityCell:
    label: str
    task: str
    perf: int  # rank of the mean within its task (1 = best)
    stab: int  # rank of the std within its task (1 = most stable)
    trivial: bool  # every run at the trivial score (a constant prediction)


def stability_cells(results: Results, split: str = "test", ddof: int = 1,
                    keep_trivial: bool = False) -> tuple[list[StabilityCell], int]:
    """The cells of Fig. 3b (2+ finished runs) with their ranks within each task, as the table ranks
    (rankdata "min" on the printed numbers), and how many trivial cells were left out. A cell whose
    every run sat at the trivial score has a std that says nothing about stability (runs that all
    predict one class agree perfectly): it is left out, and the ranks are taken among the cells
    kept, unless `keep_trivial`."""
    table = build_table(results, split, ddof)
    cells = [(row, task, table.cells[(row, task)]) for row in table.rows for task in table.tasks]
    cells = [(row, task, c) for row, task, c in cells if c.mean is not None and c.std is not None]
    excluded = 0 if keep_trivial else sum(c.trivial for _, _, c in cells)
    if not keep_trivial:
        cells = [(row, task, c) for row, task, c in cells if not c.trivial]
    out = []
    for task in table.tasks:
        here = [(row, c) for row, t, c in cells if t == task]
        if not here:
            continue
        perf = rankdata([-round(c.mean, DECIMALS) for _, c in here], method="min")
        stab = rankdata([round(c.std, DECIMALS) for _, c in here], method="min")
        out += [StabilityCell(row, task, int(p), int(q), c.trivial) for (row, c), p, q in zip(here, perf, stab)]
    if len(out) < 3:
        raise UserError(f"{results.root}: Fig. 3b needs at least 3 (method, task) cells with 2 or more "
                        f"finished runs{'' if keep_trivial else ' off the trivial score'}; found {len(out)}")
    return out, excluded


def stability_ranks(results: Results, split: str = "test", ddof: int = 1, keep_trivial: bool = True):
    """(labels, tasks, performance ranks, stability ranks) of every cell that has both ranks."""
    cells, _ = stability_cells(results, split, ddof, keep_trivial)
    return ([c.label for c in cells], [c.task for c in cells], [c.perf for c in cells], [c.stab for c in cells])


@dataclass
class Stability:
    """Fig. 3b's statistics. Ranks tie often (cells with equal means, or equal stds such as the
    zero std of runs that all predict one class), and Spearman's p-value then overstates the
    evidence: Kendall's tau-b accounts for ties, and the tied shares say how many there are.
    `per_task`: each task's own Spearman rho and p (None with fewer than 3 cells or constant
    ranks); `without`: the pooled rho without each task (how much one task drives it)."""

    rho: float
    p: float
    tau: float
    tau_p: float
    n: int
    tied_performance: float  # share of cells whose performance rank another cell of its task shares
    tied_stability: float  # the same for stability ranks
    per_task: dict = field(default_factory=dict)  # task -> (rho, p, n)
    without: dict = field(default_factory=dict)  # task -> pooled rho over the other tasks
    excluded_trivial: int = 0

    @property
    def ties_dominate(self) -> bool:
        return max(self.tied_performance, self.tied_stability) > 0.5

    def lines(self) -> list[str]:
        """What `plot stability` prints: pooled, per task, and the pooled rho without each task."""
        out = [f"Spearman rho = {self.rho:.4f}, p = {self.p:.6g} over {self.n} (method, task) cells; "
               f"Kendall tau-b = {self.tau:.4f}, p = {self.tau_p:.6g}; tied ranks within a task: "
               f"{self.tied_performance:.0%} of performance, {self.tied_stability:.0%} of stability"]
        if self.excluded_trivial:
            out.append(f"left out: {self.excluded_trivial} cell(s) whose every run scored the trivial score "
                       "(--keep-trivial keeps them)")
        for task, (rho, p, n) in self.per_task.items():
            out.append(f"  {task_display(task)}: rho = {_num(rho, '.4f')}, p = {_num(p, '.3g')} over {n} cells")
        for task, rho in self.without.items():
            change = None if rho is None or np.isnan(self.rho) else rho - self.rho
            out.append(f"  without {task_display(task)}: pooled rho = {_num(rho, '.4f')} "
                       f"(change {_num(change, '+.4f')})")
        return out


def _num(x, spec: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)


def tied_share(tasks: list[str], ranks: list[int]) -> float:
    """The share of cells whose rank is shared by another cell of the same task."""
    seen = Counter(zip(tasks, ranks))
    return sum(seen[(t, r)] > 1 for t, r in zip(tasks, ranks)) / len(ranks)


def _spearman(perf, stab) -> tuple[float | None, float | None]:
    if len(perf) < 3 or len(set(perf)) < 2 or len(set(stab)) < 2:
        return None, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho, p = spearmanr(perf, stab)
    return float(rho), float(p)


def stability_stats(tasks: list[str], perf: list[int], stab: list[int]) -> Stability:
    with warnings.catch_warnings():  # constant ranks: nan, reported as such
        warnings.simplefilter("ignore")
        rho, p = spearmanr(perf, stab)
        tau, tau_p = kendalltau(perf, stab)  # variant "b": corrected for ties
    st = Stability(float(rho), float(p), float(tau), float(tau_p), len(perf),
                   tied_share(tasks, perf), tied_share(tasks, stab))
    order = list(dict.fromkeys(tasks))
    for task in order:
        idx = [i for i, t in enumerate(tasks) if t == task]
        st.per_task[task] = (*_spearman([perf[i] for i in idx], [stab[i] for i in idx]), len(idx))
    if len(order) > 1:
        for task in order:
            idx = [i for i, t in enumerate(tasks) if t != task]
            st.without[task] = _spearman([perf[i] for i in idx], [stab[i] for i in idx])[0]
    return st


def plot_stability(results: Results, out: str | Path, split: str = "test", ddof: int = 1,
                   keep_trivial: bool = False) -> Stability:
    """Draw Fig. 3b; returns its statistics (Spearman's rho pooled and per task, Kendall's tau-b,
    ties, the pooled rho without each task). Each point is labelled with its method."""
    check_output(out)
    cells, excluded = stability_cells(results, split, ddof, keep_trivial)
    tasks, perf, stab = [c.task for c in cells], [c.perf for c in cells], [c.stab for c in cells]
    st = stability_stats(tasks, perf, stab)
    st.excluded_trivial = excluded
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    order = list(dict.fromkeys(tasks))
    for i, task in enumerate(order):
        # Ranks are integers, so cells of different tasks would hide each other: each task's
        # points are shifted sideways by a small fixed amount (the correlation uses the ranks).
        # Cells of one task with the same two ranks fall on one point, drawn larger.
        shift = (i - (len(order) - 1) / 2) * 0.7 / max(len(order), 1)
        here = [c for c in cells if c.task == task]
        at = Counter((c.perf, c.stab) for c in here)
        ax.scatter([x + shift for x, _ in at], [y for _, y in at], alpha=0.75,
                   s=[24 * n ** 0.5 for n in at.values()], label=task_display(task), marker=MARKERS[i % len(MARKERS)])
        trivial = [c for c in here if c.trivial]
        if trivial:
            ax.scatter([c.perf + shift for c in trivial], [c.stab for c in trivial], marker="x", color="0.3", s=40)
        for (x, y), names in _names_at(here).items():
            ax.annotate(names, (x + shift, y), textcoords="offset points", xytext=(4, -3), fontsize=6, color="0.3")
    top = max(max(perf), max(stab))
    ax.set_xticks(range(1, top + 1))
    ax.set_yticks(range(1, top + 1))
    ax.set_xlabel("performance rank (rank of the mean within its task; 1 = best; tasks side by side)")
    ax.set_ylabel("stability rank (rank of the std within its task; 1 = most stable)")
    ties = (f"tied ranks: {st.tied_performance:.0%} of performance, {st.tied_stability:.0%} of stability"
            + (" (most: read rho with care)" if st.ties_dominate else ""))
    left_out = (f"; {excluded} trivial cell(s) left out" if excluded else
                ("; x: every run at the trivial score" if any(c.trivial for c in cells) else ""))
    ax.set_title(f"Stability vs performance (Fig. 3b), {st.n} cells{left_out}\n"
                 f"Spearman rho = {st.rho:.4f} (p = {st.p:.3g}); Kendall tau-b = {st.tau:.4f} (p = {st.tau_p:.3g})\n"
                 f"{ties}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="task", title_fontsize=8)
    _save(fig, out)
    return st


def _names_at(cells: list[StabilityCell]) -> dict[tuple[int, int], str]:
    """The method labels of the cells at each (performance, stability) point of one task."""
    out: dict[tuple[int, int], list[str]] = {}
    for c in cells:
        out.setdefault((c.perf, c.stab), []).append(c.label)
    return {k: ", ".join(v) for k, v in out.items()}


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


def _number(value) -> float:
    """A logged number; null (how a non-finite value is written, see sam_peft.io) is nan."""
    return float("nan") if value is None else float(value)


def plot_curve(path: str | Path, out: str | Path) -> dict:
    """Draw Fig. 4 for one run; returns what was drawn (run dir, number of points, marked steps)."""
    check_output(out)
    run_dir = find_curve_run(path)
    log_path = run_dir / "train_log.jsonl"
    if not log_path.is_file():
        raise UserError(f"{run_dir}: no train_log.jsonl (set train.log_every > 0)")
    log = [{**r, "loss": _number(r["loss"])} for r in read_jsonl(log_path) if "step" in r and "loss" in r]
    if not log:
        raise UserError(f"{log_path}: no training-loss records")
    result = read_json(run_dir / "result.json") if (run_dir / "result.json").is_file() else {}
    if not isinstance(result, dict):
        raise UserError(f"{run_dir / 'result.json'}: expected a JSON object")
    evals = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    evals = [e for e in evals if "step" in e and isinstance(e.get("val"), dict) and "major" in e["val"]]
    evals = [{**e, "val": {**e["val"], "major": _number(e["val"]["major"])}} for e in evals]
    projections = projection_steps(result)
    burnin = result.get("burnin_steps") or 0

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.plot([r["step"] for r in log], [r["loss"] for r in log], color="tab:blue", lw=1, label="training loss")
    for i, step in enumerate(projections):
        ax.axvline(step, color="tab:red", ls="--", lw=0.8, label="(re-)projection" if i == 0 else None)
    if burnin:
        # Wide and pale, under the re-projection lines: the first projection is often at this very step.
        ax.axvline(burnin, color="0.6", lw=4, alpha=0.4, zorder=0, label="end of burn-in")
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
    # Below the axes, not on them: wherever it sits inside, some curve passes under it.
    ax.legend(handles, labels, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=len(labels),
              frameon=False)
    ax.set_xlim(left=0)  # the run starts at step 0, also when the first logged step is later
    who = f"{task_display(result.get('task', ''))} / {method_display(result.get('method', ''))}"
    ax.set_title(f"{who} / seed {result.get('seed', '?')}: training loss (Fig. 4)" if result else str(run_dir))
    _save(fig, out)
    return {"run_dir": run_dir, "points": len(log), "projections": projections, "burnin_steps": burnin}
