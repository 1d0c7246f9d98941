"""The contract every registered method keeps, checked by looping over `list_methods()`: a new
method module is tested by this file without being named in it.

For each method, on the tiny model and the demo data: a run finishes; its counts are exact for
its category; entries outside what it trained are bit-identical to theta0; base + delta
reproduces its test metrics (`evaluate_run`); and a run killed after a checkpoint resumes to the
same result as an uninterrupted one.
"""

from __future__ import annotations

import pytest

from sam_peft import run as run_lib
from sam_peft.methods import list_methods, method_class
from sam_peft.params import head_names
from sam_peft.selection import budget
from util import cfg_for, check_resume

# Small values for options that set a method's cost on the tiny model.
SMALL = {"density": 0.01, "burnin_steps": 4, "r": 2, "reduction": 8}


def small_options(name: str) -> dict:
    fields = method_class(name).Options.model_fields
    return {"name": name, **{k: v for k, v in SMALL.items() if k in fields}}


@pytest.mark.slow
@pytest.mark.parametrize("name", list_methods())
def test_method_contract(name, tmp_path, monkeypatch):
    method = small_options(name)
    cls = method_class(name)
    cfg = cfg_for(tmp_path / "plain", method)
    result = run_lib.run(cfg, progress=False, log=lambda *a: None)
    assert result["status"] == "done" and result["training_steps"] == cfg.train.max_steps

    fresh = run_lib.build(cfg, splits=("train", "test"))
    params = dict(fresh.model.named_parameters())
    m = sum(params[n].numel() for n in fresh.eligible)
    assert result["n_params"] == m and result["n_head"] == sum(params[n].numel() for n in head_names(fresh.model))
    trained = result["n_trainable_eligible"]
    if cls.category == "sparse":
        assert trained == budget(method["density"], m)
    elif cls.category == "full":
        assert trained == m
    elif cls.category == "subset":
        assert 0 < trained < m
    elif cls.category == "added":
        assert result["n_added"] > 0 and trained == 0
    else:
        pytest.fail(f"method '{name}': unknown category {cls.category!r}")
    assert result["n_changed"] <= trained  # nothing outside the trained entries moved
    shares = result["mask_share"]["groups"]
    assert sum(g["chosen"] for g in shares.values()) == trained

    metrics, _ = run_lib.evaluate_run(tmp_path / "plain" / result["run_id"])
    assert metrics == result["metrics"]["test"]  # base + delta = the trained model

    check_resume(tmp_path / "resume", method, monkeypatch)


def test_every_method_says_how_tables_show_it():
    for name in list_methods():
        cls = method_class(name)
        assert cls.display and cls.category in ("full", "sparse", "added", "subset"), name
    rows = sorted(method_class(n).paper_row for n in list_methods() if method_class(n).paper_row)
    assert rows == list(range(1, len(rows) + 1))  # the paper's rows, each once
