"""The library surface on a plain Hugging Face encoder with a user's own head and loop."""

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

import sam_peft.lib as sp


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.bert = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0))
        self.head = nn.Linear(32, 2)

    def forward(self, ids):
        return self.head(self.bert(input_ids=ids).last_hidden_state[:, 0])


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 50, (8, 6), generator=g)
        out.append((ids, ids[:, 1] % 2))
    return out


def loss_fn(model, batch):
    ids, y = batch
    return nn.functional.cross_entropy(model(ids), y)


def test_select_train_save_apply_on_a_hf_encoder(tmp_path):
    model = Classifier()
    encoder = [n for n, _ in model.named_parameters() if n.startswith("bert.")]
    theta0 = sp.snapshot(model, encoder)
    scores = sp.sam_scores(model, batches(4), loss_fn, encoder)
    mask = sp.top_k(scores, density=0.02)
    m = sum(t.numel() for t in theta0.values())
    k = sum(i.numel() for i in mask.values())
    assert k == int(0.02 * m)
    assert all(torch.equal(model.state_dict()[n], theta0[n]) for n in theta0)  # scoring updated nothing

    trainer = sp.SparseTrainer(model, mask, lr=1e-2, dense=["head.weight", "head.bias"])
    for batch in batches(10, seed=1):
        loss_fn(model, batch).backward()
        trainer.step()
        trainer.zero_grad()
    changed = sp.count_changed(model, theta0)
    assert 0 < changed <= k
    assert trainer.state_bytes() < 0.1 * 8 * m  # far below a dense AdamW's two moments per entry
    for n, idx in mask.items():  # masked entries bit-identical
        keep = torch.ones(theta0[n].numel(), dtype=torch.bool)
        keep[idx] = False
        assert torch.equal(model.state_dict()[n].reshape(-1)[keep], theta0[n].reshape(-1)[keep])

    size = sp.save_delta(tmp_path / "d.safetensors", model, theta0, base_model="tiny-bert")
    assert size < 4 * sum(p.numel() for p in model.parameters()) / 5
    fresh = Classifier()
    sp.apply_delta(fresh, tmp_path / "d.safetensors")
    ids = batches(1, seed=7)[0][0]
    assert torch.equal(fresh(ids), model(ids))


def test_other_scores_and_modes():
    model = Classifier()
    names = [n for n, _ in model.named_parameters() if n.startswith("bert.encoder")]
    for scores in (sp.magnitude_scores(model, names), sp.random_scores(model, names, seed=3),
                   sp.sam_scores(model, batches(2), loss_fn, names, score="fisher")):
        for mode in ("global", "per_tensor"):
            mask = sp.top_k(scores, 0.1, mode)
            assert sum(i.numel() for i in mask.values()) == int(0.1 * sum(s.numel() for s in scores.values()))


def test_sparse_trainer_is_a_torch_optimizer_that_any_scheduler_drives():
    """The lr a scheduler sets is the lr of the update: two runs, one at a constant 1e-2 and one
    whose LambdaLR halves it at every step, differ; a scheduler at factor 1 matches the constant."""

    def run(factor):
        model = Classifier()
        encoder = [n for n, _ in model.named_parameters() if n.startswith("bert.")]
        mask = sp.select(model, "magprune", params=encoder, density=0.05)
        opt = sp.SparseTrainer(model, mask, lr=1e-2, dense=["head.weight", "head.bias"])
        assert isinstance(opt, torch.optim.Optimizer)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        lrs = []
        for batch in batches(4, seed=1):
            loss_fn(model, batch).backward()
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
            opt.zero_grad()
        return lrs, dict(model.named_parameters())

    lrs_const, const = run(lambda step: 1.0)
    lrs_half, halved = run(lambda step: 0.5 ** step)
    assert lrs_const == [1e-2] * 4 and lrs_half == [1e-2, 5e-3, 2.5e-3, 1.25e-3]
    assert any(not torch.equal(const[n], halved[n]) for n in const)
    _, again = run(lambda step: 1.0)
    assert all(torch.equal(const[n], again[n]) for n in const)


def test_sparse_trainer_defaults_are_the_hf_integrations():
    import inspect

    from transformers import TrainingArguments

    defaults = {k: v.default for k, v in inspect.signature(sp.SparseTrainer).parameters.items()}
    args = TrainingArguments("unused", report_to="none")
    assert (defaults["lr"], defaults["weight_decay"], defaults["betas"], defaults["eps"], defaults["max_grad_norm"]) \
        == (args.learning_rate, args.weight_decay, (args.adam_beta1, args.adam_beta2), args.adam_epsilon,
            args.max_grad_norm)


@pytest.mark.parametrize("selector, options", [
    ("random", {}), ("magprune", {}), ("sam", {"burnin_steps": 3}),
    ("childprune", {"variant": "fisher", "fisher_scope": "eligible"}),
])
def test_select_runs_every_registered_selector_exactly(selector, options):
    model = Classifier()
    encoder = [n for n, _ in model.named_parameters() if n.startswith("bert.")]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mask = sp.select(model, selector, batches=batches(3), loss_fn=loss_fn, params=encoder, batches_per_epoch=3,
                     density=0.05, **options)
    m = sum(dict(model.named_parameters())[n].numel() for n in encoder)
    assert sum(i.numel() for i in mask.values()) == int(0.05 * m)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # left as found
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing updated


def test_select_sam_is_top_k_of_sam_scores():
    model = Classifier()
    encoder = [n for n, _ in model.named_parameters() if n.startswith("bert.")]
    expected = sp.top_k(sp.sam_scores(model, batches(3), loss_fn, encoder), 0.05)
    mask = sp.select(model, "sam", batches=batches(3), loss_fn=loss_fn, params=encoder, density=0.05, burnin_steps=3)
    assert all(torch.equal(mask[n], expected[n]) for n in expected)


def test_select_refuses_what_cannot_select_outside_the_engine_in_one_line():
    model = Classifier()
    assert sp.selectors() == ["childprune", "magprune", "random", "sam"]
    for selector, options, message in [("diffprune", {}, "changes the model while it trains"),
                                       ("bitfit", {}, "is a subset method"),
                                       ("magprune", {"burnin_steps": 5}, "trains 5 steps"),
                                       ("sam", {"density": 1e-7}, "floor(p*m) is 0"),
                                       ("sam", {"topk": "local"}, "key 'topk'")]:
        with pytest.raises(ValueError) as err:
            sp.select(model, selector, **options)
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)
