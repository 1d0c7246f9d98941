#!/usr/bin/env python
"""Benchmark training steps of every method against a naive baseline, in one process.

    python scripts/bench.py --device cpu --shape small --out results/bench/cpu_small.json
    python scripts/bench.py --device cuda --shape roberta-base --out results/bench/h100.json [--runs-per-gpu 4]

The model is built from a config with random weights (no download): throughput does not
depend on the weights. Batches are synthetic token sequences whose lengths follow a fixed,
seeded distribution resembling GLUE/SuperGLUE pairs (median ~60 tokens, long tail to 256).

For every method the same training step is timed twice:
- sam-peft's engine: bf16 autocast on a GPU that has it (`precision: auto`; on a CPU fp32), dynamic padding of
  length-grouped batches, fused AdamW on GPU, whole frozen tensors without weight gradients,
  optimizer state for the chosen entries only;
- the naive baseline (the authors' setup): fp32, every batch padded to 256 tokens, every
  parameter requiring gradients and a dense AdamW over all of them, the method's mask applied
  by zeroing gradients (frozen tensors included).
On a CPU the engine's step is also timed in bf16 autocast (`train.precision: bf16`; --no-bf16
leaves it out), to show what bf16 buys there: `bf16` per method, `bf16_vs_fp32_step` ratios,
`cpu_native_bf16` (AVX512-BF16 or AMX present; without them torch emulates bf16) and
`auto_precision` (what `precision: auto` resolves to on this CPU: bf16 where it is native).
It writes JSON (per method: step_s, tokens_per_s, peak_mem_bytes, optimizer_state_bytes, and
the same for the naive mode; the ratios the performance targets are stated in; SAM's top-k
selection time; on CUDA the MFU against the measured bf16 matmul rate and the projected
GPU-hours of Table 1) and prints a short table.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sam_peft import delta as delta_lib  # noqa: E402
from sam_peft.data import LengthGroupedSampler, TaskData, collate, to_device  # noqa: E402
from sam_peft.device import cpu_has_native_bf16, resolved_precision  # noqa: E402
from sam_peft.engine import Trainer  # noqa: E402
from sam_peft.loader import build_config  # noqa: E402
from sam_peft.methods import build_method, list_methods  # noqa: E402
from sam_peft.model import TaskModel  # noqa: E402
from sam_peft.params import eligible_names  # noqa: E402
from sam_peft.selection import budget, topk_entries  # noqa: E402
from sam_peft.tasks import get_task  # noqa: E402

SHAPES = {
    # RoBERTa-base: 12 layers, 768 wide, 50,265-token vocabulary (125M parameters).
    "roberta-base": dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072, max_position_embeddings=514),
    # all-MiniLM-L6-v2's shape (the stand-in and parity studies' encoder): 6 layers, 384 wide.
    "minilm": dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                   intermediate_size=1536, max_position_embeddings=514),
    # A quick CPU mode: same structure, small enough to finish in well under a minute.
    "small": dict(vocab_size=8000, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=512, max_position_embeddings=514),
}
DENSITY = 0.005
NAIVE_LEN = 256
# Per-method options for the benchmark (burn-in kept short: it is timed separately).
OPTIONS = {
    "random": {"density": DENSITY}, "magprune": {"density": DENSITY},
    "sam": {"density": DENSITY, "burnin_steps": 2}, "diffprune": {"density": DENSITY, "burnin_steps": 2},
    "childprune": {"density": DENSITY, "burnin_steps": 2},
}
# Table 1's protocol, for the projection: 10 seeds; steps per run = 20,000 minimum plus the
# typical tail before 40 evaluations without improvement end it (assumed 30,000 in all).
TABLE1 = {"seeds": 10, "steps_per_run": 30000, "eval_every": 500,
          "tasks": {"cola": (7695, 856), "stsb": (5166, 583), "mrpc": (3294, 374), "rte": (2241, 249),
                    "cb": (225, 25), "copa": (360, 40), "wsc": (495, 59)}}


def synthetic_lengths(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    # log-normal around 60 tokens, clipped to [8, 256]
    x = torch.exp(torch.randn(n, generator=g) * 0.55 + math.log(60))
    return [int(min(256, max(8, round(v)))) for v in x.tolist()]


def synthetic_data(vocab: int, n: int = 1024, seed: int = 0) -> TaskData:
    g = torch.Generator().manual_seed(seed)
    feats = []
    for i, length in enumerate(synthetic_lengths(n, seed)):
        ids = [0] + torch.randint(3, vocab, (length - 2,), generator=g).tolist() + [2]
        feats.append({"input_ids": ids, "label": i % 2})
    return TaskData(get_task("rte"), {"train": feats, "val": feats[:256], "test": feats[:256]}, pad_id=1)


def build_model(shape: str):
    from transformers import RobertaConfig, RobertaModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cfg = RobertaConfig(type_vocab_size=1, pad_token_id=1, **SHAPES[shape])
    torch.manual_seed(0)
    return TaskModel(RobertaModel(cfg), get_task("rte"))


class HeapPeak:
    """Peak bytes allocated on the CPU heap (glibc mallinfo2: arena + mmapped blocks) while a
    block runs, above the level when it was created: a method's own footprint (model, gradients,
    optimizer state, activations). Sampled every 2 ms by a thread."""

    def __init__(self):
        import ctypes

        class MallInfo2(ctypes.Structure):
            _fields_ = [(f, ctypes.c_size_t) for f in
                        ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                         "fordblks", "keepcost")]

        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
        self._mallinfo = libc.mallinfo2
        self.base = self.now()
        self.peak = self.base
        self._stop = threading.Event()
        self._t = None

    def now(self) -> int:
        m = self._mallinfo()
        return int(m.uordblks + m.hblkhd)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.002)

    def start(self):
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def stop(self) -> int:
        self._stop.set()
        if self._t:
            self._t.join()
        self.peak = max(self.peak, self.now())
        return self.peak - self.base


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_scope(device):
    """Start counting before the model is built: peak memory includes the model itself."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return None
    return HeapPeak()


