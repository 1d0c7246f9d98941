"""The protocol of "results that survive a learning-rate grid": the authors' lr schedule as an
option, and what a result records of where it came from."""

from __future__ import annotations

import json

import pytest
import torch

from sam_peft.cli import main
from sam_peft.engine import learning_rate, schedule
from sam_peft.errors import UserError
from sam_peft.identity import run_id
from sam_peft.loader import build_config
from util import SHORT, hand_trainer, lr_trace, tiny_run


# ------------------------------------------------------------------------ the authors' schedule


def test_schedule_epochs_sets_the_horizon_whatever_max_steps(monkeypatch):
    # 48 synthetic train examples in batches of 8: 6 batches per epoch. 3 epochs: the lr warms up
    # over round(0.25 * 18) = 4 (rounded half to even: 4) steps and reaches 0 at step 18, whether
    # the run stops at 12 or at 30 steps.
    traces = {}
    for max_steps in (12, 30):
        tr = hand_trainer({"name": "full"}, max_steps=max_steps, eval_every=6, warmup=0.25, lr=0.01,
                          schedule_epochs=3)
        assert tr.schedule.steps == (18, 4)
        traces[max_steps] = lr_trace(monkeypatch)
        tr.fit()
        monkeypatch.undo()
    expected = [learning_rate(s, 0.01, 18, 4) for s in range(30)]
    assert traces[12] == expected[:12]
    assert traces[30] == expected
    assert expected[17] > 0 and expected[18:] == [0.0] * 12


def test_without_schedule_epochs_the_horizon_is_max_steps():
    t = build_config({"task": "cb", "train": {"max_steps": 200, "warmup": 0.1}}).train
    assert schedule(t, batches_per_epoch=15) == (200, 20)
    t = build_config({"task": "cb", "train": {"max_steps": 200, "schedule_epochs": 10000}}).train
    assert schedule(t, batches_per_epoch=15) == (150000, 15000)


def test_authors_schedule_barely_ramps_on_a_large_task():
    # STS-B's authors' split: 5,166 train examples, 323 batches of 16. At step 20,000 of a 10,000-epoch
    # horizon the lr is 1e-4 * 20,000 / 323,000, about 6e-6 (CB's 15 batches: past warmup, about 1e-4).
    t = build_config({"task": "stsb", "train": {"schedule_epochs": 10000}}).train
    horizon, warmup = schedule(t, batches_per_epoch=323)
    assert learning_rate(20000, 1e-4, horizon, warmup) == pytest.approx(6.19e-6, rel=1e-3)
    horizon, warmup = schedule(t, batches_per_epoch=15)
    assert learning_rate(20000, 1e-4, horizon, warmup) == pytest.approx(9.63e-5, rel=1e-3)


