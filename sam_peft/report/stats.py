"""Significance and stability of the differences between rows, and training time (the paper's appendix).

A comparison sets two cells of one task side by side (a, b: the runs of two rows) and gives, all
from scipy:
- the difference of means a - b with its 95% confidence interval (Welch's, unequal variances:
  scipy.stats.ttest_ind(equal_var=False).confidence_interval), Welch's two-sided p, and
  Mann-Whitney's two-sided p (scipy.stats.mannwhitneyu);
- the Welch p adjusted by Holm's step-down over the family of comparisons shown (the family is
  every comparison of the output, or the pre-registered one of a `--contrasts` file);
- stability: the ratio of the two stds with the Brown-Forsythe test of equal variances
  (scipy.stats.levene, center="median"), also Holm-adjusted over the family, and the smallest std
  ratio that the cells' sizes detect with 80% power at a two-sided 5% level. That bound is the
  F test's under normal scores (scipy.stats.f); Brown-Forsythe trades some of that power for
  robustness, so it needs at least this ratio. "More stable" is a claim only where the adjusted
  test rejects, never a reading of std ranks.

By default the family is one reference row (SAM) against every other row, per task. Cells whose
every run sat at the trivial score (a constant prediction: metrics.trivial) are marked with a
dagger. Runs whose top-k filled entries by position (fewer positive scores than k) are listed.
Then the median wall time and number of training steps per row and task, and where each sparse
row's chosen entries are (result.json's mask_share). Output is Markdown.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import f as f_dist
from scipy.stats import levene, mannwhitneyu, ttest_ind

from sam_peft.errors import UserError
from sam_peft.params import GROUPS
from sam_peft.report.names import method_display, task_display
from sam_peft.report.results import Results

ALPHA = 0.05
POWER = 0.8
DAGGER = "†"


@dataclass
class Comparison:
    task: str
    ref: str  # row a (the reference row by default)
    other: str  # row b
    n_ref: int
    n_other: int
    mean_ref: float
    mean_other: float
    std_ref: float | None
    std_other: float | None
    t: float | None  # Welch's t; None where a side has one run or neither side varies
    t_p: float | None
    ci: tuple[float, float] | None  # 95% CI of mean_ref - mean_other (Welch)
    u: float
    u_p: float
    bf: float | None = None  # Brown-Forsythe statistic; None without 2+ runs a side and some spread
    bf_p: float | None = None
    detectable_ratio: float | None = None  # the std ratio these n detect at 80% power
    trivial_ref: bool = False  # every run of the cell at the trivial score
    trivial_other: bool = False
    t_p_holm: float | None = None
    bf_p_holm: float | None = None

    @property
    def diff(self) -> float:
        return self.mean_ref - self.mean_other

    @property
    def std_ratio(self) -> float | None:
        """The larger std over the smaller (inf when one cell has no spread)."""
        if self.std_ref is None or self.std_other is None:
            return None
        hi, lo = max(self.std_ref, self.std_other), min(self.std_ref, self.std_other)
        return float("inf") if lo == 0 and hi > 0 else (1.0 if hi == 0 else hi / lo)


@dataclass
class Contrast:
    """One pre-registered comparison: rows a and b on some tasks (None: every task both have)."""

    a: str
    b: str
    tasks: list[str] | None = None
    where: str = ""  # file:line, for messages


@dataclass
class Family:
    comparisons: list[Comparison]
    pre_registered: bool = False
    notes: list[str] = field(default_factory=list)


def resolve_reference(results: Results, name: str, what: str = "--method") -> str:
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
        raise UserError(f"{what} '{name}' matches several rows ({', '.join(by_method)}); name one of them")
    raise UserError(f"{what} '{name}': no such row in {results.root} (rows: {', '.join(labels) or 'none'})")


# Scores are x100 percentages: differences below this are float noise from averaging (58.333...
# computed two ways), not a difference between runs.
DECIMALS = 9


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of the p-values that are not None (the family's size is their
    number): the i-th smallest of m is multiplied by m - i + 1, then made monotone and capped at 1."""
    order = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        out[i] = running
    return out


def detectable_std_ratio(n_a: int, n_b: int, alpha: float = ALPHA, power: float = POWER) -> float | None:
    """The smallest ratio of stds (larger / smaller) that n_a and n_b runs detect with `power` at a
    two-sided level `alpha`, by the F test of equal variances under normal scores: the variance
    ratio lam solves P(F(n_a - 1, n_b - 1) > c / lam) = power, c the upper alpha/2 critical value."""
    if n_a < 2 or n_b < 2:
        return None
    df_a, df_b = n_a - 1, n_b - 1
    critical = f_dist.ppf(1 - alpha / 2, df_a, df_b)
    return float(np.sqrt(critical / f_dist.ppf(1 - power, df_a, df_b)))