def peak_bytes(device, scope) -> int:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else scope.stop()


def make_trainer(name: str, shape: str, device: torch.device, data: TaskData, steps: int, compile_: bool,
                 precision: str = "auto"):
    cfg = build_config({"model": "tiny", "task": "rte", "method": {"name": name, **OPTIONS.get(name, {})},
                        "train": {"max_steps": 10**6, "eval_every": 10**6, "min_steps": 0, "batch_size": 16,
                                  "compile": compile_, "log_every": 0, "precision": precision}})
    model = build_model(shape)
    method = build_method(cfg.method)
    eligible = eligible_names(model)
    base_names = {n for n, _ in model.named_parameters() if n.startswith("encoder.")}
    method.wrap(model)
    model.to(device)
    tr = Trainer(cfg, model, method, data, device, eligible, progress=False)
    return tr, base_names


def fixed_batches(data: TaskData, n: int) -> list[list[int]]:
    """The batches every method is timed on (after its own burn-in): identical across methods."""
    s = LengthGroupedSampler(data.lengths("train"), 16, seed=12345)
    return [s.next_batch() for _ in range(n)]


def time_engine(name, shape, device, data, steps, warmup, compile_, precision: str = "auto") -> dict:
    scope = memory_scope(device)
    tr, base_names = make_trainer(name, shape, device, data, steps, compile_, precision)
    t0 = time.perf_counter()
    plan = tr.method.select(tr.model, tr.select_context())
    select_s = time.perf_counter() - t0
    tr.build_optimizers(plan)
    batches = fixed_batches(data, warmup + steps)
    tr.batches.use_batches(batches)  # the same batches for every method
    for _ in range(warmup):
        tr.train_step()
    sync(device)
    lengths = data.lengths("train")
    tokens = sum(lengths[i] for b in batches[warmup:] for i in b)
    times = []
    if scope:
        scope.start()
    for _ in range(steps):
        t = time.perf_counter()
        tr.train_step()
        sync(device)
        times.append(time.perf_counter() - t)
    peak = peak_bytes(device, scope)
    step_s = statistics.median(times)
    opt_bytes = tr.optimizer.state_bytes()  # the engine's own count (its FitResult.optimizer_state_bytes)
    # the delta after these steps (sizes depend on what trains, not on how long)
    tensors, counts = delta_lib.build(tr.model, tr.theta0, base_names)
    with tempfile.TemporaryDirectory() as tmp:
        delta_bytes = delta_lib.save(Path(tmp) / "d.safetensors", tensors, {"base_model": shape})
    n_params_all = sum(p.numel() for p in tr.model.parameters())
    out = {"step_s": step_s, "tokens_per_s": tokens / sum(times), "peak_mem_bytes": peak,
           "optimizer_state_bytes": opt_bytes, "delta_bytes": delta_bytes, "select_s": select_s,
           "n_trainable": sum(i.numel() for i in plan.sparse.values())
           + sum(tr.params[n].numel() for n in plan.dense), "n_params_total": n_params_all,
           "tokens_per_step": tokens / steps}
    del tr
    return out


