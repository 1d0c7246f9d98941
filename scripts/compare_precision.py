"""Compare two results directories run by run: the same rows, tasks and seeds under two settings
(e.g. fp32 against bf16 autocast), on one split's major metric.

    python scripts/compare_precision.py results/standin/runs results/standin_bf16/runs \
        --names fp32 bf16 -o results/standin_bf16/comparison.md

For every (row, task) that both directories hold: the seeds both finished, each side's mean ± std
(sample std) over them, the difference of the means (second minus first), the largest difference
of one seed's two runs, Welch's t-test (scipy, unequal variances) and the paired t-test over
seeds. A row is a run's sweep label (e.g. FullTuning, SAM), as in `sam-peft table`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy.stats import ttest_ind, ttest_rel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sam_peft.errors import UserError  # noqa: E402
from sam_peft.io import atomic_write_text  # noqa: E402
from sam_peft.report.results import load_results  # noqa: E402


def by_cell(root: str, split: str) -> dict[tuple[str, str], dict[int, float]]:
    """{(row, task): {seed: major metric}} over the done runs under root."""
    cells: dict[tuple[str, str], dict[int, float]] = {}
    for r in load_results(root).runs:
        value = r.metric(split)
        if value is not None:
            cells.setdefault((r.label, r.task), {})[r.seed] = value
    return cells


def compare(first: dict, second: dict, names: tuple[str, str], split: str) -> str:
    a_name, b_name = names
    lines = [f"| Task | Row | Seeds | {a_name} | {b_name} | Mean diff | Largest seed diff | Welch p | Paired p |",
             "|:--|:--|:--|--:|--:|--:|--:|--:|--:|"]
    diffs_all = []
    for key in sorted(set(first) & set(second), key=lambda k: (k[1], k[0])):
        seeds = sorted(set(first[key]) & set(second[key]))
        if not seeds:
            continue
        a = np.array([first[key][s] for s in seeds])
        b = np.array([second[key][s] for s in seeds])
        diffs_all.extend(b - a)
        std = (lambda x: f"{x.std(ddof=1):.2f}" if len(x) > 1 else "-")
        welch = f"{ttest_ind(a, b, equal_var=False).pvalue:.2f}" if len(seeds) > 1 else "-"
        paired = f"{ttest_rel(a, b).pvalue:.2f}" if len(seeds) > 1 and np.any(a != b) else "-"
        worst = (b - a)[np.argmax(np.abs(b - a))]
        lines.append(f"| {key[1]} | {key[0]} | {','.join(map(str, seeds))} | {a.mean():.2f} ± {std(a)} | "
                     f"{b.mean():.2f} ± {std(b)} | {b.mean() - a.mean():+.2f} | {worst:+.2f} | {welch} | {paired} |")
    if not diffs_all:
        raise UserError("no (row, task, seed) is done in both results directories")
    d = np.array(diffs_all)
    lines.append("")
    lines.append(f"{len(d)} pairs of runs ({split} major metric x 100): {b_name} minus {a_name} is "
                 f"{d.mean():+.2f} on average, {np.abs(d).mean():.2f} in absolute value, at most "
                 f"{np.abs(d).max():.2f}; {int((d > 0).sum())} higher, {int((d < 0).sum())} lower, "
                 f"{int((d == 0).sum())} equal.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("first", help="results directory of the first setting (e.g. fp32)")
    p.add_argument("second", help="results directory of the second setting (e.g. bf16)")
    p.add_argument("--names", nargs=2, default=("first", "second"), metavar=("FIRST", "SECOND"))
    p.add_argument("--split", default="test", choices=("test", "val", "train"))
    p.add_argument("-o", "--output", help="write the table to this file as well")
    args = p.parse_args(argv)
    try:
        text = compare(by_cell(args.first, args.split), by_cell(args.second, args.split), tuple(args.names),
                       args.split)
        print(text, end="")
        if args.output:
            atomic_write_text(args.output, text)  # a failed write is a one-line WriteError
    except UserError as e:
        print(f"compare_precision: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
