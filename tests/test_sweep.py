"""Sweeps: expansion (counts, order, ids, labels, overrides), dry run, resume, failures, bad input,
and one real tiny sweep on the demo data followed by its table."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

import sam_peft.run
from sam_peft import cli
from sam_peft.config import config_dict
from sam_peft.errors import UserError
from sam_peft.identity import run_id
from sam_peft.methods import list_methods
from sam_peft.sweep_expand import load_sweep

import util
from util import tiny_run, tiny_sweep

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

BASE = tiny_sweep({"max_steps": 4, "eval_every": 2, "min_steps": 0, "max_seq_len": 64, "eval_batch_size": 64})


def write_sweep(tmp_path: Path, **keys) -> Path:
    return util.write_sweep(tmp_path / "sweep.yaml", tmp_path / "runs", BASE, **keys)


def grid_sweep(tmp_path: Path) -> Path:
    """2 methods x 2 tasks x 3 seeds x a grid of 2 = 24 runs."""
    return write_sweep(
        tmp_path,
        tasks=["rte", "cb"],
        seeds=3,
        methods=[{"name": "full", "train": {"lr": 2.0e-5}}, {"name": "sam", "density": 0.01, "burnin_steps": 2}],
        grid={"train.batch_size": [8, 16]},
    )


def test_expansion_count_order_ids_and_labels(tmp_path):
    sweep = load_sweep(grid_sweep(tmp_path))
    runs = sweep.runs
    assert len(runs) == 24
    # grid x methods x tasks x seeds: seeds vary fastest, the grid slowest
    key = [(r.cfg.train.batch_size, r.cfg.method["name"], r.cfg.task, r.cfg.seed) for r in runs]
    assert key[:4] == [(8, "full", "rte", 0), (8, "full", "rte", 1), (8, "full", "rte", 2), (8, "full", "cb", 0)]
    assert key[6] == (8, "sam", "rte", 0)
    assert key[12] == (16, "full", "rte", 0)
    assert key[-1] == (16, "sam", "cb", 2)
    # ids: config.run_id of the resolved config, unique, and the same on every load
    assert [r.run_id for r in runs] == [run_id(r.cfg) for r in runs]
    assert len({r.run_id for r in runs}) == 24
    assert [r.run_id for r in load_sweep(grid_sweep(tmp_path)).runs] == [r.run_id for r in runs]
    # the per-method learning rate lands in that method's runs only; the base protocol in all
    assert {r.cfg.train.lr for r in runs if r.cfg.method["name"] == "full"} == {2.0e-5}
    assert {r.cfg.train.lr for r in runs if r.cfg.method["name"] == "sam"} == {1.0e-4}
    assert {r.cfg.train.max_steps for r in runs} == {4}
    assert {r.cfg.method.get("density") for r in runs if r.cfg.method["name"] == "sam"} == {0.01}
    # labels: the paper's name plus the grid value, stored in the run config too
    assert runs[0].label == "FullTuning batch_size=8" == runs[0].cfg.label
    assert runs[-1].label == "SAM batch_size=16"
    assert runs[-1].grid == {"train.batch_size": 16}
    assert sweep.output_dir == tmp_path / "runs"


def test_seed_grid_keys_are_replicates_and_labels_can_be_given(tmp_path):
    path = write_sweep(tmp_path, tasks=["rte"], seeds=[0],
                       methods=[{"name": "bitfit", "label": "Bias only"}, "full"],
                       data={"drop_fraction": 0.1}, grid={"data.drop_seed": [0, 1, 2]})
    runs = load_sweep(path).runs
    assert len(runs) == 6
    assert [r.label for r in runs] == ["Bias only", "FullTuning"] * 3
    assert [r.cfg.data.drop_seed for r in runs] == [0, 0, 1, 1, 2, 2]
    assert {r.cfg.data.drop_fraction for r in runs} == {0.1}


def test_overrides_edit_the_sweep(tmp_path):
    path = grid_sweep(tmp_path)
    runs = load_sweep(path, ["seeds=1", "tasks=[cb]", "methods.sam.density=0.02", "grid.train.batch_size=[4]",
                             "train.max_steps=7", "methods.full.train.lr=0.003"]).runs
    assert [(r.cfg.method["name"], r.cfg.task, r.cfg.seed) for r in runs] == [("full", "cb", 0), ("sam", "cb", 0)]
    assert runs[0].cfg.train.lr == 0.003 and runs[1].cfg.train.lr == 1.0e-4
    assert runs[1].cfg.method["density"] == 0.02
    assert {r.cfg.train.batch_size for r in runs} == {4}
    assert {r.cfg.train.max_steps for r in runs} == {7}
    with pytest.raises(UserError, match="override 'methods.lora.r=4': no method entry named or labelled 'lora'"):
        load_sweep(path, ["methods.lora.r=4"])


def test_base_file_is_merged_and_its_run_keys_ignored(tmp_path):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(
        tiny_run("wsc", "full", train={"max_steps": 9, "lr": 0.5}, seed=5)))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": "run.yaml", "output_dir": str(tmp_path / "runs"), "tasks": ["cb"],
                                    "methods": ["bitfit"], "train": {"lr": 0.25}}))
    (run,) = load_sweep(path).runs
    assert (run.cfg.task, run.cfg.method["name"], run.cfg.seed) == ("cb", "bitfit", 0)
    assert (run.cfg.train.max_steps, run.cfg.train.lr) == (9, 0.25)


def test_dry_run_prints_the_runs_and_writes_nothing(tmp_path, capsys):
    assert cli.main(["sweep", str(grid_sweep(tmp_path)), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 25
    assert out[-1].startswith("24 runs (grid x methods x tasks x seeds): 0 done, 24 to run")
    assert "FullTuning batch_size=8" in out[0] and "[pending]" in out[0]
    assert not (tmp_path / "runs").exists()


def _fake_run(calls: list, fail_ids=(), error=RuntimeError):
    """Stands in for sam_peft.run.run: records the call and writes a finished result.json."""

    def fake(cfg, progress=True, force=False, log=print):
        rid = run_id(cfg)
        calls.append(rid)
        if rid in fail_ids:
            raise error("boom")
        run_dir = Path(cfg.output_dir) / rid
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config_dict(cfg)))
        result = {"run_id": rid, "task": cfg.task, "method": cfg.method["name"], "seed": cfg.seed,
                  "status": "done", "metrics": {s: {"major": 50.0 + cfg.seed} for s in ("val", "test", "train")}}
        (run_dir / "result.json").write_text(json.dumps(result))
        return result

    return fake


def small_sweep(tmp_path: Path) -> Path:
    return write_sweep(tmp_path, tasks=["rte"], seeds=2, methods=["bitfit", {"name": "sam", "burnin_steps": 2}])


def test_resume_skips_done_runs(tmp_path, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(sam_peft.run, "run", _fake_run(calls))
    path = small_sweep(tmp_path)
    assert cli.main(["sweep", str(path), "--no-progress"]) == 0
    assert len(calls) == 4
    plan = json.loads((tmp_path / "runs" / "sweep.json").read_text())
    assert [e["run_id"] for e in plan["runs"]] == calls
    assert plan["labels"] == ["BitFit", "SAM"] and plan["n_runs"] == 4

    calls.clear()
    assert cli.main(["sweep", str(path), "--no-progress"]) == 0
    assert calls == []  # everything done: nothing runs again
    (tmp_path / "runs" / plan["runs"][2]["run_id"] / "result.json").unlink()
    assert cli.main(["sweep", str(path), "--no-progress"]) == 0
    assert calls == [plan["runs"][2]["run_id"]]


@pytest.mark.parametrize("error", [RuntimeError, UserError])
def test_a_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys, error):
    ids = [r.run_id for r in load_sweep(small_sweep(tmp_path)).runs]
    calls: list[str] = []
    monkeypatch.setattr(sam_peft.run, "run", _fake_run(calls, fail_ids={ids[1]}, error=error))
    assert cli.main(["sweep", str(small_sweep(tmp_path)), "--no-progress"]) == 1
    assert calls == ids  # the runs after the failed one still ran
    failed = json.loads((tmp_path / "runs" / ids[1] / "result.json").read_text())
    assert failed["status"] == "failed" and failed["reason"] == f"{error.__name__}: boom"
    # a bug keeps its traceback, in a file; bad input does not need one
    error_log = tmp_path / "runs" / ids[1] / "error.log"
    assert error_log.is_file() == (error is RuntimeError)
    assert error is UserError or "Traceback" in error_log.read_text()
    captured = capsys.readouterr()
    assert "3 done now, 0 skipped (already done), 1 failed" in captured.out and f"failed {ids[1]}" in captured.out
    assert "Traceback" not in captured.out + captured.err
    # rerunning leaves the failed run alone (exit status 1: the sweep still has a failed run)...
    calls.clear()
    monkeypatch.setattr(sam_peft.run, "run", _fake_run(calls))
    assert cli.main(["sweep", str(small_sweep(tmp_path)), "--no-progress"]) == 1
    assert calls == []
    assert "1 failed earlier (not rerun; --retry-failed reruns them)" in capsys.readouterr().out
    # ...and --retry-failed reruns only that one
    assert cli.main(["sweep", str(small_sweep(tmp_path)), "--no-progress", "--retry-failed"]) == 0
    assert calls == [ids[1]]
    assert not error_log.exists()  # the earlier failure's traceback goes with it


def _error_of(argv, capsys) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    return err


@pytest.mark.parametrize("keys, message", [
    ({"taks": ["rte"]}, r"sweep.yaml:\d+: unknown sweep key 'taks' \(did you mean 'tasks'\?\)"),
    ({"seed": 3}, r"sweep.yaml:\d+: 'seed' is set per run by a sweep; use seeds"),
    ({"methods": ["bitfit", {"name": "samm"}]}, r"sweep.yaml:\d+: unknown method 'samm' \(did you mean 'sam'\?\)"),
    ({"methods": [{"name": "sam", "densty": 0.1}]}, r"sweep.yaml:\d+: unknown key 'method.densty' for method 'sam'"),
    ({"grid": {"method.density": [0.01, 2.0]}},
     r"sweep.yaml:\d+ \(grid method.density=2.0\): key 'method.density': .*less than 1"),
    ({"tasks": ["rte", "mnli"]}, r"sweep.yaml:\d+: .*mnli"),
    ({"seeds": 0}, r"sweep.yaml:\d+: seeds: a count must be at least 1"),
    ({"grid": {"output_dir": ["a", "b"]}}, r"sweep.yaml:\d+: grid: 'output_dir' cannot vary"),
    ({"methods": ["sam", {"name": "sam", "density": 0.01}]}, r"would share the table row 'SAM'; give one of them"),
])
def test_bad_sweeps_are_one_line_errors_and_write_nothing(tmp_path, capsys, keys, message):
    tree = {"tasks": ["rte"], "methods": ["sam"], **keys}
    err = _error_of(["sweep", str(write_sweep(tmp_path, **tree))], capsys)
    assert err.startswith("sam-peft: error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "runs").exists()


def test_missing_data_stops_the_sweep_before_any_run(tmp_path, capsys, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(sam_peft.run, "run", _fake_run(calls))
    path = write_sweep(tmp_path, tasks=["rte"], methods=["bitfit"], data_dir=str(tmp_path / "nodata"))
    assert "nodata: no such directory" in _error_of(["sweep", str(path)], capsys)
    assert calls == [] and not (tmp_path / "runs").exists()


PAPER_SWEEPS = [("table1.yaml", 1610), ("table2.yaml", 1610), ("sparsity.yaml", 700), ("projection.yaml", 1),
                ("demo.yaml", 210), ("standin.yaml", 165), ("standin_sparsity.yaml", 15),
                ("standin_table2.yaml", 25), ("gpu_study.yaml", 210), ("table1_authors.yaml", 1120),
                ("table2_authors.yaml", 1120), ("lr_study.yaml", 95), ("demo_lr_grid.yaml", 32)]
RUN_CONFIGS = ["demo_run.yaml", "paper.yaml"]


def test_every_shipped_config_is_checked_here():
    """A config added to configs/ must be added to one of the lists below, so that it is validated."""
    shipped = {p.name for p in CONFIGS.glob("*.yaml")}
    assert shipped == {name for name, _ in PAPER_SWEEPS} | set(RUN_CONFIGS)


@pytest.mark.parametrize("name", RUN_CONFIGS)
def test_shipped_run_configs_validate(name):
    from sam_peft.loader import load_config
    cfg = load_config(CONFIGS / name)
    assert cfg.method["name"] and cfg.task


@pytest.mark.skipif(
    not {"mixout", "adapter", "lora", "diffprune", "childprune"} <= set(list_methods()),
    reason="the paper's sweeps need all ten methods registered",
)
@pytest.mark.parametrize("name, count", PAPER_SWEEPS)
def test_paper_sweeps_expand(name, count, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # their output_dir is relative; a dry run must not touch it anyway
    # Run ids identify the data by content, so the plan needs data: the built-in data has every
    # task in the same layout (a stand-in for the data the config names).
    assert cli.main(["sweep", str(CONFIGS / name), "data_dir=demo", "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"{count} runs ")
    assert not (tmp_path / "results").exists()


def test_tiny_sweep_end_to_end_then_table(tmp_path, capsys):
    """A real sweep (tiny model, demo data, a few steps): 2 methods x 1 task x 2 seeds, then the table."""
    path = small_sweep(tmp_path)
    assert cli.main(["sweep", str(path), "--no-progress"]) == 0
    runs = tmp_path / "runs"
    results = [json.loads(p.read_text()) for p in sorted(runs.glob("*/result.json"))]
    assert len(results) == 4 and {r["status"] for r in results} == {"done"}
    capsys.readouterr()
    assert cli.main(["table", str(runs), "--format", "csv"]) == 0
    rows = {line.split(",")[0]: line.split(",") for line in capsys.readouterr().out.splitlines()[1:]}
    assert list(rows) == ["BitFit", "SAM"]
    for label, method in (("BitFit", "bitfit"), ("SAM", "sam")):
        tests = [r["metrics"]["test"]["major"] for r in results if r["method"] == method]
        assert float(rows[label][1]) == pytest.approx(sum(tests) / 2)
        assert rows[label][3] == "2" and rows[label][4] == "2"  # n and planned


def test_a_method_entry_grid_multiplies_that_entry_only(tmp_path):
    path = write_sweep(tmp_path, tasks=["rte"], seeds=2, methods=[
        {"name": "full"},
        {"name": "sam", "density": 0.01, "grid": {"method.burnin_steps": [2, 3]}},
        {"name": "sam", "label": "SAM (per-tensor)", "topk": "per_tensor", "grid": {"method": {"burnin_steps": [2]}}},
    ])
    sweep = load_sweep(path)
    rows = [(r.label, r.row, r.cfg.method.get("burnin_steps")) for r in sweep.runs if r.cfg.seed == 0]
    assert rows == [("FullTuning", "FullTuning", None), ("SAM burnin_steps=2", "SAM", 2),
                    ("SAM burnin_steps=3", "SAM", 3), ("SAM (per-tensor) burnin_steps=2", "SAM (per-tensor)", 2)]
    assert all("grid" not in r.cfg.method for r in sweep.runs)
    # A command-line override reaches an entry's grid (nested form), for quick trials.
    small = load_sweep(path, ["methods.sam.grid.method.burnin_steps=[5]"])
    assert {r.cfg.method.get("burnin_steps") for r in small.runs if r.cfg.method["name"] == "sam"} == {5}


def test_every_shipped_config_says_which_batching_it_uses():
    for path in CONFIGS.glob("*.yaml"):
        assert re.search(r"^\s*group_by_length: (true|false)", path.read_text(), re.M), path.name


def test_a_grid_over_a_method_option_leaves_out_methods_without_it(tmp_path, capsys):
    """docs/sweeps.md's `grid.method.density=[0.01]` on the demo sweep: methods without a density run once,
    unlabelled by it, with a notice; a key no method has stays an error."""
    path = write_sweep(tmp_path, tasks=["rte"], methods=["full", {"name": "sam", "burnin_steps": 2}, "bitfit"])
    sweep = load_sweep(path, ["grid.method.density=[0.01, 0.02]"])
    assert [(r.label, r.cfg.method.get("density")) for r in sweep.runs] == [
        ("FullTuning", None), ("SAM density=0.01", 0.01), ("BitFit", None), ("SAM density=0.02", 0.02)]
    assert sweep.notices == ["grid method.density: full, bitfit have no option 'density'; their runs do not vary it"]
    assert cli.main(["sweep", str(path), "grid.method.density=[0.01]", "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert "sam-peft: note: grid method.density: full, bitfit have no option 'density'" in captured.err
    assert captured.out.splitlines()[-1].startswith("3 runs ")
    with pytest.raises(UserError, match="unknown key 'method.densty'"):
        load_sweep(path, ["grid.method.densty=[0.01]"])


def test_the_readme_override_example_holds_on_the_demo_sweep(capsys):
    assert cli.main(["sweep", str(CONFIGS / "demo.yaml"), "grid.method.density=[0.01]", "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("210 runs ")