def time_naive(name, shape, device, data, steps, warmup) -> dict:
    """The authors' setup: fp32, pad to 256, dense AdamW over all parameters, gradients masked."""
    scope = memory_scope(device)
    tr, _ = make_trainer(name, shape, device, data, steps, False)
    plan = tr.method.select(tr.model, tr.select_context())
    model = tr.model
    params = dict(model.named_parameters())
    masks = {}
    heads = {n for n in params if n.startswith("head.")}
    for n, p in params.items():
        if n in plan.dense or n in heads:
            continue  # trains whole: no mask
        m = torch.zeros(p.numel(), dtype=torch.bool, device=device)
        if n in plan.sparse:
            m[plan.sparse[n].to(device)] = True
        masks[n] = m.view_as(p)
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(list(params.values()), lr=1e-4, weight_decay=0.01)
    sampler = iter(fixed_batches(data, warmup + steps))

    def step():
        idx = next(sampler)
        feats = [data.features["train"][i] for i in idx]
        batch = collate(feats, data.pad_id)
        pad = NAIVE_LEN - batch["input_ids"].shape[1]
        batch["input_ids"] = torch.nn.functional.pad(batch["input_ids"], (0, pad), value=data.pad_id)
        batch["attention_mask"] = torch.nn.functional.pad(batch["attention_mask"], (0, pad), value=0)
        batch = to_device(batch, device)
        model.train()
        loss = model.loss(model(batch), batch["labels"])
        loss.backward()
        for n, m in masks.items():
            if params[n].grad is not None:
                params[n].grad.mul_(m)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return sum(len(f["input_ids"]) for f in feats)

    for _ in range(warmup):
        step()
    sync(device)
    times, tokens = [], 0
    if scope:
        scope.start()
    for _ in range(steps):
        t = time.perf_counter()
        tokens += step()
        sync(device)
        times.append(time.perf_counter() - t)
    peak = peak_bytes(device, scope)
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    out = {"step_s": statistics.median(times), "tokens_per_s": tokens / sum(times),
           "peak_mem_bytes": peak, "optimizer_state_bytes": state}
    del tr, model, opt
    return out


def sam_select_seconds(shape: str) -> float:
    """Global top-k over all eligible entries of the model, on the CPU (scores random)."""
    model = build_model(shape)
    eligible = eligible_names(model)
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(params[n].shape, generator=g) for n in eligible}
    m = sum(s.numel() for s in scores.values())
    times = []
    for _ in range(3):
        t = time.perf_counter()
        sel = topk_entries(scores, budget(DENSITY, m), "global")
        times.append(time.perf_counter() - t)
    assert sum(i.numel() for i in sel.values()) == budget(DENSITY, m)
    return statistics.median(times)


def bf16_matmul_tflops(device) -> float:
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    reps = 20
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def model_flops_per_token(shape: str, seq_len: float) -> float:
    """Training FLOPs per token: 6 x matmul parameters + attention (12 * layers * width * seq)."""
    s = SHAPES[shape]
    h, L, f = s["hidden_size"], s["num_hidden_layers"], s["intermediate_size"]
    matmul_params = L * (4 * h * h + 2 * h * f)
    return 6 * matmul_params + 12 * L * h * seq_len


