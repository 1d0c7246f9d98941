"""Each method as its original implementation runs it (docs/fidelity.md), on the hand-made encoder.

- burn-in: scoring batches are not training steps; training burn-ins are; every method gets the
  same weight updates under the same schedule; a config with no main-phase step is rejected;
- batches are shuffled afresh every epoch by default;
- DiffPruning's gates learn (own optimizer group, Guo et al.'s L0 term), and the authors'
  projection is theirs;
- Mixout mixes Linear weights only, one draw per input column, with Lee et al.'s backward;
- LoRA's authors' variant; SAM's clipped burn-in; ChildTuning-D's Fisher; jiant's head init.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from sam_peft.config import TrainConfig
from sam_peft.data import LengthGroupedSampler
from sam_peft.engine import learning_rate
from sam_peft.methods.base import SelectContext
from sam_peft.errors import UserError
from sam_peft.loader import build_config
from sam_peft.methods.diffprune import _key
from sam_peft.model import TaskModel
from sam_peft.selection import budget, per_tensor_quotas, topk_flat
from sam_peft.tasks import get_task
from util import hand_trainer, HandEncoder, lr_trace, tiny_run


# ------------------------------------------------------------------------ 1. burn-in and the schedule


def test_sam_burnin_is_not_a_training_step(monkeypatch):
    # The old engine counted the 7 burn-in batches toward max_steps: SAM trained 5 of 12 steps,
    # its first update at lr(7), its evaluations at other steps than FullTuning's.
    protocol = dict(max_steps=12, eval_every=4, warmup=0.25, lr=0.01)
    runs = {}
    for name, method in (("sam", {"name": "sam", "density": 0.1, "burnin_steps": 7}), ("full", {"name": "full"})):
        evals = []
        tr = hand_trainer(method, log_eval=evals.append, **protocol)
        lrs = lr_trace(monkeypatch)
        fit = tr.fit()
        monkeypatch.undo()
        runs[name] = (fit, list(lrs), [e["step"] for e in evals])
    (sam, sam_lrs, sam_evals), (full, full_lrs, full_evals) = runs["sam"], runs["full"]
    assert (sam.steps, sam.scoring_steps, sam.burnin_steps) == (12, 7, 0)
    assert (full.steps, full.scoring_steps, full.burnin_steps) == (12, 0, 0)
    # The same weight updates under the same schedule and the same evaluation cadence.
    assert sam_lrs == full_lrs == [learning_rate(s, 0.01, 12, 3) for s in range(12)]
    assert sam_evals == full_evals == [4, 8, 12]


def test_training_burnins_are_training_steps(monkeypatch):
    for method in ({"name": "diffprune", "density": 0.1, "burnin_steps": 4},
                   {"name": "childprune", "density": 0.1, "burnin_steps": 4},
                   {"name": "magprune", "density": 0.1, "burnin_steps": 4}):
        tr = hand_trainer(method, max_steps=12, eval_every=4, warmup=0.25, lr=0.01)
        lrs = lr_trace(monkeypatch)
        fit = tr.fit()
        monkeypatch.undo()
        assert (fit.steps, fit.burnin_steps, fit.scoring_steps) == (12, 4, 0), method["name"]
        assert lrs == [learning_rate(s, 0.01, 12, 3) for s in range(12)], method["name"]


@pytest.mark.parametrize("method", ["diffprune", "childprune", "magprune"])
def test_config_without_a_main_phase_step_is_rejected(method):
    with pytest.raises(UserError, match="method.burnin_steps.*no main-phase step"):
        build_config({"task": "rte", "method": {"name": method, "burnin_steps": 500}, "train": {"max_steps": 12}})
    # SAM's burn-in is scoring: the same numbers leave all 12 steps to train.
    build_config({"task": "rte", "method": {"name": "sam", "burnin_steps": 500}, "train": {"max_steps": 12}})


def test_progress_bar_total_counts_scoring_and_training_steps():
    # The 5 scoring batches are in the total from the start: it never jumps when they begin.
    tr = hand_trainer({"name": "sam", "density": 0.1, "burnin_steps": 5}, max_steps=9, eval_every=3)
    tr._progress_on = True
    seen = []
    orig = tr._tick

    def spy(**postfix):
        orig(**postfix)
        seen.append((tr.progress.n, tr.progress.total, postfix.get("phase")))

    tr._tick = spy
    tr.fit()
    assert {total for _, total, _ in seen} == {14} and seen[-1][:2] == (14, 14)
    # The phase label follows the phase: the first tick after the scoring batches says "train".
    phases = [phase for _, _, phase in seen if phase]
    assert phases[:5] == ["scoring"] * 5 and phases[5] == "train" and seen[5][0] == 6


def test_progress_prints_plain_lines_where_stderr_is_no_terminal(capsys):
    from sam_peft.engine import Progress

    progress = Progress(True, 200, "stsb/sam/s0", plain=True)
    for step in range(1, 201):
        progress.to(step, phase="train")
    progress.close()
    lines = capsys.readouterr().err.splitlines()
    assert 10 <= len(lines) <= 11 and "\r" not in "".join(lines)
    assert lines[0] == "stsb/sam/s0: 1/200 (phase train)" and lines[-1].startswith("stsb/sam/s0: 181/200")


# ------------------------------------------------------------------------ 2. shuffled batches


def test_batches_are_shuffled_afresh_every_epoch_by_default():
    assert TrainConfig().group_by_length is False
    lengths = [int(x) for x in torch.randint(5, 120, (250,), generator=torch.Generator().manual_seed(0))]

    def repeated_pairs(group_by_length: bool) -> float:
        """The share of same-batch pairs of epoch 0 that share a batch again in epoch 1."""
        s = LengthGroupedSampler(lengths, 16, seed=3, group_by_length=group_by_length)
        pairs = [{frozenset(p) for b in s.epoch_batches(e) for p in itertools.combinations(b, 2)} for e in (0, 1)]
        return len(pairs[0] & pairs[1]) / len(pairs[0])

    assert repeated_pairs(False) < 0.15  # about batch_size / n by chance
    assert repeated_pairs(True) > 2 * repeated_pairs(False)  # what length grouping keeps together


# ------------------------------------------------------------------------ 3. DiffPruning


def density_after_burnin(**opts) -> float:
    """The mean open probability P(z != 0) of the gates at the end of a 30-step burn-in."""
    tr = hand_trainer({"name": "diffprune", "density": 0.1, "burnin_steps": 30, **opts}, max_steps=31,
                      eval_every=31, lr=0.01)
    tr.method.select(tr.model, tr.select_context())
    return tr.method.report()["expected_density"][0]["mean_open_probability"]


def test_diffprune_gates_learn_and_the_l0_penalty_lowers_the_expected_density():
    # Guo et al.'s per-entry weight 1.25e-7 is sized for BERT's 10^8 entries; the hand model has
    # about 300, so the test uses a weight that matters at this size.
    free, penalised = density_after_burnin(l0_lambda=0.0), density_after_burnin(l0_lambda=0.05)
    assert penalised < free - 0.1
    assert penalised < 0.9  # the gates start at sigmoid(5) = 0.993


def test_diffprune_gate_logits_have_their_own_constant_lr_and_move():
    tr = hand_trainer({"name": "diffprune", "density": 0.1, "burnin_steps": 10}, max_steps=20, eval_every=10,
                      lr=1e-2, weight_decay=0.01, warmup=0.5)
    m = tr.method
    start = {}

    def spy(model, step, orig=m.before_forward):
        if not start:
            start.update({k: v.detach().clone() for k, v in m._gates.log_alpha.items()})
        if step == 9:  # last burn-in step: the gate optimizer still at 0.1 while the main lr warms up
            own = tr.optimizer.own
            assert len(own) == 1 and all(g["lr"] == 0.1 and g["weight_decay"] == 0.0 for g in own[0][1].param_groups)
            moved = max(float((start[k] - v.detach()).abs().max()) for k, v in m._gates.log_alpha.items())
            assert moved > 0.2  # in the main optimizer they moved by < 0.005 in 100 steps
            assert tr.optimizer.dense.param_groups[0]["lr"] < 0.01  # the main lr: still warming up
        orig(model, step)

    m.before_forward = spy
    tr.fit()


def test_diffprune_authors_projection_is_per_tensor_top_alpha_with_the_gate_dropped():
    tr = hand_trainer({"name": "diffprune", "density": 0.1, "burnin_steps": 6, "project_by": "alpha",
                       "topk": "per_tensor", "alpha_init": "sigmoid_randn", "stretch": [-3, 3]},
                      max_steps=7, eval_every=7, lr=0.05)
    m = tr.method
    seen = {}
    orig_write = m._write_masked

    def capture():
        seen["w"] = {n: m._gates.w[_key(n)].detach().clone() for n in m._params}
        seen["alpha"] = {n: m._gates.log_alpha[_key(n)].detach().clone() for n in m._params}
        orig_write()

    m._write_masked = capture
    plan = m.select(tr.model, tr.select_context())
    k = budget(0.1, sum(t.numel() for t in tr.theta0.values()))
    quotas = per_tensor_quotas([tr.theta0[n].numel() for n in tr.eligible], k)
    for n, q in zip(tr.eligible, quotas):
        idx = plan.sparse[n]
        assert torch.equal(idx, topk_flat(seen["alpha"][n].abs(), q)), n
        p, p0, w = tr.params[n].detach().reshape(-1), tr.theta0[n].reshape(-1), seen["w"][n].reshape(-1)
        assert torch.equal(p[idx], p0[idx] + w[idx]), n  # theta0 + w: no gate
        keep = torch.ones_like(p, dtype=torch.bool)
        keep[idx] = False
        assert torch.equal(p[keep], p0[keep])
    with pytest.raises(UserError, match="topk: per_tensor"):
        build_config({"task": "cb", "method": {"name": "diffprune", "project_by": "alpha"}, "train": {"max_steps": 600}})


def test_diffprune_l0_defaults_are_guo_et_al():
    cfg = build_config({"task": "cb", "method": {"name": "diffprune"}, "train": {"max_steps": 600}})
    assert (cfg.method["l0_reduction"], cfg.method["l0_lambda"], cfg.method["alpha_lr"]) == ("sum", 1.25e-7, 0.1)
    cfg = build_config({"task": "cb", "method": {"name": "diffprune", "l0_reduction": "mean"},
                        "train": {"max_steps": 600}})
    assert cfg.method["l0_lambda"] == 1.0


def test_diffprune_per_tensor_alpha_scales_every_gate_of_a_tensor():
    tr = hand_trainer({"name": "diffprune", "density": 0.1, "burnin_steps": 3, "per_tensor_alpha": True},
                      max_steps=4, eval_every=4, lr=0.05)
    tr.fit()
    report = tr.method.report()
    assert report["projections"] == [3]


# ------------------------------------------------------------------------ 4. Mixout


def mixout_trainer(**opts):
    tr = hand_trainer({"name": "mixout", "p": 0.7, **opts}, max_steps=4, eval_every=4)
    plan = tr.method.select(tr.model, tr.select_context())
    tr.build_optimizers(plan)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for n in tr.eligible:
            tr.params[n].add_(torch.randn(tr.params[n].shape, generator=g))
    return tr


def test_mixout_mixes_linear_weights_only_with_one_draw_per_input_column():
    tr = mixout_trainer()
    assert tr.method._mixed == ["encoder.dense.weight"]
    before = {n: tr.params[n].detach().clone() for n in tr.eligible}
    tr.method.before_forward(tr.model, 0)
    for n in tr.eligible:
        if n != "encoder.dense.weight":
            assert torch.equal(tr.params[n], before[n]), n  # biases, embeddings, LayerNorm: never mixed
    keep = tr.method._keep["encoder.dense.weight"]
    assert bool((keep == keep[0:1]).all())  # every row shares the column's draw
    w, w0 = before["encoder.dense.weight"], tr.theta0["encoder.dense.weight"]
    mixed = tr.params["encoder.dense.weight"].detach()
    assert torch.equal(mixed[:, ~keep[0]], w0[:, ~keep[0]])
    assert torch.allclose(mixed[:, keep[0]], ((w - 0.7 * w0) / 0.3)[:, keep[0]], atol=1e-5)
    tr.method.after_backward(tr.model, 0)


def test_mixout_sets_encoder_dropout_to_zero_unless_kept():
    from sam_peft.methods import build_method

    def dropouts(**opts):
        enc = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1))
        enc.config = HandEncoder().config
        model = nn.Module()
        model.encoder = enc
        build_method({"name": "mixout", "embeddings": True, "layernorm": True, "p": 0.9, "mode": "train",
                      "mask": "column", "keep_dropout": False, **opts}).wrap(model)
        return enc[1].p

    assert dropouts() == 0.0
    assert dropouts(keep_dropout=True) == 0.1
    assert dropouts(mode="eval_reset") == 0.1  # the authors' code kept dropout


def test_mixout_eval_reset_resets_at_every_evaluation_including_the_final_ones():
    tr = hand_trainer({"name": "mixout", "p": 0.5, "mode": "eval_reset"}, max_steps=8, eval_every=4, lr=0.05)
    seen = []
    orig = tr.method._reset_copy

    def spy(generator):
        seen.append(generator is tr.method._generator)
        return orig(generator)

    tr.method._reset_copy = spy
    tr.fit()
    assert seen == [True, True]  # each validation during training: the run's reset stream
    a, b = tr.evaluate("test"), tr.evaluate("test")
    assert seen[2:] == [False, False]  # final evaluations: a reset too, from a per-split stream
    assert a == b  # reproducible, so `sam-peft eval` can check it


# ------------------------------------------------------------------------ 5. LoRA


def test_lora_authors_variant_is_alpha_one_and_kaiming_b():
    cfg = build_config({"task": "cb", "method": {"name": "lora", "variant": "authors", "r": 4}})
    assert (cfg.method["alpha"], cfg.method["b_init"]) == (1.0, "kaiming")
    with pytest.raises(UserError, match="variant: authors means alpha"):
        build_config({"task": "cb", "method": {"name": "lora", "variant": "authors", "alpha": 16}})
    default = build_config({"task": "cb", "method": {"name": "lora"}})
    assert (default.method["r"], default.method["alpha"], default.method["b_init"]) == (8, 16, "zeros")


# ------------------------------------------------------------------------ 6. SAM


def test_sam_clipped_burnin_sums_clipped_gradients(monkeypatch):
    clip = 0.05
    tr = hand_trainer({"name": "sam", "density": 0.1, "burnin_steps": 3, "clip_burnin_grads": True},
                      max_steps=3, eval_every=3, grad_clip=clip)
    got = {}
    orig = SelectContext.accumulate_gradients

    def spy(*args, **kwargs):
        out = orig(*args, **kwargs)
        got.update(out["sum"])
        return out

    monkeypatch.setattr(SelectContext, "accumulate_gradients", spy)
    import copy

    model0 = copy.deepcopy(tr.model)
    tr.method.select(tr.model, tr.select_context())
    # Independently: clip_grad_norm_ over the model (eligible and head) per batch, then sum.
    sampler = iter(LengthGroupedSampler(tr.data.lengths("train"), 8, seed=tr.seed))
    from sam_peft.data import collate

    params = dict(model0.named_parameters())
    expect = {n: torch.zeros_like(params[n]) for n in tr.eligible}
    for _ in range(3):
        batch = collate([tr.data.features["train"][i] for i in next(sampler)], tr.data.pad_id)
        model0.zero_grad()
        model0.loss(model0(batch), batch["labels"]).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model0.parameters() if p.grad is not None], clip)
        for n in tr.eligible:
            expect[n] += params[n].grad
    for n in tr.eligible:
        assert torch.allclose(got[n], expect[n], rtol=1e-5, atol=1e-8), n


# ------------------------------------------------------------------------ 7. ChildTuning-D


def test_childtuning_d_fisher_is_the_mean_of_per_tensor_clipped_squared_gradients():
    clip = 0.01
    tr = hand_trainer({"name": "childprune", "density": 0.1, "variant": "fisher", "fisher_scope": "eligible"},
                      max_steps=3, eval_every=3, grad_clip=clip)
    import copy

    from sam_peft.data import collate

    model0 = copy.deepcopy(tr.model)
    plan = tr.method.select(tr.model, tr.select_context())
    n_batches = math.ceil(len(tr.data.features["train"]) / 8)
    sampler = iter(LengthGroupedSampler(tr.data.lengths("train"), 8, seed=tr.seed))
    params = dict(model0.named_parameters())
    fisher = {n: torch.zeros_like(params[n]) for n in tr.eligible}
    for _ in range(n_batches):
        batch = collate([tr.data.features["train"][i] for i in next(sampler)], tr.data.pad_id)
        model0.zero_grad()
        model0.loss(model0(batch), batch["labels"]).backward()
        for n in tr.eligible:
            torch.nn.utils.clip_grad_norm_(params[n], clip)  # each tensor on its own
            fisher[n] += params[n].grad ** 2 / n_batches
    flat = torch.cat([fisher[n].reshape(-1) for n in tr.eligible])
    k = budget(0.1, flat.numel())
    expect = set(topk_flat(flat, k).tolist())
    offsets = dict(zip(tr.eligible, itertools.accumulate([0] + [fisher[n].numel() for n in tr.eligible])))
    got = {offsets[n] + i for n, idx in plan.sparse.items() for i in idx.tolist()}
    assert got == expect


def test_childtuning_d_scores_only_the_transformer_layers_by_default():
    tr = hand_trainer({"name": "childprune", "density": 0.1, "variant": "fisher"}, max_steps=3, eval_every=3)
    with pytest.raises(UserError, match="fisher_scope"):  # the hand model has no numbered layers
        tr.method.select(tr.model, tr.select_context())


# ------------------------------------------------------------------------ 8. head initialisation


def test_head_keeps_nn_linear_default_init_as_jiant():
    torch.manual_seed(5)
    model = TaskModel(HandEncoder(), get_task("cb"))
    torch.manual_seed(5)
    HandEncoder()
    dense = nn.Linear(8, 8)
    out = nn.Linear(8, 3)
    assert torch.equal(model.head.dense.weight, dense.weight) and torch.equal(model.head.out_proj.bias, out.bias)
    hf = TaskModel(HandEncoder(), get_task("cb"), head_init="hf_normal")
    assert torch.equal(hf.head.out_proj.bias, torch.zeros(3))


def test_run_ids_carry_the_results_version(monkeypatch):
    import sam_peft.identity as identity

    cfg = build_config(tiny_run("cb", "full"))
    before = identity.run_id(cfg)
    monkeypatch.setattr(identity, "RESULTS_VERSION", identity.RESULTS_VERSION - 1)
    assert identity.run_id(cfg) != before  # results of the older readings get other ids
