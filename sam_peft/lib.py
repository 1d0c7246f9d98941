"""sam-peft as a library: choose entries, train only those, keep the result as a sparse delta.

For your own model and training loop (any torch module, e.g. a Hugging Face encoder with your
head). The CLI's runs and the HF Trainer integration (hf.py) go through the same core: the
methods' own `select` (methods/), exact top-k (selection.py), gradient statistics (scoring.py),
one freezing rule and one optimizer (optim.plan_optimizer), deltas (delta.py).

    import sam_peft.lib as sp

    model.train()                                             # from_pretrained returns eval mode
    theta0 = sp.snapshot(model, encoder)                      # pretrained values
    mask = sp.select(model, "sam", batches=batches, loss_fn=loss_fn, params=encoder,
                     density=0.005, burnin_steps=64)          # any registered sparse method
    opt = sp.SparseTrainer(model, mask, lr=1e-4, dense=head)  # freezes the rest; O(k) state
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / 1000)
    for batch in batches:
        loss_fn(model, batch).backward()
        opt.step(); sched.step(); opt.zero_grad()             # chosen entries and the head only
    sp.save_delta("task.safetensors", model, theta0, base_model="roberta-base")

`params` is a list of parameter names (default: every parameter that requires grad);
`loss_fn(model, batch) -> scalar loss`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from sam_peft import delta as _delta
from sam_peft.errors import ConfigKeyError
from sam_peft.methods import build_method, list_methods, method_class, validate_method_options
from sam_peft.methods.base import Method, SelectContext, TrainPlan
from sam_peft.optim import plan_optimizer
from sam_peft.scoring import SCORES, score_from
from sam_peft.selection import budget, tie_report, topk_entries, zero_budget

log = logging.getLogger("sam_peft")

__all__ = ["snapshot", "select", "sparse_method", "selectors", "sam_scores", "magnitude_scores", "random_scores",
           "top_k", "SparseTrainer", "save_delta", "apply_delta", "count_changed"]


def _named(model: nn.Module, params: list[str] | None) -> dict[str, nn.Parameter]:
    all_params = dict(model.named_parameters())
    if params is None:
        return {n: p for n, p in all_params.items() if p.requires_grad}
    missing = [n for n in params if n not in all_params]
    if missing:
        raise KeyError(f"no parameter named {missing[0]!r} in the model")
    return {n: all_params[n] for n in params}


@contextlib.contextmanager
def _requires_grad_kept(model: nn.Module):
    """Scoring freezes what it does not score (params.set_trainable); a library call leaves the
    caller's requires_grad flags as it found them."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))


