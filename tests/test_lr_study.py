"""scripts/lr_study.py on a fabricated phase 1: the choice waits for every run, is each row's best
mean val over seeds 0-4, becomes a phase-2 sweep of seeds 5-9 at that lr, and stands once made;
the report writes its files."""

from __future__ import annotations

import json
from pathlib import Path


from sam_peft.sweep_expand import load_sweep

from util import load_script

ROOT = Path(__file__).resolve().parents[1]


def _script():
    return load_script("lr_study")


def _score(row: str, lr: float, seed: int) -> tuple[float, float]:
    """(val, test): each row peaks at its own lr; seeds add a little spread."""
    best = {"FullTuning": 1e-4, "Random": 1.5e-2, "MagPruning": 5e-3, "SAM": 5e-3, "SAM (per-tensor)": 1.5e-3}[row]
    import math

    val = 80 - 5 * abs(math.log10(lr / best)) + 0.3 * seed
    return val, val - 2 + 0.1 * seed


def fabricate(plan_runs, root: Path, seeds=None) -> None:
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for r in plan_runs:
        if seeds is not None and r.cfg.seed not in seeds:
            continue
        d = root / r.run_id
        d.mkdir()
        val, test = _score(r.row, r.cfg.train.lr, r.cfg.seed)
        result = {"run_id": r.run_id, "task": "stsb", "method": r.cfg.method["name"], "seed": r.cfg.seed,
                  "status": "done", "best_step": 550, "steps": 600,
                  "metrics": {"val": {"major": val}, "test": {"major": test}, "train": {"major": 90.0}},
                  "trivial": {"val": 0.0, "test": 0.0, "train": 0.0}}
        if r.row != "FullTuning":  # a sparse row: 1,000 of the pooler's 4,000 entries, 40% of its own
            result["mask_share"] = {"groups": {
                "pooler": {"chosen": 1000, "total": 4000, "share_of_chosen": 0.4, "density": 0.25},
                "ffn": {"chosen": 1500, "total": 300000, "share_of_chosen": 0.6, "density": 0.005}}}
        (d / "result.json").write_text(json.dumps(result))
        entries.append(r.record())
    (root / "sweep.json").write_text(json.dumps({"runs": entries}))


def test_choose_then_confirm_then_report(tmp_path, capsys):
    lr_study = _script()
    out = tmp_path / "study"
    (out).mkdir()
    (out / "contrasts.yaml").write_text((ROOT / "results/lr_study/contrasts.yaml").read_text())
    phase1 = load_sweep(ROOT / "configs/lr_study.yaml", ["data_dir=demo"]).runs
    assert len(phase1) == 95
    fabricate(phase1, out / "runs" / "tune", seeds={0, 1, 2, 3})
    assert lr_study.main(["choose", str(out)]) == 1  # seed 4 is missing: no choice yet
    assert "76 of 95 runs done" in capsys.readouterr().err
    assert not (out / "confirm.yaml").exists()

    import shutil

    shutil.rmtree(out / "runs" / "tune")
    fabricate(phase1, out / "runs" / "tune")
    assert lr_study.main(["choose", str(out)]) == 0  # tmp_path is no git checkout: nothing to commit
    confirm = out / "confirm.yaml"
    text = confirm.read_text()
    assert "#   SAM: lr=0.005" in text and "#   FullTuning: lr=0.0001" in text and "#   Random: lr=0.015" in text
    phase2 = load_sweep(confirm, ["data_dir=demo"]).runs
    assert len(phase2) == 25 and {r.cfg.seed for r in phase2} == {5, 6, 7, 8, 9}
    labels = {r.row: r.label for r in phase2}
    assert labels == {"FullTuning": "FullTuning lr=0.0001", "Random": "Random lr=0.015",
                      "MagPruning": "MagPruning lr=0.005", "SAM": "SAM lr=0.005",
                      "SAM (per-tensor)": "SAM (per-tensor) lr=0.0015"}
    # The phase-2 runs are the phase-1 cells' configs with other seeds: the same labels and rows.
    tune_labels = {r.label for r in phase1}
    assert set(labels.values()) <= tune_labels
    assert lr_study.main(["choose", str(out)]) == 0 and "the choice stands" in capsys.readouterr().out

    fabricate(phase2, out / "runs" / "confirm")
    assert lr_study.main(["report", str(out)]) == 0
    for name in ("table.md", "table_grid.md", "stats.md", "stability.md", "by_lr.md", "by_lr.png", "convergence.md"):
        assert (out / name).is_file(), name
    stats = (out / "stats.md").read_text()
    assert "Pre-registered contrasts" in stats and "| SAM | Random | 10/10 |" in stats
    assert "| SAM (per-tensor) | Random | 10/10 |" in stats and "| SAM | FullTuning | 10/10 |" in stats
    by_lr = (out / "by_lr.md").read_text()
    assert by_lr.count("| SAM lr=") == 4 and "### learning rate 0.0005" in by_lr
    convergence = (out / "convergence.md").read_text()
    assert "| SAM | 10 | 550 |" in convergence
    # Each row's val at every grid lr, its choice, and whether that sits at an end of the grid.
    val = {lr: _score("Random", lr, 0)[0] for lr in (5e-4, 1.5e-3, 5e-3, 1.5e-2)}
    assert f"| Random | 0.0005: {val[5e-4] + 0.6:.2f} (5)," in convergence and "| 0.015 | yes |" in convergence
    assert "| SAM (per-tensor) | " in convergence and "| 0.0015 | no |" in convergence
    assert "| SAM | 10 | 1,000 | 25.0% | 40.0% |" in convergence  # the pooler's part
    assert "| FullTuning | 10 | 1," not in convergence  # FullTuning trains whole tensors: no row

    # A different phase 1 later must not overwrite the committed choice.
    confirm.write_text(text.replace("- 0.005", "- 0.0005", 1))
    assert lr_study.main(["choose", str(out)]) == 2
    assert "the committed choice stands" in capsys.readouterr().err


def test_choose_waits_for_the_choice_to_be_committed(tmp_path, capsys):
    import subprocess

    lr_study = _script()
    out = tmp_path / "study"
    fabricate(load_sweep(ROOT / "configs/lr_study.yaml", ["data_dir=demo"]).runs, out / "runs" / "tune")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    assert lr_study.main(["choose", str(out)]) == 3
    assert "commit" in capsys.readouterr().err
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["add", "study/confirm.yaml"], check=True)
    subprocess.run(git + ["commit", "-qm", "the choice"], check=True)
    assert lr_study.main(["choose", str(out)]) == 0
