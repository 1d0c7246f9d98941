"""Choosing a grid value on the validation split, as the paper chose SAM's burn-in length.

A sweep row with a grid (e.g. SAM with `grid: {method.burnin_steps: [500, ..., 2000]}`) has one
label per grid point ("SAM burnin_steps=500", ...) and one `row` ("SAM"). For each (row, task),
`select_on` keeps the grid point whose finished runs have the best mean major metric on the
chosen split (ties: the first grid point of the sweep's order) and reports the test numbers of
that grid point under the row's name. The choice is per task, as in the paper. With `seeds`, only
those seeds' runs choose (a study's tuning seeds); the chosen point's other runs are reported too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from sam_peft.errors import UserError
from sam_peft.report.results import Results


@dataclass
class Choice:
    row: str
    task: str
    label: str  # the grid point chosen
    score: float  # its mean metric on the selection split
    n: int  # finished runs behind that mean
    candidates: int  # grid points with finished runs


def parse_seeds(text: str) -> set[int]:
    """`--select-seeds`: "0-4", "0,1,2" or a mix ("0-2,5"), as a set of seeds."""
    seeds: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        lo, dash, hi = part.partition("-")
        try:
            if dash:
                a, b = int(lo), int(hi)
                if a > b:
                    raise ValueError
                seeds.update(range(a, b + 1))
            else:
                seeds.add(int(part))
        except ValueError:
            raise UserError(f"--select-seeds '{text}': expected seeds such as 0-4 or 0,1,2") from None
    return seeds


def select_on(results: Results, split: str = "val", seeds: set[int] | None = None) -> tuple[Results, list[Choice]]:
    """Results with one grid point per (row, task), relabelled to the row; and the choices.

    `seeds`: choose on these seeds' runs only (the tuning seeds of a study that later adds seeds
    at the chosen point: the new seeds must not move the choice); every run of the chosen point
    is kept for the report."""
    order = {label: i for i, label in enumerate(results.labels())}
    rows = {r.label: r.row or r.label for r in results.runs}
    rows.update({p["label"]: p.get("row") or p["label"] for p in results.planned})
    scores: dict[tuple[str, str], dict[str, list[float]]] = {}
    for r in results.done():
        if seeds is None or r.seed in seeds:
            scores.setdefault((rows[r.label], r.task), {}).setdefault(r.label, []).append(r.metric(split))
    choices, chosen = [], {}
    for (row, task), by_label in scores.items():
        means = {label: float(np.mean(v)) for label, v in by_label.items()}
        best = max(means, key=lambda label: (means[label], -order.get(label, 0)))
        chosen[(row, task)] = best
        choices.append(Choice(row, task, best, means[best], len(by_label[best]), len(by_label)))

    def keep(label: str, task: str) -> bool:
        return chosen.get((rows[label], task), label) == label

    runs = [dataclasses.replace(r, label=rows[r.label]) for r in results.runs if keep(r.label, r.task)]
    planned = [{**p, "label": rows[p["label"]]} for p in results.planned if keep(p["label"], p["task"])]
    choices.sort(key=lambda c: (order.get(c.label, 0), results.tasks().index(c.task)))
    return Results(root=results.root, runs=runs, planned=planned, ignored=results.ignored), choices


def render_choices(choices: list[Choice], split: str) -> str:
    """One line per choice that had more than one grid point to choose from."""
    lines = [f"- {c.row} / {c.task}: {c.label.removeprefix(c.row).strip() or c.label} "
             f"(mean {split} {c.score:.2f} over {c.n} runs; {c.candidates} grid points)"
             for c in choices if c.candidates > 1]
    if not lines:
        return ""
    return f"\nGrid points chosen on {split} (the best mean {split} score per row and task):\n" + "\n".join(lines) + "\n"
