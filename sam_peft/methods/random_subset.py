"""Random: a random subset of the eligible entries trains.

Default (paper): exactly floor(p*m) entries, uniformly at random (seeded by the run seed).
`variant: bernoulli` reproduces the authors' code: each entry independently with probability
p, so the count varies around p*m (result.json reports the exact count).
"""

from typing import Literal

import torch

from sam_peft.methods import register_method
from sam_peft.methods.base import Method, SparseOptions, TrainPlan
from sam_peft.selection import random_scores


class RandomOptions(SparseOptions):
    variant: Literal["exact", "bernoulli"] = "exact"


@register_method("random")
class RandomMask(Method):
    display = "Random"
    paper_row = 2
    category = "sparse"
    Options = RandomOptions

    def select(self, model, ctx) -> TrainPlan:
        shapes = {n: p.shape for n, p in ctx.eligible.items()}
        scores = random_scores(shapes, ctx.generator)
        if self.opts.variant == "bernoulli":
            sparse = {n: torch.nonzero(s.reshape(-1) < self.opts.density).squeeze(1) for n, s in scores.items()}
        else:
            sparse = ctx.topk(scores, self.opts.density, self.opts.topk)
        return TrainPlan(sparse=sparse)
