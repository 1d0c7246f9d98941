"""Gradient statistics over scoring batches: forward and backward, no update.

SAM's burn-in and ChildTuning-D's Fisher pass both reduce to "run N batches, keep running sums
of each entry's gradient". A scoring batch is not a training step: it updates no weight and
advances neither the learning-rate schedule nor the evaluation cadence (the paper authors'
runner returned before its scheduler step during SAM's burn-in).

Statistics: "sum" (sum of gradients), "sum_sq" (sum of squared gradients), "sum_abs".
Clipping before a batch is added, as the original implementations did:
- `clip_mode: global`: one norm over all gradients of the batch (torch's clip_grad_norm_ over
  the model, as the paper authors' runner clipped every backward pass, SAM's burn-in included);
- `clip_mode: per_tensor`: each tensor's gradient clipped on its own (ChildTuning-D's Fisher).
"""

from __future__ import annotations

import torch
from torch import nn

STATS = ("sum", "sum_sq", "sum_abs")
CLIP_MODES = ("global", "per_tensor")

# A selection score -> the gradient statistic it is made from: (sum of gradients)^2 (SAM, the
# paper's Theorem 3 with D = |lambda_max| I), the Fisher information (sum of squared gradients),
# and the sum of |gradients| (options of the paper authors' code).
SCORES = {"squared_sum": "sum", "fisher": "sum_sq", "abs_sum": "sum_abs"}


def score_from(sums: dict[str, dict[str, torch.Tensor]], score: str) -> dict[str, torch.Tensor]:
    """{name: score per entry} from GradientStats.sums holding SCORES[score]."""
    acc = sums[SCORES[score]]
    return {n: a.square() for n, a in acc.items()} if score == "squared_sum" else acc


def _clip_coef(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    # torch.nn.utils.clip_grad_norm_'s rule: scale by max_norm / (norm + 1e-6) when that is < 1.
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


class GradientStats:
    """Running sums of the gradients of `params` over the batches passed to `add()`.

    `norm_extra`: further parameters whose gradients enter the global clipping norm but are not
    accumulated (e.g. the task head, which the authors' clip_grad_norm_ over the model included).
    `dtype`: the accumulators' (float32; bfloat16 halves their memory, rounding each sum to 8 bits
    of mantissa, which can reorder entries whose scores are close).
    """

    def __init__(self, params: dict[str, nn.Parameter], stats=("sum",), clip: float = 0.0,
                 clip_mode: str = "global", norm_extra: list[nn.Parameter] = (), dtype: torch.dtype = torch.float32):
        unknown = set(stats) - set(STATS)
        if unknown:
            raise ValueError(f"unknown gradient statistics {sorted(unknown)}; known: {', '.join(STATS)}")
        if clip_mode not in CLIP_MODES:
            raise ValueError(f"unknown clip mode {clip_mode!r}; known: {', '.join(CLIP_MODES)}")
        self.params = params
        self.clip, self.clip_mode = clip, clip_mode
        self.norm_extra = list(norm_extra)
        # 4 bytes per entry and statistic in float32; bfloat16 halves it for models near the memory's limit.
        self.sums = {s: {n: torch.zeros_like(p, dtype=dtype) for n, p in params.items()} for s in stats}
        self.batches = 0

    @torch.no_grad()
    def add(self) -> None:
        """Add the gradients now in `.grad` (one batch's backward pass)."""
        # A tensor no gradient reached (e.g. the pooler under a span head) adds nothing.
        grads = {n: p.grad.float() for n, p in self.params.items() if p.grad is not None}
        if self.clip > 0 and grads:
            if self.clip_mode == "global":
                extra = [p.grad.float() for p in self.norm_extra if p.grad is not None]
                norm = torch.linalg.vector_norm(torch.stack(
                    [torch.linalg.vector_norm(g) for g in list(grads.values()) + extra]))
                coef = _clip_coef(norm, self.clip)
                grads = {n: g * coef for n, g in grads.items()}
            else:
                grads = {n: g * _clip_coef(torch.linalg.vector_norm(g), self.clip) for n, g in grads.items()}
        for n, g in grads.items():
            if "sum" in self.sums:
                self.sums["sum"][n].add_(g)
            if "sum_sq" in self.sums:
                self.sums["sum_sq"][n].addcmul_(g, g)
            if "sum_abs" in self.sums:
                self.sums["sum_abs"][n].add_(g.abs())
        self.batches += 1
