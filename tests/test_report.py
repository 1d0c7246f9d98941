"""Reports on fabricated results directories: table numbers and ranks against hand-computed ones,
missing runs, formats, the results loader's rules, each figure, and the statistics against scipy."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.stats import kendalltau, levene, mannwhitneyu, rankdata, spearmanr, ttest_ind

from sam_peft import cli
from sam_peft.report.results import load_results
from sam_peft.report.stats import compare, time_table
from sam_peft.report.table import build_table, render_markdown
from util import write_run

NAMES = {"full": "FullTuning", "bitfit": "BitFit", "sam": "SAM", "random": "Random"}


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

    # Holm over the 4 comparisons shown, each Welch CI from scipy, Brown-Forsythe from scipy.
    pvals = {key: ttest_ind(CELLS[("sam", key[0])], CELLS[({"FullTuning": "full", "BitFit": "bitfit"}[key[1]], key[0])],
                            equal_var=False).pvalue for key in comparisons}
    ordered = sorted(pvals.values())
    holm_expected = np.maximum.accumulate([min(1.0, (4 - i) * p) for i, p in enumerate(ordered)])
    for key, c in comparisons.items():
        assert c.t_p_holm == pytest.approx(holm_expected[ordered.index(pvals[key])])
    assert cli.main(["stats", str(root), "--method", "sam"]) == 0
    out = capsys.readouterr().out
    welch = ttest_ind(CELLS[("sam", "cola")], CELLS[("full", "cola")], equal_var=False)
    low, high = welch.confidence_interval(0.95)
    bf = levene(CELLS[("sam", "cola")], CELLS[("full", "cola")], center="median")
    c = comparisons[("cola", "FullTuning")]
    assert (f"| SAM | FullTuning | 3/3 | 64.00 ± 1.00 | 62.00 ± 2.00 | +2.00 [{low:+.2f}, {high:+.2f}] | "
            f"{welch.statistic:.3f} | {welch.pvalue:.3g} | {c.t_p_holm:.3g} |") in out
    assert f"| 2.00 | {bf.pvalue:.3g} | {c.bf_p_holm:.3g} |" in out
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


def test_stability_reports_kendalls_tau_b_and_warns_when_ties_dominate(tmp_path, capsys):
    """Cells whose runs all score the same tie in both ranks (as on the random-weight demo): the
    tie-aware statistic and the tied shares come with rho, and a warning when ties dominate."""
    cells = {(m, t): [50.0, 50.0, 50.0] for m in ("full", "bitfit", "sam", "random") for t in ("cola", "rte")}
    cells[("sam", "rte")] = [70.0, 72.0, 74.0]
    fabricate(tmp_path / "runs", cells)
    assert cli.main(["plot", "stability", str(tmp_path / "runs"), "-o", str(tmp_path / "f.png")]) == 0
    captured = capsys.readouterr()
    # ranks (perf, stab): cola all (1, 1); rte sam (1, 4), the rest (2, 1)
    perf, stab = [1, 1, 1, 1, 2, 2, 1, 2], [1, 1, 1, 1, 1, 1, 4, 1]
    tau, tau_p = kendalltau(perf, stab)
    match = re.search(r"Kendall tau-b = (-?[\d.]+), p = ([\d.e+-]+); tied ranks within a task: "
                      r"(\d+)% of performance, (\d+)% of stability", captured.out)
    assert match, captured.out
    assert float(match.group(1)) == pytest.approx(tau, abs=5e-5) and float(match.group(2)) == pytest.approx(tau_p)
    assert (match.group(3), match.group(4)) == ("88", "88")  # 7 of 8 cells share a rank within their task
    assert "warning: most cells share a rank with another cell of their task" in captured.err

    distinct = {("full", "cola"): [60, 62, 64], ("bitfit", "cola"): [50, 51, 52], ("sam", "cola"): [70, 73, 76],
                ("random", "cola"): [40, 44, 48], ("full", "rte"): [60, 61, 62], ("bitfit", "rte"): [70, 72, 74],
                ("sam", "rte"): [50, 53, 56], ("random", "rte"): [80, 84, 88]}
    fabricate(tmp_path / "distinct", distinct)  # no two cells of a task share a rank: no warning
    assert cli.main(["plot", "stability", str(tmp_path / "distinct"), "-o", str(tmp_path / "g.png")]) == 0
    assert "warning" not in capsys.readouterr().err


def test_stats_treat_every_cell_without_variance_alike(tmp_path, capsys):
    """One cell of identical zeros and one of identical 58.33s that float noise makes unequal by
    1e-14: both have no variance, so both show '-' (not nan in one and t = 0, p = 1 in the other)."""
    third, other_way = 175 / 3, 100 * (1 / 3 + 1 / 4)  # 58.333...: the same number computed two ways
    cells = {("sam", "cola"): [0.0, 0.0, 0.0], ("full", "cola"): [0.0, 0.0, 0.0],
             ("sam", "rte"): [third] * 3, ("full", "rte"): [third, other_way, third]}
    assert other_way != third
    fabricate(tmp_path, cells)
    assert {(c.task, c.t, c.t_p) for c in compare(load_results(tmp_path), "SAM")} == {("cola", None, None),
                                                                                       ("rte", None, None)}
    assert cli.main(["stats", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "nan" not in out
    assert "| SAM | FullTuning | 3/3 | 0.00 ± 0.00 | 0.00 ± 0.00 | +0.00 | - | - | - | 4.5 | 1 | 1.00 | - | - |" in out
    assert "| SAM | FullTuning | 3/3 | 58.33 ± 0.00 | 58.33 ± 0.00 | +0.00 | - | - | - | 4.5 | 1 | 1.00 | - | - |" in out
    assert "no run of either side scored differently" in out


def _figure_of(monkeypatch, draw):
    """Draw with `draw()` and return the matplotlib figure instead of only a file."""
    from sam_peft.report import plot

    kept = []
    real_save = plot._save
    monkeypatch.setattr(plot, "_save", lambda fig, out: (kept.append(fig), fig.canvas.draw()))
    draw()
    monkeypatch.setattr(plot, "_save", real_save)
    return kept[0]


def _overlaps(box, points) -> bool:
    return any(box.x0 <= x <= box.x1 and box.y0 <= y <= box.y1 for x, y in points)


def test_legends_do_not_cover_the_data(tmp_path, monkeypatch):
    from sam_peft.report import plot

    fabricate(tmp_path / "runs", {**CELLS, ("random", "cola"): [50, 55, 60], ("random", "rte"): [69, 70, 71]})
    fig = _figure_of(monkeypatch, lambda: plot.plot_stability(load_results(tmp_path / "runs"), tmp_path / "a.png"))
    ax = fig.axes[0]
    points = [p for c in ax.collections for p in ax.transData.transform(c.get_offsets())]
    legend = ax.get_legend().get_window_extent()
    assert points and not _overlaps(legend, points)
    assert legend.x0 >= ax.get_window_extent().x1  # outside, to the right

    run_dir = write_run(tmp_path / "curve", "diffprune", "cb", 0, 80.0, extra={"burnin_steps": 20})
    (run_dir / "train_log.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 1.0 + (s % 30) / 10}) + "\n" for s in range(10, 130, 10)))
    (run_dir / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "val": {"major": 60.0 + s / 5}}) + "\n" for s in (40, 80, 120)))
    fig = _figure_of(monkeypatch, lambda: plot.plot_curve(run_dir, tmp_path / "b.png"))
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent()
    lines = [p for a in fig.axes for line in a.get_lines() for p in a.transData.transform(line.get_xydata())]
    assert not _overlaps(legend, lines)
    assert legend.y1 <= ax.get_window_extent().y0  # below the axes


def test_sparsity_ticks_are_the_densities_and_do_not_overlap(tmp_path, monkeypatch):
    from sam_peft.report import plot

    for density in (0.002, 0.003, 0.004, 0.005, 0.007):  # less than a decade: log minor ticks crowd
        for seed in range(2):
            write_run(tmp_path, "sam", "rte", seed, 60.0 + seed, density=density, label=f"SAM density={density}")
    fig = _figure_of(monkeypatch, lambda: plot.plot_sparsity(load_results(tmp_path), tmp_path / "s.png"))
    ax = fig.axes[2]  # bottom left: the labelled x axis
    labels = [t for t in ax.get_xticklabels(which="both") if t.get_visible() and t.get_text()]
    assert [t.get_text() for t in labels] == ["0.002", "0.003", "0.004", "0.005", "0.007"]
    boxes = [t.get_window_extent() for t in labels]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


# ---------------------------------------------------------------- statistics fit for claims


def test_holm_adjusts_step_down_and_keeps_order():
    from sam_peft.report.stats import holm

    # m = 4 defined p-values: 0.01*4, 0.02*3, 0.03*2 -> 0.06 stays monotone, 0.5*1.
    assert holm([0.03, None, 0.01, 0.5, 0.02]) == [pytest.approx(0.06), None, pytest.approx(0.04), 0.5,
                                                   pytest.approx(0.06)]
    assert holm([0.9, 0.8]) == [1.0, 1.0]
    assert holm([]) == []


def test_detectable_std_ratio_has_the_stated_power():
    from scipy.stats import f as f_dist

    from sam_peft.report.stats import detectable_std_ratio

    r5, r10 = detectable_std_ratio(5, 5), detectable_std_ratio(10, 10)
    assert r5 > r10 > detectable_std_ratio(30, 30) > 1 and detectable_std_ratio(1, 5) is None
    # Simulated: normal samples whose stds differ by that ratio; the two-sided 5% F test rejects
    # about 80% of the time.
    rng = np.random.default_rng(0)
    lo, hi = f_dist.ppf(0.025, 9, 9), f_dist.ppf(0.975, 9, 9)
    a = rng.normal(0, r10, (20000, 10)).var(axis=1, ddof=1)
    b = rng.normal(0, 1, (20000, 10)).var(axis=1, ddof=1)
    power = np.mean((a / b > hi) | (a / b < lo))
    assert power == pytest.approx(0.8, abs=0.015)


def _trivial_runs(root, method, task, values, trivial, seeds=None, extra=None):
    for seed, v in zip(seeds or range(len(values)), values):
        write_run(root, method, task, seed, float(v), extra={"trivial": {"test": trivial, "val": trivial,
                                                                         "train": trivial}, **(extra or {})})


def test_contrasts_file_fixes_the_family(tmp_path, capsys):
    root = tmp_path / "runs"
    cells = {("sam", "rte"): [71, 72, 74, 70], ("random", "rte"): [60, 65, 62, 61], ("full", "rte"): [73, 75, 71, 72],
             ("bitfit", "rte"): [50, 52, 51, 55]}
    for (m, t), v in cells.items():
        _trivial_runs(root, m, t, v, 50.0)
    spec = tmp_path / "contrasts.yaml"
    spec.write_text("# the family\n- {a: SAM, b: Random, tasks: [rte]}\n- {a: sam, b: full}\n")
    assert cli.main(["stats", str(root), "--contrasts", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "Pre-registered contrasts" in out and "BitFit" not in out.split("## Training time")[0]
    rows = [line for line in out.split("## Training time")[0].splitlines() if line.startswith("| SAM |")]
    assert len(rows) == 2
    p = [ttest_ind(cells[("sam", "rte")], cells[(m, "rte")], equal_var=False).pvalue for m in ("random", "full")]
    holm = sorted([(min(1, 2 * min(p)), min(p)), (max(min(1, 2 * min(p)), max(p)), max(p))])
    adjusted = {raw: adj for adj, raw in holm}
    for row, raw in zip(rows, p):
        cols = [c.strip() for c in row.strip("|").split("|")]
        assert float(cols[7]) == pytest.approx(raw, rel=1e-2) and float(cols[8]) == pytest.approx(adjusted[raw], rel=1e-2)
    assert "over the pre-registered contrasts with a p (2)" in out

    for text, needle in [("- {a: SAM, b: LoRA}\n", "contrasts.yaml:1: row 'LoRA': no such row"),
                         ("- {a: SAM, c: Random}\n", "contrasts.yaml:1: unknown key 'c'"),
                         ("- {a: SAM, b: SAM}\n", "a and b are the same row"),
                         ("- {a: SAM, b: Random, tasks: [rtee]}\n", "contrasts.yaml:1: unknown task 'rtee'"),
                         ("- [SAM\n", "contrasts.yaml:2: invalid YAML"),
                         ("a: SAM\n", "expected a list of contrasts")]:
        spec.write_text(text)
        assert cli.main(["stats", str(root), "--contrasts", str(spec)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err


def test_trivial_cells_are_marked_in_table_and_stats(tmp_path, capsys):
    root = tmp_path / "runs"
    _trivial_runs(root, "sam", "mrpc", [74.8, 74.8, 74.8], 74.8)  # every run at the majority class
    _trivial_runs(root, "full", "mrpc", [74.8, 77.0, 78.0], 74.8)  # one run at it: not a trivial cell
    assert cli.main(["table", str(root)]) == 0
    out = capsys.readouterr().out
    texts = cell_texts(out)
    assert texts["SAM"][0].startswith("74.80†±0.00") and "†" not in texts["FullTuning"][0]
    assert "†: every run of the cell scored the trivial score" in out
    assert cli.main(["table", str(root), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {r["method"]: r["MRPC_trivial"] for r in rows} == {"FullTuning": "0", "SAM": "1"}
    assert cli.main(["table", str(root), "--format", "latex"]) == 0
    assert r"74.80$^\dagger$" in capsys.readouterr().out
    assert cli.main(["stats", str(root)]) == 0
    assert "| SAM | FullTuning | 3/3 | 74.80† ± 0.00 | 76.60 ± 1.64 |" in capsys.readouterr().out


def test_trivial_score_of_runs_that_predate_it_comes_from_their_data(tmp_path):
    # A run made before result.json recorded `trivial`: its config's data_dir gives it.
    from sam_peft import metrics
    from sam_peft.data import demo_data_dir, load_splits

    splits = load_splits(demo_data_dir(), "rte", ("train", "test"))
    expected = metrics.trivial("rte", [e.label for e in splits["train"]], [e.label for e in splits["test"]])
    d = write_run(tmp_path, "sam", "rte", 0, expected)
    (d / "config.yaml").write_text(yaml.safe_dump({"task": "rte", "data_dir": "demo", "method": {"name": "sam"}}))
    run = load_results(tmp_path).runs[0]
    assert run.trivial("test") == pytest.approx(expected) and run.at_trivial("test")
    (d / "config.yaml").write_text(yaml.safe_dump({"task": "rte", "data_dir": str(tmp_path / "none")}))
    assert load_results(tmp_path).runs[0].trivial("test") is None  # no data at hand: unknown, not trivial


def test_metrics_trivial_is_a_constant_prediction():
    from sam_peft import metrics

    assert metrics.trivial("stsb", [1.0, 2.0, 5.0], [0.5, 3.0, 4.0]) == 0.0
    # MRPC: majority "1" in train; on [1, 1, 0, 1]: acc 0.75, F1 6/7.
    assert metrics.trivial("mrpc", [1, 1, 0], [1, 1, 0, 1]) == pytest.approx(100 * (0.75 + 6 / 7) / 2)
    assert metrics.trivial("rte", [0, 1], [1, 1, 0]) == pytest.approx(100 / 3)  # a tie: the smallest class id


def test_table_and_stats_warn_when_a_cell_mixes_machines_or_precisions(tmp_path, capsys):
    root = tmp_path / "runs"
    for seed, (device, precision) in enumerate([("Xeon", "bf16"), ("Xeon", "bf16"), ("EPYC", "fp32")]):
        write_run(root, "sam", "rte", seed, 70.0 + seed, extra={"machine": {"device": device}, "precision": precision})
    for seed in range(2):
        write_run(root, "full", "rte", seed, 70.0 + seed, extra={"machine": {"device": "Xeon"}, "precision": "fp32"})
    write_run(root, "full", "rte", 2, 73.0)  # an old run: unknown machine and precision
    assert cli.main(["table", str(root)]) == 0
    err = capsys.readouterr().err
    assert "SAM / rte mixes machines: 2 on Xeon, 1 on EPYC" in err
    assert "SAM / rte mixes precisions: 2 on bf16, 1 on fp32" in err
    assert "FullTuning / rte mixes machines: 2 on Xeon, 1 on unknown" in err
    assert cli.main(["stats", str(root)]) == 0
    assert "SAM / rte mixes precisions" in capsys.readouterr().err


def test_select_seeds_keeps_later_seeds_out_of_the_choice(tmp_path, capsys):
    """lr 0.001 wins on val over seeds 0-1; seeds 2-3 (added at that lr only) are worse on val, and
    would flip the choice if they chose; with --select-seeds 0-1 they only join the report."""
    runs = tmp_path / "runs"
    plan = []
    cells = {("0.001", 0): 80, ("0.001", 1): 82, ("0.01", 0): 79, ("0.01", 1): 80, ("0.001", 2): 60, ("0.001", 3): 62}
    for (lr, seed), val in cells.items():
        label = f"SAM lr={lr}"
        d = write_run(runs, "sam", "rte", seed, float(val) - 10, label=label, density=float(lr))
        result = json.loads((d / "result.json").read_text())
        result["metrics"]["val"]["major"] = val
        (d / "result.json").write_text(json.dumps(result))
        plan.append({"run_id": result["run_id"], "task": "rte", "method": "sam", "seed": seed, "label": label,
                     "row": "SAM", "grid": {"train.lr": float(lr)}})
    (runs / "sweep.json").write_text(json.dumps({"runs": plan}))
    assert cli.main(["table", str(runs), "--format", "csv", "--select-on", "val"]) == 0
    got = dict(zip(*list(csv.reader(io.StringIO(capsys.readouterr().out)))[:2]))
    assert float(got["RTE_n"]) == 2  # all four seeds chose: lr 0.01 (79.5 > 71.0)
    assert cli.main(["table", str(runs), "--format", "csv", "--select-on", "val", "--select-seeds", "0-1"]) == 0
    out = capsys.readouterr()
    got = dict(zip(*list(csv.reader(io.StringIO(out.out)))[:2]))
    assert float(got["RTE_n"]) == 4 and float(got["RTE_mean"]) == pytest.approx(61.0)  # lr 0.001, all 4 seeds
    assert "SAM / rte: lr=0.001 (mean val 81.00 over 2 runs" in out.err
    assert cli.main(["table", str(runs), "--select-seeds", "0-1"]) == 2
    assert "--select-seeds chooses among grid points" in capsys.readouterr().err
    assert cli.main(["stats", str(runs), "--select-on", "val", "--select-seeds", "0-x"]) == 2
    assert "--select-seeds '0-x'" in capsys.readouterr().err


def test_stats_warn_about_selections_filled_by_position(tmp_path, capsys):
    root = tmp_path / "runs"
    write_run(root, "sam", "rte", 0, 70.0, extra={"n_chosen_without_positive_score": 12, "n_positive_scores": 88})
    write_run(root, "sam", "rte", 1, 71.0, extra={"n_chosen_without_positive_score": 0, "n_positive_scores": 500})
    write_run(root, "full", "rte", 0, 72.0)
    assert cli.main(["stats", str(root)]) == 0
    captured = capsys.readouterr()
    assert "Selections that top-k filled by position" in captured.out
    assert "12 of its chosen entries had no positive score (88 eligible entries scored above 0)" in captured.out
    assert captured.err.count("top-k filled by position") == 1


def test_fig3b_per_task_leaves_out_trivial_cells_and_says_what_each_task_does(tmp_path, capsys):
    root = tmp_path / "runs"
    # cola: four informative cells, perfectly concordant (better mean, smaller std).
    for m, vals in {"full": [70, 72, 74], "bitfit": [60, 64, 68], "sam": [50, 56, 62], "random": [40, 48, 56]}.items():
        _trivial_runs(root, m, "cola", vals, 0.0)
    # mrpc: two informative cells and two stuck at the majority class (std 0, the best stability).
    for m, vals in {"full": [78, 80, 82], "bitfit": [75, 79, 83]}.items():
        _trivial_runs(root, m, "mrpc", vals, 74.8)
    for m in ("sam", "random"):
        _trivial_runs(root, m, "mrpc", [74.8] * 3, 74.8)
    assert cli.main(["plot", "stability", str(root), "-o", str(tmp_path / "f.png")]) == 0
    out = capsys.readouterr().out
    assert "over 6 (method, task) cells" in out and "left out: 2 cell(s)" in out
    assert "  CoLA: rho = 1.0000" in out and "  MRPC: rho = n/a" in out  # two cells: no rho
    assert re.search(r"without MRPC: pooled rho = 1\.0000 \(change [+-]\d", out)
    assert cli.main(["plot", "stability", str(root), "-o", str(tmp_path / "g.png"), "--keep-trivial"]) == 0
    kept = capsys.readouterr().out
    assert "over 8 (method, task) cells" in kept and "left out" not in kept
    # The stuck cells rank best on stability and worst on performance: they pull rho down.
    rho_kept = float(re.search(r"Spearman rho = (-?[\d.]+)", kept).group(1))
    rho = float(re.search(r"Spearman rho = (-?[\d.]+)", out).group(1))
    assert rho_kept < rho
