"""Whole runs on the built-in demo data with the tiny model: outputs, counts, delta round trip,
determinism."""

import json

import pytest
import torch
from safetensors import safe_open

from sam_peft import delta as delta_lib
from sam_peft.loader import build_config
from sam_peft.run import build, evaluate_run, run
from util import tiny_run

FAST = {"max_steps": 24, "eval_every": 8, "patience": 2, "min_steps": 0, "max_seq_len": 64, "lr": 5e-3,
        "log_every": 4}


def demo_cfg(tmp_path, task="rte", method=None, seed=0, **train):
    return build_config(tiny_run(task, method or {"name": "sam", "density": 0.01, "burnin_steps": 4},
                                 tmp_path / "runs", {**FAST, **train}, seed=seed))


METHODS = [
    {"name": "full"},
    {"name": "random", "density": 0.01},
    {"name": "bitfit"},
    {"name": "magprune", "density": 0.01},
    {"name": "sam", "density": 0.01, "burnin_steps": 4},
]


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m["name"])
def test_run_outputs_counts_and_delta_round_trip(tmp_path, method):
    cfg = demo_cfg(tmp_path, method=method)
    result = run(cfg, progress=False, log=lambda *a: None)
    run_dir = tmp_path / "runs" / result["run_id"]
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "config.yaml", "delta.safetensors", "metrics.jsonl", "result.json", "train_log.jsonl"]
    saved = json.loads((run_dir / "result.json").read_text())
    assert saved == json.loads(json.dumps(result))
    for key in ("task", "method", "seed", "status", "metrics", "n_params", "n_trainable", "n_changed", "steps",
                "best_step", "wall_time_s"):
        assert key in saved
    assert saved["status"] == "done"
    assert all("major" in saved["metrics"][s] for s in ("val", "test", "train"))
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first_eval = (saved["burnin_steps"] // 8 + 1) * 8  # evaluations start after the burn-in
    assert [r["step"] for r in lines] == list(range(first_eval, saved["steps"] + 1, 8))
    assert all({"step", "train_loss", "lr", "val"} <= set(r) for r in lines)

    # exact counts, recomputed from a fresh base model and the delta file
    fresh = build(cfg)
    theta0 = {n: p.detach().clone() for n, p in fresh.model.named_parameters() if n in fresh.eligible}
    m = sum(t.numel() for t in theta0.values())
    assert saved["n_params"] == m
    n_bias = sum(t.numel() for n, t in theta0.items() if n.endswith(".bias"))
    k = int(0.01 * m)
    expected_trainable = {"full": m, "random": k, "bitfit": n_bias, "magprune": k, "sam": k}[method["name"]]
    assert saved["n_trainable"] == expected_trainable
    assert saved["n_head"] == sum(p.numel() for n, p in fresh.model.named_parameters() if n.startswith("head."))
    assert 0 < saved["n_changed"] <= saved["n_trainable"]

    with safe_open(str(run_dir / "delta.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
        n_in_delta = 0
        for key in keys:
            if key.endswith("::index"):
                n_in_delta += f.get_tensor(key).numel()
            elif "::" not in key and key.startswith("encoder."):
                n_in_delta += int((f.get_tensor(key) != theta0[key]).sum())
    assert meta["base_model"] == "tiny" and meta["format"] == delta_lib.FORMAT
    assert n_in_delta == saved["n_changed"]  # the delta holds exactly the changed entries
    assert {k.split("::")[0] for k in keys if k.startswith("head.")} == {
        n for n, _ in fresh.model.named_parameters() if n.startswith("head.")}

    # rebuilt from base + delta: the same test metrics, to the last bit
    metrics, res = evaluate_run(run_dir)
    assert metrics == saved["metrics"]["test"]


def test_same_config_and_seed_give_identical_results(tmp_path):
    a = run(demo_cfg(tmp_path / "a", task="cb"), progress=False, log=lambda *a: None)
    b = run(demo_cfg(tmp_path / "b", task="cb"), progress=False, log=lambda *a: None)
    assert a["metrics"] == b["metrics"] and a["run_id"] == b["run_id"]
    deltas = []
    for d, r in (("a", a), ("b", b)):
        with safe_open(str(tmp_path / d / "runs" / r["run_id"] / "delta.safetensors"), framework="pt") as f:
            deltas.append({k: f.get_tensor(k) for k in f.keys()})
    assert deltas[0].keys() == deltas[1].keys()
    assert all(torch.equal(deltas[0][k], deltas[1][k]) for k in deltas[0])
    c = run(demo_cfg(tmp_path / "c", task="cb", seed=1), progress=False, log=lambda *a: None)
    assert c["run_id"] != a["run_id"]


def test_finished_run_is_not_repeated(tmp_path):
    cfg = demo_cfg(tmp_path, method={"name": "bitfit"})
    first = run(cfg, progress=False, log=lambda *a: None)
    said = []
    again = run(cfg, progress=False, log=said.append)
    assert again == json.loads(json.dumps(first)) and "already done" in said[0]


def test_delta_fixes_inexact_differences(tmp_path):
    # theta0 = 1.0 and theta = 1e-10: theta - theta0 rounds, so theta0 + delta != theta in fp32
    model = torch.nn.Linear(4, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    theta0 = {"weight": model.weight.detach().clone()}
    with torch.no_grad():
        model.weight[0, 0] = 1e-10
        model.weight[0, 1] = 2.5
    tensors, counts = delta_lib.build(model, theta0, {"weight", "bias"})
    assert counts["n_changed"] == 2 and "weight::fix_index" in tensors
    path = tmp_path / "d.safetensors"
    delta_lib.save(path, tensors, {"base_model": "x"})
    fresh = torch.nn.Linear(4, 1)
    with torch.no_grad():
        fresh.weight.copy_(theta0["weight"])
    delta_lib.apply(fresh, path, check_base=False)
    assert torch.equal(fresh.weight, model.weight)


def test_delta_rejects_other_base_and_bad_files(tmp_path):
    from sam_peft.errors import UserError

    cfg = demo_cfg(tmp_path, method={"name": "random", "density": 0.01})
    result = run(cfg, progress=False, log=lambda *a: None)
    path = tmp_path / "runs" / result["run_id"] / "delta.safetensors"
    other = build(demo_cfg(tmp_path, task="cb", method={"name": "random", "density": 0.01}))
    with pytest.raises(UserError, match="different tokenizer"):
        delta_lib.apply(other.model, path, tokenizer=other.tokenizer)
    with pytest.raises(UserError, match="shape"):
        delta_lib.apply(other.model, path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a readable safetensors"):
        delta_lib.apply(other.model, bad)


def test_a_delta_file_is_the_same_bytes_whatever_the_metadata_order(tmp_path):
    # safetensors writes its header from a hash map: the key order, and so the file's bytes and
    # size (result.json's delta_bytes), changed from one process to the next.
    import torch

    from sam_peft import delta as delta_lib

    tensors = {"w::index": torch.arange(4, dtype=torch.int32), "head.weight": torch.ones(2, 3),
               "w::delta": torch.full((4,), 0.5)}
    meta = {"base_model": "tiny", "task": "cb", "run_id": "r", "eligible": ["w"], "config": {"seed": 1}}
    sizes = [delta_lib.save(tmp_path / "a.safetensors", tensors, meta),
             delta_lib.save(tmp_path / "b.safetensors", dict(reversed(list(tensors.items()))),
                            dict(reversed(list(meta.items()))))]
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert sizes[0] == sizes[1]
    assert delta_lib.read_metadata(tmp_path / "a.safetensors")["run_id"] == "r"
