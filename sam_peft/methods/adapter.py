"""Adapter: bottleneck adapters (Pfeiffer or Houlsby, as AdapterHub's) in a frozen encoder.

The pretrained encoder stays frozen; the adapters and the task head train. The adapters are the
project's own small modules, placed through the architecture table (sam_peft/arch.py), so they
work on every supported encoder. They compute what the `adapters` library (1.3.0) computes:
- bit for bit, initial weights, outputs and gradients, in eval and train mode, on every family
  both support (BERT, RoBERTa, XLM-R, ELECTRA, DeBERTa-v2, DistilBERT), when both run on the same
  encoder code (tests/test_adapter_parity.py);
- against the library's stored results on BERT and RoBERTa, in every environment, with
  transformers' own encoder code (tests/test_adapter_golden.py): the library runs its own copy of
  the attention code, which in train mode can differ from transformers' by float32 round-off.
That library is not needed at run time. MPNet and ModernBERT, which it does not support, get the
same arithmetic at their blocks.

A residual block of a layer (attention or feed-forward) computes h, its output after its dropout,
then LayerNorm(h + r) with the residual stream r (in pre-LayerNorm layers, r + h). An adapter
`up(act(down(x)))` changes h into h + up(act(down(x))), before the model's own residual and
LayerNorm, where x is:
- `config: pfeiffer` (default; the authors' code; the library's SeqBnConfig): one adapter per
  layer, after the feed-forward block, ReLU; x = LayerNorm(h + r) with the block's own LayerNorm
  (which the model then applies once more to h + adapter + r), or h + r in pre-LayerNorm layers.
- `config: houlsby` (the library's DoubleSeqBnConfig): two per layer, after the attention block
  and after the feed-forward block, SiLU ("swish", the library's default for it); x = h.
No dropout inside the adapter and scaling 1 (the library's defaults for both configs); the
encoder's own dropouts apply in train mode as before.

Options:
- `reduction` (16, the authors' default): bottleneck size = hidden size // reduction (at least 1).
- `train_layernorm` (false, as the authors' code and AdapterHub's `train_adapter`): also train
  the encoder's eligible LayerNorm parameters (Houlsby et al. did).
- `init: bert` (default): AdapterHub's default initialisation (`init_weights="bert"`): both
  projections' weights from N(0, 0.02), biases zero. The paper's authors used the library with its
  defaults, so this is what they trained from. Each adapter draws from torch's global generator
  in the library's order (down then up, layer by layer, attention before feed-forward), so the
  same generator state gives the library's very weights; the engine seeds before `wrap`.
- `init: zero`: the same, then the up-projection (weight and bias) zeroed, so that the wrapped
  model computes exactly what the pretrained one does at step 0 (the paper's "equivalent
  model"); this was the default before `init` replaced `zero_init` (`zero_init: true` is
  `init: zero`).

Parameters are named `encoder.<layer>.adapter_attention.{down,up}.{weight,bias}` and
`encoder.<layer>.adapter_ffn.{down,up}.{weight,bias}`, e.g. `encoder.encoder.layer.0.adapter_ffn.down.weight`.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

from sam_peft.arch import Block, architecture_of, layers_of, submodule
from sam_peft.params import layernorm_names
from sam_peft.methods import register_method
from sam_peft.methods.base import Method, MethodOptions, TrainPlan

# Where each config puts adapters, and their non-linearity (the library's defaults for the config).
CONFIGS = {
    "pfeiffer": {"blocks": ("ffn",), "activation": "relu", "normed_input": True},
    "houlsby": {"blocks": ("attention", "ffn"), "activation": "silu", "normed_input": False},
}
_ACTIVATIONS = {"relu": nn.functional.relu, "silu": nn.functional.silu}
INIT_STD = 0.02  # AdapterHub's "bert" initialisation


class AdapterOptions(MethodOptions):
    config: Literal["pfeiffer", "houlsby"] = "pfeiffer"
    reduction: int = Field(16, ge=1)
    train_layernorm: bool = False
    init: Literal["bert", "zero"] = "bert"
    # Replaced by `init`; a field only so that an old config gets an error naming the new key.
    zero_init: None = Field(None, exclude=True)

    @field_validator("zero_init", mode="before")
    @classmethod
    def _replaced_by_init(cls, value):
        raise ValueError("replaced by 'init': write init: zero (what zero_init: true did) or init: bert "
                         "(AdapterHub's initialisation, the default now)")

    @model_validator(mode="after")
    def _layernorm_eligible(self):
        if self.train_layernorm and not self.layernorm:
            raise ValueError("train_layernorm needs the LayerNorm parameters eligible (layernorm: true)")
        return self


class Bottleneck(nn.Module):
    """x -> up(act(down(x))), hidden -> hidden // reduction -> hidden."""

    def __init__(self, hidden: int, reduction: int, activation: str, init: str, device=None, dtype=None):
        super().__init__()
        size = max(1, hidden // reduction)
        self.activation = activation
        # Constructed and initialised in the library's order (down, up, then down's init, up's
        # init), so that the same generator state gives the same weights.
        self.down = nn.Linear(hidden, size, device=device, dtype=dtype)
        self.up = nn.Linear(size, hidden, device=device, dtype=dtype)
        with torch.no_grad():
            for linear in (self.down, self.up):
                linear.weight.normal_(mean=0.0, std=INIT_STD)
                linear.bias.zero_()
            if init == "zero":
                self.up.weight.zero_()  # (its bias is 0 already)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(_ACTIVATIONS[self.activation](self.down(x)))


class _BlockHooks:
    """Forward hooks that put one Bottleneck into one residual block of a layer.

    `adapt` rewrites the block's output h into h + adapter(x); the model then adds the residual
    and applies its LayerNorm as usual, so the sum is formed in the library's order,
    LayerNorm((adapter + h) + r). With a LayerNorm'ed input (Pfeiffer) x needs r, which
    `capture_residual` takes from the module that receives it, just before the block runs.
    A plain object rather than closures, so that deep-copying a wrapped model copies the hooks
    along with the modules they refer to.
    """

    def __init__(self, adapter: Bottleneck, norm: nn.Module | None, block: Block, normed_input: bool):
        self.adapter = adapter
        self.norm = norm
        self.block = block
        self.normed_input = normed_input
        self.residual: torch.Tensor | None = None

    def capture_residual(self, module, args, kwargs):
        res = self.block.residual
        if len(args) > res.position:
            self.residual = args[res.position]
        else:
            self.residual = next((kwargs[k] for k in res.keywords if k in kwargs), None)
        if self.residual is None:
            raise RuntimeError(f"adapter: '{res.module}' was called without its residual input "
                               f"(argument {res.position} or {res.keywords}); an unsupported transformers version?")

    def adapt(self, module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        x = h
        if self.normed_input:
            r, self.residual = self.residual, None  # do not keep the activation alive past the forward
            if r is None:
                raise RuntimeError(f"adapter: '{self.block.output}' ran before its residual input was seen")
            x = h + r
            if self.norm is not None:
                x = self.norm(x)
        h = self.adapter(x) + h
        return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h


def adapter_param_names(model) -> list[str]:
    """The parameters of the adapters `wrap` added, in model order."""
    owners = [name for name, m in model.named_modules() if isinstance(m, Bottleneck)]
    return [n for n, _ in model.named_parameters() if any(n.startswith(o + ".") for o in owners)]


@register_method("adapter")
class Adapter(Method):
    display = "Adapter"
    paper_row = 6
    category = "added"
    Options = AdapterOptions

    def wrap(self, model) -> None:
        encoder = model.encoder
        arch = architecture_of(encoder, "method 'adapter'")
        spec = CONFIGS[self.opts.config]
        hidden = encoder.config.hidden_size
        # Find every module first, so that a model without them is left untouched.
        plan = []
        for _, layer in layers_of(encoder, arch):
            for block_name in spec["blocks"]:
                block = arch.blocks()[block_name]
                output = submodule(layer, block.output, encoder)
                residual = submodule(layer, block.residual.module, encoder)
                norm = submodule(layer, block.norm, encoder) if block.norm else None
                plan.append((layer, block_name, block, output, residual, norm))
        for layer, block_name, block, output, residual, norm in plan:
            ref = next(layer.parameters())
            adapter = Bottleneck(hidden, self.opts.reduction, spec["activation"], self.opts.init,
                                 device=ref.device, dtype=ref.dtype)
            layer.add_module(f"adapter_{block_name}", adapter)
            hooks = _BlockHooks(adapter, norm, block, spec["normed_input"])
            if spec["normed_input"]:
                residual.register_forward_pre_hook(hooks.capture_residual, with_kwargs=True)
            output.register_forward_hook(hooks.adapt)

    def select(self, model, ctx) -> TrainPlan:
        dense = adapter_param_names(model)
        if self.opts.train_layernorm:
            norms = layernorm_names(model)
            dense += [n for n in ctx.eligible if n in norms]
        return TrainPlan(dense=dense)
