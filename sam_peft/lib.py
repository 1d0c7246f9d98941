"""sam-peft as a library: choose entries, train only those, keep the result as a sparse delta.

For your own model and training loop (any torch module, e.g. a Hugging Face encoder with your
head). The CLI's runs use the same pieces (selection.py, optim.py, delta.py).

    import sam_peft.lib as sp

    theta0 = sp.snapshot(model, params)                       # pretrained values
    scores = sp.sam_scores(model, batches[:500], loss_fn, params)   # accumulated-gradient score
    mask = sp.top_k(scores, density=0.005)                    # exactly floor(p*m) entries
    opt = sp.SparseTrainer(model, mask, lr=1e-4)             # freezes the rest; O(k) optimizer state
    for batch in batches:
        loss = loss_fn(model, batch); loss.backward()
        opt.step()                                            # clip, update the chosen entries only
    sp.save_delta("task.safetensors", model, theta0, base_model="roberta-base")
    ...
    sp.apply_delta(fresh_model, "task.safetensors")           # base + delta = the fine-tuned model

`params` is a list of parameter names (default: every parameter that requires grad).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from sam_peft import delta as _delta
from sam_peft.optim import PlanOptimizer
from sam_peft.params import no_decay_names
from sam_peft.scoring import GradientStats
from sam_peft.selection import budget, topk_entries

# lib's score names -> the gradient statistic each one is made from (scoring.GradientStats)
_SCORE_STATS = {"squared_sum": "sum", "fisher": "sum_sq", "abs_sum": "sum_abs"}

__all__ = ["snapshot", "sam_scores", "magnitude_scores", "random_scores", "top_k", "SparseTrainer",
           "save_delta", "apply_delta", "count_changed"]


def _named(model: nn.Module, params: list[str] | None) -> dict[str, nn.Parameter]:
    all_params = dict(model.named_parameters())
    if params is None:
        return {n: p for n, p in all_params.items() if p.requires_grad}
    missing = [n for n in params if n not in all_params]
    if missing:
        raise KeyError(f"no parameter named {missing[0]!r} in the model")
    return {n: all_params[n] for n in params}


def snapshot(model: nn.Module, params: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Copies of the pretrained values (theta0) of the parameters you will fine-tune."""
    return {n: p.detach().clone() for n, p in _named(model, params).items()}


def sam_scores(model: nn.Module, batches: Iterable, loss_fn: Callable, params: list[str] | None = None,
               score: str = "squared_sum") -> dict[str, torch.Tensor]:
    """SAM's score per entry from gradients accumulated over `batches`, without updating.

    loss_fn(model, batch) -> scalar loss. score: "squared_sum" = (sum of gradients)^2 (the paper),
    "fisher" = sum of squared gradients, "abs_sum" = sum of |gradients|.
    """
    if score not in _SCORE_STATS:
        raise ValueError(f"unknown score {score!r}: {', '.join(_SCORE_STATS)}")
    stats = GradientStats(_named(model, params), stats=(_SCORE_STATS[score],))
    was_training = model.training
    model.train()
    for batch in batches:
        model.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        stats.add()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    acc = stats.sums[_SCORE_STATS[score]]
    return {n: a.square() for n, a in acc.items()} if score == "squared_sum" else acc


def magnitude_scores(model: nn.Module, params: list[str] | None = None) -> dict[str, torch.Tensor]:
    """|theta|: MagPruning's score."""
    return {n: p.detach().abs() for n, p in _named(model, params).items()}


def random_scores(model: nn.Module, params: list[str] | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Uniform scores: top_k of these is a uniformly random subset."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g).to(p.device) for n, p in _named(model, params).items()}


def top_k(scores: dict[str, torch.Tensor], density: float, mode: str = "global") -> dict[str, torch.Tensor]:
    """{name: sorted flat indices}: exactly floor(density * m) entries with the largest scores
    (ties by position); mode "per_tensor" gives each tensor its proportional share."""
    if not 0 < density < 1:
        raise ValueError("density must be in (0, 1)")
    m = sum(s.numel() for s in scores.values())
    return topk_entries(scores, budget(density, m), mode)


class SparseTrainer:
    """AdamW on the chosen entries (and, whole, on `dense` parameters such as a task head).

    Everything else is frozen (requires_grad False, so no weight gradients are computed); the
    chosen entries' optimizer state is O(k); entries outside the mask are never written, so they
    stay bit-identical to their values at construction. Call step() after loss.backward().

    The update is the CLI's (optim.PlanOptimizer): the trained entries and dense tensors are
    clipped by their joint norm, and weight decay skips biases and LayerNorm-like parameters
    (params.no_decay_names; pass `no_decay(name) -> bool` for another rule).
    """

    def __init__(self, model: nn.Module, mask: dict[str, torch.Tensor], lr: float = 1e-4,
                 dense: list[str] = (), weight_decay: float = 0.01, betas=(0.9, 0.999), eps: float = 1e-8,
                 max_grad_norm: float = 1.0, no_decay: Callable[[str], bool] | None = None):
        named = dict(model.named_parameters())
        unknown = [n for n in [*mask, *dense] if n not in named]
        if unknown:
            raise KeyError(f"no parameter named {unknown[0]!r} in the model")
        dense = list(dense)
        for n, p in named.items():
            p.requires_grad_(n in dense or (n in mask and mask[n].numel() > 0))
        skip = no_decay_names(model) if no_decay is None else {n for n in named if no_decay(n)}
        device = next(iter(named.values())).device.type if named else "cpu"
        self.optimizer = PlanOptimizer(named, dense, mask, groups=(), no_decay=skip, lr=lr, betas=betas, eps=eps,
                                       weight_decay=weight_decay, max_grad_norm=max_grad_norm, device_type=device)
        self.lr = lr
        self.model = model

    def step(self) -> None:
        self.optimizer.step(self.lr)
        self.model.zero_grad(set_to_none=True)

    def state_bytes(self) -> int:
        return self.optimizer.state_bytes()

    def state_dict(self) -> dict:
        return {"lr": self.lr, **self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self.lr = state.pop("lr", self.lr)
        self.optimizer.load_state_dict(state)


def count_changed(model: nn.Module, theta0: dict[str, torch.Tensor]) -> int:
    """Entries that differ from theta0."""
    named = dict(model.named_parameters())
    return sum(int(_delta.changed_entries(named[n], t0).numel()) for n, t0 in theta0.items())


def save_delta(path, model: nn.Module, theta0: dict[str, torch.Tensor], base_model: str = "",
               whole: list[str] | None = None, **metadata) -> int:
    """Write what changed relative to theta0 (entries as index + delta, or whole tensors when most
    changed) and the `whole` parameters as they are (default: those outside theta0 that require
    grad, e.g. a task head). Returns the file size in bytes."""
    named = dict(model.named_parameters())
    if whole is None:
        whole = [n for n, p in named.items() if n not in theta0 and p.requires_grad]
    tensors, _ = _delta.build(model, theta0, set(named) - set(whole))
    meta = {"base_model": base_model, "base_fingerprint": _delta.base_fingerprint(theta0),
            "eligible": sorted(theta0), **metadata}
    return _delta.save(path, tensors, meta)


def apply_delta(model: nn.Module, path) -> dict:
    """Load a delta into a model built from the same base; returns the file's metadata."""
    return _delta.apply(model, path)
