"""How methods and tasks are named and ordered in tables and figures (the paper's names and order).

The names live with what they name: a method's class (`display`, `paper_row`) and a task's
TaskSpec (`display`, and TASKS is in the paper's column order). This module only looks them up.
"""

from __future__ import annotations

from sam_peft.methods import method_display, paper_rows
from sam_peft.tasks import TASKS

__all__ = ["method_display", "task_display", "metric_display", "paper_label_order", "paper_task_order"]

# jiant's major metric of each kind, in words (x100 in every table and figure).
METRIC_NAMES = {"mcc": "Matthews corr.", "pearson_spearman": "(Pearson + Spearman) / 2",
                "acc_f1": "(accuracy + F1) / 2", "acc_macro_f1_3": "(accuracy + macro F1) / 2",
                "accuracy": "accuracy"}


def task_display(name: str) -> str:
    spec = TASKS.get(name)
    return spec.display if spec else name


def paper_label_order(labels) -> list[str]:
    """Labels sorted into the paper's row order; unknown labels follow, alphabetically."""
    rank = {v: i for i, v in enumerate(paper_rows())}
    return sorted(labels, key=lambda x: (rank.get(x, len(rank)), x))


def paper_task_order(tasks) -> list[str]:
    rank = {t: i for i, t in enumerate(TASKS)}
    return sorted(tasks, key=lambda t: (rank.get(t, len(rank)), t))


def metric_display(task: str) -> str:
    """The task's major metric in words, e.g. STS-B's "(Pearson + Spearman) / 2"."""
    spec = TASKS.get(task)
    return METRIC_NAMES.get(spec.metric, spec.metric) if spec else "major metric"
