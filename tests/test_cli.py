"""The CLI verbs that other test files do not drive: data prepare, list, eval output."""

import json
from pathlib import Path

import pytest

from sam_peft.cli import main
from util import PAPER_SPLITS, SPLITS_MISSING


@pytest.mark.skipif(not PAPER_SPLITS.is_dir(), reason=SPLITS_MISSING)
def test_data_prepare_from_a_local_mirror(tmp_path, capsys):
    out = tmp_path / "data"
    code = main(["data", "prepare", "--out", str(out), "--tasks", "cb", "copa", "--base-url", str(PAPER_SPLITS),
                 "--no-progress"])
    assert code == 0 and "data ready" in capsys.readouterr().out
    for split in ("train", "val", "test"):
        assert (out / "data" / "cb" / f"{split}.jsonl").read_bytes() == \
            (PAPER_SPLITS / "data" / "cb" / f"{split}.jsonl").read_bytes()
    assert json.loads((out / "configs" / "copa_config.json").read_text())["task"] == "copa"


def test_data_prepare_bad_source_url(tmp_path, capsys):
    code = main(["data", "prepare", "--out", str(tmp_path / "d"), "--tasks", "cb", "--base-url",
                 "http://127.0.0.1:9/", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "127.0.0.1" in err


def test_list_methods_and_tasks(capsys):
    assert main(["list", "methods"]) == 0
    out = capsys.readouterr().out
    for name in ("full", "random", "mixout", "bitfit", "magprune", "adapter", "lora", "diffprune", "childprune", "sam"):
        assert name in out
    assert main(["list", "tasks"]) == 0
    out = capsys.readouterr().out
    assert all(t in out for t in ("cola", "stsb", "mrpc", "rte", "cb", "copa", "wsc"))


def test_run_then_eval_prints_identical(tmp_path, capsys):
    config = Path(__file__).resolve().parents[1] / "configs" / "demo_run.yaml"
    code = main(["run", str(config), f"output_dir={tmp_path}", "train.max_steps=30",
                 "train.min_steps=0", "method.burnin_steps=5", "--no-progress"])
    assert code == 0
    run_dir = next(tmp_path.iterdir())
    capsys.readouterr()
    assert main(["eval", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "identical" in out and '"major"' in out
