"""The one interface every fine-tuning method implements.

A method says four things (docs/architecture.md), and nothing else in the engine knows its name:
1. `wrap`: permanent changes to the model's structure (adapter or LoRA modules). Called when
   training and again when `sam-peft eval` rebuilds the model from the base and the delta.
2. `select`: which entries train, as a TrainPlan (whole tensors and/or flat index sets inside
   tensors). It may first run a burn-in through the SelectContext the engine hands it
   (accumulate gradients without updating, or train some steps with another plan).
3. Training-time hooks, called by the engine in every training phase (burn-in and main):
   before_forward / extra_loss / after_backward / after_step, and eval_weights (a context
   manager for the weights evaluation sees).
4. `finalize`: remove training-time machinery so the model holds plain weights; the engine then
   counts changed entries and writes the delta from the plan (`final_plan`: the plan as it
   describes the finalized model, for methods whose main-phase plan named tensors that
   finalize removed).
The task head always trains and is counted separately; the engine adds it to every plan.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from sam_peft.params import set_trainable
from sam_peft.scoring import GradientStats
from sam_peft.selection import budget, tie_report, topk_entries


class MethodOptions(BaseModel):
    """Options every method has. Subclasses add their own; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    name: str
    # Which encoder parameters are eligible (may be selected / trained / counted in m).
    # Ineligible ones stay frozen at their pretrained values.
    embeddings: bool = True
    layernorm: bool = True

    def training_burnin(self) -> int:
        """Training steps (weight updates) the method takes before its main phase. Config
        validation rejects a max_steps that leaves no main-phase step after them."""
        return 0

    def scoring_batches(self, batches_per_epoch: int) -> int:
        """Scoring batches (gradients only, no update) the method will run before its main phase;
        the progress bar counts them from the start."""
        return 0


class SparseOptions(MethodOptions):
    """Options of methods that choose floor(density * m) entries."""

    density: float = Field(0.005, gt=0, lt=1)
    # global: one top-k over all eligible entries (the paper's theorem);
    # per_tensor: each tensor its share (the authors' code), see selection.per_tensor_quotas.
    topk: Literal["global", "per_tensor"] = "global"


@dataclass
class OwnGroup:
    """Whole tensors trained by an AdamW of their own: a constant learning rate, their own weight
    decay, and their own gradient-norm clipping (e.g. DiffPruning's gate logits, as Guo et al.
    trained them). They follow neither the main schedule nor the main clipping norm."""

    names: list[str]
    lr: float
    weight_decay: float = 0.0


@dataclass
class TrainPlan:
    """What trains: whole tensors by name, sorted flat indices inside others, and own groups."""

    dense: list[str] = field(default_factory=list)
    sparse: dict[str, torch.Tensor] = field(default_factory=dict)
    train_head: bool = True
    groups: list[OwnGroup] = field(default_factory=list)
    # Added tensors that AdamW must not decay, beyond the model's biases and LayerNorms
    # (e.g. DiffPruning's diffs of bias and LayerNorm tensors).
    no_decay: list[str] = field(default_factory=list)

    def __post_init__(self):
        named = [list(self.dense), list(self.sparse)] + [list(g.names) for g in self.groups]
        seen: set[str] = set()
        for names in named:
            overlap = seen & set(names)
            if overlap:
                raise ValueError(f"tensors in two parts of a plan: {sorted(overlap)[:3]}")
            seen |= set(names)

    def group_names(self) -> list[str]:
        return [n for g in self.groups for n in g.names]


class SelectionHost(Protocol):
    """Who runs a selection: the CLI's engine (engine.Trainer), the Hugging Face Trainer callback
    (hf.SparseFineTuning) or the library (lib.select). It supplies the batches; the SelectContext
    does the rest, so every front door scores, budgets and freezes the same way."""

    step: int  # training steps (weight updates) taken so far
    batches_per_epoch: int  # training batches in one pass over the train split

    def scoring_batches(self, n: int) -> Iterator[torch.Tensor]:
        """Run n batches forward and backward (training mode, no update), yielding each loss
        after its backward pass; the caller reads and clears the gradients before the next."""

    def train(self, n_steps: int, plan: "TrainPlan", after_step: Callable[[int], None] | None = None) -> None:
        """Take n training steps with `plan` (plus the head), calling after_step(step) after each;
        a host that cannot (the HF Trainer before its first step) raises."""


