"""The sparse engine: bit-identical masked entries, AdamW equivalence, clipping, freezing,
optimizer memory, early stopping with best-weight restore, the LR schedule, determinism."""

import math

import pytest
import torch

import sam_peft.optim as optim
from sam_peft.engine import learning_rate
from sam_peft.optim import SparseAdamW, clip_
from util import hand_trainer

SPARSE = [
    {"name": "random", "density": 0.1},
    {"name": "magprune", "density": 0.1},
    {"name": "sam", "density": 0.1, "burnin_steps": 4},
    {"name": "sam", "density": 0.1, "burnin_steps": 4, "topk": "per_tensor", "score": "fisher"},
    {"name": "magprune", "density": 0.1, "burnin_steps": 4, "reset": True},
]


@pytest.mark.parametrize("method", SPARSE, ids=lambda m: "-".join(str(v) for v in m.values()))
def test_masked_entries_stay_bit_identical(method):
    # Large lr and weight decay: any leak (decay on masked entries, dense Adam state) would show.
    tr = hand_trainer(method, max_steps=40, eval_every=10, lr=0.05, weight_decay=0.5)
    fit = tr.fit()
    n_selected = 0
    n_changed = 0
    for name in tr.eligible:
        p, p0 = tr.params[name].detach().reshape(-1), tr.theta0[name].reshape(-1)
        keep = torch.ones_like(p, dtype=torch.bool)
        idx = fit.plan.sparse.get(name, torch.empty(0, dtype=torch.long))
        keep[idx] = False
        assert torch.equal(p[keep], p0[keep]), name  # bitwise, masked entries untouched
        n_selected += idx.numel()
        n_changed += int((p != p0).sum())
    assert 0 < n_changed <= n_selected
    assert n_changed > 0.8 * n_selected  # the chosen entries really trained


def test_magprune_authors_variant_keeps_burnin_drift():
    tr = hand_trainer({"name": "magprune", "density": 0.1, "burnin_steps": 4, "reset": False},
                      max_steps=10, eval_every=5, lr=0.05)
    fit = tr.fit()
    n_changed = sum(int((tr.params[n] != tr.theta0[n]).sum()) for n in tr.eligible)
    assert n_changed > sum(i.numel() for i in fit.plan.sparse.values())


def test_sparse_adamw_matches_torch_adamw_bitwise():
    g = torch.Generator().manual_seed(0)
    a = torch.nn.Parameter(torch.randn(6, 5, generator=g))
    b = torch.nn.Parameter(torch.randn(7, generator=g))
    a2, b2 = (torch.nn.Parameter(x.detach().clone()) for x in (a, b))
    sparse = SparseAdamW([(a, torch.arange(30), 0.1), (b, torch.arange(7), 0.0)], lr=0.01)
    ref = torch.optim.AdamW([{"params": [a2], "weight_decay": 0.1}, {"params": [b2], "weight_decay": 0.0}],
                            lr=0.01, foreach=False)
    for step in range(6):
        ga, gb = torch.randn(6, 5, generator=g), torch.randn(7, generator=g)
        a.grad, b.grad, a2.grad, b2.grad = ga.clone(), gb.clone(), ga.clone(), gb.clone()
        sparse.lr = ref.param_groups[0]["lr"] = ref.param_groups[1]["lr"] = 0.01 * (step + 1)
        sparse.step(sparse.gather_grads())
        ref.step()
    assert torch.equal(a, a2) and torch.equal(b, b2)


def test_sparse_adamw_touches_only_its_entries_and_state_is_order_k():
    g = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter(torch.randn(1000, generator=g))
    before = p.detach().clone()
    idx = torch.tensor([3, 10, 999])
    opt = SparseAdamW([(p, idx, 0.5)], lr=0.1)
    p.grad = torch.randn(1000, generator=g)
    opt.step(opt.gather_grads())
    changed = torch.nonzero(p.detach() != before).squeeze(1)
    assert changed.tolist() == idx.tolist()
    assert opt.exp_avg.numel() == opt.exp_avg_sq.numel() == 3
    assert opt.state_bytes() == 3 * 8 + 3 * 4 * 2 + 3  # int64 indices, two fp32 moments, decay mask


def test_clip_uses_trained_entries_only():
    w = torch.nn.Parameter(torch.zeros(2))
    w.grad = torch.tensor([3.0, 0.0])
    sparse_g = torch.tensor([4.0])
    norm = clip_([w], sparse_g, max_norm=1.0)
    assert float(norm) == pytest.approx(5.0)
    assert torch.allclose(w.grad, torch.tensor([0.6, 0.0]), atol=1e-6)
    assert torch.allclose(sparse_g, torch.tensor([0.8]), atol=1e-6)


def test_trainer_clips_with_gathered_sparse_grads(monkeypatch):
    seen = []

    def spy(dense, sparse_g, max_norm):
        seen.append((len(dense), None if sparse_g is None else sparse_g.numel()))
        return clip_(dense, sparse_g, max_norm)

    monkeypatch.setattr(optim, "clip_", spy)
    tr = hand_trainer({"name": "sam", "density": 0.1, "burnin_steps": 2}, max_steps=6, eval_every=3)
    fit = tr.fit()
    k = sum(i.numel() for i in fit.plan.sparse.values())
    head = [n for n in tr.params if n.startswith("head.")]
    assert seen and all(s == (len(head), k) for s in seen)


