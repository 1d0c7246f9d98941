"""SAM and the other sparse selectors inside Hugging Face's `transformers.Trainer`.

    from transformers import Trainer, TrainingArguments
    from sam_peft.hf import SparseFineTuning

    args = TrainingArguments("out/rte", learning_rate=1e-4, weight_decay=0.01, max_steps=2000, max_grad_norm=0)
    sparse = SparseFineTuning(model, args, selector="sam", density=0.005, scoring_batches=100, max_grad_norm=1.0)
    trainer = Trainer(model=model, args=args, train_dataset=train_dataset,
                      optimizers=(sparse.optimizer, None), callbacks=[sparse])
    trainer.train()          # out/rte/delta.safetensors holds what changed

`SparseFineTuning` is both the optimizer's maker and a TrainerCallback:
- at construction it copies the pretrained values (theta0) of the eligible parameters (by
  default the encoder, `model.base_model_prefix`), lets every other parameter (the task head)
  train whole, and makes a torch Optimizer with TrainingArguments' learning rate, weight decay,
  betas and epsilon, so that Trainer builds its LR scheduler on it as on its own AdamW;
- when training begins, before the first step, it scores the eligible entries: for "sam", the
  gradients of `scoring_batches` batches of Trainer's own train dataloader are summed and
  squared, with no update and no scheduler step; "magnitude" and "random" read no data, and a
  function `(model, batches, loss_fn, names) -> {name: scores}` can score instead;
- it keeps exactly floor(p * m) entries (sam_peft.lib.top_k), and the optimizer becomes
  sam_peft.lib.SparseTrainer: AdamW on those entries (sam_peft.optim.SparseAdamW, which never
  writes the others, so they stay bit-identical to theta0, weight decay included) and on the
  head, at the learning rate Trainer's scheduler sets each step;
- when training ends it writes the delta (sam_peft.lib.save_delta) to
  `<output_dir>/delta.safetensors`; `sam_peft.lib.apply_delta(fresh_model, path)` rebuilds the
  fine-tuned model from the pretrained one.

Clipping: Trainer clips the whole gradient (TrainingArguments.max_grad_norm, 1.0 by default).
The paper's protocol clips by the norm of the trained entries only: pass `max_grad_norm` here
and set TrainingArguments(max_grad_norm=0). Setting both is refused, since the second clip
would never act.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from transformers import TrainerCallback

from sam_peft import lib

__all__ = ["SparseFineTuning", "SparseAdamWOptimizer", "SELECTORS"]

SELECTORS = ("sam", "magnitude", "random")
DELTA_FILE = "delta.safetensors"


def model_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The loss a Hugging Face model computes itself when the batch holds labels."""
    return model(**batch).loss


