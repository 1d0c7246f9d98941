"""CUDA tests (marker `cuda`): they skip without a CUDA GPU. scripts/gpu_check.sh runs them on the
GPU machine (`python -m pytest -m cuda tests/test_cuda.py`); here they only have to collect.

- bf16 autocast is what `precision: auto` picks on the GPU, and every method trains under it: its
  training loss goes down, and nothing fails on a dtype;
- the plan's optimizer (SparseAdamW for chosen entries, AdamW for whole tensors, clipping) gives on
  CUDA what it gives on the CPU, within rtol 1e-5 / atol 1e-6, and entries outside the selection
  stay bit-identical to their start values;
- fused AdamW is what the engine builds on CUDA, and it matches the unfused AdamW within the same
  tolerance;
- a packed sweep (8 runs on the GPU at once) gives the same results as one run at a time (below);
- a run's peak memory is in result.json (peak_mem_bytes, kind cuda_max_allocated).

Tolerances. Each fp32 update of the optimizers rounds to the parameter's last bit in whatever
order its kernel computes; over 20 steps of lr 1e-3 on O(1) values the two paths stay within a
few ulps (about 1e-7), hence rtol 1e-5 and atol 1e-6.

Packed against one at a time. Both sweeps run every run in a worker process of its own with the
same seed, threads and data, so the only difference packing could make is through the GPU. CUDA
kernels that accumulate with atomics (the memory-efficient attention's backward, the embedding and
index backward passes) add in an order that varies from run to run, so two CUDA runs, packed or not,
need not be bitwise equal. The comparison is therefore in fp32, where that noise is about 1e-7
relative (in bf16 it would round to 4e-3 and need a tolerance that could hide a real difference):
the per-step training loss curves must agree within 1e-4 relative, the counts exactly. A CPU
simulation of the noise (every gradient perturbed by 1e-6 relative, every step) moved the 30-step
curves by at most 3e-7; another seed or batch order moves them by 1e-2 and more. How many runs were
bitwise identical is printed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch
from sam_peft.device import autocast_dtype
from sam_peft.engine import Trainer
from sam_peft.loader import build_config
from sam_peft.methods import build_method
from sam_peft.methods.base import TrainPlan
from sam_peft.model import TaskModel
from sam_peft.optim import PlanOptimizer, dense_adamw
from sam_peft.params import eligible_names
from sam_peft.run import run, seed_everything
from sam_peft.tasks import get_task

import util
from util import tiny_run, tiny_sweep

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)")]

ROOT = Path(__file__).resolve().parents[1]
RTOL, ATOL = 1e-5, 1e-6  # fp32 optimizer paths (module docstring)
PACKED_RTOL = 1e-4  # fp32 loss curves, packed against one at a time (module docstring)

# Every method, with burn-ins short enough for a 60-step run.
METHODS = [
    {"name": "full"}, {"name": "random", "density": 0.005}, {"name": "mixout", "p": 0.9}, {"name": "bitfit"},
    {"name": "magprune", "density": 0.005}, {"name": "adapter"}, {"name": "lora"},
    {"name": "diffprune", "density": 0.005, "burnin_steps": 10}, {"name": "childprune", "density": 0.005,
                                                                   "burnin_steps": 10},
    {"name": "sam", "density": 0.005, "burnin_steps": 10},
]


def train_tiny(device: str, method: dict, out: Path, precision: str = "auto", steps: int = 60) -> dict:
    """One run of the tiny model on the built-in RTE examples; result.json's content."""
    cfg = build_config(tiny_run("rte", method, out, {"max_steps": steps, "eval_every": 20, "patience": 100,
                                                     "min_steps": steps, "lr": 1e-3, "max_seq_len": 64,
                                                     "precision": precision, "log_every": 1, "checkpoint_every": 0},
                                seed=0, device=device))
    return run(cfg, progress=False, log=lambda *_: None)


def train_losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------ bf16 autocast


def test_precision_auto_is_bf16_autocast_on_this_gpu():
    assert torch.cuda.is_bf16_supported()
    assert autocast_dtype("auto", torch.device("cuda")) is torch.bfloat16


def check_trains(result: dict, out: Path) -> None:
    assert result["status"] == "done", result.get("reason")
    losses = train_losses(out / result["run_id"])
    assert losses and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first, f"{result['method']}: training loss did not go down ({first:.4f} -> {last:.4f})"
    assert result["n_changed"] <= result["n_trainable"]  # nothing outside the plan moved


