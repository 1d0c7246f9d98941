"""DiffPruning and ChildPruning on the hand-made encoder: exact budgets, the projection
schedules, masked entries bit-identical to theta0, best-checkpoint weights, determinism."""

import math

import pytest
import torch

from sam_peft.methods.base import SelectContext

from sam_peft.methods.diffprune import Gates, deterministic_gate, open_probability, sample_gate
from sam_peft.selection import budget
from util import hand_trainer


def masks_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def changed(tr) -> dict[str, torch.Tensor]:
    return {n: torch.nonzero(tr.params[n].detach().reshape(-1) != tr.theta0[n].reshape(-1)).squeeze(1)
            for n in tr.eligible}


def outside_mask_is_theta0(tr, mask) -> bool:
    for n in tr.eligible:
        keep = torch.ones(tr.theta0[n].numel(), dtype=torch.bool)
        keep[mask[n]] = False
        if not torch.equal(tr.params[n].detach().reshape(-1)[keep], tr.theta0[n].reshape(-1)[keep]):
            return False
    return True


# ---------------------------------------------------------------------------- DiffPruning


def test_hard_concrete_gate():
    la = torch.tensor([-10.0, 0.0, 10.0])
    assert deterministic_gate(la, (-1.5, 1.5)).tolist() == [0.0, 0.0, 1.0]  # sigmoid(0)*3-1.5 = 0
    u = torch.full((3,), 0.5)
    assert torch.equal(sample_gate(la, u, (-1.5, 1.5), 1.0), deterministic_gate(la, (-1.5, 1.5)))
    # P(z != 0) = sigmoid(log_alpha - beta * log(-l / r)); with symmetric stretch, sigmoid(log_alpha)
    assert torch.allclose(open_probability(la, (-1.5, 1.5), 2 / 3), torch.sigmoid(la))
    p = open_probability(torch.zeros(1), (-0.1, 1.1), 2 / 3)
    assert float(p) == pytest.approx(1 / (1 + math.exp((2 / 3) * math.log(0.1 / 1.1))))
    # Monte Carlo: the fraction of non-zero samples matches P(z != 0)
    g = torch.Generator().manual_seed(0)
    la = torch.full((200_000,), -0.7)
    z = sample_gate(la, torch.rand(la.shape, generator=g).clamp(1e-6, 1 - 1e-6), (-0.1, 1.1), 2 / 3)
    assert float((z > 0).float().mean()) == pytest.approx(float(open_probability(la[:1], (-0.1, 1.1), 2 / 3)), abs=0.01)


def test_diffprune_burnin_projection_is_exact_and_masked_entries_stay_theta0():
    # Large lr and weight decay: any leak outside the mask would show.
    tr = hand_trainer({"name": "diffprune", "density": 0.1, "burnin_steps": 6}, max_steps=30, eval_every=6,
                      lr=0.05, weight_decay=0.5)
    seen = {}
    orig_select = tr.method.select

    def select(model, ctx):
        plan = orig_select(model, ctx)
        seen["after_burnin"] = {n: p.detach().clone() for n, p in ctx.eligible.items()}
        seen["names"] = [n for n, _ in model.named_parameters()]
        return plan

    tr.method.select = select
    fit = tr.fit()
    m = sum(t.numel() for t in tr.theta0.values())
    k = budget(0.1, m)
    assert sum(i.numel() for i in fit.plan.sparse.values()) == k
    assert fit.burnin_steps == 6
    assert not any(n.startswith("diffprune") for n in seen["names"])  # gates removed after burn-in
    assert not any(n.startswith("diffprune") for n, _ in tr.model.named_parameters())
    # The projection wrote theta0 + z_det * w on the mask only ...
    for n in tr.eligible:
        keep = torch.ones(tr.theta0[n].numel(), dtype=torch.bool)
        keep[fit.plan.sparse[n]] = False
        assert torch.equal(seen["after_burnin"][n].reshape(-1)[keep], tr.theta0[n].reshape(-1)[keep])
    # ... and after the fixed-mask phase everything outside the mask is still theta0.
    assert outside_mask_is_theta0(tr, fit.plan.sparse)
    n_changed = sum(i.numel() for i in changed(tr).values())
    assert 0.8 * k < n_changed <= k


