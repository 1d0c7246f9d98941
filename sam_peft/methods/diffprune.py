"""DiffPruning (Guo et al. 2021): gated diffs with an L0 penalty, projected onto floor(p*m) entries.

theta = theta0 + z * w with hard-concrete gates z and an L0 penalty, then a projection onto
exactly floor(p*m) entries and fixed-mask training. Defaults follow Guo et al.'s code
(dguo98/DiffPruning, examples/run_glue_diffpruning.py); the paper authors' code is one option
per difference (docs/fidelity.md has the table).

Burn-in (`burnin_steps`, 500 training steps: weights change, so they are steps of the shared
schedule): every eligible tensor gets a diff w (zeros) and gate logits log_alpha (`alpha_init`,
5: gates start nearly open). Each step samples
    s = sigmoid((log u - log(1 - u) + log_alpha) / temperature),  u ~ U(0, 1)
    z = clamp(s * (r - l) + l, 0, 1)                              (l, r) = `stretch`
and adds the expected L0 norm, P(z != 0) = sigmoid(log_alpha - temperature * log(-l / r)),
weighted by `l0_lambda`:
- `l0_reduction: sum` (default, Guo et al.): lambda * sum over the m entries, lambda 1.25e-7 (their
  default per-parameter coefficient). The penalty then grows with the model, as the sum of m
  per-entry costs: at RoBERTa-base's m = 125M it is about 15.6 * the mean open probability.
- `mean` (the paper authors' code): lambda * mean over the entries, lambda 1.
The gate logits train in their own AdamW, as in Guo et al.: `alpha_lr` 0.1, constant (their
second scheduler was never stepped), no weight decay, gradient norm clipped on its own. With
`alpha_lr: null` they sit in the main optimizer instead (main schedule and weight decay), as
in the authors' code; at lr 1e-4 they then barely move from their initial value.
`per_tensor_alpha: true`: Guo et al.'s structured variant (their script's default): a second,
scalar gate per tensor multiplies the entries' gates, with its own L0 term.

End of burn-in, the projection (exactly floor(p*m) entries):
- `project_by: magnitude` (default; Guo et al. and the paper): the top |z_det * w|, with the
  deterministic gate z_det = clamp(sigmoid(log_alpha) * (r - l) + l, 0, 1); chosen entries keep
  theta0 + z_det * w.
- `project_by: alpha` (the authors' code): per tensor (needs `topk: per_tensor`), the top
  |log_alpha|; chosen entries keep theta0 + w, the gate dropped.
The gates are then removed, all other entries are theta0 bit for bit, and the engine's
fixed-mask sparse training continues.

`remask_every: N` (the paper's Fig. 4 uses 600 on CB): the gated parametrization (and its L0
penalty) stays for the whole run; at global steps burnin+N, burnin+2N, ... the mask is
re-projected and w is zeroed outside it, so the training loss jumps back up. Evaluation sees
theta0 + mask * diff; after the best checkpoint is restored (gates and mask), exactly those
weights are baked in. The projection steps are in result.json under method_report.projections.

Implementation: no module surgery. The gate tensors live in `model.diffprune` (added
parameters); `before_forward` writes theta0 + z * w into the eligible parameters, the backward
pass gives dL/dtheta there, and `after_backward` carries it on to w and log_alpha through z * w
(autograd), then puts theta0 back. The eligible parameters keep their names, and hold theta0
between steps.

`gate_head: true` (the authors' code): the task head is gated, trained through its diff and
projected too, each head tensor to int(p * numel) entries, so a tiny out_proj.bias keeps none and
stays at its random init; the encoder's budget stays floor(p*m) over the eligible entries.

Other authors'-code values, as options: `stretch: [-3, 3]`, `alpha_init: sigmoid_randn`
(sigmoid of a standard normal draw per entry).
"""

from __future__ import annotations

import contextlib
import math
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from sam_peft.methods import register_method
from sam_peft.methods.base import Method, OwnGroup, SparseOptions, TrainPlan
from sam_peft.params import no_decay_names
from sam_peft.selection import tie_report, topk_entries, topk_flat

L0_LAMBDA_DEFAULT = {"sum": 1.25e-7, "mean": 1.0}  # Guo et al.'s per-entry weight; the authors' code


