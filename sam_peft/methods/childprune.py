"""ChildPruning: choose a child network of floor(p*m) entries, then train only those.

- `variant: paper` (default; the paper's description, and the authors' closest code): train
  all eligible parameters for `burnin_steps` training steps (500), and after every step keep the
  top floor(p*m) entries by |theta - theta0| and reset the rest to theta0 bit for bit. The mask
  of the last projection is then fixed and the chosen entries keep training from where they
  are. `topk: per_tensor` gives each tensor its share, as the authors' code did. The burn-in
  updates weights, so its steps are steps of the schedule every method shares.
- `variant: fisher`: ChildTuning-D (Xu et al. 2021, alibaba/AliceMind ChildTuning/ChildTuningD.py):
  one pass over the training data (ceil(n_train / batch_size) scoring batches, no update, no
  training step) accumulates the Fisher information: each tensor's gradient is clipped on its
  own to `train.grad_clip` (their max_grad_norm), squared, summed, and the sum divided by the
  number of batches. As in the original, only the parameters inside the transformer layers are
  scored (their `'layer' in name`: not the embeddings, not the pooler); `fisher_scope: eligible`
  scores every eligible parameter instead. The top floor(p*m_scored) entries then train, where
  m_scored counts the scored entries (the original's reserve_p is a share of those).
  Difference kept on purpose: the original trains the unscored parameters (embeddings, pooler)
  densely alongside the child network; here they stay frozen, so that ChildPruning is a
  p-sparse method like the other rows, and the chosen entries train with plain AdamW (no
  ChildTuning gradient rescaling).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from sam_peft.errors import UserError
from sam_peft.methods import register_method
from sam_peft.methods.base import Method, SparseOptions, TrainPlan
from sam_peft.params import in_numbered_layer


class ChildPruneOptions(SparseOptions):
    burnin_steps: int = Field(500, ge=1)
    variant: Literal["paper", "fisher"] = "paper"
    fisher_scope: Literal["layers", "eligible"] = "layers"

    def training_burnin(self) -> int:
        return self.burnin_steps if self.variant == "paper" else 0

    def scoring_batches(self, batches_per_epoch: int) -> int:
        return batches_per_epoch if self.variant == "fisher" else 0  # ChildTuning-D's one pass


@register_method("childprune")
class ChildPruning(Method):
    display = "ChildPruning"
    paper_row = 9
    category = "sparse"
    Options = ChildPruneOptions

    def __init__(self, opts):
        super().__init__(opts)
        self.mask: dict[str, torch.Tensor] = {}

    def select(self, model, ctx) -> TrainPlan:
        if self.opts.variant == "fisher":
            names = [n for n in ctx.eligible if self.opts.fisher_scope == "eligible" or in_numbered_layer(n)]
            if not names:
                raise UserError("method.fisher_scope: no eligible parameter lies inside a numbered transformer "
                                "layer of this model; use fisher_scope: eligible")
            n_batches = ctx.batches_per_epoch
            sums = ctx.accumulate_gradients(n_batches, stats=("sum_sq",), names=names, clip=ctx.grad_clip,
                                            clip_mode="per_tensor")["sum_sq"]
            fisher = {n: s / n_batches for n, s in sums.items()}
            return TrainPlan(sparse=ctx.topk(fisher, self.opts.density, self.opts.topk))
        ctx.train(self.opts.burnin_steps, ctx.full_plan(), after_step=lambda step: self._project(ctx))
        return TrainPlan(sparse=self.mask)

    @torch.no_grad()
    def _project(self, ctx) -> None:
        """After every burn-in step: keep the top floor(p*m) entries by |theta - theta0|, reset the rest."""
        scores = {n: (p.detach() - ctx.theta0[n]).abs() for n, p in ctx.eligible.items()}
        self.mask = ctx.topk(scores, self.opts.density, self.opts.topk)
        for n, p in ctx.eligible.items():
            keep = torch.zeros(p.numel(), dtype=torch.bool, device=p.device)
            keep[self.mask[n]] = True
            p.copy_(torch.where(keep.view_as(p), p, ctx.theta0[n]))
