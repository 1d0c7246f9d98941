"""Training engine: burn-in services for methods, the training loop, evaluation, early stopping.

Read top to bottom: `Trainer.fit` asks the method for a TrainPlan (the method may run a burn-in
through `SelectContext`), freezes everything outside the plan, builds the optimizers (whole
tensors: torch AdamW; chosen entries: SparseAdamW), trains with evaluation every `eval_every`
steps and early stopping, restores the best weights, lets the method finalize, and evaluates.
The engine never looks at a method's name.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from sam_peft import metrics as metrics_lib
from sam_peft.errors import UserError
from sam_peft.data import LengthGroupedSampler, collate, eval_batches, feature_length
from sam_peft.methods.base import Method, TrainPlan
from sam_peft.optim import PlanOptimizer
from sam_peft.scoring import GradientStats
from sam_peft.selection import budget, topk_entries
from sam_peft.tasks import TaskSpec


# Parameter classifiers live in sam_peft.params (one rule for every floor); re-exported here.
from sam_peft.params import eligible_names, head_names, layernorm_names, no_decay_names  # noqa: E402,F401


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU computes bf16 in hardware: the `avx512_bf16` or `amx_bf16` flag of Linux's
    /proc/cpuinfo (`cpuinfo`: that file's text, for tests). False elsewhere, or when the file
    cannot be read. Without these instructions torch's CPU bf16 kernels convert to fp32 and back,
    and a bf16 step is slower than an fp32 one (docs/benchmarks.md)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags = set(value.split())
            return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


def learning_rate(step: int, base: float, max_steps: int, warmup_steps: int) -> float:
    """Linear warmup then linear decay to 0 at max_steps (HF's linear schedule, as jiant).

    `step` is the number of optimizer steps already taken.
    """
    if step < warmup_steps:
        return base * step / max(1, warmup_steps)
    return base * max(0.0, (max_steps - step) / max(1, max_steps - warmup_steps))


# ------------------------------------------------------------------------ data


@dataclass
class TaskData:
    spec: TaskSpec
    features: dict[str, list[dict]]  # split -> encoded examples (sam_peft.data.encode)
    pad_id: int

    def lengths(self, split: str) -> list[int]:
        return [feature_length(f) for f in self.features[split]]

    def labels(self, split: str) -> list:
        return [f["label"] for f in self.features[split]]


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ------------------------------------------------------------------------ selection services


class SelectContext:
    """What the engine offers a method's `select`: eligible parameters, theta0, budgets, burn-ins.

    Two kinds of burn-in, and the difference matters for fairness between methods:
    - `accumulate_gradients`: scoring batches (forward and backward, no update). They are not
      training steps: the schedule, the evaluation cadence, `min_steps` and `max_steps` count
      only steps that update weights (SAM's burn-in, ChildTuning-D's Fisher pass).
    - `train`: steps that update weights (ChildPruning's, DiffPruning's and MagPruning's
      authors' burn-ins). They are training steps of the one schedule every method shares.
    """

    def __init__(self, trainer: "Trainer"):
        self._t = trainer
        self.model = trainer.model
        self.eligible: dict[str, nn.Parameter] = {n: trainer.params[n] for n in trainer.eligible}
        self.theta0 = trainer.theta0
        self.m = sum(p.numel() for p in self.eligible.values())
        self.head = head_names(trainer.model)
        self.seed = trainer.seed
        # Randomness of the selection itself (Random's subset, Bernoulli masks): its own stream.
        self.generator = torch.Generator().manual_seed(1_000_003 * trainer.seed + 7)
        self.device = trainer.device
        self.grad_clip = trainer.t.grad_clip  # the protocol's max gradient norm

    @property
    def step(self) -> int:
        """Training steps (weight updates) done so far."""
        return self._t.step

    @property
    def batches_per_epoch(self) -> int:
        """Training batches in one pass over the train split (the last one may be partial)."""
        return math.ceil(len(self._t.data.features["train"]) / self._t.t.batch_size)

    def budget(self, density: float, m: int | None = None) -> int:
        """floor(density * m); m defaults to all eligible entries."""
        return budget(density, self.m if m is None else m)

    def topk(self, scores: dict[str, torch.Tensor], density: float, mode: str = "global") -> dict[str, torch.Tensor]:
        """Exactly floor(density * m) entries with the largest scores, m = the entries scored
        (all eligible ones unless a method scores fewer); see selection.py."""
        m = sum(s.numel() for s in scores.values())
        return topk_entries(scores, self.budget(density, m), mode)

    def accumulate_gradients(self, n_batches: int, stats=("sum",), names: list[str] | None = None,
                             clip: float = 0.0, clip_mode: str = "global") -> dict[str, dict[str, torch.Tensor]]:
        """Run n scoring batches forward/backward without updating anything.

        Returns {stat: {name: tensor}} (see scoring.py) over `names` (default: every eligible
        parameter). `clip` > 0 clips each batch's gradients first (scoring.py's clip modes).
        Scoring batches are not training steps (see the class docstring).
        """
        return self._t.accumulate_gradients(n_batches, stats, names, clip, clip_mode)

    def train(self, n_steps: int, plan: TrainPlan) -> None:
        """Train n steps with `plan` (plus the head), e.g. a full fine-tuning burn-in."""
        self._t.train_phase(plan, n_steps)

    def full_plan(self) -> TrainPlan:
        return TrainPlan(dense=list(self.eligible))


# ------------------------------------------------------------------------ trainer


CHECKPOINT_FORMAT = "sam-peft-checkpoint/2"


class CheckpointMismatch(Exception):
    """A checkpoint that does not belong to this run (the caller then starts afresh)."""


@dataclass
class EarlyStopping:
    """Counters of the main phase: the best weights so far and evaluations without improvement."""

    best: dict | None = None  # snapshot of the best weights
    best_step: int = 0
    best_val: dict | None = None
    bad: int = 0  # evaluations since the last improvement
    n_evals: int = 0
    losses: list = field(default_factory=list)  # training losses since the last evaluation
    eval_s: float = 0.0

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "best_val": self.best_val, "bad": self.bad,
                "n_evals": self.n_evals, "losses": list(self.losses), "eval_s": self.eval_s}

    @classmethod
    def from_state(cls, state: dict) -> "EarlyStopping":
        return cls(**state)


def _numpy_rng_state():
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _set_numpy_rng_state(s) -> None:
    np.random.set_state((s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["gauss"]))


@dataclass
class FitResult:
    plan: TrainPlan
    best_step: int
    steps: int  # training steps: weight updates, burn-in training steps included
    burnin_steps: int  # training steps taken before the main phase (a method's training burn-in)
    scoring_steps: int  # batches of gradient accumulation without an update (not training steps)
    best_val: dict
    n_evals: int
    stopped: str  # "patience" | "max_steps"
    timings: dict = field(default_factory=dict)
    optimizer_state_bytes: int = 0
    resumed_from: int | None = None  # the step a resumed run continued from


class Trainer:
    def __init__(self, cfg, model, method: Method, data: TaskData, device, eligible: list[str],
                 log_eval=None, log_train=None, checkpoint=None, progress: bool = True, desc: str = ""):
        self.cfg, self.t = cfg, cfg.train
        self.model, self.method, self.data = model, method, data
        self.device = torch.device(device)
        self.seed = cfg.seed
        self.params = dict(model.named_parameters())
        self.eligible = eligible
        self.theta0 = {n: self.params[n].detach().clone() for n in eligible}
        self.log_eval = log_eval or (lambda record: None)
        self.log_train = log_train or (lambda record: None)
        self.checkpoint = checkpoint  # called with checkpoint_state(...) every train.checkpoint_every
        self._recent: list[torch.Tensor] = []  # losses since the last train-log line
        self.step = 0  # training steps: weight updates (the schedule, eval cadence and limits count these)
        self.scoring_steps = 0  # scoring batches: forward/backward without an update
        self.warmup_steps = self.t.warmup_steps if self.t.warmup_steps is not None else round(self.t.warmup * self.t.max_steps)
        self.autocast_dtype = self._precision()
        self.sampler: LengthGroupedSampler | None = None  # built on first use: `eval` has no train split
        self._batches = None
        self.optimizer: PlanOptimizer | None = None
        self.progress = progress
        self.desc = desc
        self._bar = None
        self.encoder_forward = model.encoder.forward
        if self.t.compile and self.device.type == "cuda":
            self.model.encoder.forward = torch.compile(self.model.encoder.forward, dynamic=True)

    # -------------------------------------------------------------- plumbing
    def _precision(self):
        """The autocast dtype for `train.precision` on this device (None: fp32).

        auto: bf16 on a GPU that supports it, fp32 on every CPU. A CPU with native bf16
        (AVX512-BF16 or AMX, `cpu_has_native_bf16`) would run faster in bf16, but that bf16
        leaves accuracy unchanged has not been measured on one, so auto does not choose it
        (README, "Precision on a CPU"). If it ever does, the run id must change with it
        (config_hash), or fp32 results of `auto` runs would be taken for bf16 ones.
        bf16 on a CPU is taken as asked, with a warning where the CPU only emulates it.
        """
        want = self.t.precision
        if want == "fp32" or (want == "auto" and self.device.type != "cuda"):
            return None
        if want == "bf16" and self.device.type == "cpu":
            if not cpu_has_native_bf16():
                warnings.warn("train.precision bf16 on a CPU without AVX512-BF16 or AMX: bf16 is emulated there, "
                              "and a training step is several times slower than in fp32 (docs/benchmarks.md)",
                              stacklevel=2)
            return torch.bfloat16
        if self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _ensure_sampler(self) -> LengthGroupedSampler:
        if self.sampler is None:
            self.sampler = LengthGroupedSampler(
                self.data.lengths("train"), self.t.batch_size, seed=self.seed, group_by_length=self.t.group_by_length
            )
            self._batches = iter(self.sampler)
        return self.sampler

    def next_batch(self) -> dict:
        self._ensure_sampler()
        idx = next(self._batches)
        return to_device(collate([self.data.features["train"][i] for i in idx], self.data.pad_id), self.device)

    def _tick(self, **postfix):
        """Move the progress bar to the current position (scoring batches + training steps)."""
        if self._bar is not None:
            self._bar.update(self.scoring_steps + self.step - self._bar.n)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)

    def set_trainable(self, plan: TrainPlan) -> list[str]:
        """requires_grad only where the plan trains: frozen tensors compute no weight gradient."""
        trained = (set(plan.dense) | set(plan.sparse) | set(plan.group_names())
                   | (set(head_names(self.model)) if plan.train_head else set()))
        for n, p in self.model.named_parameters():
            p.requires_grad_(n in trained)
        return [n for n in self.params if n in trained]

    def build_optimizers(self, plan: TrainPlan) -> None:
        self.params = dict(self.model.named_parameters())  # methods may have added parameters
        self.set_trainable(plan)
        # Tensors in the plan with no chosen entry: no gradient needed at all.
        for n, idx in plan.sparse.items():
            if not idx.numel():
                self.params[n].requires_grad_(False)
        t = self.t
        dense = list(plan.dense) + (head_names(self.model) if plan.train_head else [])
        no_decay = no_decay_names(self.model) | set(plan.no_decay)
        self.optimizer = PlanOptimizer(self.params, dense, plan.sparse, plan.groups, no_decay,
                                       t.lr, t.adam_betas, t.adam_eps, t.weight_decay, t.grad_clip, self.device.type)

    def optimizer_state_bytes(self) -> int:
        return self.optimizer.state_bytes() if self.optimizer else 0

    # -------------------------------------------------------------- one step
    def train_step(self) -> torch.Tensor:
        model = self.model
        model.train()
        batch = self.next_batch()
        self.method.before_forward(model, self.step)
        with self.autocast():
            logits = model(batch)
            loss = model.loss(logits, batch["labels"])
        total = loss
        extra = self.method.extra_loss(model)
        if extra is not None:
            total = loss + extra
        total.backward()
        self.method.after_backward(model, self.step)
        lr = learning_rate(self.step, self.t.lr, self.t.max_steps, self.warmup_steps)
        self.optimizer.step(lr)
        self.optimizer.zero_grad()
        # Gradients of tensors that train nowhere (sparse tensors with empty selections etc.).
        for p in model.parameters():
            p.grad = None
        self.step += 1
        self.method.after_step(model, self.step)
        loss = loss.detach()
        self._log_loss(loss, lr)
        return loss

    def _log_loss(self, loss: torch.Tensor, lr: float) -> None:
        """Mean training loss every `log_every` steps (burn-in training steps included)."""
        if not self.t.log_every:
            return
        self._recent.append(loss)
        if self.step % self.t.log_every == 0:
            mean = float(torch.stack(self._recent).float().mean())
            self._recent = []
            self.log_train({"step": self.step, "loss": mean, "lr": lr})
            if not math.isfinite(mean):
                raise FloatingPointError(f"training loss is {mean} at step {self.step}")

    # -------------------------------------------------------------- burn-in services
    def accumulate_gradients(self, n_batches: int, stats, names=None, clip: float = 0.0,
                             clip_mode: str = "global") -> dict[str, dict[str, torch.Tensor]]:
        """Scoring batches (SelectContext.accumulate_gradients): no update, no training step."""
        names = list(self.eligible) if names is None else list(names)
        # Global clipping takes its norm over the model's gradients, the head's included, as
        # clip_grad_norm_(model.parameters()) did in the authors' runner: the head computes one.
        with_head = bool(clip) and clip_mode == "global"
        self.set_trainable(TrainPlan(dense=names, train_head=with_head))
        acc = GradientStats({n: self.params[n] for n in names}, stats, clip, clip_mode,
                            norm_extra=[self.params[n] for n in head_names(self.model)] if with_head else [])
        if self._bar is not None:
            self._bar.total += n_batches
            self._bar.refresh()
        model = self.model
        for _ in range(n_batches):
            model.train()
            batch = self.next_batch()
            self.method.before_forward(model, self.step)
            with self.autocast():
                loss = model.loss(model(batch), batch["labels"])
            loss.backward()
            acc.add()
            model.zero_grad(set_to_none=True)
            self.scoring_steps += 1
            self._tick(loss=f"{loss.item():.4f}", phase="scoring")
        return acc.sums

    def train_phase(self, plan: TrainPlan, n_steps: int) -> None:
        """Train n steps with a plan (burn-in); no evaluation."""
        self.build_optimizers(plan)
        for _ in range(n_steps):
            loss = self.train_step()
            self._tick(loss=f"{loss.item():.4f}", phase="burn-in")

    # -------------------------------------------------------------- evaluation
    @torch.no_grad()
    def predict(self, split: str, limit: int | None = None) -> list:
        feats = self.data.features[split]
        if limit is not None:
            feats = feats[:limit]
        lengths = self.data.lengths(split)[: len(feats)]
        preds = [None] * len(feats)
        self.model.eval()
        weights = self.method.eval_weights(self.model, split) if self.method else contextlib.nullcontext()
        with weights:
            for idx in eval_batches(lengths, self.t.eval_batch_size):
                batch = to_device(collate([feats[i] for i in idx], self.data.pad_id), self.device)
                with self.autocast():
                    logits = self.model(batch)
                out = self.model.predictions(self.model.kind, logits).cpu().tolist()
                for i, p in zip(idx, out):
                    preds[i] = p
        return preds

    def evaluate(self, split: str, limit: int | None = None) -> dict:
        preds = self.predict(split, limit)
        labels = self.data.labels(split)[: len(preds)]
        return metrics_lib.compute(self.data.spec, preds, labels)

    # -------------------------------------------------------------- snapshots
    def snapshot(self, plan: TrainPlan) -> dict:
        """Copies of everything the main phase can change: plan tensors, head, method state."""
        dense = list(plan.dense) + (head_names(self.model) if plan.train_head else [])
        return {
            "dense": {n: self.params[n].detach().clone() for n in dense},
            "sparse": {n: self.params[n].detach().reshape(-1)[idx].clone() for n, idx in plan.sparse.items()},
            "groups": {n: self.params[n].detach().clone() for n in plan.group_names()},
            "method": copy.deepcopy(self.method.state_dict()),
        }

    @torch.no_grad()
    def restore(self, plan: TrainPlan, snap: dict) -> None:
        for n, v in snap["dense"].items():
            self.params[n].copy_(v)
        for n, v in snap["sparse"].items():
            self.params[n].reshape(-1).index_copy_(0, plan.sparse[n].to(v.device), v)
        for n, v in snap.get("groups", {}).items():
            self.params[n].copy_(v)
        self.method.load_state_dict(snap["method"])

    # -------------------------------------------------------------- the run
    def fit(self, resume: dict | None = None) -> FitResult:
        """Select, train with early stopping, restore the best weights, finalize.

        `resume`: a checkpoint from `checkpoint_state`. select() is replayed (burn-in is
        deterministic), then the checkpoint's weights, optimizers, data position, random
        states and counters are loaded, so the run continues exactly where it stopped.
        """
        t = self.t
        timings = {}
        bar_ctx = contextlib.nullcontext()
        if self.progress:
            from tqdm.auto import tqdm

            bar_ctx = self._bar = tqdm(total=t.max_steps, desc=self.desc, unit="step", dynamic_ncols=True, leave=False)
        with bar_ctx:
            t0 = time.perf_counter()
            plan = self.method.select(self.model, SelectContext(self))
            timings["select_s"] = time.perf_counter() - t0
            burnin = self.step
            if self.step >= t.max_steps:  # config validation rejects this for every shipped method
                raise UserError(f"method '{self.method.name}': its burn-in took {self.step} training steps, "
                                f"train.max_steps is {t.max_steps}: no main-phase step is left")
            self.build_optimizers(plan)
            st = EarlyStopping(best_step=self.step)
            if resume is not None:
                st = self.load_checkpoint_state(resume, plan)
                self._tick()
            stopped = "max_steps"
            t1 = time.perf_counter()
            while self.step < t.max_steps:
                st.losses.append(self.train_step())
                at_eval = self.step % t.eval_every == 0 or self.step == t.max_steps
                if self.step % 25 == 0 or at_eval:  # not every step: .item() waits for the GPU
                    self._tick(phase="train", loss=f"{st.losses[-1].item():.4f}",
                               best=f"{st.best_val['major']:.2f}" if st.best_val else "-")
                if at_eval:
                    if self.evaluate_and_track(plan, st):
                        stopped = "patience"
                        break
                if self.checkpoint and (t.checkpoint_every == "eval" and at_eval or
                                        isinstance(t.checkpoint_every, int) and t.checkpoint_every
                                        and self.step % t.checkpoint_every == 0):
                    self.checkpoint(self.checkpoint_state(plan, st))
            opt_bytes = self.optimizer_state_bytes()  # AdamW allocates its state at the first step
            timings["train_s"] = time.perf_counter() - t1 - st.eval_s
            timings["eval_s"] = st.eval_s
            self.restore(plan, st.best)
            self.method.finalize(self.model)
            plan = self.method.final_plan(plan)
        self._bar = None
        for p in self.model.parameters():
            p.requires_grad_(False)
        return FitResult(plan=plan, best_step=st.best_step, steps=self.step, burnin_steps=burnin,
                         scoring_steps=self.scoring_steps,
                         best_val=st.best_val, n_evals=st.n_evals, stopped=stopped, timings=timings,
                         optimizer_state_bytes=opt_bytes, resumed_from=resume["step"] if resume else None)

    def evaluate_and_track(self, plan: TrainPlan, st: "EarlyStopping") -> bool:
        """Evaluate on val, keep the best weights, log; True when early stopping ends the run."""
        t = self.t
        te = time.perf_counter()
        val = self.evaluate("val", t.val_subset)
        st.eval_s += time.perf_counter() - te
        st.n_evals += 1
        train_loss = float(torch.stack(st.losses).float().mean()) if st.losses else float("nan")
        st.losses = []
        improved = st.best_val is None or val["major"] > st.best_val["major"]
        if improved:
            st.best, st.best_step, st.best_val, st.bad = self.snapshot(plan), self.step, val, 0
        else:
            st.bad += 1
        self.log_eval({"step": self.step, "train_loss": train_loss,
                       "lr": learning_rate(self.step, t.lr, t.max_steps, self.warmup_steps),
                       "val": val, "best": improved})
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"training loss is {train_loss} at step {self.step}")
        return st.bad >= t.patience and self.step >= t.min_steps

    # -------------------------------------------------------------- checkpoints (resume)
    def checkpoint_state(self, plan: TrainPlan, st: "EarlyStopping") -> dict:
        """Everything needed to continue this run exactly (see fit(resume=...))."""
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
               "numpy": _numpy_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "plan": {"dense": list(plan.dense), "sparse": {n: i.cpu() for n, i in plan.sparse.items()},
                     "train_head": plan.train_head, "groups": plan.group_names()},
            "weights": self.snapshot(plan),
            "method": self.method.training_state(),
            "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.state_dict() if self.sampler else None,
            "rng": rng,
            "early_stopping": st.state_dict(),
            "train_log": list(self._recent),
        }

    def load_checkpoint_state(self, ckpt: dict, plan: TrainPlan) -> "EarlyStopping":
        saved = ckpt["plan"]
        same = (saved["dense"] == list(plan.dense) and saved["train_head"] == plan.train_head
                and saved.get("groups", []) == plan.group_names()
                and saved["sparse"].keys() == plan.sparse.keys()
                and all(torch.equal(saved["sparse"][n], plan.sparse[n].cpu()) for n in plan.sparse))
        if not same:
            raise CheckpointMismatch("the replayed selection differs from the checkpoint's")
        self.restore(plan, ckpt["weights"])
        self.method.load_training_state(ckpt["method"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["sampler"] is not None:
            self._ensure_sampler().load_state_dict(ckpt["sampler"])
        rng = ckpt["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        _set_numpy_rng_state(rng["numpy"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.step = int(ckpt["step"])
        self._recent = list(ckpt["train_log"])
        return EarlyStopping.from_state(ckpt["early_stopping"])
