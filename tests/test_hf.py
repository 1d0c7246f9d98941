"""sam_peft.hf inside transformers.Trainer on a tiny BertForSequenceClassification (CPU, a few
steps): every registered selector through the methods' own select, exact counts, misuse errors.
The README's and docs' snippets run in tests/test_docs_quick.py."""

import logging
import math

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

import sam_peft.lib as sp
from sam_peft.hf import SparseFineTuning
from sam_peft.methods.base import SelectContext


pytestmark = pytest.mark.usefixtures("one_torch_thread")

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


def test_sam_in_trainer_counts_masked_entries_head_and_delta(tmp_path, monkeypatch):
    model = tiny_bert()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen_at_scoring, scoring_calls = {}, []
    orig = SelectContext.accumulate_gradients

    def spy(ctx, n_batches, *args, **kwargs):
        # The scoring pass runs on the pretrained weights: nothing was updated before it.
        seen_at_scoring.update({n: p.detach().clone() for n, p in model.named_parameters()})
        scoring_calls.append(n_batches)
        return orig(ctx, n_batches, *args, **kwargs)

    monkeypatch.setattr(SelectContext, "accumulate_gradients", spy)
    args = small_args(tmp_path / "out")
    sparse, trainer = train(model, args, selector="sam", density=0.01, burnin_steps=5, max_grad_norm=1.0)

    assert scoring_calls == [5]
    assert all(torch.equal(seen_at_scoring[n], start[n]) for n in start)
    m = sum(start[n].numel() for n in encoder_names(model))
    assert sparse.n_params == m
    assert sparse.n_selected == math.floor(0.01 * m) > 0  # exactly floor(p*m)
    # Trainer's schedule drove exactly max_steps updates: the scoring pass took none of them.
    assert trainer.state.global_step == 6
    assert sparse.optimizer._plan.sparse.t == 6
    assert 0 < sparse.count_changed() <= sparse.n_selected
    assert_outside_mask_untouched(model, sparse.theta0, sparse.mask)  # weight decay 0.1 leaked nowhere
    for name in ("classifier.weight", "classifier.bias"):
        assert not torch.equal(dict(model.named_parameters())[name], start[name])  # the head trained

    delta = tmp_path / "out" / "delta.safetensors"
    assert delta.is_file()  # written when training ended
    fresh = tiny_bert()
    meta = sp.apply_delta(fresh, delta)
    assert meta["selector"] == "sam"
    fresh_params = dict(fresh.named_parameters())
    assert all(torch.equal(p, fresh_params[n]) for n, p in model.named_parameters())
    batch = trainer.data_collator(dataset(4, seed=9))
    model.eval()
    fresh.eval()
    assert torch.equal(model(**batch).logits, fresh(**batch).logits)


@pytest.mark.parametrize("selector, options", [
    ("random", {}),
    ("magprune", {"topk": "per_tensor"}),
    ("sam", {"burnin_steps": 3, "score": "fisher", "topk": "per_tensor"}),
    ("childprune", {"variant": "fisher", "fisher_scope": "eligible"}),
])
def test_every_registered_selector_trains_exactly_floor_pm_in_the_trainer(tmp_path, selector, options):
    model = tiny_bert()
    sparse, trainer = train(model, small_args(tmp_path, seed=3), selector=selector, density=0.02, delta_path=None,
                            **options)
    assert sparse.n_selected == math.floor(0.02 * sparse.n_params) > 0
    assert trainer.state.global_step == 6
    assert_outside_mask_untouched(model, sparse.theta0, sparse.mask)
    assert not (tmp_path / "delta.safetensors").exists()  # delta_path=None writes none


def test_selectors_choose_what_the_cli_engine_chooses():
    """One core: the Trainer integration and the library run the method's own select, as a CLI run does."""
    from util import hand_trainer

    for spec in ({"name": "random", "density": 0.1, "topk": "per_tensor"}, {"name": "magprune", "density": 0.1}):
        tr = hand_trainer(spec, max_steps=2, eval_every=2)
        engine_mask = tr.method.select(tr.model, tr.select_context()).sparse
        options = {k: v for k, v in spec.items() if k != "name"}
        mask = sp.select(tr.model, spec["name"], params=tr.eligible, seed=tr.seed, **options)
        assert mask.keys() == engine_mask.keys()
        assert all(torch.equal(mask[n], engine_mask[n]) for n in mask)


