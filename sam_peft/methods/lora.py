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
- `targets`: which Linear modules. A target is a module's path inside its transformer layer
  (`attention.output.dense`, `output.dense`, `intermediate.dense`) or its last name alone
  (`query`). The default is the paper's six: query, key, value, attention output, intermediate
  and output dense layers (the same names in RoBERTa and BERT). Modules outside the numbered
  layers (the pooler) are matched by their whole path in the encoder.
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

from sam_peft.errors import UserError
from sam_peft.methods import register_method
from sam_peft.methods.base import Method, MethodOptions, TrainPlan

DEFAULT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
_IN_LAYER = re.compile(r"(?:^|\.)layer\.\d+\.(.+)$")


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
    """Whether a module (path inside the encoder) is one of `targets` (see the module docstring)."""
    m = _IN_LAYER.search(module_name)
    local = m.group(1) if m else module_name
    last = local.rsplit(".", 1)[-1]
    return any(local == t or ("." not in t and last == t) for t in targets)


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
    Options = LoRAOptions

    def wrap(self, model) -> None:
        linear = lora_linear_class()
        encoder = model.encoder
        chosen = [(name, mod) for name, mod in encoder.named_modules()
                  if type(mod) is nn.Linear and targeted(name, self.opts.targets)]
        if not chosen:
            raise UserError(f"method.targets: no Linear module of the encoder matches {self.opts.targets}")
        for name, old in chosen:
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