class DiffPruneOptions(SparseOptions):
    burnin_steps: int = Field(500, ge=1)
    stretch: tuple[float, float] = (-1.5, 1.5)
    temperature: float = Field(1.0, gt=0)
    alpha_init: float | Literal["sigmoid_randn"] = 5.0
    alpha_lr: float | None = Field(0.1, gt=0)
    l0_reduction: Literal["sum", "mean"] = "sum"
    l0_lambda: float | None = Field(None, ge=0)  # None: 1.25e-7 with sum, 1.0 with mean
    per_tensor_alpha: bool = False
    project_by: Literal["magnitude", "alpha"] = "magnitude"
    remask_every: int | None = Field(None, ge=1)
    # true: the task head is gated and projected too, as in the paper authors' code: each head
    # tensor keeps int(p * numel) entries (so a 1- to 3-entry out_proj.bias keeps none and stays at
    # its random init), and the head trains only through its gated diff. false (default, Guo et
    # al.): the head trains densely beside the gated encoder, as every other method's does.
    gate_head: bool = False

    @field_validator("stretch")
    @classmethod
    def _stretch(cls, v):
        if not (v[0] < 0 and v[1] > 1):
            raise ValueError("stretch (l, r) needs l < 0 and r > 1 so that gates can be exactly 0 and 1")
        return v

    @model_validator(mode="after")
    def _defaults_and_combinations(self):
        if self.l0_lambda is None:
            self.l0_lambda = L0_LAMBDA_DEFAULT[self.l0_reduction]
        if self.project_by == "alpha" and self.topk != "per_tensor":
            raise ValueError("project_by: alpha is the authors' per-tensor projection; set topk: per_tensor")
        return self

    def training_burnin(self) -> int:
        return self.burnin_steps


def sample_gate(log_alpha, u, stretch, temperature):
    """Hard-concrete sample (Louizos et al. 2018), differentiable in log_alpha."""
    lo, hi = stretch
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / temperature)
    return (s * (hi - lo) + lo).clamp(0, 1)


def deterministic_gate(log_alpha, stretch):
    lo, hi = stretch
    return (torch.sigmoid(log_alpha) * (hi - lo) + lo).clamp(0, 1)


def open_probability(log_alpha, stretch, temperature):
    """P(z != 0): the expected L0 norm per gate."""
    lo, hi = stretch
    return torch.sigmoid(log_alpha - temperature * math.log(-lo / hi))


def _key(name: str) -> str:
    return name.replace(".", "__")  # parameter names cannot contain dots


class Gates(nn.Module):
    """w and log_alpha for each gated tensor (and a per-tensor log_alpha), under `model.diffprune`."""

    def __init__(self, params: dict[str, nn.Parameter], alpha_init, per_tensor: bool = False,
                 generator: torch.Generator | None = None):
        super().__init__()

        def init(p):
            if alpha_init == "sigmoid_randn":  # the authors' code: sigmoid of a standard normal
                return torch.randn(p.shape, generator=generator).sigmoid().to(p.device)
            return torch.full_like(p, float(alpha_init), dtype=torch.float32)

        self.w = nn.ParameterDict({_key(n): nn.Parameter(torch.zeros_like(p, dtype=torch.float32))
                                   for n, p in params.items()})
        self.log_alpha = nn.ParameterDict({_key(n): nn.Parameter(init(p)) for n, p in params.items()})
        self.tensor_log_alpha = nn.ParameterDict(
            {_key(n): nn.Parameter(torch.full((1,), float(alpha_init) if alpha_init != "sigmoid_randn" else 0.5,
                                              device=p.device)) for n, p in params.items()} if per_tensor else {})