def snapshot(model: nn.Module, params: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Copies of the pretrained values (theta0) of the parameters you will fine-tune."""
    return {n: p.detach().clone() for n, p in _named(model, params).items()}


# ------------------------------------------------------------------------ selection by a registered method

# Method hooks that act while training runs (structure, gates, projections): a method that
# overrides one needs sam-peft's own training loop.
_TRAINING_HOOKS = ("wrap", "before_forward", "extra_loss", "after_backward", "after_step", "eval_weights",
                   "finalize", "final_plan", "attach_for_eval")


def _training_hooks(cls: type[Method]) -> list[str]:
    return [h for h in _TRAINING_HOOKS if getattr(cls, h) is not getattr(Method, h)]


def selectors() -> list[str]:
    """The registered methods that select outside sam-peft's own loop: sparse ones whose only work
    is their `select` (every shipped one but DiffPruning)."""
    return [n for n in list_methods() if method_class(n).category == "sparse" and not _training_hooks(method_class(n))]


def sparse_method(selector: str, **options) -> Method:
    """The registered method `selector` with its options (validated as in a config's `method:`),
    or a one-line ValueError saying why it cannot select here."""
    known = selectors()
    try:
        cls = method_class(selector)
        spec = validate_method_options({**options, "name": selector})
    except ConfigKeyError as e:
        raise ValueError(f"selector {selector!r}: {e.message.replace('method.', '')}"
                         + ("" if selector in known else f"; selectors: {', '.join(known)}")) from None
    if cls.category != "sparse":
        raise ValueError(f"selector {selector!r}: {cls.display or cls.name} is a {cls.category} method, not a "
                         f"selection of floor(p*m) entries; selectors: {', '.join(known)}")
    hooks = _training_hooks(cls)
    if hooks:
        raise ValueError(f"selector {selector!r}: {cls.display or cls.name} changes the model while it trains "
                         f"({', '.join(hooks)}), which only sam-peft's own loop does (`sam-peft run`); "
                         f"selectors: {', '.join(known)}")
    method = build_method(spec)
    steps = method.opts.training_burnin()
    if steps:
        raise ValueError(f"selector {selector!r}: with these options it trains {steps} steps (weight updates) "
                         f"before it selects, which only sam-peft's own loop does (`sam-peft run`)")
    return method


class BatchHost:
    """A SelectionHost over the caller's batches: scoring batches are forward and backward of
    `loss_fn(model, batch)` in training mode; it takes no training steps.

    `progress(n)` (optional) is called with each scoring pass's length and returns a callable
    that is called once per batch (e.g. a tqdm bar's update). With `accumulation` > 1 a scoring
    batch is that many micro-batches, each loss divided by their number (gradient accumulation)."""

    step = 0

    def __init__(self, model: nn.Module, batches: Iterable, loss_fn: Callable, batches_per_epoch: int | None = None,
                 progress: Callable[[int], Callable[[], None]] | None = None, accumulation: int = 1):
        self.model, self.loss_fn = model, loss_fn
        self.accumulation = accumulation  # micro-batches per scoring batch (gradient accumulation)
        self._batches = iter(batches)
        self._per_epoch = batches_per_epoch
        self._progress = progress

    @property
    def batches_per_epoch(self) -> int:
        if self._per_epoch is None:
            raise ValueError("this selector scores one epoch of batches: pass batches_per_epoch")
        return self._per_epoch

    def scoring_batches(self, n: int | None) -> Iterator[torch.Tensor]:
        tick = self._progress(n) if self._progress is not None and n is not None else (lambda: None)
        was_training = self.model.training
        self.model.train()
        try:
            for _ in itertools.count() if n is None else range(n):
                # One scoring batch is `accumulation` micro-batches, as one optimizer step would be.
                micro = list(itertools.islice(self._batches, self.accumulation))
                if not micro:
                    return
                total = 0.0
                for batch in micro:
                    loss = self.loss_fn(self.model, batch) / len(micro)
                    loss.backward()
                    total += loss.detach()
                yield total
                tick()
        finally:
            self.model.train(was_training)

    def train(self, n_steps: int, plan: TrainPlan, after_step=None) -> None:
        raise ValueError("this selector trains before it selects, which only sam-peft's own loop does")


def select(model: nn.Module, selector: str = "sam", *, batches: Iterable = (), loss_fn: Callable | None = None,
           params: list[str] | None = None, head: list[str] = (), seed: int = 0, grad_clip: float = 1.0,
           batches_per_epoch: int | None = None, model_name: str = "the model", progress=None, accumulation: int = 1,
           stats_dtype: torch.dtype = torch.float32, **options) -> dict[str, torch.Tensor]:
    """{name: sorted flat indices} chosen by a registered sparse method's own `select`, as in a
    `sam-peft run` of that method: e.g. `select(model, "sam", batches=..., loss_fn=..., density=0.005,
    burnin_steps=100)`, `select(model, "random", density=0.005, seed=1)`, `select(model, "magprune")`,
    `select(model, "childprune", variant="fisher", batches=..., batches_per_epoch=len(loader))`.

    options: the method's own (`sam-peft methods` lists them); `head`: parameters whose gradient
    enters a global clipping norm (SAM's clip_burnin_grads); `grad_clip`: that norm (and
    ChildTuning-D's per-tensor clip); `accumulation`: micro-batches per scoring batch;
    `stats_dtype`: the score accumulators' dtype (float32: 4 bytes per eligible entry; bfloat16: 2).
    Nothing is updated; requires_grad flags are left as found.
    """
    method = sparse_method(selector, **options)
    named = _named(model, params)
    message = zero_budget("density", method.opts.density, sum(p.numel() for p in named.values()), model_name)
    if message:
        raise ValueError(message)
    host = BatchHost(model, batches, loss_fn, batches_per_epoch, progress, accumulation)
    device = next(iter(named.values())).device
    # theta0 is read by selections that compare against the pretrained values (none of today's
    # selectors here): views, not copies, since nothing changes before they are read.
    ctx = SelectContext(model, list(named), {n: p.detach() for n, p in named.items()}, host, seed=seed,
                        device=device, grad_clip=grad_clip, head=list(head), stats_dtype=stats_dtype)
    with _requires_grad_kept(model):
        plan = method.select(model, ctx)
    report = ctx.selection or {}
    if report.get("n_chosen_without_positive_score"):
        log.warning("%s: %d of the %d chosen entries have no positive score (ties at zero, filled by position)",
                    selector, report["n_chosen_without_positive_score"], report["k"])
    return plan.sparse


# ------------------------------------------------------------------------ scores and top-k by hand


def sam_scores(model: nn.Module, batches: Iterable, loss_fn: Callable, params: list[str] | None = None,
               score: str = "squared_sum") -> dict[str, torch.Tensor]:
    """SAM's score per entry from gradients accumulated over `batches`, without updating.

    score: "squared_sum" = (sum of gradients)^2 (the paper), "fisher" = sum of squared gradients,
    "abs_sum" = sum of |gradients| (scoring.SCORES).
    """
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}: {', '.join(SCORES)}")
    named = _named(model, params)
    ctx = SelectContext(model, list(named), {}, BatchHost(model, batches, loss_fn), seed=0,
                        device=None, grad_clip=0.0, head=[])
    with _requires_grad_kept(model):
        sums = ctx.accumulate_gradients(None, stats=(SCORES[score],))
    return score_from(sums, score)


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
    chosen = topk_entries(scores, budget(density, m), mode)
    report = tie_report(scores, chosen)
    if report["n_chosen_without_positive_score"]:
        log.warning("top_k: %d of the %d chosen entries have no positive score (ties at zero, filled by position)",
                    report["n_chosen_without_positive_score"], report["k"])
    return chosen


# ------------------------------------------------------------------------ training the chosen entries


class SparseTrainer(torch.optim.Optimizer):
    """AdamW on the chosen entries (and, whole, on `dense` parameters such as a task head): a torch
    Optimizer, so any lr scheduler drives it (its one parameter group carries the lr).

    Everything else is frozen (requires_grad False, so no weight gradients are computed); the
    chosen entries' optimizer state is O(k); entries outside the mask are never written, so they
    stay bit-identical to their values at construction. Use it as any optimizer:
    `loss.backward(); opt.step(); opt.zero_grad()`.

    The update is the CLI's (optim.PlanOptimizer): the trained entries and dense tensors are
    clipped by their joint norm (`max_grad_norm`; 0: off; `last_grad_norm` holds the norm before
    clipping), and weight decay skips biases and LayerNorm-like parameters
    (params.no_decay_names; pass `no_decay(name) -> bool` for another rule). The defaults are
    those of hf.SparseFineTuning under default TrainingArguments.

    `mask=None` with `eligible` names: an optimizer whose entries are chosen later by
    `select(mask)` (hf.SparseFineTuning chooses them when training begins); stepping before is an error.
    """

    def __init__(self, model: nn.Module, mask: dict[str, torch.Tensor] | None = None, lr: float = 5e-5,
                 dense: Iterable[str] = (), weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8,
                 max_grad_norm: float = 1.0, no_decay: Callable[[str], bool] | None = None,
                 eligible: Iterable[str] | None = None):
        named = dict(model.named_parameters())
        self.dense_names = list(dense)
        tensors = list(mask if mask is not None else (eligible or []))
        unknown = [n for n in [*tensors, *self.dense_names] if n not in named]
        if unknown:
            raise KeyError(f"no parameter named {unknown[0]!r} in the model")
        super().__init__([named[n] for n in [*tensors, *self.dense_names]],
                         {"lr": lr, "weight_decay": weight_decay, "betas": tuple(betas), "eps": eps})
        self.model = model
        self.max_grad_norm = max_grad_norm
        self._no_decay = None if no_decay is None else {n for n in named if no_decay(n)}
        self.mask: dict[str, torch.Tensor] | None = None
        self.last_grad_norm: float | None = None
        self._plan = None
        if mask is not None:
            self.select(mask)

    def select(self, mask: dict[str, torch.Tensor]) -> None:
        """Train exactly these entries (and the dense parameters) from now on."""
        group = self.param_groups[0]
        self.mask = mask
        self._plan = plan_optimizer(self.model, self.dense_names, mask, no_decay=self._no_decay, lr=group["lr"],
                                    betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"],
                                    max_grad_norm=self.max_grad_norm)

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._plan is None:
            raise RuntimeError("SparseTrainer: no entries selected yet (select(mask) first; with the HF Trainer, "
                               "pass the SparseFineTuning object as a callback too: callbacks=[sparse])")
        norm = self._plan.step(self.param_groups[0]["lr"])
        self.last_grad_norm = None if norm is None else float(norm)
        return loss

    def state_bytes(self) -> int:
        """Optimizer memory: moments of the chosen entries and dense tensors, and the index sets."""
        return self._plan.state_bytes() if self._plan is not None else 0

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self._plan is not None:
            state["sam_peft"] = {"mask": {n: i.cpu() for n, i in self.mask.items()},
                                 "optimizer": self._plan.state_dict()}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        ours = state_dict.pop("sam_peft", None)
        super().load_state_dict(state_dict)
        if ours is None:
            return
        # A checkpoint past its selection (e.g. Trainer's resume_from_checkpoint): keep its entries.
        device = self.param_groups[0]["params"][0].device
        self.select({n: i.to(device) for n, i in ours["mask"].items()})
        self._plan.load_state_dict(ours["optimizer"])


# ------------------------------------------------------------------------ deltas


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
