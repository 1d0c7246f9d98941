"""Short runs on the authors' exact splits (../shared/data/paper_splits); skipped when absent."""

import pytest
from sam_peft.data import load_splits
from sam_peft.loader import build_config
from sam_peft.run import evaluate_run, run
from util import PAPER_SPLITS, SPLITS_MISSING, tiny_run

pytestmark = pytest.mark.skipif(not PAPER_SPLITS.is_dir(), reason=SPLITS_MISSING)

SIZES = {"cola": (7695, 856, 1043), "stsb": (5166, 583, 1500), "mrpc": (3294, 374, 408), "rte": (2241, 249, 277),
         "cb": (225, 25, 56), "copa": (360, 40, 100), "wsc": (495, 59, 104)}


@pytest.mark.parametrize("task", list(SIZES))
def test_short_sam_run_on_paper_splits(tmp_path, task):
    cfg = build_config(tiny_run(task, {"name": "sam", "density": 0.005, "burnin_steps": 3}, tmp_path,
                                {"max_steps": 9, "eval_every": 3, "min_steps": 0, "max_seq_len": 128,
                                 "val_subset": 64, "eval_batch_size": 128}, seed=0, data_dir=str(PAPER_SPLITS)))
    result = run(cfg, progress=False, log=lambda *a: None)
    assert result["status"] == "done" and result["steps"] == 9 and result["scoring_steps"] == 3
    assert result["burnin_steps"] == 0  # SAM's burn-in batches are scoring, not training steps
    assert result["n_trainable"] == int(0.005 * result["n_params"])
    assert 0 < result["n_changed"] <= result["n_trainable"]
    for split in ("val", "test", "train"):
        assert result["metrics"][split]["major"] == result["metrics"][split]["major"]  # not NaN
    metrics, _ = evaluate_run(tmp_path / result["run_id"])
    assert metrics == result["metrics"]["test"]


def test_the_authors_split_sizes():
    for task, sizes in SIZES.items():
        splits = load_splits(PAPER_SPLITS, task)
        assert tuple(len(splits[s]) for s in ("train", "val", "test")) == sizes