class SelectContext:
    """What a method's `select` sees: the eligible parameters, theta0, exact budgets and burn-ins.

    Two kinds of burn-in, and the difference matters for fairness between methods:
    - `accumulate_gradients`: scoring batches (forward and backward, no update). They are not
      training steps: the schedule, the evaluation cadence, `min_steps` and `max_steps` count
      only steps that update weights (SAM's burn-in, ChildTuning-D's Fisher pass).
    - `train`: steps that update weights (ChildPruning's, DiffPruning's and MagPruning's
      authors' burn-ins). They are training steps of the one schedule every method shares.
    """

    def __init__(self, model: nn.Module, eligible: list[str], theta0: dict[str, torch.Tensor], host: SelectionHost,
                 *, seed: int, device, grad_clip: float, head: list[str], stats_dtype: torch.dtype = torch.float32):
        named = dict(model.named_parameters())
        self.model = model
        self.eligible: dict[str, nn.Parameter] = {n: named[n] for n in eligible}
        self.theta0 = theta0
        self.m = sum(p.numel() for p in self.eligible.values())
        self.head = list(head)
        self.seed = seed
        # Randomness of the selection itself (Random's subset, Bernoulli masks): its own stream,
        # the same in every front door for the same seed.
        self.generator = torch.Generator().manual_seed(1_000_003 * seed + 7)
        self.device = device
        self.grad_clip = grad_clip  # the protocol's max gradient norm
        self.selection: dict | None = None  # selection.tie_report of the last topk
        self.stats_dtype = stats_dtype  # the gradient statistics' accumulators (scoring.GradientStats)
        self._host = host

    @property
    def step(self) -> int:
        """Training steps (weight updates) done so far."""
        return self._host.step

    @property
    def batches_per_epoch(self) -> int:
        """Training batches in one pass over the train split (the last one may be partial)."""
        return self._host.batches_per_epoch

    def budget(self, density: float, m: int | None = None) -> int:
        """floor(density * m); m defaults to all eligible entries."""
        return budget(density, self.m if m is None else m)

    def topk(self, scores: dict[str, torch.Tensor], density: float, mode: str = "global") -> dict[str, torch.Tensor]:
        """Exactly floor(density * m) entries with the largest scores, m = the entries scored
        (all eligible ones unless a method scores fewer); see selection.py."""
        m = sum(s.numel() for s in scores.values())
        chosen = topk_entries(scores, self.budget(density, m), mode)
        self.selection = tie_report(scores, chosen)
        return chosen

    def accumulate_gradients(self, n_batches: int, stats=("sum",), names: list[str] | None = None,
                             clip: float = 0.0, clip_mode: str = "global") -> dict[str, dict[str, torch.Tensor]]:
        """Run n scoring batches forward/backward without updating anything.

        Returns {stat: {name: tensor}} (see scoring.py) over `names` (default: every eligible
        parameter). `clip` > 0 clips each batch's gradients first (scoring.py's clip modes).
        Only those parameters compute weight gradients (and the head, whose gradient enters a
        global clipping norm as clip_grad_norm_ over the model did in the authors' runner).
        """
        names = list(self.eligible) if names is None else list(names)
        self.model.zero_grad(set_to_none=True)  # only these batches' gradients count
        with_head = bool(clip) and clip_mode == "global"
        set_trainable(self.model, set(names) | (set(self.head) if with_head else set()))
        named = dict(self.model.named_parameters())
        acc = GradientStats({n: named[n] for n in names}, stats, clip, clip_mode,
                            norm_extra=[named[n] for n in self.head] if with_head else [], dtype=self.stats_dtype)
        for _ in self._host.scoring_batches(n_batches):
            acc.add()
            self.model.zero_grad(set_to_none=True)
        return acc.sums

    def train(self, n_steps: int, plan: "TrainPlan", after_step: Callable[[int], None] | None = None) -> None:
        """Train n steps with `plan` (plus the head), e.g. a full fine-tuning burn-in;
        `after_step(step)` runs after each (e.g. a projection onto the budget)."""
        self._host.train(n_steps, plan, after_step)

    def full_plan(self) -> "TrainPlan":
        return TrainPlan(dense=list(self.eligible))


class Method(abc.ABC):
    """Base class. Subclasses set `Options` and implement `select`."""

    Options: type[MethodOptions] = MethodOptions
    name: str = ""  # the registry name, set by register_method
    display: str | None = None  # the name in tables and figures (the paper's); default: `name`
    paper_row: int | None = None  # row in the paper's Table 1 (tables order rows by it)
    # full: every eligible entry trains; sparse: floor(p*m) chosen entries of the pretrained
    # tensors; added: new modules train, the encoder is frozen (adapters, LoRA); subset: a fixed
    # kind of tensor trains (BitFit)
    category: str = "sparse"

    def __init__(self, opts: MethodOptions):
        self.opts = opts

    # 1. structure
    def wrap(self, model) -> None:
        """Add permanent modules (adapters, LoRA). Default: none."""

    # 2. selection (may run a burn-in through ctx)
    @abc.abstractmethod
    def select(self, model, ctx) -> TrainPlan:
        """The plan for the main phase; may run a burn-in through ctx first."""

    # 3. training-time hooks
    def before_forward(self, model, step: int) -> None:
        """Called before each training forward pass."""

    def extra_loss(self, model) -> torch.Tensor | None:
        """A term added to the task loss (e.g. an L0 penalty)."""
        return None

    def after_backward(self, model, step: int) -> None:
        """Called after backward, before clipping and the optimizer step."""

    def after_step(self, model, step: int) -> None:
        """Called after each optimizer step; `step` is the global step just completed."""

    def eval_weights(self, model, split: str):
        """Context manager: the weights evaluation on `split` should see."""
        return contextlib.nullcontext()

    def attach_for_eval(self, model, params: dict, theta0: dict, seed: int, device) -> None:
        """`sam-peft eval` rebuilt the trained model from the base and the delta: set up what
        eval_weights needs for the final evaluations (params: the eligible parameters, theta0
        their pretrained values). Default: nothing (the rebuilt weights are what evaluation sees)."""

    # 4. end of training
    def finalize(self, model) -> None:
        """Leave plain weights in the model (bake in gates, remove wrappers)."""

    def final_plan(self, plan: TrainPlan) -> TrainPlan:
        """What trained, in terms of the finalized model (counts in result.json).

        Default: the main-phase plan. A method whose main phase trained parameters that
        finalize() removed (e.g. gates baked into a sparse mask) returns the plan of the result.
        """
        return plan

    def report(self) -> dict:
        """Facts about the run worth keeping in result.json (under "method_report")."""
        return {}

    # State outside the model's parameters.
    def state_dict(self) -> dict:
        """What evaluation and finalize() need from the best checkpoint (e.g. a current mask)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def training_state(self) -> dict:
        """What continuing training after a restart needs: state_dict() plus anything that evolves
        during the main phase (random generators, logs). A resumed run replays select() first,
        so state set up there need not be saved."""
        return self.state_dict()

    def load_training_state(self, state: dict) -> None:
        self.load_state_dict(state)