def compare_cells(task: str, ref: str, other: str, a, b, trivial_ref=False, trivial_other=False) -> Comparison:
    """Welch (with its CI), Mann-Whitney and Brown-Forsythe for two cells' scores. Welch's t needs
    2+ runs on each side and some variance on at least one: where every run of both cells scored
    the same, t is 0/0, undefined, and reported as None (as for a one-run side)."""
    a, b = np.round(np.asarray(a, float), DECIMALS), np.round(np.asarray(b, float), DECIMALS)
    t = t_p = ci = bf = bf_p = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if len(a) > 1 and len(b) > 1 and (np.ptp(a) > 0 or np.ptp(b) > 0):
            res = ttest_ind(a, b, equal_var=False)
            t, t_p = float(res.statistic), float(res.pvalue)
            low, high = res.confidence_interval(confidence_level=1 - ALPHA)
            ci = (float(low), float(high))
            deviations = np.concatenate([np.abs(a - np.median(a)), np.abs(b - np.median(b))])
            if np.ptp(deviations) > 0:  # Brown-Forsythe is 0/0 when every absolute deviation is equal
                lev = levene(a, b, center="median")
                bf, bf_p = float(lev.statistic), float(lev.pvalue)
        mw = mannwhitneyu(a, b, alternative="two-sided")
    std = (lambda x: float(np.std(x, ddof=1)) if len(x) > 1 else None)
    return Comparison(task, ref, other, len(a), len(b), float(np.mean(a)), float(np.mean(b)), std(a), std(b),
                      t, t_p, ci, float(mw.statistic), float(mw.pvalue), bf, bf_p,
                      detectable_std_ratio(len(a), len(b)), trivial_ref, trivial_other)


def adjust(comparisons: list[Comparison]) -> list[Comparison]:
    """Holm over the family (Welch's p and Brown-Forsythe's p each)."""
    for c, p in zip(comparisons, holm([c.t_p for c in comparisons])):
        c.t_p_holm = p
    for c, p in zip(comparisons, holm([c.bf_p for c in comparisons])):
        c.bf_p_holm = p
    return comparisons


def compare(results: Results, reference: str, split: str = "test") -> list[Comparison]:
    """Per task, the reference row against every other row, Holm-adjusted over all of them."""
    cells = results.cells(split)
    trivial = results.trivial_cells(split)
    out = []
    for task in results.tasks():
        ref = cells.get((reference, task), [])
        if not ref:
            continue
        for other in results.labels():
            vals = cells.get((other, task), [])
            if other == reference or not vals:
                continue
            out.append(compare_cells(task, reference, other, ref, vals, (reference, task) in trivial,
                                     (other, task) in trivial))
    return adjust(out)


def compare_contrasts(results: Results, contrasts: list[Contrast], split: str = "test") -> Family:
    """The pre-registered family: each contrast on each of its tasks, Holm-adjusted over all."""
    cells = results.cells(split)
    trivial = results.trivial_cells(split)
    out, notes = [], []
    for c in contrasts:
        a = resolve_reference(results, c.a, f"{c.where}: row")
        b = resolve_reference(results, c.b, f"{c.where}: row")
        for task in c.tasks or results.tasks():
            va, vb = cells.get((a, task), []), cells.get((b, task), [])
            if not va or not vb:
                notes.append(f"{a} - {b} on {task_display(task)}: no finished runs of "
                             f"{a if not va else b}; left out of the family")
                continue
            out.append(compare_cells(task, a, b, va, vb, (a, task) in trivial, (b, task) in trivial))
    return Family(adjust(out), pre_registered=True, notes=notes)


def read_contrasts(path: str | Path) -> list[Contrast]:
    """A contrasts file: a YAML list of {a: ROW, b: ROW, tasks: [TASK, ...]} (tasks optional)."""
    from sam_peft.config import key_lines, load_yaml_text
    from sam_peft.tasks import get_task

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such contrasts file")
    try:
        text = path.read_text(encoding="utf-8")
        tree = load_yaml_text(text)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except Exception as e:  # noqa: BLE001 - any YAML error: one line naming the file
        mark = getattr(e, "problem_mark", None)
        raise UserError(f"{path}{f':{mark.line + 1}' if mark else ''}: invalid YAML "
                        f"({getattr(e, 'problem', None) or e})") from None
    lines = key_lines(text)
    if not isinstance(tree, list) or not tree:
        raise UserError(f"{path}: expected a list of contrasts, e.g. - {{a: SAM, b: Random, tasks: [stsb]}}")
    out = []
    for i, item in enumerate(tree):
        where = f"{path}:{lines.get((i,), '?')}"
        if not isinstance(item, dict):
            raise UserError(f"{where}: a contrast is a mapping {{a: ROW, b: ROW, tasks: [...]}}")
        unknown = sorted(set(item) - {"a", "b", "tasks"})
        if unknown:
            raise UserError(f"{where}: unknown key '{unknown[0]}' (a contrast has a, b and tasks)")
        for key in ("a", "b"):
            if not isinstance(item.get(key), str) or not item[key].strip():
                raise UserError(f"{where}: '{key}': expected a row name")
        tasks = item.get("tasks")
        if tasks is not None:
            if isinstance(tasks, str):
                tasks = [tasks]
            if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
                raise UserError(f"{where}: 'tasks': expected a list of task names")
            for t in tasks:
                try:
                    get_task(t)
                except UserError as e:
                    raise UserError(f"{where}: {e}") from None
        if item["a"] == item["b"]:
            raise UserError(f"{where}: a and b are the same row ('{item['a']}')")
        out.append(Contrast(item["a"], item["b"], tasks, where))
    return out


