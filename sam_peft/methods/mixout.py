"""Mixout (Lee et al. 2020): during training, parts of the weights are swapped for their pretrained values.

Full fine-tuning (every eligible parameter trains) in which, at every training step, the weight
of each Linear layer of the encoder is mixed with its pretrained value, as Lee et al.'s
implementation does (bloodwass/mixout: mixout.py's Mixout function, MixLinear):
- only nn.Linear weights are mixed: never biases, embeddings or LayerNorms;
- `mask: column` (default): one Bernoulli(1 - p) draw per input column, shared by all rows of
  the weight (their noise[0] repeated over the rows); `mask: entry` draws one per entry;
- with keep mask M, the forward pass sees  w~ = ((1 - M) w0 + M w - p w0) / (1 - p),
  written here as w0 + M (w - w0) / (1 - p) (the same value; it is w0 bit for bit wherever
  w == w0, so step 0 sees the pretrained model), and E[w~] = w: inference uses w;
- the backward pass returns dL/dw = M * dL/dw~, exactly as their Function's backward does
  (it omits the 1 / (1 - p) of the true derivative; Adam is insensitive to that constant
  scale up to its eps and the clipping threshold);
- the encoder's dropout is set to 0 (their examples replace every Dropout by Dropout(0) when
  Mixout is used); `keep_dropout: true` keeps it.

`mix_head: true` is the other reading of Lee et al.'s Hugging Face example, which sets every
Dropout of the model to 0 and mixes every nn.Linear, the classifier included: the task head's
Linear weights are then mixed too (towards their initial values, the only "pretrained" value a
new head has) and the head's dropout is 0 as well. The default mixes and un-drops the encoder
only, the pretrained part that Mixout regularises towards.

`p` (0.9): the swap probability; the paper does not state it, 0.9 is Lee et al.'s value for
large models.

`mode: eval_reset` reproduces the paper authors' code instead: plain full fine-tuning (dropout
kept, nothing mixed during training), and every evaluation — each validation during training
and the final val, test and train evaluations — sees a fresh copy in which each eligible entry
is reset to theta0 with probability p, without rescaling (their run_val). The reset masks come
from a stream seeded by the run seed; the final evaluations use a stream seeded by (seed,
split), so that `sam-peft eval` reproduces them from the delta.
"""

from __future__ import annotations

import contextlib
import zlib
from typing import Literal

import torch
from pydantic import Field, model_validator

from sam_peft.methods import register_method
from sam_peft.methods.base import Method, MethodOptions, TrainPlan
from sam_peft.params import linear_weight_names


class MixoutOptions(MethodOptions):
    p: float = Field(0.9, ge=0, lt=1)
    mode: Literal["train", "eval_reset"] = "train"
    mask: Literal["column", "entry"] = "column"
    keep_dropout: bool = False
    mix_head: bool = False

    @model_validator(mode="after")
    def _mix_head_mixes(self):
        if self.mix_head and self.mode != "train":
            raise ValueError("mix_head: true mixes the head's Linear weights during training; mode eval_reset "
                             "mixes nothing then")
        return self