def test_train_log_shows_the_schedule_s_lr(tmp_path):
    from sam_peft.run import run

    cfg = build_config(tiny_run("cb", "bitfit", tmp_path, {**SHORT, "max_steps": 8, "eval_every": 4, "batch_size": 4,
                                                           "lr": 1e-3, "warmup": 0.5, "schedule_epochs": 2,
                                                           "log_every": 1}, device="cpu"))
    result = run(cfg, progress=False, log=lambda *a: None)
    from sam_peft.data import demo_data_dir, load_splits

    n_train = len(load_splits(demo_data_dir(), "cb", "train")["train"])
    per_epoch = -(-n_train // 4)
    horizon, warmup = 2 * per_epoch, round(0.5 * 2 * per_epoch)
    log = [json.loads(line) for line in open(tmp_path / result["run_id"] / "train_log.jsonl")]
    assert [r["step"] for r in log] == list(range(1, 9))
    # A record at step s logs the lr of the update that made step s (the s-1 steps before it).
    assert [r["lr"] for r in log] == [learning_rate(s - 1, 1e-3, horizon, warmup) for s in range(1, 9)]


@pytest.mark.parametrize("value, needle", [
    ("0", "greater than or equal to 1"),
    ("-5", "greater than or equal to 1"),
    ("2.5", "expected a whole number"),
    ("ten", "expected a whole number"),
    ("true", "expected a whole number"),
])
def test_bad_schedule_epochs_is_one_line(tmp_path, capsys, value, needle):
    path = tmp_path / "run.yaml"
    path.write_text("task: cb\nmodel: tiny\ndata_dir: demo\n")
    assert main(["run", str(path), f"train.schedule_epochs={value}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.schedule_epochs" in err and needle in err, err
    assert not any(tmp_path.glob("runs"))


def test_schedule_epochs_with_warmup_steps_is_an_error(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("task: cb\nmodel: tiny\ndata_dir: demo\ntrain:\n  warmup_steps: 10\n  schedule_epochs: 100\n")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "schedule_epochs" in err and "warmup_steps" in err and "run.yaml:6" in err, err


def test_a_new_key_at_its_neutral_default_leaves_run_ids_alone():
    # Results made before train.schedule_epochs existed keep their ids: at None it is not hashed.
    base = tiny_run("cb", "sam", train={"precision": "fp32"})
    plain = run_id(build_config(base))
    assert run_id(build_config(base, ["train.schedule_epochs=null"])) == plain
    assert run_id(build_config(base, ["train.schedule_epochs=100"])) != plain


# ------------------------------------------------------------------------ fidelity items


def test_defaults_pinned_head_init_is_nn_linear_s_own():
    # jiant's heads keep nn.Linear's init: uniform weights within 1/sqrt(fan_in), non-zero biases.
    # HF's normal init would give zero biases; reverting the default must fail here.
    from sam_peft.model import TaskModel
    from sam_peft.tasks import get_task
    from util import HandEncoder

    cfg = build_config({"task": "cb"})
    assert cfg.train.head_init == "torch_default"
    model = TaskModel(HandEncoder(), get_task("cb"), head_init=cfg.train.head_init)
    for layer in (model.head.dense, model.head.out_proj):
        bound = 1 / layer.weight.shape[1] ** 0.5
        assert layer.weight.abs().max() <= bound and layer.bias.abs().min() > 0


def test_defaults_pinned_mixout_sets_dropout_to_zero():
    # Lee et al.'s examples replace every Dropout by Dropout(0) when Mixout is used.
    from torch import nn

    from sam_peft.methods import build_method, validate_method_options
    from sam_peft.model import TaskModel
    from sam_peft.tasks import get_task
    from util import HandEncoder

    opts = validate_method_options({"name": "mixout"})
    assert opts["keep_dropout"] is False and opts["mix_head"] is False
    encoder = HandEncoder()
    encoder.drop = nn.Dropout(0.1)
    model = TaskModel(encoder, get_task("cb"), dropout=0.1)
    build_method(opts).wrap(model)
    assert encoder.drop.p == 0.0
    assert model.head.dropout.p == 0.1  # the head is not the encoder: only mix_head zeroes it


def test_mixout_mix_head_mixes_the_classifier_and_drops_no_head_unit(monkeypatch):
    from torch import nn

    tr = hand_trainer({"name": "mixout", "p": 0.5, "mix_head": True}, max_steps=4, eval_every=2, lr=0.05)
    tr.model.head.dropout = nn.Dropout(0.1)
    tr.method.wrap(tr.model)
    assert tr.model.head.dropout.p == 0.0
    seen = {}
    orig = type(tr.method).before_forward

    def spy(self, model, step):
        orig(self, model, step)
        seen.setdefault("mixed", list(self._mixed))
        seen.setdefault("w", model.head.out_proj.weight.detach().clone())

    monkeypatch.setattr(type(tr.method), "before_forward", spy)
    init = tr.model.head.out_proj.weight.detach().clone()
    tr.fit()
    assert {"head.dense.weight", "head.out_proj.weight"} <= set(seen["mixed"])
    assert "encoder.dense.weight" in seen["mixed"] and "head.out_proj.bias" not in seen["mixed"]
    # At step 0 w == w0, so the mixed classifier is its initial value bit for bit.
    assert torch.equal(seen["w"], init)
    with pytest.raises(UserError, match="mix_head"):
        build_config({"task": "cb", "method": {"name": "mixout", "mix_head": True, "mode": "eval_reset"}})


def test_mixout_default_leaves_the_head_unmixed():
    tr = hand_trainer({"name": "mixout", "p": 0.5}, max_steps=2, eval_every=2, lr=0.05)
    tr.fit()
    assert not any(n.startswith("head.") for n in tr.method._mixed)


def test_diffprune_gate_head_projects_the_head_per_tensor_as_the_authors():
    # The authors' code gated every parameter, the head's too, keeping int(p * numel) entries per
    # head tensor: a bias of fewer than 1/p entries keeps none and stays at its random init.
    method = {"name": "diffprune", "density": 0.1, "burnin_steps": 4, "gate_head": True}
    tr = hand_trainer(method, max_steps=12, eval_every=4)
    init = {n: p.detach().clone() for n, p in tr.model.named_parameters() if n.startswith("head.")}
    fit = tr.fit()
    assert not fit.plan.train_head
    changed = {n: int((p != init[n]).sum()) for n, p in tr.model.named_parameters() if n.startswith("head.")}
    quota = {n: int(0.1 * t.numel()) for n, t in init.items()}
    assert quota == {"head.dense.weight": 6, "head.dense.bias": 0, "head.out_proj.weight": 2, "head.out_proj.bias": 0}
    assert {n: int(fit.plan.sparse[n].numel()) for n in init} == quota
    assert all(changed[n] <= quota[n] for n in init) and changed["head.dense.weight"] > 0
    assert torch.equal(tr.model.head.out_proj.bias, init["head.out_proj.bias"])
    # The encoder keeps its own exact budget over the eligible entries.
    m = sum(tr.params[n].numel() for n in tr.eligible)
    assert sum(int(fit.plan.sparse[n].numel()) for n in tr.eligible) == int(0.1 * m)

    default = hand_trainer({**method, "gate_head": False}, max_steps=12, eval_every=4)
    init = default.model.head.out_proj.bias.detach().clone()
    fit = default.fit()
    assert fit.plan.train_head and not any(n.startswith("head.") for n in fit.plan.sparse)
    assert not torch.equal(default.model.head.out_proj.bias, init)  # trained densely, as every method's head


def test_diffprune_gate_head_counts_the_head_apart(tmp_path):
    from sam_peft.run import run

    cfg = build_config(tiny_run("cb", {"name": "diffprune", "density": 0.05, "burnin_steps": 2, "gate_head": True},
                                tmp_path, {**SHORT, "max_steps": 4}, device="cpu"))
    result = run(cfg, progress=False, log=lambda *a: None)
    from sam_peft.selection import budget

    assert result["n_trainable_eligible"] == budget(0.05, result["n_params"])
    assert 0 < result["n_head"] < 5000  # int(p * numel) per head tensor, not the whole head


# ------------------------------------------------------------------------ ties at zero


def test_tie_report_counts_entries_top_k_filled_by_position():
    from sam_peft.selection import tie_report, topk_entries

    scores = {"a": torch.tensor([0.0, 3.0, 0.0, 1.0]), "b": torch.tensor([0.0, 0.0, 2.0])}
    chosen = topk_entries(scores, 5, "global")
    assert tie_report(scores, chosen) == {"k": 5, "n_positive_scores": 3, "n_chosen_without_positive_score": 2}
    chosen = topk_entries(scores, 3, "global")
    assert tie_report(scores, chosen)["n_chosen_without_positive_score"] == 0
    # Per tensor: enough positive scores overall, but not in tensor b's quota.
    chosen = topk_entries({"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0, 0.0])}, 2, "per_tensor")
    assert tie_report({"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0, 0.0])}, chosen) == {
        "k": 2, "n_positive_scores": 2, "n_chosen_without_positive_score": 1}


def test_a_run_records_positive_scores_and_warns_when_top_k_fills_by_position(tmp_path):
    from sam_peft.run import run

    def sam_run(**method):
        lines = []
        cfg = build_config(tiny_run("rte", {"name": "sam", "burnin_steps": 2, **method}, tmp_path, SHORT,
                                    device="cpu"))
        return run(cfg, progress=False, log=lines.append), lines

    # Per tensor at p = 0.5: the position table's rows beyond the longest example get no gradient,
    # yet that tensor must fill half its entries.
    result, lines = sam_run(density=0.5, topk="per_tensor")
    k = result["n_trainable_eligible"]
    assert result["n_chosen_without_positive_score"] > 0 and result["n_positive_scores"] > k
    assert result["warnings"] and "by position" in result["warnings"][0]
    assert any("warning" in line and "by position" in line for line in lines)
    result, lines = sam_run(density=0.01)
    assert result["n_chosen_without_positive_score"] == 0
    assert not any("by position" in w for w in result["warnings"])
    assert result["n_positive_scores"] >= result["n_trainable_eligible"]


def test_methods_without_a_top_k_record_none(tmp_path):
    from sam_peft.run import run

    cfg = build_config(tiny_run("rte", "bitfit", tmp_path, SHORT, device="cpu"))
    result = run(cfg, progress=False, log=lambda *a: None)
    assert result["n_positive_scores"] is None and result["n_chosen_without_positive_score"] is None


# ------------------------------------------------------------------------ the authors' protocol configs


def test_authors_configs_turn_on_every_authors_reading():
    from sam_peft.sweep_expand import load_sweep

    configs = __import__("pathlib").Path(__file__).resolve().parents[1] / "configs"
    sweep = load_sweep(configs / "table1_authors.yaml", ["data_dir=demo"])
    cfgs = {r.cfg.method["name"]: r.cfg for r in sweep.runs}
    for cfg in cfgs.values():
        assert (cfg.train.schedule_epochs, cfg.train.val_subset, cfg.train.max_steps) == (10000, 500, 40000)
    assert cfgs["random"].method["variant"] == "bernoulli"
    assert cfgs["mixout"].method["mode"] == "eval_reset"
    assert {k: cfgs["magprune"].method[k] for k in ("burnin_steps", "topk", "reset")} == {
        "burnin_steps": 500, "topk": "per_tensor", "reset": False}
    assert (cfgs["lora"].method["variant"], cfgs["lora"].method["train_head"]) == ("authors", False)
    dp = cfgs["diffprune"].method
    assert (dp["stretch"], dp["alpha_init"], dp["alpha_lr"], dp["l0_reduction"], dp["project_by"], dp["topk"],
            dp["gate_head"]) == ((-3.0, 3.0), "sigmoid_randn", None, "mean", "alpha", "per_tensor", True)
    assert cfgs["childprune"].method["topk"] == "per_tensor"
    assert (cfgs["sam"].method["topk"], cfgs["sam"].method["clip_burnin_grads"]) == ("per_tensor", True)
    table2 = load_sweep(configs / "table2_authors.yaml", ["data_dir=demo"])
    assert {r.cfg.train.schedule_epochs for r in table2.runs} == {10000}
    assert {r.cfg.data.drop_fraction for r in table2.runs} == {0.1}


@pytest.mark.parametrize("table", ["1", "2"])
def test_reproduce_scripts_authors_switch(table, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "OUT": str(tmp_path / "out")}
    done = subprocess.run(["bash", str(root / f"scripts/reproduce_table{table}.sh"), "--authors", "data_dir=demo",
                           "--dry-run"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith("1120 runs") and str(tmp_path / "out" / "runs") in done.stdout
    assert not (tmp_path / "out").exists()  # a dry run writes nothing, no tables either


# ------------------------------------------------------------------------ learning-rate grids


def test_lr_and_lr_x_burnin_grids_choose_per_row_on_val(tmp_path, capsys):
    from pathlib import Path

    import yaml

    from sam_peft.report.results import load_results
    from sam_peft.report.select import select_on

    config = Path(__file__).resolve().parents[1] / "configs" / "demo_lr_grid.yaml"
    tree = yaml.safe_load(config.read_text())
    tree.update({"output_dir": str(tmp_path / "runs"), "tasks": ["rte"]})
    tree["train"]["max_steps"] = 6
    tree["train"]["min_steps"] = 6
    tree["train"]["eval_every"] = 3
    tree["methods"][2]["grid"]["method"]["burnin_steps"] = [2, 3]
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    assert main(["sweep", str(path), "--no-progress"]) == 0
    results = load_results(tmp_path / "runs")
    labels = sorted(set(r.label for r in results.runs))
    assert labels == sorted(["FullTuning lr=0.0001", "FullTuning lr=0.001", "Random lr=0.001", "Random lr=0.01",
                             "SAM lr=0.001 burnin_steps=2", "SAM lr=0.001 burnin_steps=3",
                             "SAM lr=0.01 burnin_steps=2", "SAM lr=0.01 burnin_steps=3"])
    for r in results.runs:  # the grid values reached the runs
        assert r.result["method_options"].get("burnin_steps") in (None, r.grid.get("method.burnin_steps"))
        assert (r.config or {})["train"]["lr"] == r.grid["train.lr"]
    chosen, choices = select_on(results, "val")
    assert sorted(c.row for c in choices) == ["FullTuning", "Random", "SAM"]
    for c in choices:  # each row's choice is its best mean val over its grid points
        means = {}
        for r in results.done():
            if r.row == c.row:
                means.setdefault(r.label, []).append(r.metric("val"))
        best = max(sum(v) / len(v) for v in means.values())
        assert c.score == pytest.approx(best) and c.candidates == (4 if c.row == "SAM" else 2)
    capsys.readouterr()
    assert main(["table", str(tmp_path / "runs"), "--select-on", "val"]) == 0
    out = capsys.readouterr().out
    assert "| SAM |" in out and "SAM / rte: lr=" in out and "burnin_steps=" in out


# ------------------------------------------------------------------------ provenance


def test_every_record_says_its_machine_precision_and_versions(tmp_path, monkeypatch):
    import transformers

    import sam_peft
    from sam_peft.run import run

    cfg = build_config(tiny_run("rte", "bitfit", tmp_path, SHORT, device="cpu", threads=1))
    result = run(cfg, progress=False, log=lambda *a: None)
    machine = result["machine"]
    assert machine["threads"] == 1 and machine["gpu"] is None and machine["device"] == machine["cpu"]
    assert machine["cpu"] and isinstance(machine["cores"], int) and isinstance(machine["cpu_native_bf16"], bool)
    assert result["precision"] == "fp32"
    assert result["versions"]["torch"] == torch.__version__
    assert result["versions"]["transformers"] == transformers.__version__
    assert result["versions"]["sam_peft"] == sam_peft.__version__

    # A run that fails keeps the same record: its machine and precision are known too.
    from sam_peft.engine import Trainer

    def boom(self, resume=None):
        raise RuntimeError("boom")

    monkeypatch.setattr(Trainer, "fit", boom)
    failing = build_config({**cfg.model_dump(), "seed": 1})
    with pytest.raises(RuntimeError):
        run(failing, progress=False, log=lambda *a: None)
    record = json.loads(next(p for p in tmp_path.glob("rte-bitfit-s1-*/result.json")).read_text())
    assert record["status"] == "failed" and record["precision"] == "fp32" and record["machine"]["threads"] == 1


def test_cpu_model_is_read_from_cpuinfo():
    from sam_peft.device import cpu_model

    assert cpu_model("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t: fpu\n") == "AMD EPYC 7B13"
    assert cpu_model("processor\t: 0\n")  # no model name line: platform's answer, never empty


def test_authors_schedule_script_prints_every_task(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from sam_peft.data import demo_data_dir

    script = Path(__file__).resolve().parents[1] / "scripts" / "authors_schedule.py"
    done = subprocess.run([sys.executable, str(script), "--data", str(demo_data_dir())], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and not line.startswith("| task")]
    assert [r.split("|")[1].strip() for r in rows] == ["cola", "stsb", "mrpc", "rte", "cb", "copa", "wsc"]
    done = subprocess.run([sys.executable, str(script), "--data", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1


def test_a_run_at_the_trivial_score_is_warned_about(tmp_path):
    import unittest.mock

    import numpy as np

    import sam_peft.model as model_lib
    from sam_peft.data import demo_data_dir, load_splits
    from sam_peft.run import run

    # A head that always predicts the train split's majority class (a zero output layer whose
    # bias favours it by far): val and test then score exactly the trivial score.
    majority = int(np.bincount([e.label for e in load_splits(demo_data_dir(), "rte", "train")["train"]]).argmax())
    orig = model_lib.TaskModel.__init__

    def constant_head(self, *a, **k):
        orig(self, *a, **k)
        with torch.no_grad():
            self.head.out_proj.weight.zero_()
            self.head.out_proj.bias.zero_()
            self.head.out_proj.bias[majority] = 100.0

    lines = []
    cfg = build_config(tiny_run("rte", "bitfit", tmp_path, {**SHORT, "lr": 1e-6}, device="cpu"))
    with unittest.mock.patch.object(model_lib.TaskModel, "__init__", constant_head):
        result = run(cfg, progress=False, log=lines.append)
    for split in ("val", "test"):
        assert result["metrics"][split]["major"] == pytest.approx(result["trivial"][split])
    assert any("trivial score" in w for w in result["warnings"])
    assert any("warning" in line and "trivial score" in line for line in lines)
