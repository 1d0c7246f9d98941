"""The learning-rate study's two steps after phase 1 (results/lr_study/PLAN.md; scripts/lr_study.sh).

    python scripts/lr_study.py choose OUT   each row's lr by its best mean val score over seeds 0-4,
                                            written as the phase-2 sweep OUT/confirm.yaml (that
                                            lr x seeds 5-9); refuses while phase 1 is incomplete,
                                            and never rewrites a committed choice
    python scripts/lr_study.py report OUT   OUT/table.md (each row at its chosen lr, all seeds),
                                            OUT/table_grid.md (every grid point, seeds 0-4),
                                            OUT/stats.md (the pre-registered contrasts of
                                            OUT/contrasts.yaml), OUT/stability.md (FullTuning
                                            against each sparse row), OUT/by_lr.md and
                                            OUT/by_lr.png (each sparse row against Random at every
                                            lr), OUT/convergence.md (best steps, trivial runs,
                                            each row's val at every lr and its
                                            choice, the pooler's part)

OUT defaults to results/lr_study. Exit status 2 on bad input, 1 when phase 1 is not done, 3 when the
choice is written but not yet committed to git (PLAN.md: it is committed before any phase-2 run).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import yaml

from sam_peft import cli
from sam_peft.errors import UserError
from sam_peft.io import atomic_write_text
from sam_peft.report.results import Results, load_results
from sam_peft.report.select import select_on
from sam_peft.report.stats import Family, compare_cells, render_comparisons
from sam_peft.sweep_expand import load_sweep

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "lr_study.yaml"
TUNING_SEEDS = {0, 1, 2, 3, 4}
CONFIRM_SEEDS = [5, 6, 7, 8, 9]
REFERENCE = "Random"  # the row every sparse row is set against at each lr


def _phase1(out: Path) -> Results:
    tune = out / "runs" / "tune"
    if not tune.is_dir():
        raise UserError(f"{tune}: no phase-1 runs (run scripts/lr_study.sh)")
    return load_results(tune)


def _plan_size() -> int:
    return len(load_sweep(CONFIG, ["data_dir=demo"]).runs)  # the count does not depend on the data


def choose(out: Path) -> int:
    results = _phase1(out)
    done = [r for r in results.done() if r.seed in TUNING_SEEDS]
    expected = _plan_size()
    if len(done) < expected:
        print(f"lr_study.py: phase 1 has {len(done)} of {expected} runs done; the choice waits for all of them",
              file=sys.stderr)
        return 1
    _, choices = select_on(results, "val", TUNING_SEEDS)
    chosen = {c.row: c for c in choices}
    tree = yaml.safe_load(CONFIG.read_text())
    methods = []
    for entry in tree["methods"]:
        from sam_peft.methods import method_display

        row = entry.get("label") or method_display(entry["name"])
        label = chosen[row].label
        lr = next(r.grid["train.lr"] for r in results.runs if r.label == label)
        methods.append({**entry, "grid": {"train": {"lr": [lr]}}})
    lines = ["# Phase 2 of the learning-rate study (results/lr_study/PLAN.md), written by",
             f"# `python scripts/lr_study.py choose {out}` from the {len(done)} phase-1 runs: each row's lr is the",
             "# grid point with the best mean val score over seeds 0-4 (ties: the smaller lr). The choices:"]
    for c in choices:
        lines.append(f"#   {c.row}: {c.label.removeprefix(c.row).strip()} (mean val {c.score:.2f} over {c.n} runs; "
                     f"{c.candidates} grid points)")
    lines.append("# Commit this file before any phase-2 run. This lr x seeds 5-9, into runs/confirm; the rest")
    lines.append("# is configs/lr_study.yaml's protocol, copied whole so that this file stands alone.")
    confirm = {**{k: v for k, v in tree.items() if k not in ("methods", "seeds", "output_dir")},
               "output_dir": _repo_relative(out / "runs" / "confirm"), "seeds": CONFIRM_SEEDS, "methods": methods}
    text = "\n".join(lines) + "\n" + yaml.safe_dump(confirm, sort_keys=False)
    path = out / "confirm.yaml"
    if path.is_file():
        previous = yaml.safe_load(path.read_text())
        if previous.get("methods") != methods:
            raise UserError(f"{path}: holds another choice than phase 1 gives now; the committed choice stands "
                            "(move the file away to choose again)")
        print(f"{path}: the choice stands")
        return _committed(path)
    atomic_write_text(path, text)
    print(text, end="")
    return _committed(path)


def _committed(path: Path) -> int:
    """0 when the choice may be run: committed to git (PLAN.md: before any phase-2 run), or not in a
    git checkout at all; 3, with what to do, when it still has to be committed."""
    import subprocess

    inside = subprocess.run(["git", "-C", str(path.parent), "rev-parse", "--is-inside-work-tree"],
                            capture_output=True, text=True)
    if inside.returncode != 0:
        return 0
    tracked = subprocess.run(["git", "-C", str(path.parent), "ls-files", "--error-unmatch", path.name],
                             capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(path.parent), "diff", "--quiet", "HEAD", "--", path.name])
    if tracked.returncode == 0 and dirty.returncode == 0:
        return 0
    print(f"lr_study.py: commit {path} (the choice, before any phase-2 run), then run scripts/lr_study.sh "
          "again", file=sys.stderr)
    return 3


def _repo_relative(path: Path) -> str:
    """results/lr_study/... as the repository names it, wherever the study's checkout was."""
    parts = path.parts
    for i in range(len(parts) - 1):
        if parts[i:i + 2] == ("results", "lr_study"):
            return str(Path(*parts[i:]))
    return str(path)


