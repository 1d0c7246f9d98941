"""The paper's Table 1 / Table 2 from a results directory, as Markdown, LaTeX or CSV.

Rows are the labels (methods), in the sweep's order or else the paper's; columns are the tasks in
the paper's order, then AVG. A cell is `mean±std (mean rank/std rank)` of the major metric (x100)
over the cell's finished runs:
- std is the sample std (ddof=1) unless `ddof=0` is asked for; a cell with one run shows "-";
- ranks are per column with scipy's rankdata(method="min"): the highest mean is rank 1, the
  lowest std is rank 1. They are computed on the numbers as printed (two decimals), so two
  cells that print the same share a rank; a cell without a std has no std rank ("-");
- the best mean of each column is bold (Markdown `**`, LaTeX `\\textbf`; CSV: a `best` column);
- a cell with fewer finished runs than planned says so: `n=3/10` (planned counts come from
  sweep.json; without one, from the largest cell in the table, and the cell shows `n=3`);
- a cell with failed runs says so: `58.10±1.20 (3/4) [2 failed]`, or just `failed` when none of
  its runs finished (CSV: a `failed` count per column; AVG's is the row's total);
- AVG = the mean of the row's task means ± the mean of its task stds, ranked like a task
  column, but only for rows complete on every task; other rows show AVG as "n/a";
- a cell whose every run scored the trivial score (a constant prediction, metrics.trivial) has
  a dagger after its mean and a footnote (CSV: a `trivial` column).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

from sam_peft.report.names import task_display
from sam_peft.report.results import Results

AVG = "AVG"
DECIMALS = 2
TRIVIAL_MARK = "†"
LATEX_DAGGER = r"$^\dagger$"


@dataclass
class Cell:
    n: int = 0
    planned: int | None = None
    planned_from_sweep: bool = False
    mean: float | None = None
    std: float | None = None
    mean_rank: int | None = None
    std_rank: int | None = None
    best: bool = False
    failed: int = 0  # runs of this cell with status "failed"
    trivial: bool = False  # every finished run at the trivial score (a constant prediction)

    @property
    def missing(self) -> bool:
        return self.planned is not None and self.n < self.planned


@dataclass
class Table:
    rows: list[str]
    tasks: list[str]
    cells: dict[tuple[str, str], Cell]
    split: str
    ddof: int

    @property
    def columns(self) -> list[str]:
        return self.tasks + [AVG]


def mean_std(values: list[float], ddof: int = 1) -> tuple[float | None, float | None]:
    """Mean and std of a cell; the std of fewer than two runs is undefined (None)."""
    if not values:
        return None, None
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), (float(arr.std(ddof=ddof)) if len(arr) > 1 else None)


def rank_column(cells: list[Cell]) -> None:
    """Set mean_rank, std_rank and best on the cells of one column."""
    with_mean = [c for c in cells if c.mean is not None]
    if with_mean:
        ranks = rankdata([-round(c.mean, DECIMALS) for c in with_mean], method="min")
        for c, r in zip(with_mean, ranks):
            c.mean_rank = int(r)
            c.best = r == 1
    with_std = [c for c in cells if c.std is not None]
    if with_std:
        ranks = rankdata([round(c.std, DECIMALS) for c in with_std], method="min")
        for c, r in zip(with_std, ranks):
            c.std_rank = int(r)


def build_table(results: Results, split: str = "test", ddof: int = 1) -> Table:
    values = results.cells(split)
    failed = results.failed_counts()
    expected = results.expected()
    rows = results.labels()
    tasks = results.tasks()
    largest = max((len(v) for v in values.values()), default=0)
    trivial = results.trivial_cells(split)
    cells: dict[tuple[str, str], Cell] = {}
    for row in rows:
        for task in tasks:
            vals = values.get((row, task), [])
            if (row, task) in expected:
                planned, from_sweep = expected[(row, task)], True
            else:
                planned, from_sweep = (largest if not results.planned else None), False
            mean, std = mean_std(vals, ddof)
            cells[(row, task)] = Cell(n=len(vals), planned=planned, planned_from_sweep=from_sweep, mean=mean, std=std,
                                      failed=failed.get((row, task), 0), trivial=(row, task) in trivial)
    for task in tasks:
        rank_column([cells[(row, task)] for row in rows])
    for row in rows:
        row_cells = [cells[(row, task)] for task in tasks]
        complete = all(c.n > 0 and not c.missing for c in row_cells)
        avg = Cell(failed=sum(c.failed for c in row_cells))
        if complete:
            avg.n = min(c.n for c in row_cells)
            avg.mean = float(np.mean([c.mean for c in row_cells]))
            stds = [c.std for c in row_cells]
            avg.std = float(np.mean(stds)) if all(s is not None for s in stds) else None
        cells[(row, AVG)] = avg
    rank_column([cells[(row, AVG)] for row in rows])
    return Table(rows=rows, tasks=tasks, cells=cells, split=split, ddof=ddof)


# ---------------------------------------------------------------- rendering


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.{DECIMALS}f}"


def _rank(r: int | None) -> str:
    return "-" if r is None else str(r)


def cell_text(cell: Cell, column: str, bold=lambda s: s, pm: str = "±") -> str:
    if cell.mean is None:
        if column == AVG:
            return "n/a"
        if cell.failed:
            return "failed"
        return f"n=0/{cell.planned}" if cell.planned_from_sweep else "-"
    mean = bold(_num(cell.mean)) if cell.best else _num(cell.mean)
    mean += TRIVIAL_MARK if cell.trivial else ""
    text = f"{mean}{pm}{_num(cell.std)} ({_rank(cell.mean_rank)}/{_rank(cell.std_rank)})"
    if cell.missing and column != AVG:
        text += f" n={cell.n}/{cell.planned}" if cell.planned_from_sweep else f" n={cell.n}"
    if cell.failed and column != AVG:
        text += f" [{cell.failed} failed]"
    return text


def headers(table: Table) -> list[str]:
    return [task_display(t) for t in table.tasks] + [AVG]


def legend(table: Table, mark: str = "†") -> str:
    std = "sample std (ddof=1)" if table.ddof == 1 else f"std with ddof={table.ddof}"
    text = (f"mean±std of the {table.split} major metric over finished runs ({std}); "
            "(rank of mean/rank of std) per column; bold: best mean; n=3/10: runs finished of planned; "
            "[2 failed]: runs that failed (not counted); "
            "AVG: mean of task means ± mean of task stds, over rows complete on every task.")
    if any(c.trivial for c in table.cells.values()):
        text += (f" {mark}: every run of the cell scored the trivial score, that of a constant prediction (the "
                 "majority class, or no correlation): it learned nothing the metric sees, and its std says "
                 "nothing about stability.")
    return text


def render_markdown(table: Table) -> str:
    out = ["| Method | " + " | ".join(headers(table)) + " |",
           "|:--|" + "--:|" * len(table.columns)]
    for row in table.rows:
        texts = [cell_text(table.cells[(row, c)], c, bold=lambda s: f"**{s}**") for c in table.columns]
        out.append(f"| {row.replace('|', '/')} | " + " | ".join(texts) + " |")
    out += ["", legend(table)]
    return "\n".join(out) + "\n"


def _latex_escape(text: str) -> str:
    special = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
               "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
    return "".join(special.get(ch, ch) for ch in text)


def render_latex(table: Table) -> str:
    out = ["% " + legend(table, mark=LATEX_DAGGER),
           r"\begin{tabular}{l" + "c" * len(table.columns) + "}",
           r"\hline",
           "Method & " + " & ".join(_latex_escape(h) for h in headers(table)) + r" \\",
           r"\hline"]
    for row in table.rows:
        # Cell texts hold only digits, letters and "-./()=[]" (and the dagger, set as LaTeX), nothing
        # LaTeX would need escaped.
        texts = [cell_text(table.cells[(row, c)], c, bold=lambda s: rf"\textbf{{{s}}}", pm=r"$\pm$")
                 .replace(TRIVIAL_MARK, LATEX_DAGGER) for c in table.columns]
        out.append(_latex_escape(row) + " & " + " & ".join(texts) + r" \\")
    out += [r"\hline", r"\end{tabular}"]
    return "\n".join(out) + "\n"


def render_csv(table: Table) -> str:
    """One row per method; for each column its numbers, unrounded: mean, std, n, planned, ranks, best, failed."""
    fields = ("mean", "std", "n", "planned", "mean_rank", "std_rank", "best", "failed", "trivial")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["method"] + [f"{h}_{f}" for h in headers(table) for f in fields])
    for row in table.rows:
        line = [row]
        for c in table.columns:
            cell = table.cells[(row, c)]
            planned = cell.planned if cell.planned_from_sweep else None
            line += ["" if v is None else v for v in (cell.mean, cell.std, cell.n, planned, cell.mean_rank,
                                                       cell.std_rank)]
            line += [int(cell.best), cell.failed, int(cell.trivial)]
        writer.writerow(line)
    return buf.getvalue()


RENDERERS = {"md": render_markdown, "latex": render_latex, "csv": render_csv}
