"""Mixout: the mixed weights' expectation is w, inference sees w, gradients follow Lee et al.'s
backward, training moves the weights; the authors' evaluation-time reset."""

import copy

import pytest
import torch

from sam_peft.methods.mixout import mix
from util import hand_trainer


def selected(method: dict, **train):
    """A trainer whose method has run select() (no burn-in for Mixout)."""
    tr = hand_trainer(method, **train)
    plan = tr.method.select(tr.model, tr.select_context())
    tr.build_optimizers(plan)
    return tr, plan


def moved_weights(tr, seed=0):
    """Move every eligible tensor away from theta0, so that w != w0 everywhere."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n in tr.eligible:
            tr.params[n].add_(torch.randn(tr.params[n].shape, generator=g))
    return {n: tr.params[n].detach().clone() for n in tr.eligible}


def test_mix_formula():
    w, w0 = torch.tensor([2.0, 2.0, 1.0]), torch.tensor([1.0, 1.0, 1.0])
    keep = torch.tensor([True, False, True])
    # (M w + (1 - M) w0 - p w0) / (1 - p) with p = 0.75
    assert torch.allclose(mix(w, w0, keep, 0.75), torch.tensor([5.0, 1.0, 1.0]))
    # where w == w0 the mix is w0 exactly, whatever the mask: step 0 sees the pretrained model
    assert torch.equal(mix(w0, w0, keep, 0.9), w0)


def test_expectation_of_the_mixed_weights_is_w():
    p = 0.9
    tr, _ = selected({"name": "mixout", "p": p, "mask": "entry"})  # independent draws: per-entry statistics
    w = {n: v for n, v in moved_weights(tr).items() if n in tr.method._mixed}
    assert list(w) == ["encoder.dense.weight"]  # the hand model's one Linear weight
    draws = 1500
    total = {n: torch.zeros_like(v, dtype=torch.float64) for n, v in w.items()}
    kept = 0.0
    for step in range(draws):
        tr.method.before_forward(tr.model, step)
        for n in w:
            total[n] += tr.params[n].detach().double()
        kept += sum(float(k.float().sum()) for k in tr.method._keep.values())
        tr.method.after_backward(tr.model, step)
        assert all(torch.equal(tr.params[n], w[n]) for n in w)  # w restored bit for bit
    m = sum(v.numel() for v in w.values())
    assert kept / (draws * m) == pytest.approx(1 - p, abs=0.01)
    # Per entry, (mean - w) / |w - w0| has standard deviation sigma = sqrt(p / (1 - p) / draws).
    sigma = (p / (1 - p) / draws) ** 0.5
    z = torch.cat([((total[n] / draws - w[n].double()) / (w[n] - tr.theta0[n]).abs().double()).reshape(-1)
                   for n in w])
    assert float(z.abs().max()) < 6 * sigma  # every entry
    assert abs(float(z.mean())) < 6 * sigma / m**0.5  # and pooled over all m entries: no bias
    assert float(z.std()) == pytest.approx(sigma, rel=0.2)  # the spread Mixout should have


@pytest.mark.parametrize("mask", ["column", "entry"])
def test_gradient_is_lee_et_al_s_backward(mask):
    # Their Function's backward: grad_output * noise, the keep mask without the 1 / (1 - p).
    tr, _ = selected({"name": "mixout", "p": 0.6, "mask": mask})
    moved_weights(tr)
    tr.method.before_forward(tr.model, 0)
    keep = {n: k.clone() for n, k in tr.method._keep.items()}
    batch = tr.batches.next()
    tr.model.train()
    tr.model.loss(tr.model(batch), batch["labels"]).backward()
    g = {n: tr.params[n].grad.clone() for n in tr.eligible}  # dL/dw~ for the mixed tensors
    tr.method.after_backward(tr.model, 0)
    for n in tr.eligible:
        expect = torch.where(keep[n], g[n], torch.zeros_like(g[n])) if n in keep else g[n]
        assert torch.equal(tr.params[n].grad, expect), n


def test_inference_uses_the_plain_weights():
    tr = hand_trainer({"name": "mixout"}, max_steps=8, eval_every=4, lr=0.05)
    tr.fit()
    plain = copy.deepcopy(tr.model)  # the same weights, no method anywhere
    batch = tr.batches.next()
    tr.model.eval()
    plain.eval()
    with torch.no_grad(), tr.method.eval_weights(tr.model, "test"):
        out = tr.model(batch)
    with torch.no_grad():
        ref = plain(batch)
    assert torch.equal(out, ref)


def test_masked_training_moves_weights_and_is_deterministic():
    def weights(seed):
        tr = hand_trainer({"name": "mixout", "p": 0.9}, seed=seed, max_steps=10, eval_every=5, lr=0.05)
        fit = tr.fit()
        assert fit.plan.dense == tr.eligible
        return tr, {n: p.detach().clone() for n, p in tr.params.items()}

    tr, a = weights(2)
    _, b = weights(2)
    _, c = weights(3)
    n_changed = sum(int((a[n] != tr.theta0[n]).sum()) for n in tr.eligible)
    assert n_changed > 0.5 * sum(t.numel() for t in tr.theta0.values())
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_first_step_forward_sees_the_pretrained_model():
    tr, _ = selected({"name": "mixout"})
    tr.method.before_forward(tr.model, 0)
    assert all(torch.equal(tr.params[n], tr.theta0[n]) for n in tr.eligible)
    tr.method.after_backward(tr.model, 0)


def test_eval_reset_mode_authors_code():
    p = 0.5
    tr, _ = selected({"name": "mixout", "mode": "eval_reset", "p": p})
    w = moved_weights(tr)
    # Training steps see plain weights (full fine-tuning).
    tr.method.before_forward(tr.model, 0)
    assert all(torch.equal(tr.params[n], w[n]) for n in w)
    tr.method.after_backward(tr.model, 0)
    # Validation during training: each entry reset to theta0 with probability p, no rescaling.
    with tr.method.eval_weights(tr.model, "val"):
        reset = sum(int((tr.params[n] == tr.theta0[n]).sum()) for n in w)
        same = sum(int((tr.params[n] == w[n]).sum()) for n in w)
    m = sum(v.numel() for v in w.values())
    assert reset + same == m and reset / m == pytest.approx(p, abs=0.1)
    assert all(torch.equal(tr.params[n], w[n]) for n in w)  # restored after the evaluation
    # The test split too (their run_val served val and test alike), a fresh draw each time.
    with tr.method.eval_weights(tr.model, "test"):
        first = {n: tr.params[n].detach().clone() for n in w}
    with tr.method.eval_weights(tr.model, "test"):
        assert any(not torch.equal(tr.params[n], first[n]) for n in w)
    # After training: still reset, from a per-split stream, so the final numbers are reproducible.
    tr.method.finalize(tr.model)
    draws = []
    for _ in range(2):
        with tr.method.eval_weights(tr.model, "test"):
            draws.append({n: tr.params[n].detach().clone() for n in w})
    assert all(torch.equal(draws[0][n], draws[1][n]) for n in w)
    assert sum(int((draws[0][n] == tr.theta0[n]).sum()) for n in w) / m == pytest.approx(p, abs=0.1)