class SparseAdamWOptimizer(torch.optim.Optimizer):
    """The torch Optimizer that Trainer, accelerate and the LR scheduler see.

    Its one parameter group holds the eligible and the dense parameters and carries the
    learning rate the scheduler sets. The update itself is sam_peft.lib.SparseTrainer's, made
    by `select(mask)`; stepping before that is an error.
    """

    def __init__(self, model: nn.Module, eligible: list[str], dense: list[str], lr: float,
                 weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8, max_grad_norm: float = 0.0):
        named = dict(model.named_parameters())
        super().__init__([named[n] for n in [*eligible, *dense]],
                         {"lr": lr, "weight_decay": weight_decay, "betas": tuple(betas), "eps": eps})
        self.model = model
        self.dense_names = list(dense)
        self.max_grad_norm = max_grad_norm
        self.mask: dict[str, torch.Tensor] | None = None
        self.sparse_trainer: lib.SparseTrainer | None = None

    def select(self, mask: dict[str, torch.Tensor]) -> None:
        """Train exactly these entries (and the dense parameters) from now on."""
        group = self.param_groups[0]
        self.mask = mask
        self.sparse_trainer = lib.SparseTrainer(
            self.model, mask, lr=group["lr"], dense=self.dense_names, weight_decay=group["weight_decay"],
            betas=group["betas"], eps=group["eps"], max_grad_norm=self.max_grad_norm)

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.sparse_trainer is None:
            raise RuntimeError("SparseAdamWOptimizer: no entries selected yet; pass the SparseFineTuning "
                               "object to the Trainer as a callback too (callbacks=[sparse])")
        self.sparse_trainer.lr = self.param_groups[0]["lr"]
        self.sparse_trainer.step()
        return loss

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.sparse_trainer is not None:
            state["sam_peft"] = {"mask": {n: i.cpu() for n, i in self.mask.items()},
                                 "optimizer": self.sparse_trainer.state_dict()}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        ours = state_dict.pop("sam_peft", None)
        super().load_state_dict(state_dict)
        if ours is None:
            return
        # A checkpoint of a run past its selection (Trainer's resume_from_checkpoint): keep its entries.
        device = next(iter(self.param_groups[0]["params"])).device
        self.select({n: i.to(device) for n, i in ours["mask"].items()})
        self.sparse_trainer.load_state_dict(ours["optimizer"])