def _run(argv: list[str]) -> None:
    code = cli.main(argv)
    if code != 0:
        raise SystemExit(code)


def by_lr(results: Results, seeds=TUNING_SEEDS) -> tuple[str, dict]:
    """Each sparse row against Random at every lr of the grid, on the tuning seeds."""
    cells: dict[tuple[str, float], list[float]] = {}
    for r in results.done():
        if r.seed in seeds and "train.lr" in r.grid:
            cells.setdefault((r.row, r.grid["train.lr"]), []).append(r.metric("test"))
    lrs = sorted({lr for row, lr in cells if row == REFERENCE})
    rows = [row for row in dict.fromkeys(row for row, _ in cells) if row not in (REFERENCE, "FullTuning")]
    comparisons = []
    for row in rows:
        for lr in lrs:
            if (row, lr) in cells and (REFERENCE, lr) in cells:
                comparisons.append(compare_cells(f"lr={lr:g}", f"{row} lr={lr:g}", f"{REFERENCE} lr={lr:g}",
                                                 cells[(row, lr)], cells[(REFERENCE, lr)]))
    title = f"Each sparse row against {REFERENCE} at the same lr (seeds {min(seeds)}-{max(seeds)}; descriptive)"
    text = render_comparisons(Family(comparisons), "test", title).replace("### lr=", "### learning rate ")
    return text, cells


