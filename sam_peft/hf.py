"""SAM and the other sparse selectors inside Hugging Face's `transformers.Trainer`.

    from transformers import Trainer, TrainingArguments
    from sam_peft.hf import SparseFineTuning

    args = TrainingArguments("out/rte", learning_rate=1e-4, max_steps=2000, save_strategy="no")
    sparse = SparseFineTuning(model, args, selector="sam", density=0.005, burnin_steps=100)
    trainer = Trainer(model=model, args=args, train_dataset=train_dataset,
                      optimizers=(sparse.optimizer, None), callbacks=[sparse])
    trainer.train()          # out/rte/delta.safetensors holds what changed

`SparseFineTuning` is both the optimizer's maker and a TrainerCallback:
- `selector` names any registered method whose work is choosing floor(p*m) entries
  (`sam_peft.lib.selectors()`: random, magprune, sam, childprune with variant "fisher", and
  every such method added later); further keyword arguments are that method's own options
  (sam: burnin_steps = scoring batches, score, topk, clip_burnin_grads). Its own `select` runs,
  as in `sam-peft run`, through sam_peft.lib.select; a method that trains or changes the model
  while it selects is refused at construction, saying why.
- at construction it copies the pretrained values (theta0) of the eligible parameters (by
  default the encoder, `model.base_model_prefix`), lets every other parameter (the task head)
  train whole, and makes a torch Optimizer (sam_peft.lib.SparseTrainer) with TrainingArguments'
  learning rate, weight decay, betas and epsilon, so that Trainer builds its LR scheduler on it;
- when training begins, before the first step, it checks that Trainer steps that optimizer, then
  selects: scoring batches (SAM's burn-in, ChildTuning-D's Fisher pass) come from Trainer's own
  train dataloader, with a progress bar, no update and no scheduler step; the chosen entries
  then train with AdamW (entries outside them are never written, so they stay bit-identical
  to theta0, weight decay included) at the learning rate Trainer's scheduler sets each step;
- when training ends it writes the delta (sam_peft.lib.save_delta) to
  `<output_dir>/delta.safetensors`; `sam_peft.lib.apply_delta(fresh_model, path)` rebuilds the
  fine-tuned model from the pretrained one.

Clipping and grad_norm: the paper's protocol clips by the norm of the trained entries only.
TrainingArguments.max_grad_norm (1.0 by default) is taken over as that clip, and set to 0 so that
Trainer does not clip the whole gradient first; `max_grad_norm` here sets it instead (giving
both, non-zero, is refused). The logged `grad_norm` is the trained entries' norm before clipping.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from transformers import TrainerCallback

from sam_peft import lib
from sam_peft.delta import hf_record
from sam_peft.params import linear_weight_names
from sam_peft.selection import zero_budget

log = logging.getLogger("sam_peft")

__all__ = ["SparseFineTuning", "model_loss"]

DELTA_FILE = "delta.safetensors"


def model_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The loss a Hugging Face model computes itself when the batch holds labels."""
    return model(**batch).loss