def test_diffprune_burnin_trains_gates_and_head_not_theta():
    tr = hand_trainer({"name": "diffprune", "density": 0.1, "burnin_steps": 3}, max_steps=4, eval_every=4, lr=0.05)
    grads = []

    def spy(model, step, orig=tr.method.after_backward):
        orig(model, step)
        grads.append({n: p.grad is not None for n, p in model.named_parameters()})

    tr.method.after_backward = spy
    tr.fit()
    g = grads[0]
    assert all(g[n] for n in g if n.startswith(("diffprune.", "head.")))
    assert not any(g[n] for n in tr.eligible)  # dL/dtheta went on to w and log_alpha


def test_diffprune_remask_schedule():
    burnin, every, max_steps = 5, 3, 20
    tr = hand_trainer({"name": "diffprune", "density": 0.1, "burnin_steps": burnin, "remask_every": every},
                      max_steps=max_steps, eval_every=4, lr=0.05)
    masks = {}  # step s -> the mask once s steps are done (burn-in's end: after select's projection)

    def record(step):
        masks[step] = {n: i.clone() for n, i in tr.method.mask.items()}

    def after_step(model, step, orig=tr.method.after_step):
        orig(model, step)
        record(step)

    noise = torch.Generator().manual_seed(0)

    def before_forward(model, step, orig=tr.method.before_forward):
        record(step)  # runs after select() returned: sees the end-of-burn-in projection
        if step >= burnin:
            # Shake the diffs so that every re-projection picks a different top-k: the mask
            # must still change only at the projection steps.
            with torch.no_grad():
                for w in model.diffprune.w.values():
                    w.add_(torch.randn(w.shape, generator=noise))
        orig(model, step)

    tr.method.after_step, tr.method.before_forward = after_step, before_forward
    fit = tr.fit()
    expected = list(range(burnin, max_steps + 1, every))  # 5, 8, 11, 14, 17, 20
    assert tr.method.report()["projections"] == expected
    m = sum(t.numel() for t in tr.theta0.values())
    k = budget(0.1, m)
    assert sum(i.numel() for i in masks[burnin].values()) == k  # the burn-in projection: exactly k
    # During burn-in no mask exists; afterwards it changes at the projection steps and only then.
    assert all(masks[s] == {} for s in range(1, burnin))
    changes = [s for s in range(burnin + 1, max_steps + 1) if not masks_equal(masks[s], masks[s - 1])]
    assert changes == expected[1:]
    assert all(sum(i.numel() for i in masks[s].values()) == k for s in expected)
    # The result: theta0 outside the final mask, the plan of the result is that sparse mask.
    assert sum(i.numel() for i in fit.plan.sparse.values()) == k and not fit.plan.dense
    assert outside_mask_is_theta0(tr, fit.plan.sparse)
    assert not any(n.startswith("diffprune") for n, _ in tr.model.named_parameters())


def test_diffprune_remask_zeroes_w_outside_the_mask():
    tr = hand_trainer({"name": "diffprune", "density": 0.1, "burnin_steps": 4, "remask_every": 2},
                      max_steps=8, eval_every=4, lr=0.05)
    seen = []

    def spy(model, step, orig=tr.method.after_step):
        orig(model, step)
        if step in (4, 6):
            outside = 0
            for n, idx in tr.method.mask.items():
                w = model.diffprune.w[n.replace(".", "__")].detach().reshape(-1)
                keep = torch.ones(w.numel(), dtype=torch.bool)
                keep[idx] = False
                outside += int((w[keep] != 0).sum())
            seen.append(outside)

    tr.method.after_step = spy
    tr.fit()
    assert seen == [0, 0]


def test_diffprune_remask_bakes_the_best_checkpoint(monkeypatch):
    tr = hand_trainer({"name": "diffprune", "density": 0.1, "burnin_steps": 3, "remask_every": 4},
                      max_steps=15, eval_every=3, lr=0.05)
    script = iter([1.0, 9.0, 2.0, 3.0, 4.0])  # best at the 2nd evaluation (step 9), after a re-projection at 7
    seen = {}

    def fake_eval(split, limit=None):
        with tr.method.eval_weights(tr.model, split):
            seen[tr.step] = {n: tr.params[n].detach().clone() for n in tr.eligible}
        return {"major": next(script)}

    monkeypatch.setattr(tr, "evaluate", fake_eval)
    fit = tr.fit()
    assert fit.best_step == 9 and tr.method.report()["projections"] == [3, 7, 11, 15]
    for n in tr.eligible:
        assert torch.equal(tr.params[n], seen[9][n]), n
    # Evaluation saw theta0 + mask * z_det * w: at most k entries away from theta0.
    k = sum(i.numel() for i in fit.plan.sparse.values())
    for step, weights in seen.items():
        assert sum(int((weights[n] != tr.theta0[n]).sum()) for n in tr.eligible) <= k


