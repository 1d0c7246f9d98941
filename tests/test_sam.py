"""SAM selects the top-k of its accumulated-gradient score, computed here independently."""

import copy

import pytest
import torch

from sam_peft.data import LengthGroupedSampler, collate
from util import hand_trainer


@pytest.mark.parametrize("score", ["squared_sum", "fisher", "abs_sum"])
@pytest.mark.parametrize("topk", ["global", "per_tensor"])
def test_sam_selection_is_topk_of_accumulated_gradient_score(score, topk):
    burnin, density = 5, 0.1
    tr = hand_trainer({"name": "sam", "density": density, "burnin_steps": burnin, "score": score, "topk": topk},
                      max_steps=burnin, eval_every=1)
    model0 = copy.deepcopy(tr.model)  # the model before anything happens (no dropout in the hand model)
    plan = tr.method.select(tr.model, tr.select_context())

    # The same batches, the same order: the run's training stream.
    sampler = LengthGroupedSampler(tr.data.lengths("train"), tr.t.batch_size, seed=tr.seed,
                                   group_by_length=tr.t.group_by_length)
    stream = iter(sampler)
    params = dict(model0.named_parameters())
    sums = {n: torch.zeros_like(params[n]) for n in tr.eligible}
    sq = {n: torch.zeros_like(params[n]) for n in tr.eligible}
    ab = {n: torch.zeros_like(params[n]) for n in tr.eligible}
    model0.train()
    for _ in range(burnin):
        batch = collate([tr.data.features["train"][i] for i in next(stream)], tr.data.pad_id)
        model0.zero_grad()
        model0.loss(model0(batch), batch["labels"]).backward()
        for n in tr.eligible:
            g = params[n].grad
            sums[n] += g
            sq[n] += g * g
            ab[n] += g.abs()
    scores = {"squared_sum": {n: s * s for n, s in sums.items()}, "fisher": sq, "abs_sum": ab}[score]

    m = sum(s.numel() for s in scores.values())
    k = int(density * m)
    if topk == "global":
        flat = torch.cat([scores[n].reshape(-1) for n in tr.eligible])
        chosen = set(torch.topk(flat, k).indices.tolist())
        offsets, start = {}, 0
        for n in tr.eligible:
            offsets[n] = start
            start += scores[n].numel()
        got = {offsets[n] + i for n, idx in plan.sparse.items() for i in idx.tolist()}
        assert got == chosen
    else:
        for n in tr.eligible:
            idx = plan.sparse[n]
            expected = set(torch.topk(scores[n].reshape(-1), idx.numel()).indices.tolist())
            assert set(idx.tolist()) == expected, n
    # the burn-in updated nothing and took no training step
    assert all(torch.equal(tr.params[n], tr.theta0[n]) for n in tr.eligible)
    assert (tr.step, tr.scoring_steps) == (0, burnin)
