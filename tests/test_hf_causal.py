"""SparseFineTuning on causal language models inside transformers.Trainer: tiny Llama- and
GPT-2-shaped models built from a config (no download), every registered selector, exact counts,
nothing else changes, the delta round-trips; gradient accumulation, label masks, bf16 scores."""

import math

import pytest
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments)

import sam_peft.lib as sp
from sam_peft.hf import SparseFineTuning
from sam_peft.scoring import GradientStats

VOCAB, LENGTH, PAD = 64, 12, 0


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                        pad_token_id=PAD, bos_token_id=1, eos_token_id=2))


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=PAD))


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def example(g, length: int) -> dict:
    """A right-padded text: the padded positions are masked in attention and labelled -100."""
    ids = torch.full((LENGTH,), PAD)
    ids[:length] = torch.randint(3, VOCAB, (length,), generator=g)
    mask = (torch.arange(LENGTH) < length).long()
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.where(mask.bool(), ids, -100)}


def dataset(n=32, seed=0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [example(g, int(torch.randint(4, LENGTH + 1, (1,), generator=g))) for _ in range(n)]


def args_for(out, **overrides) -> TrainingArguments:
    kwargs = dict(learning_rate=1e-2, weight_decay=0.1, max_steps=4, per_device_train_batch_size=4, use_cpu=True,
                  report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0)
    kwargs.update(overrides)
    return TrainingArguments(str(out), **kwargs)


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("selector, options", [
    ("sam", {"burnin_steps": 3}), ("random", {}), ("magprune", {}),
    ("childprune", {"variant": "fisher", "fisher_scope": "eligible"}),
])
def test_causal_lm_trains_exactly_floor_pm_entries_and_nothing_else(tmp_path, arch, selector, options):
    model = MODELS[arch]()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = args_for(tmp_path)
    sparse = SparseFineTuning(model, args, selector=selector, density=0.01, **options)
    # Every parameter is eligible, the LM head included; a tied weight counts once; no dense head.
    assert sparse.eligible == list(start) and sparse.dense == []
    if arch == "gpt2":
        assert model.lm_head.weight is model.transformer.wte.weight and "lm_head.weight" not in start
    else:
        assert "lm_head.weight" in sparse.eligible
    m = sum(t.numel() for t in start.values())
    trainer = Trainer(model=model, args=args, train_dataset=dataset(),
                      optimizers=(sparse.optimizer, None), callbacks=[sparse])
    trainer.train()

    assert sparse.n_params == m and sparse.n_selected == math.floor(0.01 * m) > 0
    params = dict(model.named_parameters())
    changed = 0
    for name, t0 in start.items():
        keep = torch.ones(t0.numel(), dtype=torch.bool)
        keep[sparse.mask[name]] = False
        assert torch.equal(params[name].detach().reshape(-1)[keep], t0.reshape(-1)[keep]), name
        changed += int((params[name].detach() != t0).sum())
    assert 0 < changed <= sparse.n_selected

    fresh = MODELS[arch]()
    sp.apply_delta(fresh, tmp_path / "delta.safetensors")
    batch = trainer.data_collator(dataset(3, seed=5))
    model.eval()
    fresh.eval()
    assert torch.equal(model(**batch).logits, fresh(**batch).logits)


def test_a_scoring_batch_is_one_optimizer_steps_worth_of_micro_batches(tmp_path):
    model = tiny_llama()
    calls = []

    def counting_loss(model, batch):
        calls.append(batch["input_ids"].shape[0])
        return model(**batch).loss

    args = args_for(tmp_path, gradient_accumulation_steps=2, max_steps=2)
    sparse = SparseFineTuning(model, args, burnin_steps=3, density=0.01, loss_fn=counting_loss, delta_path=None)
    Trainer(model=model, args=args, train_dataset=dataset(), optimizers=(sparse.optimizer, None),
            callbacks=[sparse]).train()
    assert calls == [4] * 6  # 3 scoring batches x 2 micro-batches of 4

    # The same scores as one batch of 8 holding both micro-batches (the loss is a mean over equal counts).
    rows = dataset(8, seed=3)
    for r in rows:
        r["labels"] = r["input_ids"].clone()
        r["attention_mask"] = torch.ones(LENGTH, dtype=torch.long)
    whole = [{k: torch.stack([r[k] for r in rows]) for k in rows[0]}]
    halves = [{k: v[:4] for k, v in whole[0].items()}, {k: v[4:] for k, v in whole[0].items()}]
    loss_fn = lambda model, batch: model(**batch).loss  # noqa: E731
    one = sp.select(tiny_llama(), "sam", batches=whole, loss_fn=loss_fn, density=0.01, burnin_steps=1)
    two = sp.select(tiny_llama(), "sam", batches=halves, loss_fn=loss_fn, density=0.01, burnin_steps=1,
                    accumulation=2)
    overlap = sum(len(set(one[n].tolist()) & set(two[n].tolist())) for n in one)
    assert overlap >= 0.99 * sum(i.numel() for i in one.values())  # equal up to float rounding at the cut


def test_padded_positions_labelled_minus_100_do_not_enter_the_scores():
    model = tiny_llama()
    g = torch.Generator().manual_seed(4)
    padded = example(g, 7)
    unpadded = {k: v[:7] for k, v in padded.items()}
    loss_fn = lambda model, batch: model(**{k: v[None] for k, v in batch.items()}).loss  # noqa: E731
    with_pads = sp.sam_scores(model, [padded], loss_fn)
    without = sp.sam_scores(model, [unpadded], loss_fn)
    for name in without:
        assert torch.allclose(with_pads[name], without[name], rtol=1e-4, atol=1e-12), name


def test_bf16_accumulators_halve_the_score_memory(tmp_path, monkeypatch):
    made = []
    orig = GradientStats.__init__

    def spy(self, *args, **kwargs):
        orig(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(GradientStats, "__init__", spy)
    model = tiny_gpt2()
    args = args_for(tmp_path, max_steps=1)
    sparse = SparseFineTuning(model, args, burnin_steps=2, density=0.01, scoring_dtype=torch.bfloat16,
                              delta_path=None)
    Trainer(model=model, args=args, train_dataset=dataset(), optimizers=(sparse.optimizer, None),
            callbacks=[sparse]).train()
    (stats,) = made
    assert {t.dtype for t in stats.sums["sum"].values()} == {torch.bfloat16}
    assert sum(t.numel() * t.element_size() for t in stats.sums["sum"].values()) == 2 * sparse.n_params
    assert sparse.n_selected == math.floor(0.01 * sparse.n_params)
