"""Optimizers for a TrainPlan: AdamW on whole tensors, and AdamW on chosen entries only.

SparseAdamW keeps its state (two moments) for the chosen entries alone: memory proportional
to k, not m. It gathers the chosen entries' gradients, updates them, and writes them back with
index_copy_, so entries outside the selection are never written: they stay bit-identical to
their pretrained values (no weight-decay leak, unlike masking gradients before a dense AdamW,
which the authors' code did). The update follows torch.optim.AdamW's arithmetic step for step.
"""

from __future__ import annotations

import math

import torch

from sam_peft.params import no_decay_names, set_trainable


class SparseAdamW:
    """AdamW over `entries`: a list of (parameter, sorted flat indices, weight decay)."""

    def __init__(self, entries, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = [p for p, _, _ in entries]
        self.index = [i.to(p.device) for p, i, _ in entries]
        self.sizes = [int(i.numel()) for i in self.index]
        self.lr = lr
        self.betas = betas
        self.eps = eps
        self.t = 0
        total = sum(self.sizes)
        dev = self.params[0].device if self.params else torch.device("cpu")
        # Moments in fp32 whatever the parameter dtype.
        self.exp_avg = torch.zeros(total, device=dev)
        self.exp_avg_sq = torch.zeros(total, device=dev)
        # One weight-decay value for the entries that decay (bias and LayerNorm entries do not):
        # a bool mask per entry, and the factor 1 - lr*wd computed as a Python float like torch's AdamW.
        decays = {float(wd) for _, _, wd in entries if wd}
        if len(decays) > 1:
            raise ValueError("SparseAdamW supports one weight-decay value")
        self.weight_decay = decays.pop() if decays else 0.0
        self.decay_mask = torch.cat(
            [torch.full((n,), bool(wd), device=dev) for n, (_, _, wd) in zip(self.sizes, entries)]
        ) if entries else torch.zeros(0, dtype=torch.bool, device=dev)
        self.n_entries = total

    def gather_grads(self) -> torch.Tensor:
        """The chosen entries' gradients, concatenated (zeros where a tensor got no gradient)."""
        parts = []
        for p, idx in zip(self.params, self.index):
            if p.grad is None:
                parts.append(torch.zeros(idx.numel(), device=p.device))
            else:
                parts.append(p.grad.reshape(-1).index_select(0, idx).float())
        return torch.cat(parts) if parts else torch.zeros(0)

    @torch.no_grad()
    def step(self, grads: torch.Tensor) -> None:
        if not self.n_entries:
            return
        self.t += 1
        b1, b2 = self.betas
        lr = self.lr
        theta = torch.cat([p.detach().reshape(-1).index_select(0, i).float() for p, i in zip(self.params, self.index)])
        if self.weight_decay:
            factor = torch.tensor(1 - lr * self.weight_decay, dtype=theta.dtype, device=theta.device)
            theta.mul_(torch.where(self.decay_mask, factor, torch.ones((), dtype=theta.dtype, device=theta.device)))
        self.exp_avg.lerp_(grads, 1 - b1)
        self.exp_avg_sq.mul_(b2).addcmul_(grads, grads, value=1 - b2)
        bias_c1 = 1 - b1**self.t
        bias_c2_sqrt = math.sqrt(1 - b2**self.t)
        denom = (self.exp_avg_sq.sqrt() / bias_c2_sqrt).add_(self.eps)
        theta.addcdiv_(self.exp_avg, denom, value=-lr / bias_c1)
        for p, i, new in zip(self.params, self.index, theta.split(self.sizes)):
            p.data.reshape(-1).index_copy_(0, i, new.to(p.dtype))

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def state_bytes(self) -> int:
        """Optimizer memory: moments, decay vector and the index sets."""
        idx = sum(i.numel() * i.element_size() for i in self.index)
        return idx + (self.exp_avg.numel() + self.exp_avg_sq.numel()) * 4 + self.decay_mask.numel()

    def state_dict(self) -> dict:
        return {"t": self.t, "exp_avg": self.exp_avg.cpu(), "exp_avg_sq": self.exp_avg_sq.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.t = int(state["t"])
        self.exp_avg.copy_(state["exp_avg"])
        self.exp_avg_sq.copy_(state["exp_avg_sq"])


def dense_adamw(params_decay, params_no_decay, lr, betas, eps, weight_decay, device_type: str):
    """torch AdamW on whole tensors; fused kernels on GPU."""
    groups = [g for g in (
        {"params": params_decay, "weight_decay": weight_decay},
        {"params": params_no_decay, "weight_decay": 0.0},
    ) if g["params"]]
    if not groups:
        return None
    kwargs = {"fused": True} if device_type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kwargs)


def adamw_state_bytes(opt: torch.optim.Optimizer | None) -> int:
    if opt is None:
        return 0
    total = 0
    for state in opt.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total


@torch.no_grad()
def clip_(dense_params, sparse_grads: torch.Tensor | None, max_norm: float) -> torch.Tensor | None:
    """Clip by the norm of the trained entries only (dense grads + gathered sparse grads).

    The authors' code clipped by the norm of the whole, unmasked gradient. Returns the norm
    as a tensor (no host sync on a GPU).
    """
    norms = [torch.linalg.vector_norm(p.grad.float()) for p in dense_params if p.grad is not None]
    if sparse_grads is not None and sparse_grads.numel():
        norms.append(torch.linalg.vector_norm(sparse_grads))
    if not norms:
        return None
    total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in dense_params:
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.device))
        if sparse_grads is not None:
            sparse_grads.mul_(coef.to(sparse_grads.device))
    return total


