"""The tiny offline model, the pretrained loader, and the heads."""

import torch

from sam_peft.model import SpanComparisonHead, TaskModel, build_tiny, load_pretrained
from sam_peft.tasks import get_task

TEXTS = ["The cat sat on the mat.", "A dog barked at the mailman.", "Birds sing in the morning."] * 3


def test_tiny_model_is_deterministic_and_offline():
    (e1, t1), (e2, t2) = build_tiny(TEXTS), build_tiny(list(reversed(TEXTS)))
    assert t1.get_vocab() == t2.get_vocab()  # tokenizer does not depend on record order
    s1, s2 = e1.state_dict(), e2.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    ids = t1("The cat barked.", "A bird sat.")["input_ids"]
    assert ids[0] == t1.bos_token_id and ids[-1] == t1.eos_token_id


def test_tiny_tokenizer_reads_the_text():
    # transformers 5 ignores RobertaTokenizerFast(vocab_file=, merges_file=): built that way, the
    # tokenizer had an empty vocabulary and read every text as special tokens.
    _, tok = build_tiny(TEXTS)
    ids = tok(TEXTS[0], add_special_tokens=False)["input_ids"]
    assert ids and not set(ids) & set(tok.all_special_ids)
    assert tok.decode(ids) == TEXTS[0]
    assert len(tok) > 256  # the byte alphabet plus merges learnt from the texts


def test_tiny_model_does_not_disturb_global_rng():
    torch.manual_seed(123)
    a = torch.rand(3)
    torch.manual_seed(123)
    build_tiny(TEXTS)
    assert torch.equal(torch.rand(3), a)


def test_pretrained_loads_from_a_local_folder(tmp_path):
    enc, tok = build_tiny(TEXTS)
    enc.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    enc2, tok2 = load_pretrained(str(tmp_path / "m"))
    assert tok2.get_vocab() == tok.get_vocab()
    assert all(torch.equal(a, b) for a, b in zip(enc.state_dict().values(), enc2.state_dict().values()))


def test_span_head_pools_only_inside_each_span():
    torch.manual_seed(0)
    head = SpanComparisonHead(hidden=4, n_spans=2, n_labels=2, dropout=0.0)
    states = torch.randn(1, 6, 4)
    spans = torch.tensor([[[1, 2], [4, 4]]])
    pooled = {}
    head.classifier.register_forward_hook(lambda m, inp, out: pooled.setdefault("x", inp[0]))
    head(states, spans)
    x = pooled["x"].view(2, 4)
    w = torch.softmax(head.attention(states[0, 1:3]).squeeze(-1), 0)
    assert torch.allclose(x[0], (w[:, None] * states[0, 1:3]).sum(0), atol=1e-6)
    assert torch.allclose(x[1], states[0, 4], atol=1e-6)  # a one-token span is that token's state
    other = states.clone()
    other[0, [0, 3, 5]] += 10.0  # tokens outside both spans do not matter
    assert torch.allclose(head(states, spans), head(other, spans), atol=1e-6)


def test_heads_output_shapes():
    enc, tok = build_tiny(TEXTS)
    batch = tok(["The cat sat.", "A dog."], padding=True, return_tensors="pt")
    base = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    assert TaskModel(enc, get_task("cb"))(base).shape == (2, 3)
    assert TaskModel(enc, get_task("stsb"))(base).shape == (2,)
    mc = {k: v.unsqueeze(1).expand(-1, 2, -1) for k, v in base.items()}
    assert TaskModel(enc, get_task("copa"))(mc).shape == (2, 2)
    spans = torch.tensor([[[1, 1], [2, 2]], [[1, 2], [1, 1]]])
    assert TaskModel(enc, get_task("wsc"))({**base, "spans": spans}).shape == (2, 2)