def mix(w: torch.Tensor, w0: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """The mixed weight w0 + keep * (w - w0) / (1 - p); its expectation over keep is w."""
    return torch.where(keep, w0 + (w - w0) / (1 - p), w0)


def _final_seed(seed: int, split: str) -> int:
    return (7_919 * seed + zlib.crc32(split.encode())) % 2**62


@register_method("mixout")
class Mixout(Method):
    display = "MixOut"
    paper_row = 3
    category = "full"
    Options = MixoutOptions

    def __init__(self, opts):
        super().__init__(opts)
        self._params: dict[str, torch.nn.Parameter] = {}  # the eligible parameters (all train)
        self._mixed: list[str] = []  # the Linear weights among them (mode train mixes these)
        self._theta0: dict[str, torch.Tensor] = {}
        self._generator: torch.Generator | None = None
        self._seed = 0
        self._saved: dict[str, torch.Tensor] = {}  # w while a step's forward/backward sees w~
        self._keep: dict[str, torch.Tensor] = {}
        self._finalized = False

    def wrap(self, model) -> None:
        if self.opts.mode == "train" and not self.opts.keep_dropout:
            for module in (model if self.opts.mix_head else model.encoder).modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0

    def select(self, model, ctx) -> TrainPlan:
        params, theta0 = dict(ctx.eligible), ctx.theta0
        if self.opts.mix_head:  # the head's Linear weights mix towards their initial values
            named = dict(model.named_parameters())
            head = [n for n in ctx.head if n in linear_weight_names(model)]
            params.update({n: named[n] for n in head})
            theta0 = {**theta0, **{n: named[n].detach().clone() for n in head}}
        self._attach(params, theta0, ctx.seed, ctx.device)
        self._mixed = [n for n in self._params if n in linear_weight_names(model)]
        return ctx.full_plan()

    def _attach(self, params, theta0, seed, device) -> None:
        self._params, self._theta0, self._seed = params, theta0, seed
        # Its own stream (not the global one that dropout uses), on the parameters' device so
        # that drawing the masks does not cross devices; seeded from the run seed.
        self._generator = torch.Generator(device=device).manual_seed(7_919 * seed + 11)

    def attach_for_eval(self, model, params, theta0, seed, device) -> None:
        """`sam-peft eval`: the final evaluations of eval_reset mode, rebuilt from the delta."""
        if self.opts.mode == "eval_reset":
            self._attach(params, theta0, seed, device)
        self._finalized = True

    def _keep_mask(self, p: torch.Tensor, mask: str, generator) -> torch.Tensor:
        """Bernoulli(1 - p): True keeps the fine-tuned value; per input column or per entry."""
        shape = p.shape[-1:] if mask == "column" and p.dim() == 2 else p.shape
        keep = torch.rand(shape, generator=generator, device=generator.device) >= self.opts.p
        return keep.to(p.device).expand_as(p)

    @torch.no_grad()
    def before_forward(self, model, step: int) -> None:
        if self.opts.mode != "train" or self._finalized:
            return
        for n in self._mixed:
            p = self._params[n]
            keep = self._keep_mask(p, self.opts.mask, self._generator)
            self._saved[n] = p.detach().clone()
            self._keep[n] = keep
            p.copy_(mix(p, self._theta0[n], keep, self.opts.p))

    @torch.no_grad()
    def after_backward(self, model, step: int) -> None:
        if not self._saved:
            return
        for n in self._mixed:
            p = self._params[n]
            p.copy_(self._saved.pop(n))
            keep = self._keep.pop(n)
            if p.grad is not None:
                # As Lee et al.'s backward: the kept entries pass dL/dw~ on, swapped ones get none.
                p.grad.copy_(torch.where(keep, p.grad, torch.zeros_like(p.grad)))

    def training_state(self) -> dict:
        # The mask stream must continue where it stopped when a killed run resumes.
        return {"generator": self._generator.get_state()} if self._generator is not None else {}

    def load_training_state(self, state: dict) -> None:
        if "generator" in state and self._generator is not None:
            self._generator.set_state(state["generator"])

    def eval_weights(self, model, split: str):
        if self.opts.mode != "eval_reset" or not self._params:
            return contextlib.nullcontext()
        if self._finalized:  # final evaluations: a stream per split, reproducible from the delta
            device = next(iter(self._params.values())).device
            return self._reset_copy(torch.Generator(device=device).manual_seed(_final_seed(self._seed, split)))
        return self._reset_copy(self._generator)

    @contextlib.contextmanager
    def _reset_copy(self, generator):
        """The authors' evaluation: each entry reset to theta0 with probability p, no rescaling."""
        saved = {}
        with torch.no_grad():
            for n, p in self._params.items():
                saved[n] = p.detach().clone()
                p.copy_(torch.where(self._keep_mask(p, "entry", generator), p, self._theta0[n]))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self._params.items():
                    p.copy_(saved[n])

    def finalize(self, model) -> None:
        # The weights between steps are always the plain w; nothing to undo.
        self._finalized = True