@pytest.mark.parametrize("method,trained", [
    ({"name": "bitfit"}, lambda n: n.endswith(".bias") or n.startswith("head.")),
    ({"name": "sam", "density": 0.01, "burnin_steps": 2}, None),
])
def test_frozen_tensors_get_no_gradient(method, trained):
    tr = hand_trainer(method, max_steps=4, eval_every=2)
    grads = []
    tr.method.after_backward = lambda model, step: grads.append(
        {n: p.grad is not None for n, p in model.named_parameters()})
    fit = tr.fit()
    if trained is None:  # sparse: exactly the tensors with selected entries (and the head)
        trained = lambda n: n.startswith("head.") or fit.plan.sparse.get(n, torch.empty(0)).numel() > 0  # noqa: E731
    main_phase = grads[-1]
    assert main_phase == {n: trained(n) for n in main_phase}
    assert any(not v for v in main_phase.values())


def test_optimizer_state_proportional_to_k():
    full = hand_trainer({"name": "full"}, max_steps=2, eval_every=2)
    full_fit = full.fit()
    sam = hand_trainer({"name": "sam", "density": 0.05, "burnin_steps": 2}, max_steps=4, eval_every=2)
    sam_fit = sam.fit()
    n_head = sum(p.numel() for n, p in sam.params.items() if n.startswith("head."))
    m = sum(p.numel() for p in sam.theta0.values())
    k = sum(i.numel() for i in sam_fit.plan.sparse.values())
    n_tensors = len(full.params)
    n_head_tensors = sum(1 for n in sam.params if n.startswith("head."))
    # torch AdamW: two fp32 moments per entry and a 4-byte step counter per tensor
    assert full_fit.optimizer_state_bytes == 8 * (m + n_head) + 4 * n_tensors
    # SparseAdamW: int64 index + two fp32 moments + a decay-mask byte per chosen entry
    assert sam_fit.optimizer_state_bytes == 8 * n_head + 4 * n_head_tensors + k * (8 + 8 + 1)


def test_early_stopping_and_best_restore(monkeypatch):
    script = iter([10.0, 30.0, 20.0, 25.0, 28.0, 29.0, 5.0, 5.0])
    snapshots = {}
    tr = hand_trainer({"name": "full"}, max_steps=100, eval_every=2, patience=3, min_steps=0)

    def fake_eval(split, limit=None):
        snapshots[tr.step] = {n: p.detach().clone() for n, p in tr.params.items()}
        return {"major": next(script)}

    monkeypatch.setattr(tr, "evaluate", fake_eval)
    logged = []
    tr.log_eval = logged.append
    fit = tr.fit()
    # best at the 2nd evaluation (step 4); three evaluations without improvement -> stop at step 10
    assert fit.best_step == 4 and fit.steps == 10 and fit.stopped == "patience" and fit.n_evals == 5
    assert [r["step"] for r in logged] == [2, 4, 6, 8, 10]
    assert [r["best"] for r in logged] == [True, True, False, False, False]
    for n, p in tr.params.items():
        assert torch.equal(p, snapshots[4][n]), n


def test_early_stopping_waits_for_min_steps(monkeypatch):
    values = iter([50.0] + [40.0] * 100)
    tr = hand_trainer({"name": "bitfit"}, max_steps=100, eval_every=2, patience=2, min_steps=15)
    monkeypatch.setattr(tr, "evaluate", lambda split, limit=None: {"major": next(values)})
    fit = tr.fit()
    assert fit.steps == 16 and fit.best_step == 2 and fit.stopped == "patience"


def test_max_steps_ends_the_run_with_an_evaluation(monkeypatch):
    values = iter(float(i) for i in range(100))
    tr = hand_trainer({"name": "full"}, max_steps=7, eval_every=3, patience=1)
    monkeypatch.setattr(tr, "evaluate", lambda split, limit=None: {"major": next(values)})
    fit = tr.fit()
    assert fit.steps == 7 and fit.best_step == 7 and fit.n_evals == 3 and fit.stopped == "max_steps"


def test_learning_rate_schedule():
    assert learning_rate(0, 1.0, 100, 10) == 0.0
    assert learning_rate(5, 1.0, 100, 10) == 0.5
    assert learning_rate(10, 1.0, 100, 10) == 1.0
    assert learning_rate(55, 1.0, 100, 10) == pytest.approx(0.5)
    assert learning_rate(100, 1.0, 100, 10) == 0.0
    assert learning_rate(3, 2.0, 100, 0) == pytest.approx(2.0 * 97 / 100)


def test_warmup_is_a_proportion_of_the_planned_run():
    tr = hand_trainer({"name": "full"}, max_steps=200, warmup=0.1)
    assert tr.schedule.steps[1] == 20
    tr = hand_trainer({"name": "full"}, max_steps=200, warmup_steps=7)
    assert tr.schedule.steps[1] == 7


def test_same_seed_same_weights_other_seed_differs():
    def weights(seed):
        tr = hand_trainer({"name": "sam", "density": 0.2, "burnin_steps": 3}, seed=seed, max_steps=12, eval_every=4)
        tr.fit()
        return {n: p.detach().clone() for n, p in tr.params.items()}

    a, b, c = weights(5), weights(5), weights(6)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_nan_loss_fails_the_run(monkeypatch):
    tr = hand_trainer({"name": "full"}, max_steps=10, eval_every=2)
    orig = tr.model.loss
    monkeypatch.setattr(tr.model, "loss", lambda logits, labels: orig(logits, labels) * float("nan"))
    with pytest.raises(FloatingPointError):
        tr.fit()
    assert math.isnan(float("nan"))
