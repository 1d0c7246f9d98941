"""`sam-peft export --merged`: a Trainer delta becomes a plain Hugging Face checkpoint that the
model's own Auto class loads, with outputs bitwise equal to the trained model's; bad input is
one line and leaves nothing behind."""

import contextlib

import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, BertConfig,
                          BertForSequenceClassification, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, Trainer, TrainingArguments)

from sam_peft.errors import UserError
from sam_peft.export import merged
from sam_peft.hf import SparseFineTuning

VOCAB, LENGTH = 60, 10
LABELS = {0: "entailment", 1: "neutral", 2: "contradiction"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rows(n=32, seed=0, labels=3, lm=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, VOCAB, (LENGTH,), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones(LENGTH, dtype=torch.long),
                    "labels": ids.clone() if lm else i % labels})
    return out


def train_sparse(model, out, **options):
    args = TrainingArguments(str(out), learning_rate=1e-2, max_steps=3, per_device_train_batch_size=8, use_cpu=True,
                             report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True)
    sparse = SparseFineTuning(model, args, density=0.02, burnin_steps=2, **options)
    lm = model.get_output_embeddings() is not None
    Trainer(model=model, args=args, train_dataset=rows(lm=lm), optimizers=(sparse.optimizer, None),
            callbacks=[sparse]).train()
    return out / "delta.safetensors"


def encoder_base(tmp_path, bpe_tokenizer, seed=0):
    """A pretrained encoder checkpoint without a classification head, and its tokenizer."""
    torch.manual_seed(seed)
    base = tmp_path / f"base{seed}"
    BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(base)
    bpe_tokenizer().save_pretrained(base)
    return base


def test_a_trainer_delta_exports_to_a_checkpoint_its_auto_class_loads_bitwise(tmp_path, bpe_tokenizer):
    base = encoder_base(tmp_path, bpe_tokenizer)
    model = BertForSequenceClassification.from_pretrained(base, num_labels=3, id2label=LABELS,
                                                          label2id={v: k for k, v in LABELS.items()})
    delta = train_sparse(model, tmp_path / "run")

    out = merged(delta, tmp_path / "merged")
    reloaded = AutoModelForSequenceClassification.from_pretrained(out)
    assert type(reloaded) is BertForSequenceClassification and reloaded.config.id2label == LABELS
    assert (out / "tokenizer.json").is_file() or (out / "vocab.json").is_file()
    batch = {"input_ids": torch.stack([r["input_ids"] for r in rows(4, seed=7)])}
    model.eval()
    reloaded.eval()
    assert torch.equal(model(**batch).logits, reloaded(**batch).logits)
    trained = dict(model.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in reloaded.named_parameters())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_causal_lm_delta_exports_and_reloads_with_auto_model_for_causal_lm(tmp_path, arch):
    torch.manual_seed(0)
    base = tmp_path / arch
    if arch == "gpt2":  # tied embeddings and lm_head
        GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32)).save_pretrained(base)
    else:
        LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1,
                                     max_position_embeddings=32)).save_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    delta = train_sparse(model, tmp_path / "run")
    out = merged(tmp_path / "run", tmp_path / "merged", log=lambda *a: None)  # a folder holding the delta
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.stack([r["input_ids"] for r in rows(3, seed=4)])
    model.eval()
    reloaded.eval()
    assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    if arch == "gpt2":
        assert reloaded.lm_head.weight is reloaded.transformer.wte.weight  # still tied
    assert delta.is_file()


def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, bpe_tokenizer):
    base = encoder_base(tmp_path, bpe_tokenizer)
    other = encoder_base(tmp_path, bpe_tokenizer, seed=1)
    model = BertForSequenceClassification.from_pretrained(base, num_labels=3)
    delta = train_sparse(model, tmp_path / "run")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    (tmp_path / "afile").write_text("x")
    cases = [
        (dict(out=tmp_path / "m1", base=str(other)), "made from a different base model"),
        (dict(out=tmp_path / "full"), "exists and is not an empty folder"),
        (dict(out=tmp_path / "afile" / "m"), "cannot be written"),
        (dict(out=tmp_path / "m2", base=str(tmp_path / "nowhere")), "cannot load the base model"),
    ]
    for kwargs, message in cases:
        before = sorted(p.name for p in tmp_path.iterdir())
        with pytest.raises(UserError) as err:
            merged(delta, log=lambda *a: None, **kwargs)
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing half-written
    assert list((tmp_path / "full").iterdir()) == [tmp_path / "full" / "x"]