def test_childprune_fisher_scores_one_epoch_of_the_trainers_dataloader(tmp_path, monkeypatch):
    calls = []
    orig = SelectContext.accumulate_gradients

    def spy(ctx, n_batches, *args, **kwargs):
        calls.append((n_batches, kwargs.get("clip_mode")))
        return orig(ctx, n_batches, *args, **kwargs)

    monkeypatch.setattr(SelectContext, "accumulate_gradients", spy)
    train(tiny_bert(), small_args(tmp_path), selector="childprune", variant="fisher", density=0.01, delta_path=None)
    assert calls == [(64 // 8, "per_tensor")]  # ChildTuning-D: one pass, each tensor clipped on its own


def test_resume_from_a_trainer_checkpoint_keeps_the_selection_and_the_result(tmp_path):
    whole = tiny_bert()
    sparse, _ = train(whole, small_args(tmp_path / "whole"), burnin_steps=4, density=0.01)

    first = tiny_bert()
    args = small_args(tmp_path / "cut", max_steps=6, save_strategy="steps", save_steps=3)
    cut = SparseFineTuning(first, args, burnin_steps=4, density=0.01)
    Trainer(model=first, args=args, train_dataset=dataset(), optimizers=(cut.optimizer, None),
            callbacks=[cut]).train()
    checkpoint = tmp_path / "cut" / "checkpoint-3"
    assert checkpoint.is_dir()

    resumed = tiny_bert()
    again = SparseFineTuning(resumed, args, burnin_steps=4, density=0.01)
    Trainer(model=resumed, args=args, train_dataset=dataset(), optimizers=(again.optimizer, None),
            callbacks=[again]).train(resume_from_checkpoint=str(checkpoint))
    assert all(torch.equal(again.mask[n], sparse.mask[n]) for n in sparse.mask)  # restored, not re-scored
    reference = dict(whole.named_parameters())
    assert all(torch.equal(p, reference[n]) for n, p in resumed.named_parameters())


def test_bad_options_fail_at_once_in_one_line(tmp_path):
    model = tiny_bert()
    cases = [
        (dict(args=small_args(tmp_path, max_grad_norm=1.0), max_grad_norm=1.0), "clipping twice"),
        (dict(selector="sma"), "selector 'sma': unknown method 'sma' (did you mean 'sam'?)"),
        (dict(density=1.5), "density"),
        (dict(params=["head.weight"]), "head.weight"),
        (dict(burnin_steps=3, scoring_batches=4), "unknown key 'scoring_batches' for method 'sam'"),
        (dict(selector="diffprune"), "changes the model while it trains"),
        (dict(selector="lora"), "is a added method, not a selection"),
        (dict(selector="full"), "not a selection of floor(p*m) entries"),
        (dict(selector="magprune", burnin_steps=10), "trains 10 steps (weight updates) before it selects"),
        (dict(selector="childprune"), "trains 500 steps"),
        # floor(p*m) = 0: the CLI's error, not a run that trains the head only
        (dict(density=1e-7), "density 1e-07: floor(p*m) is 0 for the m = "),
    ]
    for options, message in cases:
        args = options.pop("args", small_args(tmp_path))
        with pytest.raises((ValueError, KeyError)) as err:
            SparseFineTuning(model, args, **options)
        assert message in str(err.value), (options, str(err.value))
        assert "\n" not in str(err.value)


def test_forgetting_the_sparse_optimizer_is_an_error_not_a_dense_run(tmp_path):
    model = tiny_bert()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = small_args(tmp_path)
    sparse = SparseFineTuning(model, args, burnin_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), callbacks=[sparse])  # no optimizers=
    with pytest.raises(ValueError, match=r"pass optimizers=\(sparse.optimizer, None\) to Trainer"):
        trainer.train()
    assert all(torch.equal(p, start[n]) for n, p in model.named_parameters())  # nothing trained
    assert not (tmp_path / "delta.safetensors").exists()


def test_clipping_is_over_the_trained_entries_and_so_is_the_logged_grad_norm(tmp_path, caplog):
    """TrainingArguments' max_grad_norm (1.0 by default) becomes the trained entries' clip; the
    logged grad_norm is their norm, computed here from the gradients the optimizer is given."""
    model = tiny_bert()
    args = small_args(tmp_path, max_grad_norm=1.0, logging_strategy="steps", logging_steps=1)
    expected, whole = [], []

    class TrainedNorm(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            grads = [p.grad.reshape(-1)[sparse.mask[n]] for n, p in model.named_parameters()
                     if n in sparse.mask and p.grad is not None]
            grads += [p.grad.reshape(-1) for n, p in model.named_parameters() if n in sparse.dense]
            expected.append(float(torch.linalg.vector_norm(torch.cat(grads))))
            everything = [p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]
            whole.append(float(torch.linalg.vector_norm(torch.cat(everything))))

    with caplog.at_level(logging.INFO, logger="sam_peft"):
        sparse = SparseFineTuning(model, args, burnin_steps=3)
        assert (sparse.optimizer.max_grad_norm, args.max_grad_norm) == (1.0, 0.0)
        trainer = Trainer(model=model, args=args, train_dataset=dataset(), optimizers=(sparse.optimizer, None),
                          callbacks=[TrainedNorm(), sparse])
        trainer.train()
    logged = [h["grad_norm"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 6 and logged == pytest.approx(expected, rel=1e-6)
    assert all(w > 1.01 * g for w, g in zip(whole, logged))  # not Trainer's norm of the whole gradient
    text = caplog.text
    assert "sam scores 3 batches (no update)" in text and "chose" in text  # the scoring pass is logged


def test_scoring_pass_shows_a_progress_bar(tmp_path, capsys):
    model = tiny_bert()
    args = small_args(tmp_path, disable_tqdm=False)
    train(model, args, burnin_steps=4, delta_path=None)
    assert "scoring (sam)" in capsys.readouterr().err