def _f(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _cell(mean: float, std: float | None, trivial: bool) -> str:
    return f"{mean:.2f}{DAGGER if trivial else ''} ± {_f(std, '.2f')}"


def render_comparisons(family: Family, split: str, title: str) -> str:
    comparisons = family.comparisons
    out = [f"## {title} ({split} major metric, two-sided tests)", ""]
    for note in family.notes:
        out.append(f"- note: {note}")
    if family.notes:
        out.append("")
    if not comparisons:
        return "\n".join(out + ["No comparison has finished runs on both sides.", ""])
    for task in dict.fromkeys(c.task for c in comparisons):
        out += [f"### {task_display(task)}", "",
                "| a | b | n a/b | a mean ± std | b mean ± std | a - b [95% CI] | Welch t | p | Holm p | MW U | p "
                "| std ratio | BF p | Holm BF p | ratio detectable |",
                "|:--|:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for c in (c for c in comparisons if c.task == task):
            ci = f" [{c.ci[0]:+.2f}, {c.ci[1]:+.2f}]" if c.ci else ""
            ratio = c.std_ratio
            out.append(f"| {c.ref} | {c.other} | {c.n_ref}/{c.n_other} | {_cell(c.mean_ref, c.std_ref, c.trivial_ref)} | "
                       f"{_cell(c.mean_other, c.std_other, c.trivial_other)} | {c.diff:+.2f}{ci} | {_f(c.t, '.3f')} | "
                       f"{_f(c.t_p, '.3g')} | {_f(c.t_p_holm, '.3g')} | {c.u:.1f} | {c.u_p:.3g} | "
                       f"{_f(ratio, '.2f')} | {_f(c.bf_p, '.3g')} | {_f(c.bf_p_holm, '.3g')} | "
                       f"{_f(c.detectable_ratio, '.2f')} |")
        out.append("")
    n_welch = sum(c.t_p is not None for c in comparisons)
    n_bf = sum(c.bf_p is not None for c in comparisons)
    family_text = "the pre-registered contrasts" if family.pre_registered else "every comparison in this file"
    out += [
        f"Holm p: Welch's p adjusted by Holm's step-down over {family_text} with a p ({n_welch}); Holm BF p: "
        f"Brown-Forsythe's p adjusted the same way ({n_bf}). 95% CI: Welch's interval for a - b.",
        "Welch t and p: '-' where a side has one run, or where no run of either side scored differently from "
        "the others (no variance: t is undefined). BF: Brown-Forsythe (Levene, median-centred), '-' where it is "
        "undefined. std ratio: the larger std over the smaller. ratio detectable: the smallest std ratio these n "
        f"detect with {POWER:.0%} power at a two-sided {ALPHA:g} level (F test under normal scores; "
        "Brown-Forsythe needs at least this): a ratio below it that the test does not reject is not evidence "
        "of equal stability.",
        f"{DAGGER}: every run of the cell scored the trivial score (a constant prediction: the majority class, "
        "or no correlation).", ""]
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


def filled_by_position(results: Results) -> list[str]:
    """One line per run whose top-k had fewer positive scores than k (ties at zero filled by position)."""
    out = []
    for r in results.done():
        n = r.result.get("n_chosen_without_positive_score")
        if isinstance(n, int) and n > 0:
            out.append(f"{r.run_id} ({r.label}, {r.task}): {n:,} of its chosen entries had no positive score "
                       f"({r.result.get('n_positive_scores'):,} eligible entries scored above 0)")
    return out


def render_stats(results: Results, method: str = "sam", split: str = "test",
                 contrasts: list[Contrast] | None = None) -> str:
    if not results.done():
        raise UserError(f"{results.root}: no finished runs")
    if contrasts is not None:
        family = compare_contrasts(results, contrasts, split)
        title = "Pre-registered contrasts"
    else:
        reference = resolve_reference(results, method)
        family = Family(compare(results, reference, split))
        title = f"{reference} against each method"
    text = render_comparisons(family, split, title) + "\n" + render_time_table(results)
    shares = render_mask_shares(results)
    filled = filled_by_position(results)
    if filled:
        text += ("\n## Selections that top-k filled by position\n\nFewer eligible entries scored above 0 than "
                 "the method chose: the rest were taken by position (ties at zero).\n\n"
                 + "\n".join(f"- {line}" for line in filled) + "\n")
    return text + ("\n" + shares if shares else "")
