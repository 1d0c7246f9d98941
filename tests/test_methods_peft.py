"""Adapter and LoRA: the "equivalent model" at step 0 (zero-initialised outputs leave the
model's outputs unchanged, on RoBERTa and BERT encoders), the pretrained weights untouched
by training, which tensors train, and LoRA's target matching."""

import copy

import pytest
import torch
from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

from sam_peft.methods import build_method, validate_method_options
from sam_peft.methods.lora import DEFAULT_TARGETS, resolve_targets, targeted
from sam_peft.model import TaskModel
from sam_peft.params import eligible_names
from sam_peft.tasks import get_task

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
    {"name": "adapter", "config": "pfeiffer", "init": "zero"},
    {"name": "adapter", "config": "houlsby", "init": "zero"},
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
    {"name": "adapter", "init": "bert"},
    {"name": "lora", "b_init": "kaiming"},
], ids=lambda m: "-".join(str(v) for v in m.values()))
def test_non_zero_init_changes_the_outputs(family, method):
    # The equivalence above is not vacuous: with random up-projections / B it breaks.
    base, model = wrapped(family, method)
    assert not torch.equal(outputs(base)[2], outputs(model)[2])


@pytest.mark.parametrize("family", ["roberta", "bert"])
@pytest.mark.parametrize("method", [{"name": "adapter"}, {"name": "lora"}],
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


def test_lora_target_paths():
    assert targeted("encoder.layer.3.attention.self.query", ["query"])
    assert targeted("encoder.layer.3.output.dense", ["output.dense"])
    assert not targeted("encoder.layer.3.attention.output.dense", ["output.dense"])
    assert targeted("encoder.layer.3.attention.output.dense", ["attention.output.dense"])
    assert targeted("layers.1.attn.Wqkv", ["attn.Wqkv"])  # ModernBERT's `layers`
    assert not targeted("pooler.dense", ["query", "output.dense"])  # the pooler is outside the layers
    assert targeted("pooler.dense", ["pooler.dense"])


def test_lora_roles_and_paths_resolve_to_the_same_modules():
    """The default roles are the six Linears of every BERT layer; old-style paths still work, and
    a role and a path naming one module wrap it once."""
    model = task_model("bert")
    by_role = resolve_targets(model.encoder, DEFAULT_TARGETS)
    by_path = resolve_targets(model.encoder, ["query", "key", "value", "attention.output.dense",
                                              "intermediate.dense", "output.dense"])
    every_layer_linear = [n for n, m in model.encoder.named_modules()
                          if type(m) is torch.nn.Linear and n.startswith("encoder.layer.")]
    assert by_role == by_path == every_layer_linear and len(by_role) == 6 * 2
    assert resolve_targets(model.encoder, ["query", "attention.self.query", "pooler.dense"]) == [
        "encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query", "pooler.dense"]


def test_lora_roles_on_an_unknown_architecture_are_a_user_error():
    from util import HandEncoder

    from sam_peft.errors import UserError

    model = TaskModel(HandEncoder(), get_task("rte"))
    with pytest.raises(UserError, match=r"^method\.targets: role 'query' .*model type 'None' has no module-role "
                                        r"table \(supported: bert, deberta-v2, distilbert, electra, modernbert, "
                                        r"mpnet, roberta, xlm-roberta\)$"):
        build_method(validate_method_options({"name": "lora"})).wrap(model)
    # A module path works on any model.
    build_method(validate_method_options({"name": "lora", "targets": ["dense"]})).wrap(model)
    assert hasattr(model.encoder.dense, "lora_A")


def test_lora_eval_mode_never_merges_into_the_pretrained_weight():
    base, model = wrapped("roberta", {"name": "lora", "b_init": "kaiming"})
    model.train()
    model.eval()
    before = dict(base.named_parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


@pytest.mark.parametrize("method,trains", [
    # reduction 8: a bottleneck of 4 units, so that ReLU leaves some unit alive in every layer
    ({"name": "adapter", "reduction": 8}, lambda n: ".adapter_ffn." in n),
    ({"name": "adapter", "config": "houlsby", "train_layernorm": True, "reduction": 8},
     lambda n: ".adapter_attention." in n or ".adapter_ffn." in n or "LayerNorm" in n),
    ({"name": "lora"}, lambda n: n.endswith((".lora_A", ".lora_B"))),
], ids=["adapter", "adapter-houlsby-layernorm", "lora"])
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


@pytest.mark.parametrize("config", ["pfeiffer", "houlsby"])
def test_adapter_wrap_is_deterministic_and_a_deep_copy_has_its_own_adapters(config):
    """wrap() draws from torch's generator only: the same seed gives the same adapters. A deep copy
    of a wrapped model runs its own adapters (the hooks are copied with the modules they use)."""
    from sam_peft.methods.adapter import adapter_param_names

    method = build_method(validate_method_options({"name": "adapter", "config": config}))
    models = []
    for seed in (3, 3, 4):
        model = task_model("bert")
        torch.manual_seed(seed)
        method.wrap(model)
        models.append(model)
    names = adapter_param_names(models[0])
    assert len(names) == 2 * 4 * (1 if config == "pfeiffer" else 2)
    params = [dict(m.named_parameters()) for m in models]
    assert all(torch.equal(params[0][n], params[1][n]) for n in names)
    assert not any(torch.equal(params[0][n], params[2][n]) for n in names if n.endswith("weight"))

    original = models[0]
    before = outputs(original)[2]
    twin = copy.deepcopy(original)
    assert torch.equal(outputs(twin)[2], before)
    with torch.no_grad():
        for n in adapter_param_names(twin):
            dict(twin.named_parameters())[n].mul_(3.0)
    assert not torch.equal(outputs(twin)[2], before)  # the copy's hooks use the copy's adapters
    assert torch.equal(outputs(original)[2], before)  # and leave the original's alone


def test_adapter_zero_init_is_replaced_by_init():
    from sam_peft.errors import ConfigKeyError

    with pytest.raises(ConfigKeyError, match=r"^method\.zero_init: .*replaced by 'init'.*init: zero") as err:
        validate_method_options({"name": "adapter", "zero_init": True})
    assert "\n" not in str(err.value)
    assert "zero_init" not in validate_method_options({"name": "adapter"})  # not in resolved configs


def test_lora_without_matching_target_is_a_user_error():
    from sam_peft.errors import UserError

    model = task_model("roberta")
    with pytest.raises(UserError, match=r"^method\.targets: 'q_lin' matches no Linear module of the encoder "
                                        r"\(model type 'roberta'\)$"):
        build_method(validate_method_options({"name": "lora", "targets": ["query", "q_lin"]})).wrap(model)
    assert not any(hasattr(m, "lora_A") for m in model.modules())  # nothing wrapped half-way


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