def test_diffprune_l0_penalty_scale():
    # sum (default, Guo et al.): lambda * sum of P(z != 0); mean (the authors' code): lambda * mean.
    def penalty(reduction):
        tr = hand_trainer({"name": "diffprune", "l0_lambda": 2.0, "l0_reduction": reduction, "burnin_steps": 1},
                          max_steps=2)
        tr.method._gates = Gates({n: tr.params[n] for n in tr.eligible}, alpha_init=0.0)
        return float(tr.method.extra_loss(tr.model).detach()), sum(t.numel() for t in tr.theta0.values())

    (mean, m), (total, _) = penalty("mean"), penalty("sum")
    assert mean == pytest.approx(2.0 * 0.5)  # sigmoid(0) everywhere
    assert total == pytest.approx(2.0 * 0.5 * m)


@pytest.mark.parametrize("extra", [{}, {"remask_every": 3}])
def test_diffprune_same_seed_same_result(extra):
    def weights(seed):
        tr = hand_trainer({"name": "diffprune", "density": 0.2, "burnin_steps": 4, **extra}, seed=seed,
                          max_steps=10, eval_every=5, lr=0.05)
        tr.fit()
        return {n: p.detach().clone() for n, p in tr.params.items() if not n.startswith("diffprune")}

    a, b, c = weights(3), weights(3), weights(4)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


# ---------------------------------------------------------------------------- ChildPruning


@pytest.mark.parametrize("topk", ["global", "per_tensor"])
def test_childprune_projection_keeps_exactly_k_after_every_burnin_step(topk):
    burnin = 5
    tr = hand_trainer({"name": "childprune", "density": 0.1, "burnin_steps": burnin, "topk": topk},
                      max_steps=15, eval_every=5, lr=0.05, weight_decay=0.5)
    k = budget(0.1, sum(t.numel() for t in tr.theta0.values()))
    counts = {}

    def spy(model, step, orig=tr.method.after_step):
        orig(model, step)
        diff = changed(tr)
        counts[step] = sum(i.numel() for i in diff.values())
        if step <= burnin:  # the changed entries are exactly the projection's mask
            assert all(torch.equal(diff[n], tr.method.mask[n]) for n in diff)

    tr.method.after_step = spy
    fit = tr.fit()
    assert [counts[s] for s in range(1, burnin + 1)] == [k] * burnin
    assert masks_equal(fit.plan.sparse, tr.method.mask)  # the last projection's mask is fixed
    assert outside_mask_is_theta0(tr, fit.plan.sparse)
    assert all(0.8 * k < counts[s] <= k for s in range(burnin + 1, 16))


def test_childprune_fisher_is_one_pass_of_scoring_batches_without_updates(monkeypatch):
    tr = hand_trainer({"name": "childprune", "density": 0.1, "variant": "fisher", "fisher_scope": "eligible"},
                      max_steps=12, eval_every=6)
    calls = []
    orig = SelectContext.accumulate_gradients

    def spy(ctx, n, stats, names, clip, clip_mode):
        before = {name: p.detach().clone() for name, p in tr.params.items()}
        out = orig(ctx, n, stats, names, clip, clip_mode)
        calls.append((n, tuple(stats), clip, clip_mode,
                      all(torch.equal(p, before[name]) for name, p in tr.params.items())))
        return out

    monkeypatch.setattr(SelectContext, "accumulate_gradients", spy)
    fit = tr.fit()
    n_train = len(tr.data.features["train"])
    # One pass, each tensor's gradient clipped on its own to the protocol's max norm (ChildTuning-D).
    assert calls == [(math.ceil(n_train / 8), ("sum_sq",), tr.t.grad_clip, "per_tensor", True)]
    # A scoring pass, not training: every one of the 12 training steps is still a main-phase step.
    assert (fit.scoring_steps, fit.burnin_steps, fit.steps) == (math.ceil(n_train / 8), 0, 12)
    k = budget(0.1, sum(t.numel() for t in tr.theta0.values()))
    assert sum(i.numel() for i in fit.plan.sparse.values()) == k
    assert outside_mask_is_theta0(tr, fit.plan.sparse)
