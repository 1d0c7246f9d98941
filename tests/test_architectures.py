"""Every supported encoder family (BERT, RoBERTa, XLM-R, ELECTRA, MPNet, DeBERTa-v2/v3, DistilBERT,
ModernBERT), each a tiny random-weight checkpoint saved to a folder with a fast tokenizer trained
on the spot (tests/arch_models.py), loaded as `model: <folder>`:
- every registered method trains 3 steps through `sam_peft.run.run` (Adapter in both configs) and
  `evaluate_run` rebuilds base + wrap + delta and reproduces result.json's test metrics; counts;
- LoRA's six roles each resolve to one Linear in every layer and together to every Linear of every
  layer (fused ones once), and LoRA trains exactly those;
- adapters sit where they should: with zero-initialised adapters (the model's outputs then
  unchanged, bit for bit), Pfeiffer's adapter input is its layer's output, and Houlsby's two
  inputs (the attention and feed-forward blocks' outputs h) rebuild each layer's output when
  added to the layer's input through the model's own LayerNorms;
- a model type without a role table is a one-line UserError.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from arch_models import FAMILIES, save_tiny_encoder
from sam_peft import data as data_lib
from sam_peft import delta as delta_lib
from sam_peft import run as run_lib
from sam_peft.arch import ARCHITECTURES, ROLES, layers_of
from sam_peft.data import demo_data_dir, load_splits
from sam_peft.loader import build_config
from sam_peft.methods import build_method, list_methods, method_class, validate_method_options
from sam_peft.methods.adapter import Bottleneck, adapter_param_names
from sam_peft.methods.lora import lora_param_names, resolve_targets
from sam_peft.model import TaskModel, load_pretrained
from sam_peft.tasks import get_task

TASK = "rte"
PROTOCOL = {"max_steps": 3, "eval_every": 3, "min_steps": 0, "patience": 5, "batch_size": 8, "eval_batch_size": 64,
            "max_seq_len": 32, "lr": 1e-3, "warmup": 0.0, "log_every": 0, "checkpoint_every": 0, "train_eval_subset": 8}


def test_the_table_covers_the_families_tested_here():
    assert set(ARCHITECTURES) == set(FAMILIES)
    assert all(set(arch.roles) == set(ROLES) for arch in ARCHITECTURES.values())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """model_type -> folder of a tiny checkpoint whose tokenizer saw the task's texts."""
    spec = get_task(TASK)
    texts = data_lib.texts_of(load_splits(demo_data_dir(), spec, splits=("train",))["train"], spec)
    root = tmp_path_factory.mktemp("checkpoints")
    return {mt: save_tiny_encoder(mt, root / mt, texts) for mt in FAMILIES}


def task_model(folder) -> TaskModel:
    encoder, _ = load_pretrained(str(folder))
    return TaskModel(encoder, get_task(TASK))


def methods() -> list[dict]:
    """Every registered method with its defaults, burn-ins cut to 2 steps; Adapter in both configs."""
    out = []
    for name in list_methods():
        spec = {"name": name}
        if "burnin_steps" in method_class(name).Options.model_fields:
            spec["burnin_steps"] = 2
        out.append(spec)
    return out + [{"name": "adapter", "config": "houlsby"}]


def layer_linears(model: TaskModel) -> dict[str, list[str]]:
    """Per transformer layer (path in the encoder), its Linear modules' paths, adapters' excluded."""
    arch = ARCHITECTURES[model.encoder.config.model_type]
    adapters = {n for n, m in model.encoder.named_modules() if isinstance(m, Bottleneck)}
    out = {}
    for path, layer in layers_of(model.encoder, arch):
        out[path] = [f"{path}.{n}" for n, m in layer.named_modules()
                     if isinstance(m, nn.Linear) and not any(f"{path}.{n}".startswith(a + ".") for a in adapters)]
    return out


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_roles_resolve_to_every_linear_of_every_layer(model_type, checkpoints):
    model = task_model(checkpoints[model_type])
    per_layer = layer_linears(model)
    assert len(per_layer) == 2
    for role in ROLES:
        found = resolve_targets(model.encoder, [role])
        assert len(found) == 2 and all(any(f in ls for f in found) for ls in per_layer.values()), role
    everything = [name for names in per_layer.values() for name in names]
    assert resolve_targets(model.encoder, list(ROLES)) == everything
    fused = model_type == "modernbert"  # Wqkv for query/key/value: 4 Linears per layer
    assert all(len(names) == (4 if fused else 6) for names in per_layer.values())


