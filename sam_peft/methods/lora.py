"""LoRA (Hu et al. 2022) with loralib: W x + (alpha / r) * B A x on chosen linear layers.

The chosen nn.Linear modules of the encoder become loralib.Linear modules that hold the very
same pretrained weight and bias Parameters (frozen) plus A (r x in) and B (out x r), which
train whole, with the task head. `merge_weights=False`, so that eval() never adds BA into the
pretrained weight: the base weights stay bit-identical and the delta holds A and B only.

Options:
- `r` (8), `alpha` (16): rank and scale (scaling = alpha / r); Hu et al.'s RoBERTa-base values.
- `variant: authors`: the paper authors' code, `lora.Linear(in, out, r)` with loralib's default
  lora_alpha = 1 (scaling 1/r) and B re-initialised like A (Kaiming uniform); it sets `alpha` 1
  and `b_init` kaiming (naming other values of those with it is an error). Table 1 uses the
  default (`variant: standard`).
- `targets`: which Linear modules, by role or by path. The default is the paper's six roles:
  `query`, `key`, `value`, `attention_output`, `intermediate`, `output`. A role is resolved per
  architecture through the table in sam_peft/arch.py (BERT's `attention.self.query`, MPNet's
  `attention.attn.q`, DeBERTa's `attention.self.query_proj`, DistilBERT's `attention.q_lin`, ...),
  in every layer. Where the architecture fuses roles into one Linear (ModernBERT's `attn.Wqkv`
  for query, key and value; `mlp.Wi` for the gated unit's gate and up projections), the role
  names that Linear and it gets one LoRA, whichever of its roles asked for it. Any other target
  is a module path, as before: a path inside each transformer layer (`attention.output.dense`), a
  module's last name alone (`q_lin`), or for modules outside the layers (the pooler) the whole
  path inside the encoder (`pooler.dense`); paths work on any architecture, roles need the table.
  A target that matches no Linear module is a UserError naming it and the model type.
- `b_init: zeros` (default; Hu et al.): B = 0, so the wrapped model equals the pretrained one
  at step 0. `b_init: kaiming` reproduces the authors' code, which re-initialised B the way
  loralib initialises A (Kaiming uniform, a = sqrt(5)).
- `dropout` (0.0): loralib's dropout on the LoRA branch input.
- `train_head` (true). The authors' code froze the task head by accident; `false` reproduces it.
"""

from __future__ import annotations

import math
import re
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from sam_peft.arch import ROLES, architecture_of, layers_of, model_type
from sam_peft.errors import UserError
from sam_peft.methods import register_method
from sam_peft.methods.base import Method, MethodOptions, TrainPlan

DEFAULT_TARGETS = list(ROLES)
_IN_LAYER = re.compile(r"(?:^|\.)layers?\.\d+\.(.+)$")


class LoRAOptions(MethodOptions):
    variant: Literal["standard", "authors"] = "standard"
    r: int = Field(8, ge=1)
    alpha: float = Field(16, gt=0)
    targets: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS), min_length=1)
    b_init: Literal["zeros", "kaiming"] = "zeros"
    dropout: float = Field(0.0, ge=0, lt=1)
    train_head: bool = True

    @model_validator(mode="after")
    def _authors_variant(self):
        if self.variant == "authors":
            for key, value in (("alpha", 1.0), ("b_init", "kaiming")):
                if key in self.model_fields_set and getattr(self, key) != value:
                    raise ValueError(f"variant: authors means {key} {value}; drop {key} or the variant")
            self.alpha, self.b_init = 1.0, "kaiming"
        return self


def targeted(module_name: str, targets: list[str]) -> bool:
    """Whether a module (path inside the encoder) is one of `targets` given as module paths (see the
    module docstring; roles are resolved by `resolve_targets`)."""
    m = _IN_LAYER.search(module_name)
    local = m.group(1) if m else module_name
    last = local.rsplit(".", 1)[-1]
    return any(local == t or ("." not in t and last == t) for t in targets)


def resolve_targets(encoder: nn.Module, targets: list[str]) -> list[str]:
    """The paths (inside the encoder) of the Linear modules that `targets` name, in model order."""
    linears = [name for name, mod in encoder.named_modules() if type(mod) is nn.Linear]
    is_linear = set(linears)
    chosen: set[str] = set()
    for target in targets:
        if target in ROLES:
            arch = architecture_of(encoder, f"method.targets: role '{target}' (module paths work on any model)")
            found = [f"{path}.{arch.roles[target]}" for path, _ in layers_of(encoder, arch)]
            absent = [path for path in found if path not in is_linear]
            if absent:
                raise UserError(f"method.targets: role '{target}' is '{arch.roles[target]}', which is not a Linear "
                                f"module of this {model_type(encoder)} encoder ('{absent[0]}')")
        else:
            found = [name for name in linears if targeted(name, [target])]
        if not found:
            raise UserError(f"method.targets: '{target}' matches no Linear module of the encoder "
                            f"(model type '{model_type(encoder)}')")
        chosen.update(found)
    return [name for name in linears if name in chosen]


def lora_param_names(model) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.endswith(".lora_A") or n.endswith(".lora_B")]


_LINEAR = None


def lora_linear_class():
    """loralib.Linear with a fused forward: the LoRA term added by one addmm (scale and add in the
    matmul's epilogue) instead of matmul, scale and add as separate passes over the activations.
    Same parameters (weight, bias, lora_A, lora_B), same result; built lazily (import loralib)."""
    global _LINEAR
    if _LINEAR is None:
        import loralib

        class LoRALinear(loralib.Linear):
            def forward(self, x):
                if self.r == 0 or self.merged or self.fan_in_fan_out:
                    return super().forward(x)
                flat = x.reshape(-1, x.shape[-1])
                out = nn.functional.linear(flat, self.weight, self.bias)
                low = nn.functional.linear(self.lora_dropout(flat), self.lora_A)  # [tokens, r]
                out = torch.addmm(out, low, self.lora_B.t(), alpha=self.scaling)
                return out.view(*x.shape[:-1], out.shape[-1])

        _LINEAR = LoRALinear
    return _LINEAR


@register_method("lora")
class LoRA(Method):
    display = "LoRA"
    paper_row = 7
    category = "added"
    Options = LoRAOptions

    def wrap(self, model) -> None:
        linear = lora_linear_class()
        encoder = model.encoder
        for name in resolve_targets(encoder, self.opts.targets):
            old = encoder.get_submodule(name)
            new = linear(old.in_features, old.out_features, r=self.opts.r, lora_alpha=self.opts.alpha,
                                 lora_dropout=self.opts.dropout, merge_weights=False, bias=old.bias is not None,
                                 device=old.weight.device, dtype=old.weight.dtype)
            # The pretrained Parameters themselves, not copies: names, values and identity stay.
            new.weight = old.weight
            new.bias = old.bias
            if self.opts.b_init == "kaiming":
                with torch.no_grad():
                    nn.init.kaiming_uniform_(new.lora_B, a=math.sqrt(5))
            parent_name, _, attr = name.rpartition(".")
            setattr(encoder.get_submodule(parent_name) if parent_name else encoder, attr, new)

    def select(self, model, ctx) -> TrainPlan:
        return TrainPlan(dense=lora_param_names(model), train_head=self.opts.train_head)
