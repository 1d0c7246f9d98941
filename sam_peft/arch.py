"""Module roles per encoder architecture: where LoRA and bottleneck adapters go in each layer.

Every supported encoder family is one `Architecture` entry in `ARCHITECTURES`, keyed by
`config.model_type` (data, not code paths):
- `layers`: the ModuleList of transformer layers inside the Hugging Face base model;
- `roles`: the Linear module, as a path inside one layer, that plays each role of `ROLES`:
  `query`, `key`, `value` (the attention projections), `attention_output` (the projection after
  attention), `intermediate` (the feed-forward up-projection) and `output` (its down-projection);
- `attention` and `ffn`: the two residual blocks of a layer as a bottleneck adapter sees them
  (`Block`): the module whose output is the block's contribution h (after the block's dropout,
  just before the residual add), where the residual stream r that h is added to comes in, and the
  LayerNorm the model applies to h + r (None in pre-LayerNorm layers, whose sum is not normalised).

Fused projections. Some architectures compute several roles with one Linear:
- ModernBERT's `attn.Wqkv` computes query, key and value at once, so those three roles all map to
  `attn.Wqkv`; its `mlp.Wi` packs the gated unit's gate and up projections, so `intermediate`
  maps to `mlp.Wi`.
- Anything that acts on a role acts on the whole fused Linear: LoRA on `query` (or on any of
  query/key/value) is one LoRA on `Wqkv`, which adapts all three, and the default six roles give
  four LoRA modules per ModernBERT layer. Roles that share a module are wrapped once.

A model type without an entry is a UserError that lists the supported ones; there is no guessing by
module names, since a wrong guess would put adapters in the wrong place silently. (LoRA also takes
explicit module paths, which work on any architecture.)
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from sam_peft.errors import UserError

ROLES = ("query", "key", "value", "attention_output", "intermediate", "output")


@dataclass(frozen=True)
class Residual:
    """The residual stream r of a block: an input of `module`, at `position` or under a keyword.

    Several keywords because transformers versions call some modules differently (DistilBERT's
    attention gets `query=x` in 4.x and `hidden_states` positionally in 5.x)."""

    module: str
    position: int
    keywords: tuple[str, ...]


@dataclass(frozen=True)
class Block:
    """One residual block of a layer (attention or feed-forward), as a bottleneck adapter sees it.

    The model computes `norm(h + r)` (post-LayerNorm) or `r + h` (pre-LayerNorm, `norm` None),
    where h is the output of `output` (the first element if it returns a tuple).
    """

    output: str
    residual: Residual
    norm: str | None


@dataclass(frozen=True)
class Architecture:
    layers: str
    roles: dict[str, str]
    attention: Block
    ffn: Block

    def blocks(self) -> dict[str, Block]:
        return {"attention": self.attention, "ffn": self.ffn}


# BERT and the families that kept its layer (RoBERTa, XLM-R, ELECTRA; DeBERTa-v2/v3 only renamed
# the attention projections): `attention.output` and `output` each compute
# LayerNorm(dropout(dense(x)) + input_tensor), called as module(x, input_tensor).
_BERT = Architecture(
    layers="encoder.layer",
    roles={"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
           "attention_output": "attention.output.dense", "intermediate": "intermediate.dense",
           "output": "output.dense"},
    attention=Block(output="attention.output.dropout", residual=Residual("attention.output", 1, ("input_tensor",)),
                    norm="attention.output.LayerNorm"),
    ffn=Block(output="output.dropout", residual=Residual("output", 1, ("input_tensor",)), norm="output.LayerNorm"),
)

_DEBERTA_V2 = Architecture(
    layers=_BERT.layers,
    roles={**_BERT.roles, "query": "attention.self.query_proj", "key": "attention.self.key_proj",
           "value": "attention.self.value_proj"},
    attention=_BERT.attention,
    ffn=_BERT.ffn,
)

# MPNet: attention.attn holds q, k, v and o; MPNetAttention itself computes
# LayerNorm(dropout(attn(x)[0]) + x). Its feed-forward block is BERT's.
_MPNET = Architecture(
    layers="encoder.layer",
    roles={"query": "attention.attn.q", "key": "attention.attn.k", "value": "attention.attn.v",
           "attention_output": "attention.attn.o", "intermediate": "intermediate.dense", "output": "output.dense"},
    attention=Block(output="attention.dropout", residual=Residual("attention", 0, ("hidden_states",)),
                    norm="attention.LayerNorm"),
    ffn=_BERT.ffn,
)

# DistilBERT: the block computes sa_layer_norm(attention(x)[0] + x), then
# output_layer_norm(ffn(a) + a); out_lin has no dropout after it, ffn ends with its dropout.
_DISTILBERT = Architecture(
    layers="transformer.layer",
    roles={"query": "attention.q_lin", "key": "attention.k_lin", "value": "attention.v_lin",
           "attention_output": "attention.out_lin", "intermediate": "ffn.lin1", "output": "ffn.lin2"},
    attention=Block(output="attention", residual=Residual("attention", 0, ("query", "hidden_states")),
                    norm="sa_layer_norm"),
    ffn=Block(output="ffn", residual=Residual("ffn", 0, ("input",)), norm="output_layer_norm"),
)

# ModernBERT: pre-LayerNorm, x + attn(attn_norm(x))[0], then y + mlp(mlp_norm(y)); fused Wqkv and
# Wi (see the module docstring). The residual stream is what the block's pre-norm receives.
_MODERNBERT = Architecture(
    layers="layers",
    roles={"query": "attn.Wqkv", "key": "attn.Wqkv", "value": "attn.Wqkv", "attention_output": "attn.Wo",
           "intermediate": "mlp.Wi", "output": "mlp.Wo"},
    attention=Block(output="attn", residual=Residual("attn_norm", 0, ("input", "hidden_states")), norm=None),
    ffn=Block(output="mlp", residual=Residual("mlp_norm", 0, ("input", "hidden_states")), norm=None),
)

ARCHITECTURES: dict[str, Architecture] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "electra": _BERT,
    "deberta-v2": _DEBERTA_V2,
    "mpnet": _MPNET,
    "distilbert": _DISTILBERT,
    "modernbert": _MODERNBERT,
}


def model_type(encoder: nn.Module) -> str | None:
    return getattr(getattr(encoder, "config", None), "model_type", None)


def architecture_of(encoder: nn.Module, purpose: str) -> Architecture:
    """The table entry for a Hugging Face base model, or a one-line UserError naming its type."""
    mtype = model_type(encoder)
    if mtype not in ARCHITECTURES:
        raise UserError(f"{purpose}: model type '{mtype}' has no module-role table "
                        f"(supported: {', '.join(sorted(ARCHITECTURES))})")
    return ARCHITECTURES[mtype]


def layers_of(encoder: nn.Module, arch: Architecture) -> list[tuple[str, nn.Module]]:
    """(path inside the encoder, module) of each transformer layer, in order."""
    try:
        stack = encoder.get_submodule(arch.layers)
    except AttributeError:
        raise UserError(f"model type '{model_type(encoder)}': expected its layers at '{arch.layers}', "
                        "which this model does not have (an unsupported transformers version?)") from None
    return [(f"{arch.layers}.{i}", layer) for i, layer in enumerate(stack)]


def submodule(layer: nn.Module, path: str, encoder: nn.Module) -> nn.Module:
    """`layer.get_submodule(path)` with a one-line UserError naming the model type if it is absent."""
    try:
        return layer.get_submodule(path)
    except AttributeError:
        raise UserError(f"model type '{model_type(encoder)}': its layers have no module '{path}' "
                        "(an unsupported transformers version?)") from None
