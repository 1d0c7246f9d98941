"""Training engine: the loop every method shares.

Read `Trainer.fit` top to bottom: the method chooses what trains (a TrainPlan), maybe after a
burn-in it runs through `SelectContext`; everything outside the plan is frozen; one PlanOptimizer
updates the plan; the loop trains with evaluation every `eval_every` steps and early stopping;
the best weights are restored and the method finalizes. The engine never looks at a method's
name. Pieces it uses: data.TrainStream (batches), optim.PlanOptimizer (updates and clipping),
scoring.GradientStats (scoring batches), checkpoint (best-weight snapshots, resumable state).

Two kinds of step: a *training step* updates weights and advances the schedule, the evaluation
cadence and the limits; a *scoring batch* (SAM's burn-in, ChildTuning-D's Fisher pass) only
accumulates gradients and advances none of them.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from sam_peft import checkpoint as ckpt_lib
from sam_peft import metrics as metrics_lib
from sam_peft.data import TaskData, TrainStream, collate, eval_batches, to_device
from sam_peft.device import autocast_dtype
from sam_peft.errors import UserError
from sam_peft.methods.base import Method, SelectContext, TrainPlan
from sam_peft.optim import PlanOptimizer, plan_optimizer
from sam_peft.params import head_names, set_trainable


def learning_rate(step: int, base: float, horizon: int, warmup_steps: int) -> float:
    """Linear warmup then linear decay to 0 at `horizon` (HF's linear schedule, as jiant).

    `step` is the number of optimizer steps already taken.
    """
    if step < warmup_steps:
        return base * step / max(1, warmup_steps)
    return base * max(0.0, (horizon - step) / max(1, horizon - warmup_steps))


def schedule(t, batches_per_epoch: int) -> tuple[int, int]:
    """(horizon, warmup steps) of a TrainConfig: the horizon is max_steps, or schedule_epochs
    epochs of batches_per_epoch (ceil(n_train / batch_size)) steps whatever max_steps is; the
    warmup is warmup_steps, else round(warmup x horizon)."""
    horizon = t.max_steps if t.schedule_epochs is None else t.schedule_epochs * batches_per_epoch
    warmup = t.warmup_steps if t.warmup_steps is not None else round(t.warmup * horizon)
    return horizon, warmup


class LRSchedule:
    """The learning rate at each training step: schedule()'s horizon and warmup of a TrainConfig,
    counted when first needed (`sam-peft eval` has no train split to count epochs of)."""

    def __init__(self, t, batches):
        self.t, self._batches = t, batches

    @functools.cached_property
    def steps(self) -> tuple[int, int]:
        return schedule(self.t, self._batches.batches_per_epoch if self.t.schedule_epochs else 0)

    def lr(self, step: int) -> float:
        return learning_rate(step, self.t.lr, *self.steps)


def autocast_context(dtype: torch.dtype | None, device: torch.device):
    """The precision context of forward passes (train.precision, device.autocast_dtype)."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


# ------------------------------------------------------------------------ bookkeeping


@dataclass
class EarlyStopping:
    """Counters of the main phase: the best weights so far and evaluations without improvement."""

    best: dict | None = None  # checkpoint.snapshot of the best weights
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

    def observe(self, step: int, val: dict, snapshot) -> bool:
        """Count an evaluation; keep `snapshot()` if it is the best so far. True if it improved."""
        self.n_evals += 1
        improved = self.best_val is None or val["major"] > self.best_val["major"]
        if improved:
            self.best, self.best_step, self.best_val, self.bad = snapshot(), step, val, 0
        else:
            self.bad += 1
        return improved

    def mean_loss(self) -> float:
        """The mean training loss since the last evaluation (and forget those losses)."""
        mean = float(torch.stack(self.losses).float().mean()) if self.losses else float("nan")
        self.losses = []
        return mean


class TrainLog:
    """The mean training loss every `every` steps, to a callback; a non-finite mean stops the run."""

    def __init__(self, every: int, write):
        self.every, self.write = every, write
        self.recent: list[torch.Tensor] = []

    def add(self, step: int, loss: torch.Tensor, lr: float) -> None:
        if not self.every:
            return
        self.recent.append(loss)
        if step % self.every == 0:
            mean = float(torch.stack(self.recent).float().mean())
            self.recent = []
            self.write({"step": step, "loss": mean, "lr": lr})
            if not math.isfinite(mean):
                raise FloatingPointError(f"training loss is {mean} at step {step}")

    def state(self) -> list:
        return list(self.recent)

    def load(self, recent: list) -> None:
        self.recent = list(recent)


class Progress:
    """Progress over scoring batches + training steps: a tqdm bar on a terminal; where stderr is not
    one (a log file, a pipe), a plain line about every tenth of the run instead of a bar's carriage
    returns; or nothing."""

    def __init__(self, on: bool, total: int, desc: str, plain: bool | None = None):
        self.bar = None
        self.plain = False
        self.total, self.desc, self.n = total, desc, 0
        self._next_line = 0
        if on:
            self.plain = not sys.stderr.isatty() if plain is None else plain
            if not self.plain:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=False)

    def grow(self, n: int) -> None:
        self.total += n
        if self.bar is not None:
            self.bar.total += n
            self.bar.refresh()

    def to(self, position: int, **postfix) -> None:
        self.n = position
        if self.bar is not None:
            self.bar.update(position - self.bar.n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
        elif self.plain and position >= self._next_line:
            details = ", ".join(f"{k} {v}" for k, v in postfix.items())
            print(f"{self.desc}: {position}/{self.total}" + (f" ({details})" if details else ""), file=sys.stderr,
                  flush=True)
            self._next_line = position + max(1, self.total // 10)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


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


@torch.no_grad()
def predict(model, data: TaskData, split: str, batch_size: int, device, autocast, limit: int | None = None) -> list:
    """The model's predictions on a split (its first `limit` examples), in eval mode, in batches
    of similar length; `autocast()` gives the precision context."""
    feats = data.features[split][:limit]
    preds = [None] * len(feats)
    model.eval()
    for idx in eval_batches(data.lengths(split)[: len(feats)], batch_size):
        batch = to_device(collate([feats[i] for i in idx], data.pad_id), device)
        with autocast():
            logits = model(batch)
        for i, p in zip(idx, model.predictions(model.kind, logits).cpu().tolist()):
            preds[i] = p
    return preds


class EngineHost:
    """A Trainer as a SelectionHost (methods/base.py): the scoring batches and training burn-ins a
    method's select() runs through its SelectContext."""

    def __init__(self, trainer: "Trainer"):
        self.tr = trainer

    @property
    def step(self) -> int:
        return self.tr.step

    @property
    def batches_per_epoch(self) -> int:
        return self.tr.batches.batches_per_epoch

    def scoring_batches(self, n_batches: int):
        """Forward and backward, no update, no training step; yields after each backward pass."""
        tr, model = self.tr, self.tr.model
        unannounced = tr.scoring_steps + n_batches - tr.announced_scoring
        tr.progress.grow(max(0, min(n_batches, unannounced)))
        for _ in range(n_batches):
            model.train()
            batch = tr.batches.next()
            tr.method.before_forward(model, tr.step)
            with tr.autocast():
                loss = model.loss(model(batch), batch["labels"])
            loss.backward()
            yield loss
            tr.scoring_steps += 1
            tr._tick(loss=f"{loss.item():.4f}", phase="scoring")

    def train(self, n_steps: int, plan: TrainPlan, after_step=None) -> None:
        """Train n steps with a plan (a training burn-in); no evaluation."""
        self.tr.build_optimizers(plan)
        for _ in range(n_steps):
            loss = self.tr.train_step(after_step)
            self.tr._tick(loss=f"{loss.item():.4f}", phase="burn-in")


# ------------------------------------------------------------------------ the trainer


class Trainer:
    def __init__(self, cfg, model, method: Method, data: TaskData, device, eligible: list[str],
                 log_eval=None, log_train=None, checkpoint=None, progress: bool = True, desc: str = ""):
        self.t, self.seed, self.device = cfg.train, cfg.seed, torch.device(device)
        self.model, self.method, self.data, self.eligible = model, method, data, eligible
        self.params = dict(model.named_parameters())
        self.theta0 = {n: self.params[n].detach().clone() for n in eligible}
        self.log_eval = log_eval or (lambda record: None)
        self.train_log = TrainLog(self.t.log_every, log_train or (lambda record: None))
        self.checkpoint = checkpoint  # called with checkpoint.capture(...) every train.checkpoint_every
        self.step = 0  # training steps: weight updates (the schedule, eval cadence and limits count these)
        self.scoring_steps = 0  # scoring batches: forward/backward without an update
        self.autocast = functools.partial(autocast_context, autocast_dtype(self.t.precision, self.device), self.device)
        self.batches = TrainStream(data, self.t.batch_size, self.seed, self.t.group_by_length, self.device)
        self.schedule = LRSchedule(self.t, self.batches)
        self.optimizer: PlanOptimizer | None = None
        self.plan: TrainPlan | None = None  # the main phase's, once select() has run
        self.announced_scoring = 0  # scoring batches counted in the progress total from the start
        self.selection: dict | None = None  # how the method's top-k went (selection.tie_report)
        self.progress = Progress(False, 0, desc)
        self._progress_on, self.desc = progress, desc
        if self.t.compile and self.device.type == "cuda":
            self.model.encoder.forward = torch.compile(self.model.encoder.forward, dynamic=True)

    def _tick(self, **postfix) -> None:
        self.progress.to(self.scoring_steps + self.step, **postfix)

    # -------------------------------------------------------------- what trains, and one training step
    def select_context(self) -> SelectContext:
        """The SelectContext a method's select() gets from this trainer."""
        return SelectContext(self.model, self.eligible, self.theta0, EngineHost(self), seed=self.seed,
                             device=self.device, grad_clip=self.t.grad_clip, head=head_names(self.model))

    def build_optimizers(self, plan: TrainPlan) -> None:
        """Freeze what the plan does not train; one PlanOptimizer for what it does (and the head)."""
        self.params, t = dict(self.model.named_parameters()), self.t  # methods may have added parameters
        dense = list(plan.dense) + (head_names(self.model) if plan.train_head else [])
        self.optimizer = plan_optimizer(self.model, dense, plan.sparse, plan.groups, extra_no_decay=plan.no_decay,
                                        lr=t.lr, betas=t.adam_betas, eps=t.adam_eps, weight_decay=t.weight_decay,
                                        max_grad_norm=t.grad_clip)
    def train_step(self, after_step=None) -> torch.Tensor:
        model, method = self.model, self.method
        model.train()
        batch = self.batches.next()
        method.before_forward(model, self.step)
        with self.autocast():
            loss = model.loss(model(batch), batch["labels"])
        extra = method.extra_loss(model)
        (loss if extra is None else loss + extra).backward()
        method.after_backward(model, self.step)
        lr = self.schedule.lr(self.step)
        self.optimizer.step(lr)
        for p in model.parameters():  # also tensors that train nowhere (e.g. empty selections)
            p.grad = None
        self.step += 1
        if after_step is not None:  # a burn-in's own work after each step (ChildPruning's projection)
            after_step(self.step)
        method.after_step(model, self.step)
        self.train_log.add(self.step, loss.detach(), lr)
        return loss.detach()

    # -------------------------------------------------------------- resumable state
    def state_dict(self) -> dict:
        """What continuing the main phase from this step needs (checkpoint.capture adds early stopping)."""
        return {"step": self.step, "plan": ckpt_lib.plan_record(self.plan),
                "weights": ckpt_lib.snapshot(self.model, self.params, self.plan, self.method),
                "method": self.method.training_state(), "optimizer": self.optimizer.state_dict(),
                "sampler": self.batches.state_dict(), "rng": ckpt_lib.rng_state(self.device),
                "train_log": self.train_log.state()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state_dict after select() was replayed (CheckpointMismatch if it differs)."""
        ckpt_lib.check_plan(state["plan"], self.plan)
        ckpt_lib.restore(self.params, self.plan, state["weights"], self.method)
        self.method.load_training_state(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.batches.load_state_dict(state["sampler"])
        ckpt_lib.set_rng_state(state["rng"], self.device)
        self.step = int(state["step"])
        self.train_log.load(state["train_log"])

    # -------------------------------------------------------------- evaluation, and the run
    def evaluate(self, split: str, limit: int | None = None) -> dict:
        """The task's metrics on a split's first `limit` examples, on the weights the method says."""
        weights = self.method.eval_weights(self.model, split) if self.method else contextlib.nullcontext()
        with weights:
            preds = predict(self.model, self.data, split, self.t.eval_batch_size, self.device, self.autocast, limit)
        return metrics_lib.compute(self.data.spec, preds, self.data.labels(split)[: len(preds)])
    def fit(self, resume: dict | None = None) -> FitResult:
        """Select, train with early stopping, restore the best weights, finalize. `resume`: a
        checkpoint.capture; select() is replayed (burn-ins are deterministic), then its state loaded."""
        t, timings = self.t, {}
        # The bar's total counts the scoring batches the method announces, so it does not jump when they start.
        self.announced_scoring = self.method.opts.scoring_batches(self.batches.batches_per_epoch)
        self.progress = Progress(self._progress_on, t.max_steps + self.announced_scoring, self.desc)
        try:
            t0, ctx = time.perf_counter(), self.select_context()
            plan = self.method.select(self.model, ctx)
            timings["select_s"] = time.perf_counter() - t0
            burnin = self.step
            if self.step >= t.max_steps:  # config validation rejects this for every shipped method
                raise UserError(f"method '{self.method.name}': its burn-in took {self.step} training steps, "
                                f"train.max_steps is {t.max_steps}: no main-phase step is left")
            self.plan = plan
            self.build_optimizers(plan)
            st = EarlyStopping(best_step=self.step)
            if resume is not None:
                self.load_state_dict(resume)
                st = EarlyStopping.from_state(resume["early_stopping"])
                self._tick()
            stopped, t1 = "max_steps", time.perf_counter()
            while self.step < t.max_steps:
                st.losses.append(self.train_step())
                at_eval = self.step % t.eval_every == 0 or self.step == t.max_steps
                # Not every step (.item() waits for the GPU); at the main phase's first, to relabel the phase.
                if self.step % 25 == 0 or at_eval or self.step == burnin + 1:
                    self._tick(phase="train", loss=f"{st.losses[-1].item():.4f}",
                               best=f"{st.best_val['major']:.2f}" if st.best_val else "-")
                if at_eval and self.evaluate_and_track(plan, st):
                    stopped = "patience"
                    break
                every = t.checkpoint_every
                if self.checkpoint and (at_eval if every == "eval" else every and self.step % every == 0):
                    self.checkpoint(ckpt_lib.capture(self.state_dict(), st))
            opt_bytes = self.optimizer.state_bytes()  # AdamW allocates its state at the first step
            timings.update(train_s=time.perf_counter() - t1 - st.eval_s, eval_s=st.eval_s)
            ckpt_lib.restore(self.params, plan, st.best, self.method)
            self.method.finalize(self.model)
            plan = self.method.final_plan(plan)
            # A method that re-projects during training (DiffPruning's remask) reports its last top-k.
            self.selection = ctx.selection or self.method.report().get("selection")
        finally:
            self.progress.close()
        set_trainable(self.model, ())
        return FitResult(plan=plan, best_step=st.best_step, steps=self.step, burnin_steps=burnin,
                         scoring_steps=self.scoring_steps, best_val=st.best_val, n_evals=st.n_evals,
                         stopped=stopped, timings=timings, optimizer_state_bytes=opt_bytes,
                         resumed_from=resume["step"] if resume else None)

    def evaluate_and_track(self, plan: TrainPlan, st: EarlyStopping) -> bool:
        """Evaluate on val, keep the best weights, log; True when early stopping ends the run."""
        te = time.perf_counter()
        val = self.evaluate("val", self.t.val_subset)
        st.eval_s += time.perf_counter() - te
        loss = st.mean_loss()
        best = st.observe(self.step, val, lambda: ckpt_lib.snapshot(self.model, self.params, plan, self.method))
        self.log_eval({"step": self.step, "train_loss": loss, "lr": self.schedule.lr(self.step), "val": val, "best": best})
        if not math.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss} at step {self.step}")
        return st.bad >= self.t.patience and self.step >= self.t.min_steps
