"""Reports on fabricated results directories: table numbers and ranks against hand-computed ones,
missing runs, formats, the results loader's rules, each figure, and the statistics against scipy."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.stats import mannwhitneyu, rankdata, spearmanr, ttest_ind

from sam_peft import cli
from sam_peft.report.results import load_results
from sam_peft.report.stats import compare, time_table
from sam_peft.report.table import build_table, render_markdown

NAMES = {"full": "FullTuning", "bitfit": "BitFit", "sam": "SAM", "random": "Random"}


def write_run(root: Path, method: str, task: str, seed: int, test: float, *, train: float = 90.0,
              label: str | None = None, status: str = "done", density: float | None = None,
              wall: float = 10.0, steps: int = 100, extra: dict | None = None) -> Path:
    """One run directory as run.run leaves it (only the fields the reports read)."""
    rid = f"{task}-{method}-s{seed}-" + hashlib.sha256(repr((label, density)).encode()).hexdigest()[:8]
    run_dir = root / rid
    run_dir.mkdir(parents=True)
    options = {"name": method, **({"density": density} if density is not None else {})}
    result = {"run_id": rid, "task": task, "method": method, "method_options": options, "seed": seed,
              "status": status, "wall_time_s": wall, "steps": steps, **(extra or {})}
    if status == "done":
        result["metrics"] = {"test": {"major": test}, "train": {"major": train}, "val": {"major": test}}
    (run_dir / "result.json").write_text(json.dumps(result))
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"task": task, "method": options, "seed": seed,
                                                         "label": label}))
    return run_dir


# Hand-made cells (test major metric). Means and sample stds (ddof=1), computed by hand:
#                 cola                      rte
#   full   [60, 62, 64] 62.00 ± 2.00   [70, 70, 76] 72.00 ± 3.46
#   bitfit [61, 61, 64] 62.00 ± 1.73   [66, 68, 70] 68.00 ± 2.00
#   sam    [63, 64, 65] 64.00 ± 1.00   [71, 72, 73] 72.00 ± 1.00
# cola ranks: mean sam 1, full 2, bitfit 2 (tie, "min"); std sam 1, bitfit 2, full 3.
# rte ranks:  mean full 1, sam 1, bitfit 3;             std sam 1, bitfit 2, full 3.
# AVG: full 67.00 ± 2.73, bitfit 65.00 ± 1.87, sam 68.00 ± 1.00 -> means 2/3/1, stds 3/2/1.
CELLS = {
    ("full", "cola"): [60, 62, 64], ("full", "rte"): [70, 70, 76],
    ("bitfit", "cola"): [61, 61, 64], ("bitfit", "rte"): [66, 68, 70],
    ("sam", "cola"): [63, 64, 65], ("sam", "rte"): [71, 72, 73],
}


def fabricate(root: Path, cells=CELLS) -> Path:
    for (method, task), values in cells.items():
        for seed, v in enumerate(values):
            write_run(root, method, task, seed, float(v), train=95.0 - seed, wall=10.0 * (seed + 1),
                      steps=100 * (seed + 1))
    return root


def write_plan(root: Path, planned: dict[tuple[str, str], int]) -> None:
    """A sweep.json that plans `n` runs per (method, task) and lists the existing ones first."""
    existing = {}
    for p in root.glob("*/result.json"):
        r = json.loads(p.read_text())
        existing.setdefault((r["method"], r["task"]), []).append(r["run_id"])
    runs = []
    for (method, task), n in planned.items():
        ids = sorted(existing.get((method, task), []))
        ids += [f"{task}-{method}-planned{i}" for i in range(n - len(ids))]
        runs += [{"run_id": i, "task": task, "method": method, "label": NAMES[method], "seed": 0, "grid": {}}
                 for i in ids]
    (root / "sweep.json").write_text(json.dumps({"runs": runs}))


def cell_texts(md: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in md.splitlines() if line.startswith("| ")]
    return {r[0].strip(): [c.strip() for c in r[1:]] for r in rows[1:]}


def test_table_numbers_and_ranks(tmp_path):
    table = build_table(load_results(fabricate(tmp_path)))
    assert table.rows == ["FullTuning", "BitFit", "SAM"]  # the paper's order without a sweep.json
    assert table.columns == ["cola", "rte", "AVG"]
    c = table.cells
    assert c[("BitFit", "cola")].mean == pytest.approx(62.0)
    assert c[("BitFit", "cola")].std == pytest.approx(3 ** 0.5)
    assert c[("FullTuning", "rte")].std == pytest.approx(12 ** 0.5)
    assert c[("SAM", "AVG")].mean == pytest.approx(68.0) and c[("SAM", "AVG")].std == pytest.approx(1.0)
    assert c[("FullTuning", "AVG")].std == pytest.approx((2 + 12 ** 0.5) / 2)

    texts = cell_texts(render_markdown(table))
    assert texts["FullTuning"] == ["62.00±2.00 (2/3)", "**72.00**±3.46 (1/3)", "67.00±2.73 (2/3)"]
    assert texts["BitFit"] == ["62.00±1.73 (2/2)", "68.00±2.00 (3/2)", "65.00±1.87 (3/2)"]
    assert texts["SAM"] == ["**64.00**±1.00 (1/1)", "**72.00**±1.00 (1/1)", "**68.00**±1.00 (1/1)"]
    assert "| Method | CoLA | RTE | AVG |" in render_markdown(table)


def test_population_std_with_ddof_0(tmp_path, capsys):
    assert cli.main(["table", str(fabricate(tmp_path)), "--ddof", "0"]) == 0
    texts = cell_texts(capsys.readouterr().out)
    assert texts["FullTuning"][0] == "62.00±1.63 (2/3)"  # sqrt(8/3)


def test_missing_runs_one_run_cells_and_avg(tmp_path):
    cells = {**CELLS, ("bitfit", "rte"): [66, 68], ("random", "cola"): [50], ("random", "rte"): [55]}
    fabricate(tmp_path, cells)
    write_plan(tmp_path, {k: 3 for k in cells})
    texts = cell_texts(render_markdown(build_table(load_results(tmp_path))))
    assert texts["BitFit"][1] == "67.00±1.41 (3/2) n=2/3"  # ranked among the cells, marked incomplete
    assert texts["BitFit"][2] == "n/a"  # incomplete row: no AVG
    assert texts["Random"] == ["50.00±- (4/-) n=1/3", "55.00±- (4/-) n=1/3", "n/a"]
    # AVG ranks only over the complete rows
    assert texts["FullTuning"][2] == "67.00±2.73 (2/2)" and texts["SAM"][2] == "**68.00**±1.00 (1/1)"


def test_failed_runs_are_marked_in_their_cells(tmp_path, capsys):
    fabricate(tmp_path, {("sam", "cola"): [63, 65], ("sam", "rte"): [71, 72, 73]})
    write_run(tmp_path, "sam", "cola", 2, 0.0, status="failed", extra={"reason": "FloatingPointError: nan"})
    for seed in range(2):
        write_run(tmp_path, "full", "cola", seed, 0.0, status="failed", extra={"reason": "OutOfMemoryError: x"})
    write_plan(tmp_path, {("sam", "cola"): 3, ("sam", "rte"): 3, ("full", "cola"): 2})
    assert cli.main(["table", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "3 failed run(s) are not counted" in captured.err
    texts = cell_texts(captured.out)
    assert texts["SAM"][0] == "**64.00**±1.41 (1/1) n=2/3 [1 failed]"
    assert texts["FullTuning"] == ["failed", "-", "n/a"]  # nothing finished: no mean, no rank; rte not planned
    assert cli.main(["table", str(tmp_path), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["CoLA_failed"], r["RTE_failed"], r["AVG_failed"]) for r in rows] == [("1", "0", "1"), ("2", "0", "2")]


def test_cells_without_runs_and_no_plan(tmp_path):
    fabricate(tmp_path, {("sam", "cola"): [60, 61, 62], ("sam", "rte"): [70, 71], ("full", "cola"): [1, 2, 3]})
    texts = cell_texts(render_markdown(build_table(load_results(tmp_path))))
    # without a sweep.json the largest cell (3 runs) is the plan
    assert texts["SAM"] == ["**61.00**±1.00 (1/1)", "**70.50**±0.71 (1/1) n=2", "n/a"]
    assert texts["FullTuning"] == ["2.00±1.00 (2/1)", "-", "n/a"]


def test_latex_and_csv(tmp_path, capsys):
    root = fabricate(tmp_path / "r")
    assert cli.main(["table", str(root), "--format", "latex"]) == 0
    tex = capsys.readouterr().out
    assert r"\begin{tabular}{lccc}" in tex and r"\end{tabular}" in tex
    assert r"SAM & \textbf{64.00}$\pm$1.00 (1/1) & \textbf{72.00}$\pm$1.00 (1/1)" in tex

    out = tmp_path / "t" / "table.csv"
    assert cli.main(["table", str(root), "--format", "csv", "-o", str(out)]) == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [r["method"] for r in rows] == ["FullTuning", "BitFit", "SAM"]
    sam = rows[2]
    assert float(sam["CoLA_mean"]) == pytest.approx(64.0) and float(sam["CoLA_std"]) == pytest.approx(1.0)
    assert (sam["CoLA_n"], sam["CoLA_mean_rank"], sam["CoLA_std_rank"], sam["CoLA_best"]) == ("3", "1", "1", "1")
    assert rows[1]["CoLA_best"] == "0" and rows[1]["RTE_mean_rank"] == "3"


def test_sweep_plan_sets_row_order_and_hides_other_runs(tmp_path, capsys):
    fabricate(tmp_path, {("sam", "rte"): [70, 72], ("full", "rte"): [60, 62]})
    write_plan(tmp_path, {("sam", "rte"): 2, ("full", "rte"): 2})
    write_run(tmp_path, "sam", "rte", 9, 0.0)  # an earlier trial in the same folder, not in the plan
    results = load_results(tmp_path)
    assert "1 result(s) not in their directory's sweep.json" in capsys.readouterr().err
    assert results.labels() == ["SAM", "FullTuning"]  # the sweep's order
    assert results.cells()[("SAM", "rte")] == [70.0, 72.0]


def test_labels_come_from_the_run_config(tmp_path):
    write_run(tmp_path, "sam", "cb", 0, 80.0, label="SAM density=0.01")
    write_run(tmp_path, "sam", "cb", 1, 82.0, label="SAM density=0.01")
    assert load_results(tmp_path).cells() == {("SAM density=0.01", "cb"): [80.0, 82.0]}


def test_bad_and_foreign_results(tmp_path, capsys):
    root = fabricate(tmp_path / "r")
    (root / "foreign").mkdir()
    (root / "foreign" / "result.json").write_text(json.dumps({"accuracy": 0.9}))
    assert cli.main(["table", str(root)]) == 0
    assert "foreign/result.json: not a sam-peft result" in capsys.readouterr().err

    (root / "foreign" / "result.json").unlink()
    broken = next(root.glob("rte-sam-*/result.json"))
    broken.write_text(broken.read_text()[:40])
    assert cli.main(["table", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{broken}: not valid JSON" in err

    broken.write_text(json.dumps({"run_id": "x", "task": "rte", "method": "sam", "status": "done"}))
    assert cli.main(["stats", str(root)]) == 2
    assert "status 'done' but no number at metrics.test.major" in capsys.readouterr().err
    assert cli.main(["table", str(tmp_path / "nothing")]) == 2
    assert "no such results directory" in capsys.readouterr().err


# ---------------------------------------------------------------- figures


def test_sparsity_figure(tmp_path, capsys):
    root = tmp_path / "runs"
    for task in ("rte", "cb"):
        for density in (0.001, 0.01, 0.1):
            for seed in range(2):
                write_run(root, "sam", task, seed, 60 + 100 * density + seed, train=80 + seed, density=density,
                          label=f"SAM density={density}")
    for name in ("fig.png", "fig.pdf"):
        assert cli.main(["plot", "sparsity", str(root), "-o", str(tmp_path / "out" / name)]) == 0
        assert (tmp_path / "out" / name).stat().st_size > 1000
    assert (tmp_path / "out" / "fig.pdf").read_bytes().startswith(b"%PDF")
    assert cli.main(["plot", "sparsity", str(root), "-o", str(tmp_path / "fig.jpg")]) == 2
    assert "must end in .png or .pdf" in capsys.readouterr().err
    assert cli.main(["plot", "sparsity", str(root), "--method", "lora", "-o", str(tmp_path / "f.png")]) == 2
    assert "no finished 'lora' runs with a density" in capsys.readouterr().err


def test_stability_figure_prints_scipys_spearman(tmp_path, capsys):
    cells = {**CELLS, ("random", "cola"): [50, 55, 60], ("random", "rte"): [69, 70, 71]}
    fabricate(tmp_path / "runs", cells)
    out = tmp_path / "fig3b.png"
    assert cli.main(["plot", "stability", str(tmp_path / "runs"), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.stat().st_size > 1000

    # The same ranks computed here: per task, higher mean = rank 1, lower std = rank 1 ("min" ties).
    perf, stab = [], []
    for task in ("cola", "rte"):
        methods = [m for m, t in cells if t == task]
        means = [round(sum(cells[(m, task)]) / 3, 2) for m in methods]
        stds = [round(float(np.std(cells[(m, task)], ddof=1)), 2) for m in methods]
        perf += list(rankdata([-x for x in means], method="min"))
        stab += list(rankdata(stds, method="min"))
    rho, p = spearmanr(perf, stab)
    match = re.search(r"Spearman rho = (-?[\d.]+), p = ([\d.e+-]+) over 8 \(method, task\) cells", printed)
    assert match, printed
    assert float(match.group(1)) == pytest.approx(rho, abs=5e-5)
    assert float(match.group(2)) == pytest.approx(p, rel=1e-5)


def test_curve_figure_marks_the_projections(tmp_path, capsys):
    run_dir = write_run(tmp_path / "runs", "diffprune", "cb", 0, 80.0,
                        extra={"burnin_steps": 20, "method_report": {"projections": [20, 60, 100]}})
    (run_dir / "train_log.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 1.0 / s, "lr": 1e-4}) + "\n" for s in range(10, 130, 10)))
    (run_dir / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "train_loss": 0.5, "val": {"major": 70.0 + s / 10}}) + "\n"
                for s in (40, 80, 120)))
    out = tmp_path / "fig4.pdf"
    # a results directory holding exactly one run with a curve is enough
    assert cli.main(["plot", "curve", str(tmp_path / "runs"), "-o", str(out)]) == 0
    assert "12 loss points, re-projections at [20, 60, 100]" in capsys.readouterr().out
    assert out.read_bytes().startswith(b"%PDF")

    second = write_run(tmp_path / "runs", "diffprune", "cb", 1, 80.0)
    (second / "train_log.jsonl").write_text(json.dumps({"step": 10, "loss": 1.0}) + "\n")
    assert cli.main(["plot", "curve", str(tmp_path / "runs"), "-o", str(out)]) == 2
    assert "2 runs have training curves; name one run directory" in capsys.readouterr().err
    (second / "train_log.jsonl").write_text('{"step": 10, "loss"\n')
    assert cli.main(["plot", "curve", str(second), "-o", str(out)]) == 2
    assert f"{second / 'train_log.jsonl'}:1: not valid JSON" in capsys.readouterr().err


# ---------------------------------------------------------------- statistics


def test_stats_equal_scipy(tmp_path, capsys):
    root = fabricate(tmp_path)
    results = load_results(root)
    comparisons = {(c.task, c.other): c for c in compare(results, "SAM")}
    assert set(comparisons) == {(t, m) for t in ("cola", "rte") for m in ("FullTuning", "BitFit")}
    for (task, other), c in comparisons.items():
        method = {"FullTuning": "full", "BitFit": "bitfit"}[other]
        ref, vals = CELLS[("sam", task)], CELLS[(method, task)]
        welch = ttest_ind(ref, vals, equal_var=False)
        mw = mannwhitneyu(ref, vals, alternative="two-sided")
        assert (c.t, c.t_p) == (pytest.approx(welch.statistic), pytest.approx(welch.pvalue))
        assert (c.u, c.u_p) == (pytest.approx(mw.statistic), pytest.approx(mw.pvalue))
        assert (c.n_ref, c.n_other, c.mean_ref) == (3, 3, pytest.approx(sum(ref) / 3))

    # medians of wall time (10, 20, 30 s) and steps (100, 200, 300) per cell
    assert time_table(results)[("SAM", "cola")] == (20.0, 200.0, 3)

    assert cli.main(["stats", str(root), "--method", "sam"]) == 0
    out = capsys.readouterr().out
    welch = ttest_ind(CELLS[("sam", "cola")], CELLS[("full", "cola")], equal_var=False)
    assert f"| FullTuning | 3 | 62.00 | 3 | 64.00 | +2.00 | {welch.statistic:.3f} | {welch.pvalue:.3g} |" in out
    assert "| SAM | 20.0 s, 200 steps | 20.0 s, 200 steps |" in out

    assert cli.main(["stats", str(root), "--method", "lora"]) == 2
    assert "--method 'lora': no such row" in capsys.readouterr().err


def test_select_on_val_keeps_the_best_grid_point_per_row_and_task(tmp_path, capsys):
    """Two burn-ins of SAM per task: the one with the better mean val wins, per task."""
    runs = tmp_path / "runs"
    plan = []
    cells = {  # (burn-in, task) -> [(val, test)] over two seeds
        (500, "rte"): [(70, 60), (72, 62)], (700, "rte"): [(75, 50), (77, 52)],
        (500, "cb"): [(80, 81), (82, 83)], (700, "cb"): [(79, 99), (81, 97)],
    }
    for (burnin, task), vals in cells.items():
        for seed, (val, test) in enumerate(vals):
            d = write_run(runs, "sam", task, seed, test, label=f"SAM burnin_steps={burnin}", density=burnin)
            result = json.loads((d / "result.json").read_text())
            result["metrics"]["val"]["major"] = val
            (d / "result.json").write_text(json.dumps(result))
            plan.append({"run_id": result["run_id"], "task": task, "method": "sam", "seed": seed,
                         "label": f"SAM burnin_steps={burnin}", "row": "SAM", "grid": {"method.burnin_steps": burnin}})
    (runs / "sweep.json").write_text(json.dumps({"runs": plan}))
    assert cli.main(["table", str(runs), "--format", "csv", "--select-on", "val"]) == 0
    out = capsys.readouterr()
    rows = list(csv.reader(io.StringIO(out.out)))
    assert [r[0] for r in rows[1:]] == ["SAM"]
    header = rows[0]
    got = dict(zip(header, rows[1]))
    assert float(got["RTE_mean"]) == pytest.approx(51.0)  # burn-in 700 won on val (76 > 71)
    assert float(got["CB_mean"]) == pytest.approx(82.0)  # burn-in 500 won on val (81 > 80)
    assert "SAM / rte: burnin_steps=700" in out.err and "SAM / cb: burnin_steps=500" in out.err
    assert cli.main(["table", str(runs), "--select-on", "val"]) == 0
    md = capsys.readouterr().out
    assert "Grid points chosen on val" in md and "SAM / cb: burnin_steps=500 (mean val 81.00 over 2 runs" in md
