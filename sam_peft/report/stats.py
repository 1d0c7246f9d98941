"""Significance of the differences between methods, and training time (the paper's appendix).

Per task, one reference row (SAM by default) against every other row, over the runs of each
cell: Welch's t-test (scipy.stats.ttest_ind, equal_var=False; needs 2+ runs on both sides) and
the Mann-Whitney U test (scipy.stats.mannwhitneyu, two-sided). Then the median wall time and
the median number of training steps per run, for each method and task, and where each sparse
row's chosen entries are (result.json's mask_share: the share of the chosen entries in each
parameter group, mean over the row's runs). Output is Markdown.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy.stats import mannwhitneyu, ttest_ind

from sam_peft.errors import UserError
from sam_peft.params import GROUPS
from sam_peft.report.names import method_display, task_display
from sam_peft.report.results import Results


@dataclass
class Comparison:
    task: str
    other: str
    n_ref: int
    n_other: int
    mean_ref: float
    mean_other: float
    t: float | None
    t_p: float | None
    u: float
    u_p: float


def resolve_reference(results: Results, name: str) -> str:
    """A row label from --method: the label itself, a method's paper name, or its registry name."""
    labels = results.labels()
    if name in labels:
        return name
    folded = [lb for lb in labels if lb.lower() == name.lower()]
    if len(folded) == 1:
        return folded[0]
    by_method = [lb for lb in labels if name in results.method_of(lb) or method_display(name) == lb]
    if len(by_method) == 1:
        return by_method[0]
    if by_method:
        raise UserError(f"--method '{name}' matches several rows ({', '.join(by_method)}); name one of them")
    raise UserError(f"--method '{name}': no such row in {results.root} (rows: {', '.join(labels) or 'none'})")


def compare(results: Results, reference: str, split: str = "test") -> list[Comparison]:
    cells = results.cells(split)
    out = []
    for task in results.tasks():
        ref = cells.get((reference, task), [])
        if not ref:
            continue
        for other in results.labels():
            vals = cells.get((other, task), [])
            if other == reference or not vals:
                continue
            t = t_p = None
            with warnings.catch_warnings():  # identical values on both sides: nan, reported as such
                warnings.simplefilter("ignore", RuntimeWarning)
                if len(ref) > 1 and len(vals) > 1:
                    res = ttest_ind(ref, vals, equal_var=False)
                    t, t_p = float(res.statistic), float(res.pvalue)
                mw = mannwhitneyu(ref, vals, alternative="two-sided")
            out.append(Comparison(task, other, len(ref), len(vals), float(np.mean(ref)), float(np.mean(vals)),
                                  t, t_p, float(mw.statistic), float(mw.pvalue)))
    return out


def _f(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def render_comparisons(reference: str, comparisons: list[Comparison], split: str) -> str:
    out = [f"## {reference} against each method ({split} major metric, two-sided tests)", ""]
    if not comparisons:
        return "\n".join(out + [f"No task has finished runs of both {reference} and another method.", ""])
    for task in dict.fromkeys(c.task for c in comparisons):
        rows = [c for c in comparisons if c.task == task]
        out += [f"### {task_display(task)}", "",
                f"| method | n | mean | {reference} n | {reference} mean | diff | Welch t | p | MW U | p |",
                "|:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for c in rows:
            out.append(f"| {c.other} | {c.n_other} | {c.mean_other:.2f} | {c.n_ref} | {c.mean_ref:.2f} | "
                       f"{c.mean_ref - c.mean_other:+.2f} | {_f(c.t, '.3f')} | {_f(c.t_p, '.3g')} | "
                       f"{c.u:.1f} | {c.u_p:.3g} |")
        out.append("")
    return "\n".join(out)


def time_table(results: Results) -> dict[tuple[str, str], tuple[float, float, int]]:
    """(label, task) -> (median wall time in s, median steps, number of finished runs)."""
    groups: dict[tuple[str, str], list] = {}
    for r in results.done():
        groups.setdefault((r.label, r.task), []).append(r)
    out = {}
    for key, runs in groups.items():
        walls = [r.result.get("wall_time_s") for r in runs if isinstance(r.result.get("wall_time_s"), (int, float))]
        steps = [r.result.get("steps") for r in runs if isinstance(r.result.get("steps"), (int, float))]
        out[key] = (float(np.median(walls)) if walls else None, float(np.median(steps)) if steps else None, len(runs))
    return out


def render_time_table(results: Results) -> str:
    times = time_table(results)
    tasks = results.tasks()
    out = ["## Training time: median wall time and median steps per run", "",
           "| Method | " + " | ".join(task_display(t) for t in tasks) + " |",
           "|:--|" + "--:|" * len(tasks)]
    for label in results.labels():
        cells = []
        for task in tasks:
            wall, steps, _ = times.get((label, task), (None, None, 0))
            cells.append("-" if wall is None and steps is None else f"{_f(wall, '.1f')} s, {_f(steps, '.0f')} steps")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def mask_shares(results: Results) -> dict[str, dict[str, float]]:
    """label -> group -> mean share of the chosen entries, over the row's finished runs whose
    selection is partial (methods that train whole tensors only, such as FullTuning, are left out)."""
    out: dict[str, dict[str, list[float]]] = {}
    for r in results.done():
        groups = (r.result.get("mask_share") or {}).get("groups") or {}
        if not groups or all(g.get("density") in (0.0, 1.0) for g in groups.values()):
            continue
        for name, g in groups.items():
            out.setdefault(r.label, {}).setdefault(name, []).append(g["share_of_chosen"])
    return {label: {g: float(np.mean(v)) for g, v in by.items()} for label, by in out.items()}


def render_mask_shares(results: Results) -> str:
    shares = mask_shares(results)
    if not shares:
        return ""
    groups = [g for g in GROUPS if any(g in by for by in shares.values())]
    out = ["## Where the chosen entries are: share per parameter group (mean over runs)", "",
           "| Method | " + " | ".join(groups) + " |", "|:--|" + "--:|" * len(groups)]
    for label in results.labels():
        if label in shares:
            out.append(f"| {label} | " + " | ".join(f"{100 * shares[label].get(g, 0.0):.1f}%" for g in groups) + " |")
    return "\n".join(out) + "\n"


def render_stats(results: Results, method: str = "sam", split: str = "test") -> str:
    if not results.done():
        raise UserError(f"{results.root}: no finished runs")
    reference = resolve_reference(results, method)
    text = render_comparisons(reference, compare(results, reference, split), split) + "\n" + render_time_table(results)
    shares = render_mask_shares(results)
    return text + ("\n" + shares if shares else "")