def packed_throughput(method: str, shape: str, k: int, steps: int, warmup: int) -> dict:
    """K processes training the same method on one GPU at once: summed tokens/s."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_packed_worker, args=(method, shape, steps, warmup, q)) for _ in range(k)]
    t = time.perf_counter()
    for p in procs:
        p.start()
    results = [q.get() for _ in procs]
    for p in procs:
        p.join()
    wall = time.perf_counter() - t
    return {"runs": k, "tokens_per_s_sum": sum(r["tokens_per_s"] for r in results),
            "step_s_median": statistics.median(r["step_s"] for r in results), "wall_s": wall}


def _packed_worker(method, shape, steps, warmup, q):
    device = torch.device("cuda")
    data = synthetic_data(SHAPES[shape]["vocab_size"])
    q.put(time_engine(method, shape, device, data, steps, warmup, False))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps per method (default: 8 small, 3 roberta-base on CPU, 30 on CUDA)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--naive-methods", nargs="*", default=None,
                    help="methods to time in naive mode too (default: all; none with an empty list)")
    ap.add_argument("--runs-per-gpu", type=int, default=0, help="CUDA: also time K packed runs of sam and full")
    ap.add_argument("--compile", action="store_true", help="torch.compile the encoder (CUDA)")
    ap.add_argument("--no-bf16", action="store_true", help="CPU: do not also time the engine in bf16 autocast")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    steps = args.steps or (30 if device.type == "cuda" else 8 if args.shape == "small" else 3)
    methods = args.methods or list_methods()
    naive = set(methods if args.naive_methods is None else args.naive_methods)
    data = synthetic_data(SHAPES[args.shape]["vocab_size"])
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "device_type": device.type, "shape": args.shape, "density": DENSITY, "steps": steps,
           "threads": torch.get_num_threads(), "peak_mem_kind": "cuda max_memory_allocated" if device.type == "cuda"
           else "CPU heap allocated (mallinfo2), from before the model was built", "torch": torch.__version__,
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "methods": {}, "naive": {}}
    cpu_bf16 = device.type == "cpu" and not args.no_bf16
    if device.type == "cpu":
        out["cpu_native_bf16"] = cpu_has_native_bf16()
        out["auto_precision"] = resolved_precision("auto", device)
        out["load_average_at_start"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if cpu_bf16:
        out["bf16"] = {}
    # On a CPU fp32 stated: `auto` is bf16 on a native-bf16 CPU, and the bf16 step is timed apart.
    main_precision = "fp32" if device.type == "cpu" else "auto"
    for name in methods:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        out["methods"][name] = time_engine(name, args.shape, device, data, steps, args.warmup, args.compile,
                                           precision=main_precision)
        if cpu_bf16:  # right after the fp32 timing of the same method: both see about the same machine load
            r = time_engine(name, args.shape, device, data, steps, args.warmup, False, precision="bf16")
            out["bf16"][name] = {k: r[k] for k in ("step_s", "tokens_per_s", "peak_mem_bytes")}
        if name in naive:
            out["naive"][name] = time_naive(name, args.shape, device, data, steps, args.warmup)
    M = out["methods"]
    full_bytes = M["full"]["n_params_total"] * 4 if "full" in M else None
    ratios = {}
    if "sam" in M and "full" in M:
        ratios["step_time_ratio_sam_vs_full"] = M["sam"]["step_s"] / M["full"]["step_s"]
        ratios["optimizer_state_ratio_sam_vs_full"] = M["sam"]["optimizer_state_bytes"] / M["full"]["optimizer_state_bytes"]
        ratios["delta_bytes_ratio_sam_vs_full"] = M["sam"]["delta_bytes"] / full_bytes
    if "full" in M:
        for n in ("bitfit", "adapter", "lora"):
            if n in M:
                ratios[f"step_time_ratio_{n}_vs_full"] = M[n]["step_s"] / M["full"]["step_s"]
    if cpu_bf16:
        ratios["bf16_vs_fp32_step"] = {n: out["bf16"][n]["step_s"] / M[n]["step_s"] for n in out["bf16"]}
    if out["naive"]:
        ratios["step_time_ratio_vs_naive"] = {n: M[n]["step_s"] / out["naive"][n]["step_s"] for n in out["naive"]}
        ratios["throughput_ratio_vs_naive"] = {n: M[n]["tokens_per_s"] / out["naive"][n]["tokens_per_s"]
                                               for n in out["naive"]}
    out.update(ratios)
    out["sam_select_s"] = sam_select_seconds(args.shape)
    mean_len = statistics.mean(data.lengths("train"))
    if device.type == "cuda":
        peak = bf16_matmul_tflops(device)
        fpt = model_flops_per_token(args.shape, mean_len)
        out["bf16_matmul_tflops"] = peak
        out["mfu"] = {n: M[n]["tokens_per_s"] * fpt / (peak * 1e12) for n in M}
        if args.runs_per_gpu:
            out["packed"] = {}
            for n in ("full", "sam"):
                if n in M:
                    r = packed_throughput(n, args.shape, args.runs_per_gpu, steps, args.warmup)
                    r["mfu_sum"] = r["tokens_per_s_sum"] * fpt / (peak * 1e12)
                    out["packed"][n] = r
        # Table 1 projection: training tokens per run from the measured per-method throughput.
        tokens_per_step = statistics.mean(M[n]["tokens_per_step"] for n in M)
        hours = 0.0
        for n in M:
            per_run = TABLE1["steps_per_run"] * tokens_per_step / M[n]["tokens_per_s"]
            hours += per_run * len(TABLE1["tasks"]) * TABLE1["seeds"] / 3600
        out["table1_projection"] = {"assumptions": TABLE1, "gpu_hours_unpacked": hours,
                                    "methods": list(M)}
        if args.runs_per_gpu and "packed" in out and "sam" in out["packed"]:
            gain = out["packed"]["sam"]["tokens_per_s_sum"] / M["sam"]["tokens_per_s"]
            out["table1_projection"]["gpu_hours_packed"] = hours / gain
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print_table(out)
    return 0


def print_table(out: dict) -> None:
    print(f"\n{out['shape']} on {out['device']} ({out['device_type']}), p = {out['density']}, {out['steps']} timed steps")
    print(f"{'method':11s} {'step s':>8s} {'tok/s':>9s} {'opt MB':>9s} {'peak MB':>9s} {'delta MB':>9s} "
          f"{'naive s':>8s} {'naive tok/s':>11s} {'bf16 s':>8s} {'bf16/fp32':>9s}")
    for n, r in out["methods"].items():
        nv = out["naive"].get(n, {})
        bf = out.get("bf16", {}).get(n, {})
        print(f"{n:11s} {r['step_s']:8.3f} {r['tokens_per_s']:9.0f} {r['optimizer_state_bytes'] / 1e6:9.2f} "
              f"{r['peak_mem_bytes'] / 1e6:9.0f} {r['delta_bytes'] / 1e6:9.3f} "
              f"{nv.get('step_s', float('nan')):8.3f} {nv.get('tokens_per_s', float('nan')):11.0f} "
              f"{bf.get('step_s', float('nan')):8.3f} {bf.get('step_s', float('nan')) / r['step_s']:9.2f}")
    if "cpu_native_bf16" in out:
        print(f"cpu_native_bf16 (AVX512-BF16 or AMX): {out['cpu_native_bf16']}; precision auto here: "
              f"{out['auto_precision']}")
    for k in ("step_time_ratio_sam_vs_full", "optimizer_state_ratio_sam_vs_full", "delta_bytes_ratio_sam_vs_full",
              "step_time_ratio_bitfit_vs_full", "step_time_ratio_adapter_vs_full", "step_time_ratio_lora_vs_full",
              "sam_select_s"):
        if k in out:
            print(f"{k}: {out[k]:.4f}")
    if "mfu" in out:
        print("mfu:", {k: round(v, 3) for k, v in out["mfu"].items()})


if __name__ == "__main__":
    sys.exit(main())
