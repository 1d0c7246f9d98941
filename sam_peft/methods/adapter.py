"""Adapter: bottleneck adapters (AdapterHub's `adapters` library) in a frozen encoder.

The pretrained encoder stays frozen; the adapter modules and the task head train.
- `config: pfeiffer` (default; the authors' code): one bottleneck after each layer's feed-forward
  block (the library's "seq_bn").
- `config: houlsby`: two per layer, after attention and after the feed-forward block
  ("double_seq_bn").
- `reduction` (16, the authors' default): bottleneck size = hidden size / reduction.
- `train_layernorm` (false, as the authors' code and AdapterHub's `train_adapter`): also train
  the encoder's eligible LayerNorm parameters (Houlsby et al. did).
- `zero_init` (true): zero the up-projections (weight and bias), so that the wrapped model
  computes exactly what the pretrained one does at step 0 (the paper's "equivalent model").
  false keeps the library's initialisation (small random up-projections).

The library is imported inside `wrap` only: it is an optional dependency.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import Field, model_validator

from sam_peft.engine import layernorm_names
from sam_peft.errors import UserError
from sam_peft.methods import register_method
from sam_peft.methods.base import Method, MethodOptions, TrainPlan

ADAPTER_NAME = "peft"
_LIBRARY_CONFIG = {"pfeiffer": "SeqBnConfig", "houlsby": "DoubleSeqBnConfig"}


class AdapterOptions(MethodOptions):
    config: Literal["pfeiffer", "houlsby"] = "pfeiffer"
    reduction: int = Field(16, ge=1)
    train_layernorm: bool = False
    zero_init: bool = True

    @model_validator(mode="after")
    def _layernorm_eligible(self):
        if self.train_layernorm and not self.layernorm:
            raise ValueError("train_layernorm needs the LayerNorm parameters eligible (layernorm: true)")
        return self


def adapter_param_names(model) -> list[str]:
    """The parameters the adapter library added, in model order."""
    marker = f".adapters.{ADAPTER_NAME}."
    return [n for n, _ in model.named_parameters() if marker in n]


@register_method("adapter")
class Adapter(Method):
    display = "Adapter"
    paper_row = 6
    category = "added"
    Options = AdapterOptions

    def wrap(self, model) -> None:
        try:
            import adapters
        except ImportError:
            raise UserError("method 'adapter' needs the `adapters` library (pip install adapters)") from None
        encoder = model.encoder
        config = getattr(adapters, _LIBRARY_CONFIG[self.opts.config])(reduction_factor=self.opts.reduction)
        adapters.init(encoder)
        # Activating an adapter makes the library warn, from inside its own call, that none is
        # active yet: mute that one call's logger, not the library's warnings in general.
        log = logging.getLogger("adapters.model_mixin")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            encoder.add_adapter(ADAPTER_NAME, config=config, set_active=True)
        finally:
            log.setLevel(level)
        if not encoder.active_adapters:
            raise RuntimeError("adapter: the library did not activate the adapter")
        if self.opts.zero_init:
            up = [p for n, p in encoder.named_parameters() if f".adapters.{ADAPTER_NAME}.adapter_up." in n]
            if not up:  # the library renamed its modules: fail rather than silently not zeroing
                raise RuntimeError("adapter: found no adapter_up parameters to zero-initialise")
            with torch.no_grad():
                for p in up:
                    p.zero_()

    def select(self, model, ctx) -> TrainPlan:
        dense = adapter_param_names(model)
        if self.opts.train_layernorm:
            norms = layernorm_names(model)
            dense += [n for n in ctx.eligible if n in norms]
        return TrainPlan(dense=dense)