class PlanOptimizer:
    """Everything that updates weights for one TrainPlan, with one weight-decay rule.

    - dense tensors (and the head): torch AdamW, decay except on `no_decay` names;
    - chosen entries inside tensors: SparseAdamW (state for those entries only);
    - own groups (OwnGroup): one AdamW each, at its constant lr, clipped on its own.
    `step(lr)` clips the main part (dense + chosen entries) by their joint norm, then updates
    everything; `lr` is the main schedule's value for this step.
    """

    def __init__(self, params: dict, dense: list[str], sparse: dict, groups, no_decay: set[str], lr: float,
                 betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0, max_grad_norm: float = 1.0,
                 device_type: str = "cpu"):
        self.max_grad_norm = max_grad_norm
        decay = [params[n] for n in dense if n not in no_decay]
        nodecay = [params[n] for n in dense if n in no_decay]
        self.dense_params = decay + nodecay
        self.dense = dense_adamw(decay, nodecay, lr, betas, eps, weight_decay, device_type)
        entries = [(params[n], idx, 0.0 if n in no_decay else weight_decay) for n, idx in sparse.items() if idx.numel()]
        self.sparse = SparseAdamW(entries, lr, betas, eps) if entries else None
        self.own = []
        for g in groups:
            ps = [params[n] for n in g.names]
            opt = dense_adamw(ps, [], g.lr, betas, eps, g.weight_decay, device_type)
            if opt is not None:
                self.own.append((ps, opt))

    def step(self, lr: float) -> torch.Tensor | None:
        """One update; returns the main part's gradient norm before clipping (over the trained
        entries and dense tensors only), or None when nothing had a gradient."""
        sparse_g = self.sparse.gather_grads() if self.sparse else None
        norm = clip_(self.dense_params, sparse_g, self.max_grad_norm)
        if self.dense is not None:
            for g in self.dense.param_groups:
                g["lr"] = lr
            self.dense.step()
        if self.sparse is not None:
            self.sparse.lr = lr
            self.sparse.step(sparse_g)
        for ps, opt in self.own:
            clip_(ps, None, self.max_grad_norm)
            opt.step()
        return norm

    def zero_grad(self) -> None:
        if self.dense is not None:
            self.dense.zero_grad(set_to_none=True)
        if self.sparse is not None:
            self.sparse.zero_grad()
        for _, opt in self.own:
            opt.zero_grad(set_to_none=True)

    def state_bytes(self) -> int:
        return (adamw_state_bytes(self.dense) + (self.sparse.state_bytes() if self.sparse else 0)
                + sum(adamw_state_bytes(opt) for _, opt in self.own))

    def state_dict(self) -> dict:
        return {"dense": self.dense.state_dict() if self.dense else None,
                "sparse": self.sparse.state_dict() if self.sparse else None,
                "own": [opt.state_dict() for _, opt in self.own]}

    def load_state_dict(self, state: dict) -> None:
        if self.dense is not None:
            self.dense.load_state_dict(state["dense"])
        if self.sparse is not None:
            self.sparse.load_state_dict(state["sparse"])
        for (_, opt), s in zip(self.own, state["own"]):
            opt.load_state_dict(s)


def plan_optimizer(model, dense: list[str], sparse: dict, groups=(), *, extra_no_decay=(), no_decay=None,
                   lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                   max_grad_norm: float = 1.0) -> PlanOptimizer:
    """Freeze everything the plan does not train, and build the one optimizer that trains it.

    The engine, the library's SparseTrainer and the HF Trainer integration all come through here:
    one freezing rule (params.set_trainable) and one weight-decay rule (params.no_decay_names, or
    `no_decay` names given instead; `extra_no_decay` added, e.g. DiffPruning's diffs of biases).
    """
    params = dict(model.named_parameters())
    unknown = [n for n in [*dense, *sparse, *(n for g in groups for n in g.names)] if n not in params]
    if unknown:
        raise KeyError(f"no parameter named {unknown[0]!r} in the model")
    set_trainable(model, set(dense) | {n for g in groups for n in g.names} | {n for n, i in sparse.items() if i.numel()})
    skip = (no_decay_names(model) if no_decay is None else set(no_decay)) | set(extra_no_decay)
    device_type = next(iter(params.values())).device.type if params else "cpu"
    return PlanOptimizer(params, list(dense), sparse, groups, skip, lr, betas, eps, weight_decay, max_grad_norm,
                         device_type)