@register_method("diffprune")
class DiffPruning(Method):
    display = "DiffPruning"
    paper_row = 8
    category = "sparse"
    Options = DiffPruneOptions

    def __init__(self, opts):
        super().__init__(opts)
        self._params: dict[str, nn.Parameter] = {}  # the gated tensors: eligible ones (and the head's)
        self._head: list[str] = []  # head tensors among them (gate_head)
        self._theta0: dict[str, torch.Tensor] = {}
        self._gates: Gates | None = None  # present while the gated parametrization is on
        self._pending: dict[str, torch.Tensor] = {}  # z * w of the current step (with its graph)
        self._generator: torch.Generator | None = None
        self._k = 0
        self._burnin_end: int | None = None
        self.mask: dict[str, torch.Tensor] = {}  # flat indices (remask mode: the current mask)
        self.projections: list[int] = []  # global steps at which the mask was (re)projected
        self.open_share: list[tuple[int, float]] = []  # (step, mean P(z != 0)) at each projection
        self.selection: dict | None = None  # selection.tie_report of the last projection

    # ------------------------------------------------------------------ gates
    def _install(self, model, ctx) -> TrainPlan:
        init_gen = torch.Generator().manual_seed(7_877 * ctx.seed + 5)
        self._gates = Gates(self._params, self.opts.alpha_init, self.opts.per_tensor_alpha, init_gen).to(ctx.device)
        model.diffprune = self._gates
        names = [n for n, _ in model.named_parameters() if n.startswith("diffprune.")]
        w_names = [n for n in names if n.startswith("diffprune.w.")]
        alpha_names = [n for n in names if not n.startswith("diffprune.w.")]
        # The diffs decay as their tensors would (not biases and LayerNorms), as Guo et al.'s no_decay.
        base_no_decay = {_key(n) for n in no_decay_names(model) if n in self._params}
        w_no_decay = [n for n in w_names if n.removeprefix("diffprune.w.") in base_no_decay]
        # A gated head trains through its diff only (its gates decide which entries survive).
        train_head = not self.opts.gate_head
        if self.opts.alpha_lr is None:  # the authors' code: gate logits in the main optimizer
            return TrainPlan(dense=w_names + alpha_names, no_decay=w_no_decay, train_head=train_head)
        return TrainPlan(dense=w_names, no_decay=w_no_decay, train_head=train_head,
                         groups=[OwnGroup(alpha_names, lr=self.opts.alpha_lr, weight_decay=0.0)])

    def _remove(self, model) -> None:
        del model.diffprune
        self._gates = None

    def _det_gate(self, n: str) -> torch.Tensor:
        k = _key(n)
        z = deterministic_gate(self._gates.log_alpha[k].detach(), self.opts.stretch)
        if self.opts.per_tensor_alpha:
            z = z * deterministic_gate(self._gates.tensor_log_alpha[k].detach(), self.opts.stretch)
        return z

    def _diff(self, n: str) -> torch.Tensor:
        """What a chosen entry keeps on top of theta0 (no graph): z_det * w, or w with the gate
        dropped under the authors' projection."""
        w = self._gates.w[_key(n)].detach()
        return w if self.opts.project_by == "alpha" else self._det_gate(n) * w

    @torch.no_grad()
    def _project(self) -> dict[str, torch.Tensor]:
        if self.opts.project_by == "magnitude":
            scores = {n: self._diff(n).abs() for n in self._params}
        else:
            scores = {n: self._gates.log_alpha[_key(n)].detach().abs() for n in self._params}
        encoder = {n: sc for n, sc in scores.items() if n not in self._head}
        chosen = topk_entries(encoder, self._k, self.opts.topk)
        self.selection = tie_report(encoder, chosen)
        for n in self._head:  # gate_head: the authors' int(p * numel) per head tensor
            chosen[n] = topk_flat(scores[n], int(self.opts.density * scores[n].numel()))
        return chosen

    def expected_density(self) -> float:
        """Mean open probability P(z != 0) over the gated entries (the expected L0 norm / m)."""
        with torch.no_grad():
            total = sum(float(self._open(k).sum()) for k in self._gates.log_alpha)
        return total / sum(la.numel() for la in self._gates.log_alpha.values())

    def _open(self, k: str) -> torch.Tensor:
        p = open_probability(self._gates.log_alpha[k], self.opts.stretch, self.opts.temperature)
        if self.opts.per_tensor_alpha:
            p = p * open_probability(self._gates.tensor_log_alpha[k], self.opts.stretch, self.opts.temperature)
        return p

    @torch.no_grad()
    def _write_masked(self) -> None:
        """theta = theta0 + diff on the mask, theta0 elsewhere."""
        for n, p in self._params.items():
            idx = self.mask[n]
            p.copy_(self._theta0[n])
            if idx.numel():
                flat = p.view(-1)
                flat[idx] = self._theta0[n].reshape(-1)[idx] + self._diff(n).reshape(-1)[idx].to(p.dtype)

    @torch.no_grad()
    def _restore_theta0(self) -> None:
        for n, p in self._params.items():
            p.copy_(self._theta0[n])

    # ------------------------------------------------------------------ selection
    def select(self, model, ctx) -> TrainPlan:
        self._params = dict(ctx.eligible)
        self._theta0 = ctx.theta0
        if self.opts.gate_head:
            params = dict(model.named_parameters())
            self._head = list(ctx.head)
            self._params.update({n: params[n] for n in self._head})
            self._theta0 = {**ctx.theta0, **{n: params[n].detach().clone() for n in self._head}}
        self._k = ctx.budget(self.opts.density)
        self._generator = torch.Generator(device=ctx.device).manual_seed(104_729 * ctx.seed + 3)
        gated = self._install(model, ctx)
        ctx.train(self.opts.burnin_steps, gated)
        self._burnin_end = ctx.step
        self._mark_projection(ctx.step)
        if self.opts.remask_every is None:
            self._write_masked()
            self._remove(model)
            return TrainPlan(sparse=self.mask, train_head=not self.opts.gate_head)
        self._zero_outside_mask()
        return gated

    def _mark_projection(self, step: int) -> None:
        self.open_share.append((step, self.expected_density()))
        self.mask = self._project()
        self.projections.append(step)

    @torch.no_grad()
    def _zero_outside_mask(self) -> None:
        for n in self._params:
            w = self._gates.w[_key(n)]
            keep = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
            keep[self.mask[n]] = True
            w.masked_fill_(~keep.view_as(w), 0.0)

    # ------------------------------------------------------------------ training hooks
    def before_forward(self, model, step: int) -> None:
        if self._gates is None:
            return
        per_tensor = self.opts.per_tensor_alpha
        for n, p in self._params.items():
            k = _key(n)
            la = self._gates.log_alpha[k]
            u = torch.rand(la.shape, generator=self._generator, device=la.device).clamp_(1e-6, 1 - 1e-6)
            z = sample_gate(la, u, self.opts.stretch, self.opts.temperature)
            if per_tensor:
                tla = self._gates.tensor_log_alpha[k]
                ut = torch.rand(tla.shape, generator=self._generator, device=tla.device).clamp_(1e-6, 1 - 1e-6)
                z = z * sample_gate(tla, ut, self.opts.stretch, self.opts.temperature)
            d = z * self._gates.w[k]
            self._pending[n] = d
            with torch.no_grad():
                p.copy_(self._theta0[n] + d.detach().to(p.dtype))
            p.requires_grad_(True)  # so that the backward pass leaves dL/dtheta in p.grad

    def extra_loss(self, model):
        if self._gates is None or not self.opts.l0_lambda:
            return None
        total = sum(open_probability(la, self.opts.stretch, self.opts.temperature).sum()
                    for la in list(self._gates.log_alpha.values()) + list(self._gates.tensor_log_alpha.values()))
        if self.opts.l0_reduction == "mean":
            total = total / sum(la.numel() for la in
                                list(self._gates.log_alpha.values()) + list(self._gates.tensor_log_alpha.values()))
        return self.opts.l0_lambda * total

    def after_backward(self, model, step: int) -> None:
        if self._gates is None or not self._pending:
            return
        diffs, grads = [], []
        for n, p in self._params.items():
            d = self._pending.pop(n)
            if p.grad is not None:  # e.g. the pooler gets none under a span head
                diffs.append(d)
                grads.append(p.grad.to(d.dtype))
            p.grad = None
            p.requires_grad_(False)
        if diffs:
            torch.autograd.backward(diffs, grads)  # into w.grad and log_alpha.grad (L0 term already there)
        self._restore_theta0()

    def after_step(self, model, step: int) -> None:
        n = self.opts.remask_every
        if self._gates is None or n is None or self._burnin_end is None:
            return  # no gates, no re-projection, or still in burn-in (it ends with a projection)
        if step <= self._burnin_end or (step - self._burnin_end) % n:
            return
        self._mark_projection(step)
        self._zero_outside_mask()

    def eval_weights(self, model, split: str):
        if self._gates is None:
            return contextlib.nullcontext()
        return self._effective_weights()

    @contextlib.contextmanager
    def _effective_weights(self):
        self._write_masked()
        try:
            yield
        finally:
            self._restore_theta0()

    # ------------------------------------------------------------------ end of training
    def finalize(self, model) -> None:
        if self._gates is not None:  # remask mode: bake theta0 + mask * diff of the restored best
            self._write_masked()
            self._remove(model)

    def final_plan(self, plan: TrainPlan) -> TrainPlan:
        return TrainPlan(sparse=self.mask, train_head=plan.train_head)

    def state_dict(self) -> dict:
        # The mask changes during the main phase only in remask mode; best-restore needs it.
        return {"mask": {n: i.clone() for n, i in self.mask.items()}} if self._gates is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if "mask" in state:
            self.mask = {n: i.clone() for n, i in state["mask"].items()}

    def training_state(self) -> dict:
        # Resume: the current mask, the gate-noise stream and the projection log.
        state = {**self.state_dict(), "projections": list(self.projections), "open_share": list(self.open_share)}
        if self._generator is not None:
            state["generator"] = self._generator.get_state()
        return state

    def load_training_state(self, state: dict) -> None:
        self.load_state_dict(state)
        self.projections = list(state.get("projections", self.projections))
        self.open_share = [tuple(x) for x in state.get("open_share", self.open_share)]
        if "generator" in state and self._generator is not None:
            self._generator.set_state(state["generator"])

    def report(self) -> dict:
        return {"projections": list(self.projections), "k": self._k, "burnin_end": self._burnin_end,
                "selection": self.selection,
                "expected_density": [{"step": s, "mean_open_probability": round(d, 6)} for s, d in self.open_share]}
