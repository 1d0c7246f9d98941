"""Native bottleneck adapters against the `adapters` library (1.3.0), which the paper's authors used.

On tiny random encoders of every family both support (BERT, RoBERTa, XLM-R, ELECTRA, DeBERTa-v2 in
v3's layout, DistilBERT), for Pfeiffer (SeqBnConfig) and Houlsby (DoubleSeqBnConfig):
- the same generator state gives the very same initial adapter weights ("bert" init), with the
  same set of adapters (names mapped), and that init's statistics are N(0, 0.02) with zero biases;
- with the library's weights copied in, outputs and gradients (w.r.t. the input embeddings, the
  adapter parameters and every pretrained parameter) are bit-identical, in eval mode and in train
  mode with dropout (both seeded alike: the library draws no random numbers of its own, since its
  adapter dropout is 0, so the encoder's dropout masks come out the same).
Both models run on the library-initialised encoder (`adapters.init`, no library adapter on the
native side), so that both use the library's copy of the attention code. Against a plain Hugging
Face encoder (what a run uses), tests/test_adapter_golden.py compares with the library's stored
outputs.
"""

import copy

import pytest
import torch

adapters = pytest.importorskip("adapters", reason="the `adapters` library is not installed (parity with "
                                                  "it is still checked by test_adapter_golden.py's stored outputs)")

from adapter_reference import (  # noqa: E402
    LIBRARY_CONFIGS,
    LIBRARY_FAMILIES,
    build_base,
    forward_backward,
    library_adapter_params,
    library_wrap,
    make_inputs,
    native_adapter_params,
    native_wrap,
)


def wrapped_pair(family: str, config: str, seed: int = 5, library_init: bool = True):
    """(library model, native model) from one base, each wrapped after seeding the generator alike."""
    base = build_base(family)
    if library_init:
        adapters.init(base)
    lib, nat = copy.deepcopy(base), copy.deepcopy(base)
    library_wrap(lib, config, seed)
    native_wrap(nat, config, seed)
    return lib, nat


@pytest.mark.parametrize("config", list(LIBRARY_CONFIGS))
@pytest.mark.parametrize("family", LIBRARY_FAMILIES)
def test_same_seed_gives_the_library_adapters_and_initial_weights(family, config):
    lib, nat = wrapped_pair(family, config, library_init=False)
    lib_params, nat_params = library_adapter_params(lib), native_adapter_params(nat)
    per_layer = 1 if config == "pfeiffer" else 2
    assert len(nat_params) == 4 * per_layer * lib.config.num_hidden_layers  # down/up weight/bias
    assert set(nat_params) == set(lib_params)
    for name, p in lib_params.items():
        assert torch.equal(nat_params[name], p), name


def test_bert_init_statistics_match_the_library_scheme():
    """AdapterHub's init_weights="bert": weights N(0, 0.02), biases 0 (checked on the library's own
    adapter and on ours, large enough for the sample statistics to mean something)."""
    from transformers import BertConfig, BertModel

    sizes = dict(vocab_size=8, hidden_size=512, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    base = BertModel(BertConfig(**sizes))
    lib, nat = copy.deepcopy(base), copy.deepcopy(base)
    library_wrap(lib, "houlsby", seed=1, reduction=2)
    native_wrap(nat, "houlsby", seed=2, reduction=2)  # another stream: the statistics must agree, not the values
    for params in (library_adapter_params(lib), native_adapter_params(nat)):
        weights = torch.cat([p.detach().flatten() for n, p in params.items() if n.endswith("weight")])
        assert weights.numel() == 4 * 512 * 256
        n = weights.numel()
        assert abs(float(weights.mean())) < 5 * 0.02 / n**0.5
        assert abs(float(weights.std()) / 0.02 - 1) < 0.01  # std of a sample std: ~1/sqrt(2n) = 0.1%
        assert all(torch.count_nonzero(p) == 0 for name, p in params.items() if name.endswith("bias"))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("config", list(LIBRARY_CONFIGS))
@pytest.mark.parametrize("family", LIBRARY_FAMILIES)
def test_outputs_and_gradients_are_the_library_s_bit_for_bit(family, config, train):
    lib, nat = wrapped_pair(family, config)
    lib_params, nat_params = library_adapter_params(lib), native_adapter_params(nat)
    with torch.no_grad():  # random biases too, so that every term of the adapter counts
        for name, p in lib_params.items():
            p.normal_(0.0, 0.3)
            nat_params[name].copy_(p)
    inputs = make_inputs(family)
    ref = forward_backward(lib, inputs, train, lib_params)
    got = forward_backward(nat, inputs, train, nat_params)
    assert set(got) == set(ref) and len(ref) == 2 + len(lib_params)
    for key in ref:
        assert torch.equal(got[key], ref[key]), key
    # Every pretrained parameter's gradient as well (the LayerNorm applied twice in Pfeiffer); the
    # word embeddings get none, the inputs being embeddings.
    lib_base = {n: p for n, p in lib.named_parameters() if ".adapters." not in n}
    nat_base = {n: p for n, p in nat.named_parameters() if ".adapter_" not in n}
    assert set(lib_base) == set(nat_base)
    no_grad = {n for n, p in lib_base.items() if p.grad is None}
    assert no_grad == {"embeddings.word_embeddings.weight"}
    assert {n for n, p in nat_base.items() if p.grad is None} == no_grad
    for name, p in lib_base.items():
        if name not in no_grad:
            assert torch.equal(nat_base[name].grad, p.grad), name
    # The adapters did something: the outputs differ from the bare encoder's.
    bare = copy.deepcopy(nat)
    with torch.no_grad():
        for p in native_adapter_params(bare).values():
            p.zero_()
    assert not torch.equal(forward_backward(bare, inputs, train, {})["output"], got["output"])
