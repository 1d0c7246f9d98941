"""What each parameter of a TaskModel is: eligible, LayerNorm, no-decay, head, and its group.

The bottom floor of the package: methods, the engine and the library all classify parameters
through these functions, so there is one rule for each question. Classification is by module
type where a type says it (nn.Embedding, LayerNorm-like modules), else by the parameter's path.
"""

from __future__ import annotations

import re

from torch import nn

# The groups a selection is reported in (result.json "mask_share"), in display order.
GROUPS = ("embeddings", "attention", "ffn", "layernorm", "pooler", "other")

# A parameter inside a numbered transformer layer: "layer.3.", "layers.3." (ModernBERT),
# "transformer.layer.3." (DistilBERT).
_IN_LAYER = re.compile(r"(?:^|\.)layers?\.\d+\.")
_ATTENTION = re.compile(r"(?:^|\.)(?:attention|attn|self_attn)(?:\.|$)|\.(?:Wqkv|q_lin|k_lin|v_lin|out_lin)\.")


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, nn.LayerNorm) or "LayerNorm" in name or "RMSNorm" in name


def param_kinds(model: nn.Module) -> dict[str, str]:
    """'embedding' or 'layernorm' for parameters owned by such modules, by module type."""
    kind: dict[str, str] = {}
    for mname, module in model.named_modules():
        k = "embedding" if isinstance(module, nn.Embedding) else "layernorm" if _is_norm(module) else None
        if k:
            for pname, _ in module.named_parameters(recurse=False):
                kind[f"{mname}.{pname}" if mname else pname] = k
    return kind


def eligible_names(model: nn.Module, embeddings: bool = True, layernorm: bool = True) -> list[str]:
    """Encoder parameters a method may select, in model order (switches for embeddings, LayerNorm)."""
    kind = param_kinds(model)
    skip = {k for k, on in (("embedding", embeddings), ("layernorm", layernorm)) if not on}
    return [n for n, _ in model.named_parameters() if n.startswith("encoder.") and kind.get(n) not in skip]


def layernorm_names(model: nn.Module) -> set[str]:
    """Parameters owned by LayerNorm-like modules (by module type, as for eligibility)."""
    return {n for n, k in param_kinds(model).items() if k == "layernorm"}


def no_decay_names(model: nn.Module) -> set[str]:
    """AdamW weight decay skips biases and LayerNorm parameters (jiant / HF convention)."""
    kind = param_kinds(model)
    return {n for n, _ in model.named_parameters() if n.endswith("bias") or kind.get(n) == "layernorm"}


def head_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.startswith("head.")]


def in_numbered_layer(name: str) -> bool:
    """Whether a parameter lives inside one of the encoder's numbered transformer layers."""
    return bool(_IN_LAYER.search(name))


def linear_weight_names(model: nn.Module) -> set[str]:
    """The `weight` of every nn.Linear module (Mixout mixes exactly these)."""
    return {f"{m}.weight" if m else "weight" for m, mod in model.named_modules() if isinstance(mod, nn.Linear)}


def param_group(name: str, kind: str | None) -> str:
    """The group a parameter is reported in (GROUPS); `kind` from param_kinds()."""
    if kind == "layernorm":
        return "layernorm"
    if kind == "embedding" or ".embeddings." in name or name.startswith("embeddings."):
        return "embeddings"
    if ".pooler." in name or name.startswith("pooler."):
        return "pooler"
    if _ATTENTION.search(name):
        return "attention"
    if in_numbered_layer(name):
        return "ffn"  # the rest of a transformer layer: intermediate and output (feed-forward) blocks
    return "other"


def set_trainable(model: nn.Module, trained) -> None:
    """requires_grad only for the named parameters: frozen tensors compute no weight gradient.

    The one freezing rule of the engine, the library and the HF Trainer integration."""
    trained = set(trained)
    for n, p in model.named_parameters():
        p.requires_grad_(n in trained)
