"""Shared by the adapter parity test, the golden-output test and the script that writes the golden
file: tiny random-weight bases (BERT and RoBERTa for the golden file; every family the library
supports among ours for the parity test), the `adapters` library's wrap and its parameter names
mapped to ours, and one forward/backward pass that records outputs and gradients."""

from __future__ import annotations

import re

import torch
from torch import nn

from sam_peft.methods import build_method, validate_method_options
from sam_peft.methods.adapter import adapter_param_names

FAMILIES = ("bert", "roberta")  # the golden file's
LIBRARY_FAMILIES = FAMILIES + ("xlm-roberta", "electra", "deberta-v2", "distilbert")  # what adapters 1.3.0 supports
LIBRARY_CONFIGS = {"pfeiffer": "SeqBnConfig", "houlsby": "DoubleSeqBnConfig"}
REDUCTION = 4
SIZES = dict(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
             hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
ADAPTER_NAME = "golden"
DROPOUT_SEED = 1234  # torch's generator is seeded with this right before each train-mode forward


def config_kwargs(family: str) -> dict:
    if family in ("bert", "electra"):
        return dict(SIZES, type_vocab_size=2, pad_token_id=0, max_position_embeddings=16)
    if family in ("roberta", "xlm-roberta"):
        return dict(SIZES, type_vocab_size=1, pad_token_id=1, max_position_embeddings=18)  # positions start at pad + 1
    if family == "deberta-v2":  # DeBERTa-v3's layout
        return dict(SIZES, type_vocab_size=0, pad_token_id=0, max_position_embeddings=16, relative_attention=True,
                    pos_att_type=["p2c", "c2p"], share_att_key=True, position_biased_input=False, position_buckets=8,
                    norm_rel_ebd="layer_norm")
    if family == "distilbert":
        return dict(vocab_size=SIZES["vocab_size"], dim=SIZES["hidden_size"], n_layers=SIZES["num_hidden_layers"],
                    n_heads=SIZES["num_attention_heads"], hidden_dim=SIZES["intermediate_size"],
                    dropout=SIZES["hidden_dropout_prob"], attention_dropout=SIZES["attention_probs_dropout_prob"],
                    pad_token_id=0, max_position_embeddings=16)
    raise ValueError(family)


def build_base(family: str, kwargs: dict | None = None, seed: int = 0):
    """A random-weight encoder of that family, without a pooler (no download)."""
    from transformers import AutoConfig, AutoModel, BertConfig, BertModel, RobertaConfig, RobertaModel

    kwargs = config_kwargs(family) if kwargs is None else kwargs
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family in FAMILIES:
            config_cls, model_cls = (BertConfig, BertModel) if family == "bert" else (RobertaConfig, RobertaModel)
            return model_cls(config_cls(**kwargs), add_pooling_layer=False)
        no_pooler = {"add_pooling_layer": False} if family == "xlm-roberta" else {}  # the others have none
        return AutoModel.from_config(AutoConfig.for_model(family, **kwargs), **no_pooler)


def make_inputs(family: str, seed: int = 7) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, SIZES["vocab_size"], (2, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # padding in one row
    inputs = {"input_ids": ids, "attention_mask": mask,
              "loss_weight": torch.randn(2, 8, SIZES["hidden_size"], generator=g)}
    if config_kwargs(family).get("type_vocab_size", 0) > 1:
        types = torch.zeros_like(ids)
        types[:, 4:] = 1
        inputs["token_type_ids"] = types
    return inputs


class Holder(nn.Module):
    """What the method wraps: a module with the Hugging Face encoder as `.encoder`."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder


def native_wrap(encoder, config: str, seed: int, reduction: int = REDUCTION, init: str = "bert") -> None:
    """sam-peft's adapters, in place, drawn after seeding torch's generator with `seed`."""
    method = build_method(validate_method_options(
        {"name": "adapter", "config": config, "reduction": reduction, "init": init}))
    torch.manual_seed(seed)
    method.wrap(Holder(encoder))


def native_adapter_params(encoder) -> dict[str, nn.Parameter]:
    """Our adapter parameters, named as inside the encoder (without the holder's `encoder.`)."""
    params = dict(encoder.named_parameters())
    names = [n.removeprefix("encoder.") for n in adapter_param_names(Holder(encoder))]
    return {n: params[n] for n in names}


def library_wrap(encoder, config: str, seed: int, reduction: int = REDUCTION) -> None:
    """The `adapters` library's adapter of that config, active, in place (library defaults otherwise),
    drawn after seeding torch's generator with `seed` (`adapters.init` itself draws numbers, so
    the seeding comes after it)."""
    import adapters

    if not hasattr(encoder, "adapters_config"):
        adapters.init(encoder)
    cfg = getattr(adapters, LIBRARY_CONFIGS[config])(reduction_factor=reduction)
    torch.manual_seed(seed)
    encoder.add_adapter(ADAPTER_NAME, config=cfg, set_active=True)


# The library's adapters sit in `attention.output` / `output` (BERT's layer, DeBERTa-v2's) or in
# `attention_adapters` / `output_adapters` (DistilBERT's).
_LIBRARY_NAME = re.compile(r"^(?P<layer>.+\.layer\.\d+)\.(?P<where>attention\.output|attention_adapters|output"
                           r"|output_adapters)\.adapters\." + ADAPTER_NAME
                           + r"\.(?P<proj>adapter_down\.0|adapter_up)\.(?P<kind>weight|bias)$")


def library_adapter_params(encoder) -> dict[str, nn.Parameter]:
    """The library's adapter parameters under our names: `attention.output.adapters.X.adapter_down.0`
    -> `adapter_attention.down`, `output.adapters.X.adapter_up` -> `adapter_ffn.up`, ..."""
    out = {}
    for name, p in encoder.named_parameters():
        if f".adapters.{ADAPTER_NAME}." not in name:
            continue
        m = _LIBRARY_NAME.match(name)
        if m is None:
            raise AssertionError(f"unexpected library adapter parameter {name}")
        block = "attention" if m["where"].startswith("attention") else "ffn"
        proj = "down" if m["proj"].startswith("adapter_down") else "up"
        out[f"{m['layer']}.adapter_{block}.{proj}.{m['kind']}"] = p
    return out


def forward_backward(encoder, inputs: dict, train: bool, adapter_params: dict[str, nn.Parameter]) -> dict:
    """last_hidden_state, and the gradients of sum(state * loss_weight) w.r.t. the input embeddings
    and the adapter parameters (train mode: dropout drawn after seeding with DROPOUT_SEED)."""
    encoder.train(train)
    encoder.zero_grad(set_to_none=True)
    embeds = encoder.embeddings.word_embeddings(inputs["input_ids"]).detach().requires_grad_(True)
    kwargs = {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"]}
    if "token_type_ids" in inputs:
        kwargs["token_type_ids"] = inputs["token_type_ids"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DROPOUT_SEED)
        state = encoder(**kwargs).last_hidden_state
    (state * inputs["loss_weight"]).sum().backward()
    out = {"output": state.detach(), "grad/inputs_embeds": embeds.grad.detach()}
    out.update({f"grad/{n}": p.grad.detach().clone() for n, p in adapter_params.items()})
    return out