class SparseFineTuning(TrainerCallback):
    """Sparse fine-tuning with a registered selector (SAM by default) inside transformers.Trainer.

    model:         the model Trainer trains (e.g. an AutoModelForSequenceClassification).
    args:          its TrainingArguments: learning rate, weight decay, Adam betas and epsilon,
                   max_grad_norm, seed (the selection's randomness) and output_dir (the delta).
    selector:      a name from sam_peft.lib.selectors() (default "sam").
    **options:     the selector's options, e.g. density=0.005 (p: exactly floor(p * m) of the m
                   eligible entries train), burnin_steps, score, topk, variant.
    params:        the eligible parameter names (default: a language model's every parameter, a
                   tied weight once; else the encoder, every parameter under model.base_model_prefix,
                   or all parameters if the model has no such prefix); "linear_weights": the
                   nn.Linear weights among those (what a PEFT SHiRA adapter holds).
    dense:         parameters that train whole (default: those outside the default eligible ones
                   that require grad, i.e. the task head). Parameters in neither list are frozen.
    loss_fn:       (model, batch) -> loss for the scoring batches (default: the model's own loss).
    max_grad_norm: clip by the norm of the trained entries (default: TrainingArguments'; see the
                   module's note).
    delta_path:    where the delta goes when training ends (default <output_dir>/delta.safetensors;
                   None: not written; `save_delta(path)` writes it at any time).
    scoring_dtype: the score accumulators' dtype: torch.float32 (4 bytes per eligible entry) or
                   torch.bfloat16 (2 bytes) for models near the accelerator's memory.

    A scoring batch is `gradient_accumulation_steps` of Trainer's micro-batches, as one optimizer
    step is; the model's own loss leaves out padded positions (labels -100).
    """

    def __init__(self, model: nn.Module, args, selector: str = "sam", *, params: list[str] | None = None,
                 dense: list[str] | None = None, loss_fn: Callable = model_loss, max_grad_norm: float | None = None,
                 delta_path: str | None = DELTA_FILE, scoring_dtype: torch.dtype = torch.float32, **options):
        self.method = lib.sparse_method(selector, **options)  # one-line ValueError for what cannot run here
        self.selector, self.options = selector, options
        named = dict(model.named_parameters())  # a tied weight (an LM's embeddings and lm_head) once
        default = _default_eligible(model)
        if params == "linear_weights":  # what a PEFT SHiRA adapter can hold (sam_peft.export.peft_shira)
            linear = linear_weight_names(model)
            params = [n for n in default if n in linear]
        self.eligible = list(params) if params is not None else default
        missing = [n for n in self.eligible if n not in named]
        if missing:
            raise KeyError(f"no parameter named {missing[0]!r} in the model")
        if dense is None:  # the task head: what lies outside the default eligible parameters
            dense = [n for n, p in named.items() if n not in default and n not in self.eligible and p.requires_grad]
        self.dense = list(dense)
        both = set(self.eligible) & set(self.dense)
        if both:
            raise ValueError(f"parameter {sorted(both)[0]!r} is both eligible (sparse) and dense")
        name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        message = zero_budget("density", self.method.opts.density, sum(named[n].numel() for n in self.eligible),
                                  name)
        if message:
            raise ValueError(message)
        for n, p in named.items():  # what neither selection nor the head uses gets no gradient
            p.requires_grad_(n in self.eligible or n in self.dense)

        self.model = model
        self.scoring_dtype = scoring_dtype
        self.density = self.method.opts.density
        self.loss_fn = loss_fn
        self.seed = args.seed
        self.theta0 = lib.snapshot(model, self.eligible)  # pretrained values, before Trainer touches them
        self.delta_path = None if delta_path is None else os.path.join(args.output_dir, delta_path)
        self._clip_taken_over = max_grad_norm is None and bool(args.max_grad_norm)
        self.optimizer = lib.SparseTrainer(
            model, eligible=self.eligible, dense=self.dense, lr=args.learning_rate, weight_decay=args.weight_decay,
            betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
            max_grad_norm=_take_over_clipping(args, max_grad_norm))

    # ------------------------------------------------------------------ what was chosen

    @property
    def mask(self) -> dict[str, torch.Tensor] | None:
        """{name: sorted flat indices} of the entries that train; None before training begins."""
        return self.optimizer.mask

    @property
    def n_params(self) -> int:
        """m: the eligible entries."""
        return sum(t.numel() for t in self.theta0.values())

    @property
    def n_selected(self) -> int:
        return sum(int(i.numel()) for i in self.mask.values()) if self.mask is not None else 0

    def count_changed(self) -> int:
        """Eligible entries that now differ from their pretrained values."""
        return lib.count_changed(self.model, self.theta0)

    # ------------------------------------------------------------------ Trainer events

    def on_train_begin(self, args, state, control, train_dataloader=None, optimizer=None, **kwargs):
        if optimizer is not None and optimizer is not self.optimizer and getattr(optimizer, "optimizer", None) \
                is not self.optimizer:  # accelerate wraps the optimizer it is given
            raise ValueError("SparseFineTuning: the Trainer steps another optimizer, which would train every entry "
                             "densely; pass optimizers=(sparse.optimizer, None) to Trainer")
        if self.optimizer.mask is not None:  # selected earlier (a second train() or a resumed checkpoint)
            return
        # The arguments Trainer actually runs with (they may not be the ones given at construction).
        if self._clip_taken_over and args.max_grad_norm == self.optimizer.max_grad_norm:
            args.max_grad_norm = 0.0  # the same clip, taken over again
        self.optimizer.max_grad_norm = _take_over_clipping(args, self.optimizer.max_grad_norm)
        device = next(self.model.parameters()).device
        self.theta0 = {n: t.to(device) for n, t in self.theta0.items()}  # Trainer may have moved the model
        # The scoring batches draw batch orders and dropout from torch's random state; forking it
        # leaves training the data order and dropout it would have without them, which is
        # also what a run resumed from a checkpoint (no scoring pass) gets.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            mask = self._select(args, state, train_dataloader, device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Each process scored its own shard of the data: all of them take process 0's choice,
            # so that every replica trains the same entries.
            for idx in mask.values():
                torch.distributed.broadcast(idx, src=0)
        self.optimizer.select(mask)
        log.info("SparseFineTuning: %s chose %d of %d entries (p = %s); they and %d dense tensors train",
                 self.selector, self.n_selected, self.n_params, self.density, len(self.dense))

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Trainer's own grad_norm would be over the whole gradient (or absent, clipping being ours).
        norm = self.optimizer.last_grad_norm
        if logs is not None and "loss" in logs and norm is not None:
            logs["grad_norm"] = norm
            if state.log_history and "loss" in state.log_history[-1]:
                state.log_history[-1]["grad_norm"] = norm

    def on_train_end(self, args, state, control, **kwargs):
        if self.delta_path is not None and state.is_world_process_zero and self.mask is not None:
            self.save_delta(self.delta_path)

    # ------------------------------------------------------------------ selection and the delta

    def _select(self, args, state, train_dataloader, device) -> dict[str, torch.Tensor]:
        batches, per_epoch = (), None
        if train_dataloader is not None:
            batches = _on_device(_epochs(train_dataloader), device)
            per_epoch = len(train_dataloader) if hasattr(train_dataloader, "__len__") else None
        show = not args.disable_tqdm and state.is_local_process_zero

        def progress(n: int):
            log.info("SparseFineTuning: %s scores %d batches (no update)", self.selector, n)
            if not show:
                return lambda: None
            from tqdm.auto import tqdm

            bar = tqdm(total=n, desc=f"scoring ({self.selector})", unit="batch", leave=False)

            def tick():
                bar.update(1)
                if bar.n >= n:
                    bar.close()
            return tick

        accumulation = max(1, args.gradient_accumulation_steps)
        if per_epoch is not None:
            per_epoch = -(-per_epoch // accumulation)  # optimizer steps per epoch
        return lib.select(self.model, self.selector, batches=batches, loss_fn=self.loss_fn, params=self.eligible,
                          head=self.dense, seed=self.seed, grad_clip=self.optimizer.max_grad_norm,
                          batches_per_epoch=per_epoch, progress=progress, accumulation=accumulation,
                          stats_dtype=self.scoring_dtype, **self.options)

    def save_delta(self, path, **metadata) -> int:
        """Write what changed (the chosen entries that moved, and the dense parameters whole);
        returns the file size in bytes."""
        base = getattr(getattr(self.model, "config", None), "_name_or_path", "") or ""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        options = {k: v for k, v in self.method.opts.model_dump().items() if k != "name"}
        return lib.save_delta(path, self.model, self.theta0, base_model=base, whole=self.dense,
                              selector=self.selector, hf=hf_record(self.model), **options, **metadata)


def _take_over_clipping(args, max_grad_norm: float | None) -> float:
    """The clip of the trained entries: `max_grad_norm`, else TrainingArguments', which is then set to
    0 so that Trainer does not clip the whole gradient before the optimizer sees it."""
    if max_grad_norm is not None and max_grad_norm and args.max_grad_norm:
        raise ValueError(
            f"clipping twice: TrainingArguments.max_grad_norm={args.max_grad_norm} clips the whole gradient before "
            f"the optimizer clips its trained entries at {max_grad_norm}; set one of them to 0")
    if max_grad_norm is None:
        max_grad_norm = args.max_grad_norm or 0.0
    if args.max_grad_norm:
        log.info("SparseFineTuning: clipping the trained entries at %s (TrainingArguments.max_grad_norm set to 0)",
                 args.max_grad_norm)
        args.max_grad_norm = 0.0
    return max_grad_norm


def _default_eligible(model: nn.Module) -> list[str]:
    """A language model (one with output embeddings: causal or masked LM): every parameter, its
    head included, since an LM head is a vocab x hidden matrix, often a tenth of the model or more.
    Otherwise the encoder (model.base_model_prefix), the task head training whole beside it."""
    names = [n for n, _ in model.named_parameters()]
    get_output = getattr(model, "get_output_embeddings", None)
    if get_output is not None and get_output() is not None:
        return names
    prefix = getattr(model, "base_model_prefix", "") or ""
    under = [n for n in names if prefix and n.startswith(prefix + ".")]
    return under or names


def _epochs(dataloader: Iterable) -> Iterator:
    """The dataloader's batches, epoch after epoch (a scoring pass may be longer than one epoch)."""
    while True:
        empty = True
        for batch in dataloader:
            empty = False
            yield batch
        if empty:
            return


def _on_device(batches: Iterable, device: torch.device) -> Iterator:
    for batch in batches:
        if isinstance(batch, dict) or hasattr(batch, "items"):
            yield {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        else:
            yield batch
