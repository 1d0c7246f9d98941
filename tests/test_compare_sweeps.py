"""scripts/compare_sweeps.py: the check that a refactor left every run of a sweep as it was."""

import json
import shutil

from safetensors.torch import load_file, save_file

from sam_peft.loader import build_config
from sam_peft.run import run
from util import load_script, tiny_run


def test_identical_runs_pass_and_each_kind_of_change_is_caught(tmp_path, capsys):
    compare = load_script("compare_sweeps")
    cfg = build_config(tiny_run(method={"name": "sam", "density": 0.01, "burnin_steps": 2}, output_dir=tmp_path / "a",
                                train={"max_steps": 4, "eval_every": 2, "batch_size": 8, "max_seq_len": 32}))
    result = run(cfg, progress=False, log=lambda *a: None)
    run_a = tmp_path / "a" / result["run_id"]
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    run_b = tmp_path / "b" / result["run_id"]
    record = json.loads((run_b / "result.json").read_text())
    record["wall_time_s"] += 1.0  # a process fact, not the computation's
    (run_b / "result.json").write_text(json.dumps(record))
    assert compare.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "1 runs in both, 0 in one only, 0 differences" in capsys.readouterr().out

    record["n_changed"] += 1
    (run_b / "result.json").write_text(json.dumps(record))
    with open(run_b / "train_log.jsonl", "a") as f:
        f.write('{"step": 99}\n')
    tensors = load_file(str(run_a / "delta.safetensors"))
    name = next(iter(tensors))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1
    save_file(tensors, str(run_b / "delta.safetensors"))
    assert compare.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    out = capsys.readouterr().out
    assert "result.json n_changed" in out and "train_log.jsonl differs" in out and "delta tensors differ" in out
    shutil.rmtree(run_b)
    assert compare.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    assert "only in" in capsys.readouterr().out