def plot_by_lr(cells: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sam_peft.io import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in dict.fromkeys(row for row, _ in cells):
        lrs = sorted(lr for r, lr in cells if r == row)
        means = np.array([np.mean(cells[(row, lr)]) for lr in lrs])
        stds = np.array([np.std(cells[(row, lr)], ddof=1) if len(cells[(row, lr)]) > 1 else 0 for lr in lrs])
        line, = ax.plot(lrs, means, marker="o", label=row)
        ax.fill_between(lrs, means - stds, means + stds, color=line.get_color(), alpha=0.15)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("STS-B test major metric (mean of Pearson and Spearman x100)")
    ax.set_title("Test score against the learning rate, seeds 0-4 (band: ±std)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=150, bbox_inches="tight")
    plt.close(fig)


def choices_on_grid(results: Results, choices: list) -> str:
    """Each row's mean val at every lr of its grid (seeds 0-4), its choice (select_on's), and whether
    the choice is at an end of the grid (PLAN.md: such a row is named, its best lr may lie outside)."""
    means: dict[str, dict[float, list[float]]] = {}
    for r in results.done():
        if r.seed in TUNING_SEEDS and "train.lr" in r.grid:
            means.setdefault(r.row, {}).setdefault(r.grid["train.lr"], []).append(r.metric("val"))
    out = ["## The choice: mean val score at every learning rate (seeds 0-4)", "",
           "| row | lr: mean val (runs) | chosen | at an end of the grid |",
           "|:--|:--|--:|:--|"]
    for c in choices:
        by_lr = dict(sorted(means.get(c.row, {}).items()))
        chosen = next(r.grid["train.lr"] for r in results.runs if r.label == c.label)
        cells = ", ".join(f"{lr:g}: {np.mean(v):.2f} ({len(v)})" for lr, v in by_lr.items())
        lrs = list(by_lr)
        end = "yes" if chosen in (lrs[0], lrs[-1]) else "no"
        out.append(f"| {c.row} | {cells} | {chosen:g} | {end} |")
    return "\n".join(out) + "\n"


def pooler_shares(chosen: Results) -> str:
    """How much of the pooler each row trains at its chosen lr (`chosen`: select_on's results): this
    checkpoint's pooler was never trained (bias 0), and its large gradients draw a global top-k."""
    out = ["## The pooler (untrained in this checkpoint) at each row's chosen learning rate", "",
           "| row | runs | pooler entries trained | of the pooler | share of the row's trained entries |",
           "|:--|--:|--:|--:|--:|"]
    for row in chosen.labels():
        groups = [(r.result.get("mask_share") or {}).get("groups", {}).get("pooler") for r in chosen.done()
                  if r.label == row]
        groups = [g for g in groups if g and 0.0 < g.get("density", 0.0) < 1.0]
        if not groups:
            continue
        n = np.mean([g["chosen"] for g in groups])
        out.append(f"| {row} | {len(groups)} | {n:,.0f} | {100 * np.mean([g['density'] for g in groups]):.1f}% | "
                   f"{100 * np.mean([g['share_of_chosen'] for g in groups]):.1f}% |")
    return "\n".join(out) + "\n"


def convergence(results: Results) -> str:
    """Per row at its chosen lr: the best steps, runs at the trivial score; the choice on the grid;
    the pooler's part in each row's entries."""
    chosen, choices = select_on(results, "val", TUNING_SEEDS)
    out = ["## Convergence at each row's chosen learning rate", "",
           "| row | runs | median best step | best steps | runs at step 600 | runs at the trivial score |",
           "|:--|--:|--:|:--|--:|--:|"]
    for row in chosen.labels():
        runs = [r for r in chosen.done() if r.label == row]
        if not runs:
            continue
        steps = sorted(int(r.result["best_step"]) for r in runs)
        out.append(f"| {row} | {len(runs)} | {np.median(steps):g} | {', '.join(map(str, steps))} | "
                   f"{sum(s == 600 for s in steps)} | {sum(r.at_trivial('test') for r in runs)} |")
    out += ["", "A median below 600: most runs peaked on val before the end of training (best-val weights are "
            "the ones tested).", ""]
    return "\n".join(out) + "\n" + choices_on_grid(results, choices) + "\n" + pooler_shares(chosen)


def report(out: Path) -> int:
    runs = out / "runs"
    contrasts = out / "contrasts.yaml"
    select = ["--select-on", "val", "--select-seeds", "0-4"]
    _run(["table", str(runs), *select, "-o", str(out / "table.md")])
    _run(["table", str(runs / "tune"), "-o", str(out / "table_grid.md")])
    _run(["stats", str(runs), *select, "--contrasts", str(contrasts), "-o", str(out / "stats.md")])
    _run(["stats", str(runs), *select, "--method", "full", "-o", str(out / "stability.md")])
    text, cells = by_lr(load_results(runs))
    atomic_write_text(out / "by_lr.md", text)
    plot_by_lr(cells, out / "by_lr.png")
    atomic_write_text(out / "convergence.md", convergence(load_results(runs)))
    print(f"wrote {out}/by_lr.md, by_lr.png, convergence.md")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="the learning-rate study: choose, then report")
    parser.add_argument("step", choices=["choose", "report"])
    parser.add_argument("out", nargs="?", default="results/lr_study")
    args = parser.parse_args(argv)
    try:
        return {"choose": choose, "report": report}[args.step](Path(args.out))
    except UserError as e:
        print(f"lr_study.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
