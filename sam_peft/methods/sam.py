"""SAM (Fu et al. 2023): second-order approximation of which entries matter.

Accumulate gradients over `burnin_steps` scoring batches without updating anything, score each
eligible entry, keep the top floor(p*m), then fine-tune only those with the mask fixed. The
scoring batches are not training steps: SAM then gets as many weight updates, under the same
schedule, as every other method (the authors' runner returned before its scheduler step and its
train-state step during the burn-in).

Options:
- `score`: `squared_sum` (default: (sum of gradients)^2, Theorem 3 with D = |lambda_max| I);
  `fisher` (sum of squared gradients) and `abs_sum` (sum of |gradients|), options of the
  authors' code.
- `topk`: `global` (default: one top-k over all eligible entries, the paper's theorem) or
  `per_tensor` (each tensor its share, as the authors' code selected).
- `clip_burnin_grads` (false): clip each scoring batch's gradients to `train.grad_clip` (one
  norm over the model's gradients) before summing them, as the authors' code did (its backward
  pass always ended in clip_grad_norm_).
- `burnin_steps` (500): the paper chose it from {500, 600, 700, 800, 900, 1000, 2000} on the
  dev set; a sweep can do the same (configs/table1.yaml, `sam-peft table --select-on val`).
"""

from typing import Literal

from pydantic import Field

from sam_peft.methods import register_method
from sam_peft.methods.base import Method, SparseOptions, TrainPlan
from sam_peft.scoring import SCORES, score_from


class SAMOptions(SparseOptions):
    burnin_steps: int = Field(500, ge=1)
    score: Literal[tuple(SCORES)] = "squared_sum"
    clip_burnin_grads: bool = False

    def scoring_batches(self, batches_per_epoch: int) -> int:
        return self.burnin_steps


@register_method("sam")
class SAM(Method):
    display = "SAM"
    paper_row = 10
    category = "sparse"
    Options = SAMOptions

    def select(self, model, ctx) -> TrainPlan:
        clip = ctx.grad_clip if self.opts.clip_burnin_grads else 0.0
        sums = ctx.accumulate_gradients(self.opts.burnin_steps, stats=(SCORES[self.opts.score],), clip=clip)
        scores = score_from(sums, self.opts.score)
        return TrainPlan(sparse=ctx.topk(scores, self.opts.density, self.opts.topk))
