"""scripts/compare_precision.py: two results directories compared run by run (fp32 against bf16)."""

from pathlib import Path

import numpy as np
from scipy.stats import ttest_ind, ttest_rel

from util import load_script, write_run

ROOT = Path(__file__).resolve().parents[1]


def test_cells_are_matched_by_row_task_and_seed(tmp_path, capsys):
    script = load_script("compare_precision")
    fp32 = {0: 70.0, 1: 72.0, 2: 74.0}
    bf16 = {0: 70.5, 1: 71.0, 2: 74.0, 3: 99.0}  # seed 3 has no fp32 twin: left out
    for seed, v in fp32.items():
        write_run(tmp_path / "a", "sam", "rte", seed, v)
    write_run(tmp_path / "a", "full", "cb", 0, 50.0)  # only on one side: no row
    for seed, v in bf16.items():
        write_run(tmp_path / "b", "sam", "rte", seed, v)
    out = tmp_path / "cmp.md"
    assert script.main([str(tmp_path / "a"), str(tmp_path / "b"), "--names", "fp32", "bf16", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.read_text() == text
    rows = [line for line in text.splitlines() if line.startswith("| rte")]
    assert len(rows) == 1 and "| cb" not in text
    a, b = np.array([70.0, 72.0, 74.0]), np.array([70.5, 71.0, 74.0])
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[:5] == ["rte", "SAM", "0,1,2", f"{a.mean():.2f} ± {a.std(ddof=1):.2f}",
                         f"{b.mean():.2f} ± {b.std(ddof=1):.2f}"]
    assert cells[5:] == [f"{b.mean() - a.mean():+.2f}", "-1.00", f"{ttest_ind(a, b, equal_var=False).pvalue:.2f}",
                         f"{ttest_rel(a, b).pvalue:.2f}"]
    assert "3 pairs of runs" in text and "1 higher, 1 lower, 1 equal" in text


def test_no_common_run_is_an_error_exit_2(tmp_path, capsys):
    script = load_script("compare_precision")
    write_run(tmp_path / "a", "sam", "rte", 0, 70.0)
    write_run(tmp_path / "b", "sam", "cb", 0, 70.0)
    assert script.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["compare_precision: no (row, task, seed) is done in both results directories"]
    assert script.main([str(tmp_path / "a"), str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such results directory" in capsys.readouterr().err


def test_an_unwritable_output_is_one_line_exit_2_and_nothing_written(tmp_path, capsys):
    script = load_script("compare_precision")
    write_run(tmp_path / "a", "sam", "rte", 0, 70.0)
    write_run(tmp_path / "b", "sam", "rte", 0, 71.0)
    out = tmp_path / "no_such_folder" / "cmp.md"
    assert script.main([str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"compare_precision: {out}: cannot write")
    assert not out.parent.exists()