@pytest.mark.slow
@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_every_method_runs_and_its_delta_round_trips(model_type, checkpoints, tmp_path):
    folder = checkpoints[model_type]
    for method in methods():
        cfg = build_config({"model": str(folder), "data_dir": "demo", "task": TASK, "method": method, "seed": 0,
                            "output_dir": str(tmp_path), "train": PROTOCOL})
        result = run_lib.run(cfg, progress=False, log=lambda *_: None)
        label = f"{model_type}/{method}"
        assert result["status"] == "done" and result["steps"] == 3, label
        run_dir = tmp_path / result["run_id"]
        metrics, saved = run_lib.evaluate_run(run_dir)
        assert metrics == result["metrics"]["test"] == saved["metrics"]["test"], label

        if method["name"] not in ("lora", "adapter"):
            continue
        # What was added: a fresh build is the base + wrap, the run's weights are that + the delta.
        fresh = run_lib.build(cfg, splits=("test",))
        start = {n: p.detach().clone() for n, p in fresh.model.named_parameters()}
        delta_lib.apply(fresh.model, run_dir / "delta.safetensors")
        trained = dict(fresh.model.named_parameters())
        modules = dict(fresh.model.named_modules())
        if method["name"] == "lora":
            added = lora_param_names(fresh.model)
            wrapped = sorted({n.rsplit(".", 1)[0].removeprefix("encoder.") for n in added})
            assert wrapped == sorted(n for ns in layer_linears(fresh.model).values() for n in ns), label
            r = 8
            n_added = sum(r * (modules[f"encoder.{w}"].in_features + modules[f"encoder.{w}"].out_features)
                          for w in wrapped)
        else:
            added = adapter_param_names(fresh.model)
            per_layer = 2 if method.get("config") == "houlsby" else 1
            hidden = fresh.model.encoder.config.hidden_size
            bottleneck = hidden // 16
            assert len(added) == 4 * per_layer * 2, label  # down/up weight/bias, 2 layers
            n_added = per_layer * 2 * (2 * hidden * bottleneck + bottleneck + hidden)
        assert result["n_added"] == result["n_trainable"] == n_added, label
        assert result["n_changed"] == 0, label  # the encoder itself stays frozen
        # Gradients reached every added module, so the hooks and wrappers are in the forward pass:
        # its tensor that starts at 0 and has no weight decay (adapter up-bias; LoRA's B, whose decay
        # is 0 while it is 0) can only have moved by a gradient.
        witnesses = [n for n in added if n.endswith((".up.bias", ".lora_B"))]
        assert len(witnesses) == len(added) // (4 if method["name"] == "adapter" else 2), label
        assert all(not torch.equal(trained[n], start[n]) for n in witnesses), label


def layer_io(model: TaskModel, batch: dict) -> tuple[list, list, dict]:
    """Each layer's input and output, and each adapter's input, in one eval forward pass."""
    arch = ARCHITECTURES[model.encoder.config.model_type]
    ins, outs, adapter_in = [], [], {}
    handles = []
    for _, layer in layers_of(model.encoder, arch):
        handles.append(layer.register_forward_pre_hook(
            lambda m, a, kw: ins.append(a[0] if a else kw.get("hidden_states", kw.get("x"))), with_kwargs=True))
        handles.append(layer.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o)))
    for name, module in model.encoder.named_modules():
        if isinstance(module, Bottleneck):
            handles.append(module.register_forward_pre_hook(
                lambda m, a, name=name: adapter_in.__setitem__(name, a[0])))
    model.eval()
    with torch.no_grad():
        model(batch)
    for h in handles:
        h.remove()
    return ins, outs, adapter_in


def a_batch(folder) -> dict:
    _, tokenizer = load_pretrained(str(folder))
    enc = tokenizer(["the cat sat on the mat today", "a dog"], ["it was warm", "the dog ran far away from home"],
                    padding=True, return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "attention_mask")}


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_adapters_sit_on_each_block_s_output(model_type, checkpoints):
    folder = checkpoints[model_type]
    batch = a_batch(folder)
    base = task_model(folder)
    _, base_outs, _ = layer_io(base, batch)
    arch = ARCHITECTURES[model_type]
    for config in ("pfeiffer", "houlsby"):
        model = copy.deepcopy(base)
        build_method(validate_method_options({"name": "adapter", "config": config, "init": "zero"})).wrap(model)
        ins, outs, adapter_in = layer_io(model, batch)
        assert len(adapter_in) == 2 * (1 if config == "pfeiffer" else 2)
        for i, (path, layer) in enumerate(layers_of(model.encoder, arch)):
            assert torch.equal(outs[i], base_outs[i])  # zero up-projections: the pretrained model's outputs
            if config == "pfeiffer":  # its input: LayerNorm(h + r), or h + r pre-LN = what the layer outputs
                assert torch.equal(adapter_in[f"{path}.adapter_ffn"], outs[i]), path
                continue
            # Houlsby's inputs are the blocks' outputs h: through the residual sums and the model's
            # own LayerNorms they give the layer's output.
            stage = adapter_in[f"{path}.adapter_attention"] + ins[i]
            if arch.attention.norm:
                stage = layer.get_submodule(arch.attention.norm)(stage)
            out = adapter_in[f"{path}.adapter_ffn"] + stage
            if arch.ffn.norm:
                out = layer.get_submodule(arch.ffn.norm)(out)
            assert torch.equal(out, outs[i]), path


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_zero_initialised_lora_and_adapters_give_the_pretrained_outputs(model_type, checkpoints):
    folder = checkpoints[model_type]
    batch = a_batch(folder)
    base = task_model(folder)
    base.eval()
    with torch.no_grad():
        expected = base(batch)
    for method in ({"name": "lora"}, {"name": "adapter", "init": "zero", "config": "houlsby"}):
        model = copy.deepcopy(base)
        build_method(validate_method_options(method)).wrap(model)
        model.eval()
        with torch.no_grad():
            assert torch.equal(model(batch), expected), method


def test_an_unsupported_model_type_is_a_one_line_user_error():
    from transformers import GPT2Config, GPT2Model

    from sam_peft.errors import UserError

    encoder = GPT2Model(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=20, n_positions=16))
    model = TaskModel(encoder, get_task(TASK))
    with pytest.raises(UserError, match=r"^method 'adapter': model type 'gpt2' has no module-role table "
                                        r"\(supported: bert, deberta-v2, distilbert, electra, modernbert, mpnet, "
                                        r"roberta, xlm-roberta\)$"):
        build_method(validate_method_options({"name": "adapter"})).wrap(model)
    assert not adapter_param_names(model)
