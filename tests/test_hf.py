"""sam_peft.hf inside transformers.Trainer, and the README's two library snippets, run as written,
on a tiny BertForSequenceClassification (CPU, a few steps)."""

import functools
import math
import re
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

import sam_peft.lib as sp
from sam_peft.hf import SparseFineTuning

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one intra-op thread runs them faster than several, and tens of
    times faster when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
VOCAB, LENGTH = 60, 12


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_labels=2))


def dataset(n: int = 64, seed: int = 0) -> list[dict]:
    """Examples whose label is the parity of the second token (learnable)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(5, VOCAB, (LENGTH,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones(LENGTH, dtype=torch.long),
                     "labels": int(ids[1] % 2)})
    return rows


def small_args(out, **overrides) -> TrainingArguments:
    kwargs = dict(learning_rate=1e-2, weight_decay=0.1, max_steps=6, max_grad_norm=0, per_device_train_batch_size=8,
                  use_cpu=True, report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0)
    kwargs.update(overrides)
    return TrainingArguments(str(out), **kwargs)


def train(model, args, **options):
    sparse = SparseFineTuning(model, args, **options)
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), optimizers=(sparse.optimizer, None),
                      callbacks=[sparse])
    trainer.train()
    return sparse, trainer


def encoder_names(model) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.startswith("bert.")]


def assert_outside_mask_untouched(model, theta0: dict, mask: dict) -> None:
    params = dict(model.named_parameters())
    for name, t0 in theta0.items():
        keep = torch.ones(t0.numel(), dtype=torch.bool)
        keep[mask.get(name, torch.zeros(0, dtype=torch.long))] = False
        assert torch.equal(params[name].detach().reshape(-1)[keep], t0.reshape(-1)[keep]), name


def test_sam_in_trainer_counts_masked_entries_head_and_delta(tmp_path):
    model = tiny_bert()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen_at_scoring = {}

    def scores_recording_weights(model, batches, loss_fn, names):
        # The scoring pass runs on the pretrained weights: nothing was updated before it.
        seen_at_scoring.update({n: p.detach().clone() for n, p in model.named_parameters()})
        return sp.sam_scores(model, batches, loss_fn, names)

    args = small_args(tmp_path / "out")
    sparse, trainer = train(model, args, selector=scores_recording_weights, density=0.01, scoring_batches=5,
                            max_grad_norm=1.0)

    assert all(torch.equal(seen_at_scoring[n], start[n]) for n in start)
    m = sum(start[n].numel() for n in encoder_names(model))
    assert sparse.n_params == m
    assert sparse.n_selected == math.floor(0.01 * m) > 0  # exactly floor(p*m)
    # Trainer's schedule drove exactly max_steps updates: the scoring pass took none of them.
    assert trainer.state.global_step == 6
    assert sparse.optimizer.sparse_trainer.optimizer.sparse.t == 6
    assert 0 < sparse.count_changed() <= sparse.n_selected
    assert_outside_mask_untouched(model, sparse.theta0, sparse.mask)  # weight decay 0.1 leaked nowhere
    for name in ("classifier.weight", "classifier.bias"):
        assert not torch.equal(dict(model.named_parameters())[name], start[name])  # the head trained

    delta = tmp_path / "out" / "delta.safetensors"
    assert delta.is_file()  # written when training ended
    fresh = tiny_bert()
    meta = sp.apply_delta(fresh, delta)
    assert meta["selector"] == "scores_recording_weights"
    fresh_params = dict(fresh.named_parameters())
    assert all(torch.equal(p, fresh_params[n]) for n, p in model.named_parameters())
    batch = trainer.data_collator(dataset(4, seed=9))
    model.eval()
    fresh.eval()
    assert torch.equal(model(**batch).logits, fresh(**batch).logits)


def test_magnitude_and_random_selectors_choose_what_the_library_chooses(tmp_path):
    for selector in ("magnitude", "random"):
        model = tiny_bert()
        names = encoder_names(model)
        expected_scores = (sp.magnitude_scores(model, names) if selector == "magnitude"
                           else sp.random_scores(model, names, seed=3))
        expected = sp.top_k(expected_scores, 0.02, "per_tensor")
        sparse, _ = train(model, small_args(tmp_path / selector, seed=3), selector=selector, density=0.02,
                          topk="per_tensor", delta_path=None)
        assert sparse.mask.keys() == expected.keys()
        assert all(torch.equal(sparse.mask[n], expected[n]) for n in expected)
        assert sparse.n_selected == math.floor(0.02 * sparse.n_params)
        assert_outside_mask_untouched(model, sparse.theta0, sparse.mask)
        assert not (tmp_path / selector / "delta.safetensors").exists()  # delta_path=None writes none


def test_any_score_function_selects_exactly_floor_pm(tmp_path):
    model = tiny_bert()
    fisher = functools.partial(sp.sam_scores, score="fisher")
    sparse, _ = train(model, small_args(tmp_path), selector=fisher, density=0.005, scoring_batches=3)
    assert sparse.n_selected == math.floor(0.005 * sparse.n_params) > 0
    assert_outside_mask_untouched(model, sparse.theta0, sparse.mask)


def test_resume_from_a_trainer_checkpoint_keeps_the_selection_and_the_result(tmp_path):
    whole = tiny_bert()
    sparse, _ = train(whole, small_args(tmp_path / "whole"), scoring_batches=4, density=0.01)

    first = tiny_bert()
    args = small_args(tmp_path / "cut", max_steps=6, save_strategy="steps", save_steps=3)
    cut = SparseFineTuning(first, args, scoring_batches=4, density=0.01)
    Trainer(model=first, args=args, train_dataset=dataset(), optimizers=(cut.optimizer, None),
            callbacks=[cut]).train()
    checkpoint = tmp_path / "cut" / "checkpoint-3"
    assert checkpoint.is_dir()

    resumed = tiny_bert()
    again = SparseFineTuning(resumed, args, scoring_batches=4, density=0.01)
    Trainer(model=resumed, args=args, train_dataset=dataset(), optimizers=(again.optimizer, None),
            callbacks=[again]).train(resume_from_checkpoint=str(checkpoint))
    assert all(torch.equal(again.mask[n], sparse.mask[n]) for n in sparse.mask)  # restored, not re-scored
    reference = dict(whole.named_parameters())
    assert all(torch.equal(p, reference[n]) for n, p in resumed.named_parameters())


def test_bad_options_fail_at_once(tmp_path):
    model = tiny_bert()
    with pytest.raises(ValueError, match="clipping twice"):
        SparseFineTuning(model, small_args(tmp_path, max_grad_norm=1.0), max_grad_norm=1.0)
    with pytest.raises(ValueError, match="selector 'sma'"):
        SparseFineTuning(model, small_args(tmp_path), selector="sma")
    with pytest.raises(ValueError, match="density"):
        SparseFineTuning(model, small_args(tmp_path), density=1.5)
    with pytest.raises(KeyError, match="head.weight"):
        SparseFineTuning(model, small_args(tmp_path), params=["head.weight"])


# ----------------------------------------------------------------------------- the README's snippets


def readme_snippet(heading: str) -> str:
    """The first python block after a README heading."""
    text = README.read_text(encoding="utf-8")
    start = text.index(heading)
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_readme_library_snippet_runs_on_a_hf_bert(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, fresh_model = tiny_bert(), tiny_bert()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    collate = transformers.default_data_collator
    rows = dataset(64)
    scope = {"model": model, "fresh_model": fresh_model,
             "burnin_batches": [collate(rows[i:i + 8]) for i in range(0, 32, 8)],
             "batches": [collate(rows[i:i + 8]) for i in range(32, 64, 8)]}
    exec(compile(readme_snippet("## Library use"), "README.md", "exec"), scope)

    m = sum(scope["theta0"][n].numel() for n in scope["theta0"])
    assert sum(i.numel() for i in scope["mask"].values()) == math.floor(0.005 * m) > 0
    assert set(scope["head"]) == {"classifier.weight", "classifier.bias"}
    assert not torch.equal(model.classifier.weight, start["classifier.weight"])
    assert_outside_mask_untouched(model, scope["theta0"], scope["mask"])
    fresh = dict(fresh_model.named_parameters())
    assert all(torch.equal(p, fresh[n]) for n, p in model.named_parameters())


def test_readme_trainer_snippet_runs_as_written(tmp_path, monkeypatch):
    """The snippet itself; only TrainingArguments is shrunk to a few CPU steps."""
    real_arguments = transformers.TrainingArguments
    made = []

    def few_cpu_steps(*args, **kwargs):
        kwargs.update(max_steps=4, per_device_train_batch_size=8, use_cpu=True, report_to="none",
                      save_strategy="no", logging_strategy="no", disable_tqdm=True)
        made.append(real_arguments(*args, **kwargs))
        return made[-1]

    # transformers replaces its own entry in sys.modules as it loads: patch the one imports read now.
    monkeypatch.setattr(sys.modules["transformers"], "TrainingArguments", few_cpu_steps)
    monkeypatch.chdir(tmp_path)
    model = tiny_bert()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    scope = {"model": model, "train_dataset": dataset(64)}
    exec(compile(readme_snippet("### With the Hugging Face Trainer"), "README.md", "exec"), scope)

    assert len(made) == 1 and scope["trainer"].state.global_step == 4
    sparse = scope["sparse"]
    assert sparse.n_selected == math.floor(0.005 * sparse.n_params) > 0
    assert_outside_mask_untouched(model, sparse.theta0, sparse.mask)
    assert not torch.equal(model.classifier.weight, start["classifier.weight"])
    fresh = tiny_bert()
    sp.apply_delta(fresh, tmp_path / "out" / "rte" / "delta.safetensors")
    fresh_params = dict(fresh.named_parameters())
    assert all(torch.equal(p, fresh_params[n]) for n, p in model.named_parameters())
