"""Exact parity (scripts/parity_exact.py), 20 steps on a tiny BERT built from a config: sam-peft's
per-step training losses equal transformers.Trainer's (and PEFT's LoRA) to float rounding, for
FullTuning, BitFit, LoRA and the mask rows; and each injected bug exceeds the tolerance."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (the test extra)")

from util import load_script

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20


def _script():
    return load_script("parity_exact")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from arch_models import save_tiny_encoder
    from sam_peft.data import demo_data_dir, load_splits, texts_of
    from sam_peft.tasks import get_task

    texts = []
    for task in ("stsb", "mrpc"):
        texts += texts_of(load_splits(demo_data_dir(), task, ("train",))["train"], get_task(task))
    work = tmp_path_factory.mktemp("parity")
    folder = save_tiny_encoder("bert", work / "bert", texts)
    pe = _script()
    return pe, pe.dropout_free_copy(folder, work / "nodrop")


@pytest.mark.parametrize("task", ["stsb", "mrpc"])
@pytest.mark.parametrize("method", ["full", "bitfit", "lora", "sam", "random", "magprune"])
def test_losses_agree_step_by_step(tiny_bert, method, task):
    if method == "lora":
        pytest.importorskip("peft", reason="the LoRA reference is PEFT's (the parity extra)")
    pe, model = tiny_bert
    row = pe.parity(model, "demo", task, method, STEPS, max_seq_len=64)
    assert row["steps"] == STEPS
    assert row["within"], {k: v for k, v in row.items() if k not in ("losses", "ours")}
    assert row["frozen_identical"] and row["rel_weight_diff"] <= pe.TOLERANCE
    ours = row["losses"]["sam_peft"]
    assert len(set(ours)) > 1 and ours[-1] != ours[0]  # the loss moved: both sides trained


@pytest.mark.parametrize("perturb, method", [
    ("warmup_one_longer", "full"), ("one_more_entry", "sam"), ("one_more_entry", "magprune"),
    ("decay_frozen_entries", "random"), ("one_other_batch", "bitfit"), ("no_clipping", "full")])
def test_each_injected_bug_exceeds_the_tolerance(tiny_bert, perturb, method):
    pe, model = tiny_bert
    assert perturb in pe.PERTURBATIONS
    clean = pe.parity(model, "demo", "stsb", method, STEPS, max_seq_len=64)
    assert clean["within"]
    bugged = pe.parity(model, "demo", "stsb", method, STEPS, perturb=perturb, ours=clean["ours"], max_seq_len=64)
    assert not bugged["within"], (perturb, bugged["max_rel_loss_diff"], bugged["rel_weight_diff"])
    # Each bug is caught with a margin: by the losses, by the weights, or (weight decay reaching
    # entries outside the mask) by the untrained entries, which must stay bitwise theta0.
    caught_by = {"loss": bugged["max_rel_loss_diff"] > 3 * pe.TOLERANCE,
                 "weights": bugged["rel_weight_diff"] > 3 * pe.TOLERANCE,
                 "frozen": not bugged["frozen_identical"]}
    assert any(caught_by.values()), (perturb, bugged)


def test_bad_arguments_are_one_line(capsys):
    pe = _script()
    assert pe.main(["--tasks", "copa"]) == 2
    assert pe.main(["--methods", "adapter"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "copa" in err[0] and "adapter" in err[1]


def test_report_only_renders_the_summary(tmp_path, capsys):
    import json

    pe = _script()
    row = {"method": "sam", "task": "stsb", "steps": 200, "max_abs_loss_diff": 9.2e-6, "max_rel_loss_diff": 7.2e-6,
           "rel_weight_diff": 2.6e-6, "frozen_identical": True, "tolerance": pe.TOLERANCE, "within": True}
    (tmp_path / "summary.json").write_text(json.dumps([row]))
    assert pe.main(["--out", str(tmp_path), "--report-only"]) == 0
    assert "| sam | stsb | 200 | 9.2e-06 | 7.2e-06 | 2.6e-06 | yes | yes |" in (tmp_path / "table.md").read_text()
    assert pe.main(["--out", str(tmp_path / "none"), "--report-only"]) == 2