class SparseFineTuning(TrainerCallback):
    """Sparse fine-tuning (SAM, MagPruning's or random selection) inside transformers.Trainer.

    model:           the model Trainer trains (e.g. an AutoModelForSequenceClassification).
    args:            its TrainingArguments: learning rate, weight decay, Adam betas and epsilon,
                     seed (random selection) and output_dir (the delta) come from here.
    selector:        "sam" (default), "magnitude", "random", or a function
                     (model, batches, loss_fn, eligible_names) -> {name: scores}.
    density:         p; exactly floor(p * m) of the m eligible entries train.
    topk:            "global" (default) or "per_tensor" (each tensor its proportional share).
    scoring_batches: train batches whose gradients the scores sum ("sam" and functions).
    score:           "sam"'s score: "squared_sum" (the paper), "fisher" or "abs_sum".
    params:          the eligible parameter names (default: the encoder, every parameter under
                     model.base_model_prefix; all parameters if the model has no such prefix).
    dense:           parameters that train whole (default: every other parameter that requires
                     grad, i.e. the task head). Parameters in neither list are frozen.
    loss_fn:         (model, batch) -> loss for the scoring pass (default: the model's own loss).
    max_grad_norm:   clip by the norm of the trained entries (0: off; see the module's note).
    delta_path:      where the delta goes when training ends (default <output_dir>/delta.safetensors;
                     None: not written; `save_delta(path)` writes it at any time).
    """

    def __init__(self, model: nn.Module, args, *, selector: str | Callable = "sam", density: float = 0.005,
                 topk: str = "global", scoring_batches: int = 64, score: str = "squared_sum",
                 params: list[str] | None = None, dense: list[str] | None = None,
                 loss_fn: Callable = model_loss, max_grad_norm: float = 0.0, delta_path: str | None = DELTA_FILE):
        if not callable(selector) and selector not in SELECTORS:
            raise ValueError(f"selector {selector!r}: one of {', '.join(SELECTORS)}, or a scoring function")
        if not 0 < density < 1:
            raise ValueError(f"density {density!r}: must be in (0, 1)")
        if topk not in ("global", "per_tensor"):
            raise ValueError(f"topk {topk!r}: 'global' or 'per_tensor'")
        if scoring_batches < 1:
            raise ValueError("scoring_batches: at least 1")
        named = dict(model.named_parameters())
        self.eligible = list(params) if params is not None else _encoder_names(model)
        missing = [n for n in self.eligible if n not in named]
        if missing:
            raise KeyError(f"no parameter named {missing[0]!r} in the model")
        if dense is None:
            dense = [n for n, p in named.items() if n not in self.eligible and p.requires_grad]
        self.dense = list(dense)
        both = set(self.eligible) & set(self.dense)
        if both:
            raise ValueError(f"parameter {sorted(both)[0]!r} is both eligible (sparse) and dense")
        for n, p in named.items():  # what neither selection nor the head uses gets no gradient
            p.requires_grad_(n in self.eligible or n in self.dense)

        self.model = model
        self.selector = selector
        self.density = density
        self.topk = topk
        self.scoring_batches = scoring_batches
        self.score = score
        self.loss_fn = loss_fn
        self.seed = args.seed
        self.theta0 = lib.snapshot(model, self.eligible)  # pretrained values, before Trainer touches them
        self.delta_path = None if delta_path is None else os.path.join(args.output_dir, delta_path)
        _check_clipping(args, max_grad_norm)
        self.optimizer = SparseAdamWOptimizer(
            model, self.eligible, self.dense, lr=args.learning_rate, weight_decay=args.weight_decay,
            betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, max_grad_norm=max_grad_norm)

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

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if self.optimizer.mask is not None:  # selected earlier (a second train() or a resumed checkpoint)
            return
        _check_clipping(args, self.optimizer.max_grad_norm)  # the arguments Trainer actually runs with
        device = next(self.model.parameters()).device
        self.theta0 = {n: t.to(device) for n, t in self.theta0.items()}  # Trainer may have moved the model
        # The scoring pass draws batch orders and dropout from torch's random state; forking it
        # leaves training the data order and dropout it would have without the pass, which is
        # also what a run resumed from a checkpoint (no scoring pass) gets.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            scores = self._scores(train_dataloader, device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Each process scored its own shard of the data: all of them take process 0's scores,
            # so that every replica trains the same entries.
            for score in scores.values():
                torch.distributed.broadcast(score, src=0)
        self.optimizer.select(lib.top_k(scores, self.density, self.topk))

    def on_train_end(self, args, state, control, **kwargs):
        if self.delta_path is not None and state.is_world_process_zero and self.mask is not None:
            self.save_delta(self.delta_path)

    # ------------------------------------------------------------------ scoring and the delta

    def _scores(self, train_dataloader, device) -> dict[str, torch.Tensor]:
        if self.selector == "magnitude":
            return lib.magnitude_scores(self.model, self.eligible)
        if self.selector == "random":
            return lib.random_scores(self.model, self.eligible, seed=self.seed)
        if train_dataloader is None:
            raise RuntimeError("SparseFineTuning: Trainer passed no train dataloader to score with")
        batches = itertools.islice(_on_device(_epochs(train_dataloader), device), self.scoring_batches)
        if self.selector == "sam":
            return lib.sam_scores(self.model, batches, self.loss_fn, self.eligible, score=self.score)
        return self.selector(self.model, batches, self.loss_fn, self.eligible)

    def save_delta(self, path, **metadata) -> int:
        """Write what changed (the chosen entries that moved, and the dense parameters whole);
        returns the file size in bytes."""
        base = getattr(getattr(self.model, "config", None), "_name_or_path", "") or ""
        selector = self.selector if isinstance(self.selector, str) else getattr(self.selector, "__name__", "custom")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return lib.save_delta(path, self.model, self.theta0, base_model=base, whole=self.dense,
                              selector=selector, density=self.density, topk=self.topk,
                              scoring_batches=self.scoring_batches, **metadata)


def _check_clipping(args, max_grad_norm: float) -> None:
    if max_grad_norm and args.max_grad_norm:
        raise ValueError(
            f"clipping twice: TrainingArguments.max_grad_norm={args.max_grad_norm} clips the whole gradient before "
            f"the optimizer clips its trained entries at {max_grad_norm}; set one of them to 0")


def _encoder_names(model: nn.Module) -> list[str]:
    prefix = getattr(model, "base_model_prefix", "") or ""
    names = [n for n, _ in model.named_parameters()]
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
