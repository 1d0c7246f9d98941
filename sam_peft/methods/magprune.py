"""MagPruning: the entries with the largest pretrained magnitude |theta0| train.

Option `burnin_steps: N` is the authors' variant: N steps of full fine-tuning first, then the
top |theta| (use `topk: per_tensor` as their code did). Those are training steps (weights
change) of the schedule every method shares. `reset` says what happens to the
burn-in's changes: true puts every entry back to theta0 before the masked phase (a clean sparse
delta); false keeps them, as the authors' code did, so entries outside the mask differ from
theta0 too (n_changed reports it).
"""

from pydantic import Field

import torch

from sam_peft.methods import register_method
from sam_peft.methods.base import Method, SparseOptions, TrainPlan


class MagPruneOptions(SparseOptions):
    burnin_steps: int = Field(0, ge=0)
    reset: bool = True

    def training_burnin(self) -> int:
        return self.burnin_steps


@register_method("magprune")
class MagPruning(Method):
    Options = MagPruneOptions

    def select(self, model, ctx) -> TrainPlan:
        if self.opts.burnin_steps:
            ctx.train(self.opts.burnin_steps, ctx.full_plan())
        scores = {n: p.detach().abs() for n, p in ctx.eligible.items()}
        sparse = ctx.topk(scores, self.opts.density, self.opts.topk)
        if self.opts.burnin_steps and self.opts.reset:
            with torch.no_grad():
                for n, p in ctx.eligible.items():
                    p.copy_(ctx.theta0[n])
        return TrainPlan(sparse=sparse)
