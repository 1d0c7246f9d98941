"""One tiny end-to-end run per method (mixout, adapter, lora, diffprune, childprune) on the
built-in demo data: exact counts in result.json, a delta that holds exactly what the method
trained, masked entries bit-identical to theta0, and `evaluate_run` reproducing the test
metrics from base + wrap + delta."""

import math

import pytest
import torch
from safetensors import safe_open

from sam_peft import delta as delta_lib
from sam_peft import run as run_lib
from sam_peft.loader import build_config
from sam_peft.methods.adapter import adapter_param_names
from sam_peft.params import head_names, in_numbered_layer, layernorm_names
from sam_peft.selection import budget
from util import tiny_run

TRAIN = {"batch_size": 8, "eval_batch_size": 32, "max_steps": 10, "eval_every": 5, "min_steps": 0,
         "patience": 10, "max_seq_len": 40, "lr": 1e-3, "log_every": 0, "warmup": 0.0}

METHODS = [
    {"name": "mixout"},
    {"name": "mixout", "mode": "eval_reset", "p": 0.5},
    {"name": "adapter"},
    {"name": "adapter", "config": "houlsby", "train_layernorm": True, "reduction": 8},
    {"name": "lora"},
    {"name": "lora", "b_init": "kaiming", "train_head": False, "r": 2, "targets": ["query", "value"]},
    {"name": "diffprune", "density": 0.01, "burnin_steps": 4},
    {"name": "diffprune", "density": 0.01, "burnin_steps": 3, "remask_every": 3, "project_by": "alpha",
     "topk": "per_tensor"},
    {"name": "childprune", "density": 0.01, "burnin_steps": 4, "topk": "per_tensor"},
    {"name": "childprune", "density": 0.01, "variant": "fisher"},
]


def delta_tensors(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("method", METHODS, ids=lambda m: "-".join(str(v) for v in m.values()))
def test_one_run(method, tmp_path):
    task = "cb" if method["name"] in ("adapter", "childprune") else "rte"
    cfg = build_config(tiny_run(task, method, tmp_path, TRAIN, seed=1))
    result = run_lib.run(cfg, progress=False, log=lambda *_: None)
    run_dir = tmp_path / result["run_id"]
    assert result["status"] == "done"

    # A fresh build is base + wrap: theta0 and the added modules' names, untouched by training.
    fresh = run_lib.build(cfg, splits=("train", "test"))
    params0 = {n: p.detach().clone() for n, p in fresh.model.named_parameters()}
    theta0 = {n: params0[n] for n in fresh.eligible}
    heads = set(head_names(fresh.model))
    m = sum(t.numel() for t in theta0.values())
    n_head = sum(params0[n].numel() for n in heads)
    assert result["n_params"] == m
    assert result["n_head"] == (0 if method.get("train_head") is False else n_head)

    tensors = delta_tensors(run_dir / "delta.safetensors")
    whole = {k for k in tensors if "::" not in k}
    sparse = {k.split("::")[0] for k in tensors if "::" in k}

    # The rebuilt model: base + wrap + delta, as `sam-peft eval` builds it.
    delta_lib.apply(fresh.model, run_dir / "delta.safetensors")
    params1 = dict(fresh.model.named_parameters())
    # Entries of the trained model (= the rebuilt one) that differ from theta0 of a fresh build:
    # for the sparse methods at most k of them, so every masked entry is theta0 bit for bit.
    changed = {n: int((params1[n] != theta0[n]).sum()) for n in theta0}
    assert result["n_changed"] == sum(changed.values())

    name = method["name"]
    if name in ("adapter", "lora"):
        if name == "adapter":
            added = adapter_param_names(fresh.model)
            norms = [n for n in fresh.eligible if n in layernorm_names(fresh.model)]
            norms = norms if method.get("train_layernorm") else []
        else:
            added = [n for n in params0 if n.endswith((".lora_A", ".lora_B"))]
            norms = []
        assert added
        n_added = sum(params0[n].numel() for n in added)
        n_norm = sum(params0[n].numel() for n in norms)
        assert result["n_added"] == n_added
        assert result["n_trainable"] == n_added + n_norm
        assert whole | sparse == set(added) | heads | set(norms)  # adapters/LoRA whole, nothing else
        assert all(torch.equal(params1[n], tensors[n]) for n in added)
        assert set(n for n, c in changed.items() if c) <= set(norms)
        if not norms:
            assert result["n_changed"] == 0
        if name == "lora":
            r, targets = method.get("r", 8), method.get("targets")
            per_layer = {"query": 64 + 64, "key": 64 + 64, "value": 64 + 64, "attention.output.dense": 64 + 64,
                         "intermediate.dense": 64 + 128, "output.dense": 128 + 64}
            chosen = targets or list(per_layer)
            assert n_added == 2 * r * sum(per_layer[t] for t in chosen)  # tiny: 2 layers, hidden 64, ffn 128
        if method.get("train_head") is False:  # the authors' accidental frozen head
            assert all(torch.equal(params1[n], params0[n]) for n in heads)
    elif name == "mixout":
        assert result["n_added"] == 0 and result["n_trainable"] == m
        assert result["n_changed"] > m // 2  # dense training moved most entries
    else:
        scored = m
        if method.get("variant") == "fisher":  # ChildTuning-D scores the transformer layers only
            scored = sum(t.numel() for n, t in theta0.items() if in_numbered_layer(n))
            assert 0 < scored < m
        k = budget(method["density"], scored)
        assert result["n_added"] == 0
        assert result["n_trainable"] == k
        assert 0 < result["n_changed"] <= k
        # The head, and pretrained tensors (as indices + deltas, or whole where more than half
        # changed): no gate or other added tensor.
        assert heads <= whole and (whole | sparse) - heads <= set(theta0)
        n_stored = sum(tensors[f"{n}::index"].numel() for n in sparse) + sum(changed[n] for n in whole - heads)
        assert n_stored == result["n_changed"]
        if name == "diffprune":
            rep = result["method_report"]
            b, every = method["burnin_steps"], method.get("remask_every")
            expect = [b] + (list(range(b + every, TRAIN["max_steps"] + 1, every)) if every else [])
            assert rep["projections"] == expect and rep["k"] == k
        if method.get("variant") == "fisher":
            n_train = len(fresh.data.features["train"])
            # One pass of scoring batches, not training steps: all max_steps still train.
            assert result["scoring_steps"] == math.ceil(n_train / TRAIN["batch_size"])
            assert result["burnin_steps"] == 0 and result["training_steps"] == TRAIN["max_steps"]
            assert result["mask_share"]["groups"]["embeddings"]["chosen"] == 0
        share = result["mask_share"]
        assert sum(g["chosen"] for g in share["groups"].values()) == k
        assert sum(g["total"] for g in share["groups"].values()) == m
        assert sum(g["share_of_chosen"] for g in share["groups"].values()) == pytest.approx(1.0, abs=1e-5)

    metrics, saved = run_lib.evaluate_run(run_dir)
    assert metrics == result["metrics"]["test"] == saved["metrics"]["test"]