@pytest.mark.parametrize("method", METHODS, ids=[m["name"] for m in METHODS])
def test_every_method_trains_under_bf16_autocast(method, tmp_path):
    result = train_tiny("cuda", method, tmp_path)
    assert result["device"].startswith("cuda")
    check_trains(result, tmp_path)


# ------------------------------------------------------------------------ the plan's optimizer


def optimizer_problem(seed: int = 0, steps: int = 20):
    """Parameters, a selection (5% of two tensors), one dense tensor, and every step's gradients
    (nonzero everywhere: the optimizer must ignore those outside the selection)."""
    g = torch.Generator().manual_seed(seed)
    params = {"w": torch.randn(64, 48, generator=g), "e": torch.randn(200, 16, generator=g),
              "b": torch.randn(48, generator=g)}
    sparse = {n: torch.randperm(params[n].numel(), generator=g)[: params[n].numel() // 20].sort().values
              for n in ("w", "e")}
    grads = [{n: torch.randn(p.shape, generator=g) * 0.5 for n, p in params.items()} for _ in range(steps)]
    lrs = [1e-3 * (1 - i / steps) for i in range(steps)]
    return params, sparse, grads, lrs


def run_plan_optimizer(device: str, params, sparse, grads, lrs) -> tuple[dict, PlanOptimizer]:
    p = {n: torch.nn.Parameter(t.clone().to(device)) for n, t in params.items()}
    opt = PlanOptimizer(p, dense=["b"], sparse=sparse, groups=[], no_decay={"b"}, lr=1e-3, weight_decay=0.01,
                        max_grad_norm=1.0, device_type=torch.device(device).type)
    for step_grads, lr in zip(grads, lrs):
        for n, t in step_grads.items():
            p[n].grad = t.to(device)
        opt.step(lr)
        opt.zero_grad()
    return {n: t.detach().cpu() for n, t in p.items()}, opt


def test_plan_optimizer_on_cuda_matches_the_cpu_and_leaves_unchosen_entries_bit_identical():
    params, sparse, grads, lrs = optimizer_problem()
    on_cpu, _ = run_plan_optimizer("cpu", params, sparse, grads, lrs)
    on_cuda, opt = run_plan_optimizer("cuda", params, sparse, grads, lrs)
    assert opt.sparse.exp_avg.is_cuda and opt.dense.defaults["fused"] is True
    for n in params:
        torch.testing.assert_close(on_cuda[n], on_cpu[n], rtol=RTOL, atol=ATOL, msg=lambda m: f"{n}: {m}")
    for n, idx in sparse.items():
        unchosen = torch.ones(params[n].numel(), dtype=torch.bool)
        unchosen[idx] = False
        assert torch.equal(on_cuda[n].reshape(-1)[unchosen], params[n].reshape(-1)[unchosen])
        assert not torch.equal(on_cuda[n].reshape(-1)[idx], params[n].reshape(-1)[idx])  # the chosen ones moved


# ------------------------------------------------------------------------------ fused AdamW


def test_the_engine_builds_fused_adamw_on_cuda():
    cfg = util.hand_config({"name": "full"})
    seed_everything(0)
    model = TaskModel(util.HandEncoder(), get_task("cb")).to("cuda")
    method = build_method(cfg.method)
    eligible = eligible_names(model)
    trainer = Trainer(cfg, model, method, util.synthetic_data("cb"), "cuda", eligible, progress=False)
    trainer.build_optimizers(TrainPlan(dense=eligible))
    assert trainer.optimizer.dense.defaults["fused"] is True
    assert math.isfinite(float(trainer.train_step()))


def test_fused_adamw_matches_the_unfused_one():
    params, _, grads, lrs = optimizer_problem(seed=1)
    results = {}
    for fused in (True, False):
        p = {n: torch.nn.Parameter(t.clone().cuda()) for n, t in params.items()}
        if fused:
            opt = dense_adamw([p["w"], p["e"]], [p["b"]], 1e-3, (0.9, 0.999), 1e-8, 0.01, "cuda")
        else:
            opt = torch.optim.AdamW([{"params": [p["w"], p["e"]], "weight_decay": 0.01},
                                     {"params": [p["b"]], "weight_decay": 0.0}],
                                    lr=1e-3, betas=(0.9, 0.999), eps=1e-8, foreach=False, fused=False)
        for step_grads, lr in zip(grads, lrs):
            for n, t in step_grads.items():
                p[n].grad = t.cuda()
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
        results[fused] = {n: t.detach().cpu() for n, t in p.items()}
    for n in params:
        torch.testing.assert_close(results[True][n], results[False][n], rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------- packed sweep, peak memory

PACKED_SWEEP = tiny_sweep(
    {"max_steps": 30, "eval_every": 10, "patience": 100, "min_steps": 30, "lr": 1e-3, "max_seq_len": 64,
     "precision": "fp32", "log_every": 1, "checkpoint_every": 0},
    device="cuda", threads=1, tasks=["rte", "stsb"], seeds=[0],
    methods=[{"name": "full"}, {"name": "sam", "density": 0.005, "burnin_steps": 5}, {"name": "lora"},
             {"name": "mixout", "p": 0.9}],
)  # 8 runs: a classification and a regression task; dense, sparse, added-module and Mixout's updates


def run_sweep(config: Path, out: Path, runs_per_gpu: int) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", "sam_peft.cli", "sweep", str(config), f"output_dir={out}",
                           "--runs-per-gpu", str(runs_per_gpu), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """The same 8-run sweep, packed 8 on the GPU and one run at a time: {mode: (runs dir, output)}."""
    import yaml

    base = tmp_path_factory.mktemp("packed")
    config = base / "sweep.yaml"
    config.write_text(yaml.safe_dump(PACKED_SWEEP))
    return {mode: (base / mode, run_sweep(config, base / mode, k)) for mode, k in (("packed", 8), ("one_at_a_time", 1))}


def run_records(runs: Path) -> dict:
    out = {}
    for d in sorted(p for p in runs.iterdir() if (p / "result.json").is_file()):
        out[d.name] = {"result": json.loads((d / "result.json").read_text()), "losses": train_losses(d),
                       "evals": [json.loads(x)["train_loss"] for x in (d / "metrics.jsonl").read_text().splitlines()],
                       "delta_sha256": hashlib.sha256((d / "delta.safetensors").read_bytes()).hexdigest()}
    return out


def max_concurrent(results) -> int:
    """The most runs whose [started_at, finished_at] (whole seconds) share an instant."""
    spans = [(datetime.fromisoformat(r["started_at"]), datetime.fromisoformat(r["finished_at"])) for r in results]
    return max(sum(s <= t <= f for s, f in spans) for t, _ in spans)


def test_packed_sweep_matches_one_run_at_a_time(sweeps):
    (packed_dir, packed_out), (single_dir, single_out) = sweeps["packed"], sweeps["one_at_a_time"]
    assert "up to 8 runs per GPU" in packed_out and "up to 1 runs per GPU" in single_out
    packed, single = run_records(packed_dir), run_records(single_dir)
    assert len(packed) == 8 and packed.keys() == single.keys()  # same run ids: same resolved configs
    bitwise = same_test = 0
    for rid in packed:
        a, b = packed[rid], single[rid]
        assert a["result"]["status"] == b["result"]["status"] == "done", rid
        for key in ("n_params", "n_trainable", "n_head", "steps", "burnin_steps", "scoring_steps"):
            assert a["result"][key] == b["result"][key], (rid, key)
        for name in ("losses", "evals"):
            assert len(a[name]) == len(b[name]) > 0, (rid, name)
            worst = max(abs(x - y) / max(1.0, abs(y)) for x, y in zip(a[name], b[name]))
            assert worst <= PACKED_RTOL, f"{rid}: {name} differ by {worst:.2e} relative"
        bitwise += a["losses"] == b["losses"] and a["delta_sha256"] == b["delta_sha256"]
        same_test += a["result"]["metrics"]["test"]["major"] == b["result"]["metrics"]["test"]["major"]
    print(f"\npacked vs one at a time: {len(packed)} runs within {PACKED_RTOL:g}; {bitwise} bitwise identical "
          f"(losses and delta); {same_test} with the same test score; at most "
          f"{max_concurrent([r['result'] for r in packed.values()])} packed runs ran at once")


def test_peak_memory_is_in_result_json(sweeps):
    total = torch.cuda.get_device_properties(0).total_memory
    for mode, (runs, _) in sweeps.items():
        for rid, rec in run_records(runs).items():
            r = rec["result"]
            assert r["peak_mem_kind"] == "cuda_max_allocated", (mode, rid)
            # at least the fp32 weights (the model is on the GPU), at most the card
            assert r["full_fp32_bytes"] <= r["peak_mem_bytes"] < total, (mode, rid)
