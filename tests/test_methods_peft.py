"""Adapter and LoRA: the "equivalent model" at step 0 (zero-initialised outputs leave the
model's outputs unchanged, on RoBERTa and BERT encoders), the pretrained weights untouched
by training, which tensors train, and LoRA's target matching."""

import pytest
import torch
from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

from sam_peft.engine import eligible_names
from sam_peft.methods import build_method, validate_method_options
from sam_peft.methods.lora import DEFAULT_TARGETS, targeted
from sam_peft.model import TaskModel
from sam_peft.tasks import get_task
from util import needs_adapters

SIZES = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def task_model(family: str, seed: int = 0) -> TaskModel:
    """A small random-weight RoBERTa or BERT encoder with an RTE head (no download)."""
    torch.manual_seed(seed)
    if family == "roberta":
        encoder = RobertaModel(RobertaConfig(type_vocab_size=1, pad_token_id=1, **SIZES))
    else:
        encoder = BertModel(BertConfig(type_vocab_size=2, pad_token_id=0, **SIZES))
    return TaskModel(encoder, get_task("rte"))


def outputs(model: TaskModel, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, SIZES["vocab_size"], (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padding in one row
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    model.eval()
    with torch.no_grad():
        states, pooled = model.encode(ids, mask, types)
        logits = model({"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    return states, pooled, logits


def wrapped(family: str, method: dict) -> tuple[TaskModel, TaskModel]:
    base, model = task_model(family), task_model(family)
    build_method(validate_method_options(method)).wrap(model)
    return base, model


@pytest.mark.parametrize("family", ["roberta", "bert"])
@pytest.mark.parametrize("method", [
    pytest.param({"name": "adapter", "config": "pfeiffer"}, marks=needs_adapters),
    pytest.param({"name": "adapter", "config": "houlsby"}, marks=needs_adapters),
    {"name": "lora"},
], ids=lambda m: "-".join(str(v) for v in m.values()))
def test_zero_initialised_outputs_give_the_equivalent_model(family, method):
    base, model = wrapped(family, method)
    added = [n for n in dict(model.named_parameters()) if n not in dict(base.named_parameters())]
    assert added  # the wrap really added modules
    for a, b in zip(outputs(base), outputs(model)):
        assert torch.equal(a, b)  # bit for bit


@pytest.mark.parametrize("family", ["roberta", "bert"])
@pytest.mark.parametrize("method", [
    pytest.param({"name": "adapter", "zero_init": False}, marks=needs_adapters),
    {"name": "lora", "b_init": "kaiming"},
], ids=lambda m: "-".join(str(v) for v in m.values()))
def test_non_zero_init_changes_the_outputs(family, method):
    # The equivalence above is not vacuous: with random up-projections / B it breaks.
    base, model = wrapped(family, method)
    assert not torch.equal(outputs(base)[2], outputs(model)[2])


@pytest.mark.parametrize("family", ["roberta", "bert"])
@pytest.mark.parametrize("method", [pytest.param({"name": "adapter"}, marks=needs_adapters), {"name": "lora"}],
                         ids=lambda m: m["name"])
def test_wrap_keeps_every_pretrained_parameter_by_name_and_value(family, method):
    base, model = wrapped(family, method)
    before, after = dict(base.named_parameters()), dict(model.named_parameters())
    assert set(before) <= set(after)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_lora_wraps_exactly_the_paper_six_per_layer():
    _, model = wrapped("roberta", {"name": "lora", "r": 4})
    lora_modules = sorted(n for n, m in model.encoder.named_modules() if hasattr(m, "lora_A"))
    expected = sorted(f"encoder.layer.{i}.{p}" for i in range(2) for p in (
        "attention.self.query", "attention.self.key", "attention.self.value",
        "attention.output.dense", "intermediate.dense", "output.dense"))
    assert lora_modules == expected  # the pooler is not a target
    for n, m in model.encoder.named_modules():
        if hasattr(m, "lora_A"):
            assert m.lora_A.shape == (4, m.in_features) and m.lora_B.shape == (m.out_features, 4)
            assert m.scaling == 16 / 4 and not m.merge_weights


def test_lora_target_names():
    assert targeted("encoder.layer.3.attention.self.query", DEFAULT_TARGETS)
    assert targeted("encoder.layer.3.output.dense", ["output.dense"])
    assert not targeted("encoder.layer.3.attention.output.dense", ["output.dense"])
    assert targeted("encoder.layer.3.attention.output.dense", ["attention.output.dense"])
    assert not targeted("pooler.dense", DEFAULT_TARGETS)
    assert targeted("pooler.dense", ["pooler.dense"])


def test_lora_eval_mode_never_merges_into_the_pretrained_weight():
    base, model = wrapped("roberta", {"name": "lora", "b_init": "kaiming"})
    model.train()
    model.eval()
    before = dict(base.named_parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


@pytest.mark.parametrize("method,trains", [
    pytest.param({"name": "adapter"}, lambda n: ".adapters.peft." in n, marks=needs_adapters),
    pytest.param({"name": "adapter", "train_layernorm": True}, lambda n: ".adapters.peft." in n or "LayerNorm" in n,
                 marks=needs_adapters),
    ({"name": "lora"}, lambda n: n.endswith((".lora_A", ".lora_B"))),
], ids=["adapter", "adapter-layernorm", "lora"])
def test_plan_trains_added_modules_and_head_only(method, trains):
    """On a real (tiny) encoder through the engine: what trains, and theta0 stays put."""
    from sam_peft.engine import Trainer
    from util import hand_config, synthetic_data

    cfg = hand_config(method, task="rte", max_steps=6, eval_every=3, lr=0.05, weight_decay=0.5)
    model = task_model("roberta")
    eligible = eligible_names(model)
    m = build_method(cfg.method)
    m.wrap(model)
    tr = Trainer(cfg, model, m, synthetic_data("rte", vocab=SIZES["vocab_size"]), "cpu", eligible, progress=False)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit = tr.fit()
    plan_names = set(fit.plan.dense)
    assert plan_names == {n for n in start if trains(n) and not n.startswith("head.")}
    for n, p in model.named_parameters():
        if n in plan_names or n.startswith("head."):
            assert not torch.equal(p, start[n]), n  # every trained tensor moved
        else:
            assert torch.equal(p, start[n]), n  # everything else bit-identical


def test_adapter_layernorm_needs_eligible_layernorm():
    from sam_peft.errors import ConfigKeyError

    with pytest.raises(ConfigKeyError, match="train_layernorm"):
        validate_method_options({"name": "adapter", "train_layernorm": True, "layernorm": False})


def test_lora_without_matching_target_is_a_user_error():
    from sam_peft.errors import UserError

    model = task_model("roberta")
    with pytest.raises(UserError, match="targets"):
        build_method(validate_method_options({"name": "lora", "targets": ["q_lin"]})).wrap(model)


def test_fused_lora_forward_equals_loralib_forward_and_gradients():
    """The addmm fast path computes what loralib.Linear computes, values and gradients."""
    import loralib

    from sam_peft.methods.lora import lora_linear_class

    torch.manual_seed(0)
    ref = loralib.Linear(12, 7, r=4, lora_alpha=8, merge_weights=False)
    fused = lora_linear_class()(12, 7, r=4, lora_alpha=8, merge_weights=False)
    fused.load_state_dict(ref.state_dict())
    torch.nn.init.normal_(ref.lora_B)  # non-zero B so that the LoRA term counts
    fused.lora_B.data.copy_(ref.lora_B.data)
    x = torch.randn(3, 5, 12)
    out_ref, out_fused = ref(x), fused(x)
    assert out_fused.shape == out_ref.shape == (3, 5, 7)
    torch.testing.assert_close(out_fused, out_ref, rtol=1e-5, atol=1e-6)
    out_ref.square().sum().backward()
    out_fused.square().sum().backward()
    for name in ("lora_A", "lora_B"):
        torch.testing.assert_close(getattr(fused, name).grad, getattr(ref, name).grad, rtol=1e-5, atol=1e-5)