def test_the_cli_verb_exports_and_refuses_in_one_line(tmp_path, bpe_tokenizer, capsys):
    from sam_peft.cli import main

    base = encoder_base(tmp_path, bpe_tokenizer)
    model = BertForSequenceClassification.from_pretrained(base, num_labels=3)
    train_sparse(model, tmp_path / "run")
    assert main(["export", str(tmp_path / "run"), "--merged", str(tmp_path / "merged")]) == 0
    assert "a Hugging Face checkpoint" in capsys.readouterr().out
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").config.num_labels == 3
    capsys.readouterr()
    assert main(["export", str(tmp_path / "run"), "--merged", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sam-peft: error: ") and "exists and is not an empty folder" in err and "\n" not in err


# ----------------------------------------------------------------------------- a PEFT SHiRA adapter

LOAD_WITHOUT_SAM_PEFT = """
import sys
sys.modules["sam_peft"] = None  # loading must not need sam-peft
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification
base = AutoModelForSequenceClassification.from_pretrained(sys.argv[1], num_labels=3)
model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
with torch.no_grad():
    torch.save(model(input_ids=torch.load(sys.argv[3])).logits, sys.argv[4])
"""


def test_a_linear_weights_delta_exports_to_a_shira_adapter_that_plain_peft_loads(tmp_path, bpe_tokenizer):
    import subprocess
    import sys

    pytest.importorskip("peft")
    base = encoder_base(tmp_path, bpe_tokenizer)
    model = BertForSequenceClassification.from_pretrained(base, num_labels=3)
    train_sparse(model, tmp_path / "run", params="linear_weights", topk="per_tensor")
    from sam_peft.cli import main

    assert main(["export", str(tmp_path / "run"), "--peft", str(tmp_path / "shira")]) == 0
    out = tmp_path / "shira"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()

    ids = torch.stack([r["input_ids"] for r in rows(4, seed=7)])
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", LOAD_WITHOUT_SAM_PEFT, str(base), str(out), str(tmp_path / "ids.pt"),
                    str(tmp_path / "logits.pt")], check=True, capture_output=True)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    # Equal up to float32 rounding: the adapter adds each value to the base weight.
    assert torch.allclose(torch.load(tmp_path / "logits.pt"), expected, rtol=1e-5, atol=1e-6)


def test_a_delta_outside_linear_weights_is_refused_for_shira_in_one_line(tmp_path, bpe_tokenizer):
    pytest.importorskip("peft")
    from sam_peft.export import peft_shira

    base = encoder_base(tmp_path, bpe_tokenizer)
    model = BertForSequenceClassification.from_pretrained(base, num_labels=3)
    train_sparse(model, tmp_path / "run")  # the whole encoder eligible: embeddings, LayerNorm, biases too
    with pytest.raises(UserError) as err:
        peft_shira(tmp_path / "run", tmp_path / "shira")
    message = str(err.value)
    assert "entries in" in message and "outside nn.Linear weights" in message and "--merged" in message
    assert "\n" not in message and not (tmp_path / "shira").exists()


# ----------------------------------------------------------------------------- a `sam-peft run` result


def test_a_cli_run_exports_its_encoder_for_automodel_and_its_head_beside_it(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from sam_peft.cli import main
    from sam_peft.delta import tokenizer_fingerprint
    from sam_peft.engine import predict
    from sam_peft.export import load_run_export
    from sam_peft.loader import build_config
    from sam_peft.metrics import compute
    from sam_peft.run import evaluate_run, rebuild_run, run
    from util import tiny_run

    cfg = build_config(tiny_run(task="rte", method={"name": "sam", "density": 0.05, "burnin_steps": 2},
                                output_dir=tmp_path / "runs",
                                train={"max_steps": 6, "eval_every": 3, "batch_size": 8, "max_seq_len": 48}))
    run_dir = tmp_path / "runs" / run(cfg, progress=False, log=lambda *a: None)["run_id"]
    assert main(["export", str(run_dir), "--merged", str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    assert AutoModel.from_pretrained(out) is not None and (out / "head.safetensors").is_file()

    expected, _ = evaluate_run(run_dir, "test")
    built, _ = rebuild_run(run_dir, "test")
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(out)) == tokenizer_fingerprint(built.tokenizer)
    model = load_run_export(out)
    preds = predict(model, built.data, "test", 16, torch.device("cpu"), contextlib.nullcontext)
    assert compute(built.data.spec, preds, built.data.labels("test")) == expected  # exactly `sam-peft eval`'s

    # The documented few-line loader for a classification head, without sam-peft's classes.
    from safetensors.torch import load_file

    encoder, head = AutoModel.from_pretrained(out).eval(), load_file(str(out / "head.safetensors"))
    ids = torch.randint(3, 40, (2, 12))
    with torch.no_grad():
        pooled = encoder(input_ids=ids, attention_mask=torch.ones_like(ids)).pooler_output
        by_hand = torch.nn.functional.linear(
            torch.tanh(torch.nn.functional.linear(pooled, head["dense.weight"], head["dense.bias"])),
            head["out_proj.weight"], head["out_proj.bias"])
        ours = model({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert torch.equal(by_hand, ours)


def test_what_a_cli_run_cannot_export_is_refused_in_one_line(tmp_path):
    from sam_peft.export import merged, peft_shira
    from sam_peft.loader import build_config
    from sam_peft.run import run
    from util import tiny_run

    cfg = build_config(tiny_run(task="rte", method={"name": "lora", "r": 2}, output_dir=tmp_path / "runs",
                                train={"max_steps": 3, "eval_every": 3, "batch_size": 8, "max_seq_len": 48}))
    run_dir = tmp_path / "runs" / run(cfg, progress=False, log=lambda *a: None)["run_id"]
    for export, message in ((merged, "adds modules to the encoder"), (peft_shira, "export it with --merged")):
        with pytest.raises(UserError) as err:
            export(run_dir, tmp_path / "out")
        assert message in str(err.value) and "\n" not in str(err.value)
        assert not (tmp_path / "out").exists()
