"""scripts/parity.py's pure parts: the verdict, the trivial (majority / chance) scores, resume.

No model is built and nothing trains: these run in about a second.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from sam_peft.errors import UserError
from sam_peft.metrics import compute

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def parity():
    spec = importlib.util.spec_from_file_location("parity_script", ROOT / "scripts" / "parity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_verdict_parity_when_the_sides_overlap(parity):
    from scipy.stats import ttest_ind

    a, b = [80.1, 81.0, 79.5], [80.4, 79.9, 81.2]
    v = parity.verdict(a, b, trivial=50.0)
    assert v.startswith("no difference detected at n = 3/3 (p=")
    low, high = ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert f"95% CI [{low:+.2f}, {high:+.2f}]" in v


def test_verdict_names_the_higher_side(parity):
    assert parity.verdict([85.0, 85.5, 84.8], [80.0, 80.3, 79.7], trivial=50.0).startswith("sam-peft higher (p=")
    assert parity.verdict([70.0, 70.4, 69.8], [80.0, 80.3, 79.7], trivial=50.0).startswith("reference higher (p=")


def test_verdict_p_value_is_welchs(parity):
    from scipy.stats import ttest_ind

    a, b = [85.0, 86.5, 84.8, 83.0], [80.0, 84.3, 79.7]
    p = ttest_ind(a, b, equal_var=False).pvalue
    assert parity.welch_p(a, b) == pytest.approx(p)
    assert f"p={p:.2g}" in parity.verdict(a, b, trivial=50.0)


def test_both_sides_at_the_trivial_score_is_uninformative_not_parity(parity):
    # e.g. RTE's majority class: every run predicts it, both sides agree, and that says nothing.
    v = parity.verdict([52.71, 52.71, 52.71], [52.71, 52.71, 52.71], trivial=52.71)
    assert v.startswith("uninformative")
    # within the margin above it, still uninformative
    assert parity.verdict([53.2, 52.71, 53.0], [52.9, 52.71, 53.5], trivial=52.71).startswith("uninformative")


def test_one_side_learning_is_informative(parity):
    v = parity.verdict([52.71, 52.71, 52.71], [60.0, 62.0, 61.0], trivial=52.71)
    assert v.startswith("reference higher")


def test_constant_samples(parity):
    assert parity.welch_p([70.0, 70.0], [70.0, 70.0]) == 1.0
    assert parity.welch_p([70.0, 70.0], [71.0, 71.0]) == 0.0
    assert parity.verdict([70.0, 70.0], [70.0, 70.0], trivial=40.0) == "no difference detected at n = 2/2 (p=1.00)"


def test_too_few_runs(parity):
    assert parity.verdict([80.0], [81.0, 82.0], trivial=50.0) == "too few runs (1 vs 2)"


def test_trivial_scores_of_a_classification_task(parity):
    labels = [0] * 7 + [1] * 3  # RTE ids: 7 "entailment", 3 "not_entailment"
    s = parity.trivial_scores("rte", labels, draws=200)
    assert s["majority"] == pytest.approx(70.0)
    # shuffled labels: expected accuracy 0.7^2 + 0.3^2 = 58%
    assert s["chance"] == pytest.approx(58.0, abs=2.0)
    assert s["trivial"] == s["majority"]


def test_trivial_scores_use_the_tasks_metric(parity):
    # CB: jiant's mean of accuracy and the macro F1 over three classes, for the majority class.
    labels = [1] * 5 + [0] * 3 + [2] * 2
    expected = compute("cb", [1] * 10, labels)["major"]
    assert parity.trivial_scores("cb", labels, draws=5)["majority"] == pytest.approx(expected)
    # STS-B: a constant prediction has no correlation: 0; shuffled labels about 0 too.
    s = parity.trivial_scores("stsb", [0.5, 1.0, 2.5, 3.0, 4.5, 5.0, 2.0, 1.5], draws=50)
    assert s["majority"] == 0.0 and abs(s["chance"]) < 10


def test_reference_run_ids_follow_what_is_computed(parity):
    a = parity.reference_jobs("models/m", "data", ["cb"], ["full"], [0], "fp32")[0]
    again = parity.reference_jobs("models/m", "data", ["cb"], ["full"], [0], "fp32")[0]
    assert a.run_id == again.run_id and a.run_id.startswith("cb-full-s0-")
    other_precision = parity.reference_jobs("models/m", "data", ["cb"], ["full"], [0], "bf16")[0]
    other_steps = parity.reference_jobs("models/m", "data", ["cb"], ["full"], [0], "fp32",
                                        {**parity.PROTOCOL, "max_steps": 10})[0]
    assert len({a.run_id, other_precision.run_id, other_steps.run_id}) == 3


def test_resume_skips_done_and_failed_runs(parity, tmp_path):
    jobs = parity.reference_jobs("models/m", "data", ["cb"], ["full", "bitfit"], [0, 1], "fp32")
    done, failed = jobs[0], jobs[1]
    for job, status in ((done, "done"), (failed, "failed")):
        (tmp_path / f"{job.run_id}.json").write_text(json.dumps({"run_id": job.run_id, "status": status}))

    def status(job):
        return parity.reference_status(tmp_path / f"{job.run_id}.json", job.run_id)

    assert parity.pending(jobs, status) == jobs[2:]
    assert parity.pending(jobs, status, retry_failed=True) == jobs[1:]


def test_a_foreign_result_file_is_an_error(parity, tmp_path):
    job = parity.reference_jobs("models/m", "data", ["cb"], ["full"], [0], "fp32")[0]
    path = tmp_path / f"{job.run_id}.json"
    path.write_text(json.dumps({"run_id": "something-else", "status": "done"}))
    with pytest.raises(UserError, match="not a result of reference run"):
        parity.reference_status(path, job.run_id)
    path.write_text('{"run_id": "cb-full')  # cut short: not written by the script (atomic writes)
    with pytest.raises(UserError, match="not valid JSON"):
        parity.reference_status(path, job.run_id)


def test_the_sweep_config_is_the_protocol(parity, tmp_path):
    from sam_peft.loader import build_config

    cfg = parity.sweep_config("models/m", "data", tmp_path, ["cb"], ["full", "lora", "bitfit"], [0, 1], "fp32")
    assert [m["train"]["lr"] for m in cfg["methods"]] == [5e-5, 5e-4, 1e-3]
    run = build_config({k: v for k, v in cfg.items() if k not in ("tasks", "seeds", "methods")}
                       | {"task": "cb", "method": {"name": "full"}})
    p = parity.PROTOCOL
    assert (run.train.max_steps, run.train.batch_size, run.train.max_seq_len, run.train.eval_every) == \
        (p["max_steps"], p["batch_size"], p["max_seq_len"], p["eval_every"])
    assert run.train.patience * run.train.eval_every > run.train.max_steps and run.train.min_steps == 0
    assert run.train.precision == "fp32"  # explicit, never `auto`: the run id says what ran


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "copa"], "is not one of"),
    (["--methods", "adapter"], "is not one of"),
    (["--seeds", "0"], "at least 1"),
    (["--data", "no/such/dir", "--report-only"], "no jiant-layout data"),
])
def test_bad_input_is_one_line_and_exit_2(parity, argv, message, capsys, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    try:
        code = parity.main(["--model", str(model), "--out", str(tmp_path / "out"), *argv])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_stock_head_keeps_the_run_ids_of_the_committed_results(parity):
    """`--reference-head stock` computes what the study computed before the option existed, so its
    run ids are those of the committed stock-head results; the default (jiant) gets new ones."""
    committed = sorted((ROOT / "results" / "parity" / "reference").glob("stsb-full-s0-*.json"))
    results = [json.loads(p.read_text()) for p in committed]
    stock = [r for r in results if "head" not in r["settings"]]
    if not stock:
        pytest.skip("no committed stock-head reference result")
    st = stock[0]["settings"]
    job = parity.reference_jobs(st["model"], st["data_dir"], ["stsb"], ["full"], [0], st["precision"],
                                st["protocol"], head="stock")[0]
    assert job.run_id == stock[0]["run_id"] and "head" not in job.settings
    jiant = parity.reference_jobs(st["model"], st["data_dir"], ["stsb"], ["full"], [0], st["precision"],
                                  st["protocol"])[0]
    assert jiant.settings["head"] == "jiant" and jiant.run_id != job.run_id


@pytest.mark.parametrize("n_out", [1, 3])
def test_jiant_head_computes_sam_peft_s_head(parity, n_out):
    """use_jiant_head turns BERT's one-layer classifier into sam-peft's ClassificationHead: with the
    same weights, the same logits from the same pooled output (dropout off)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from sam_peft.model import ClassificationHead

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, num_labels=n_out)
    model = BertForSequenceClassification(cfg)
    parity.use_jiant_head(model)
    model.eval()
    ours = ClassificationHead(16, n_out, cfg.hidden_dropout_prob).eval()
    dense, _, dropout, out = model.classifier
    assert dropout.p == cfg.hidden_dropout_prob
    ours.dense.load_state_dict(dense.state_dict())
    ours.out_proj.load_state_dict(out.state_dict())
    ids = torch.randint(0, 50, (3, 7))
    pooled = model.bert(input_ids=ids).pooler_output
    torch.testing.assert_close(model(input_ids=ids).logits, ours(pooled), rtol=0, atol=0)
    trainable = sum(p.numel() for p in model.classifier.parameters())
    assert trainable == sum(p.numel() for p in ours.parameters()) == 16 * 16 + 16 + 16 * n_out + n_out


@pytest.mark.parametrize("family", ["roberta", "distilbert", "electra"])
def test_jiant_head_refuses_heads_it_cannot_match(parity, family):
    """RoBERTa's class drops the pooler that sam-peft (as jiant) feeds its head, DistilBERT's adds a
    ReLU layer, ELECTRA's uses GELU: swapping the classifier would not give sam-peft's model, so
    the jiant head is refused with a one-line error naming the way out."""
    import transformers

    name = {"roberta": "Roberta", "distilbert": "DistilBert", "electra": "Electra"}[family]
    size = dict(dim=16, n_layers=1, n_heads=2, hidden_dim=32) if family == "distilbert" else \
        dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    cfg = getattr(transformers, f"{name}Config")(vocab_size=50, num_labels=2, **size)
    model = getattr(transformers, f"{name}ForSequenceClassification")(cfg)
    head = model.classifier
    with pytest.raises(parity.UserError, match="--reference-head stock"):
        parity.use_jiant_head(model)
    assert model.classifier is head


def test_jiant_head_check_passes_a_bert_layout_model(parity, tmp_path):
    """The up-front check builds the model from its config alone (meta device, no weights) and
    lets a BERT-layout model through."""
    from transformers import BertConfig

    BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=32).save_pretrained(tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
    parity.check_reference_head(str(tmp_path))  # raises UserError for a head it cannot match


def test_jiant_head_check_names_a_model_folder_without_a_config(parity, tmp_path):
    with pytest.raises(parity.UserError, match=f"model '{tmp_path}'"):
        parity.check_reference_head(str(tmp_path))


def test_jiant_head_is_checked_before_any_run(parity, tmp_path, monkeypatch, capsys):
    """A model whose head cannot be matched stops parity.py with exit 2 and one line, before a run
    starts or a result folder is written."""
    from transformers import RobertaConfig

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(parity, "_version", lambda package: "1.0")  # peft need not be installed
    RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=32).save_pretrained(tmp_path / "model")
    argv = ["--model", "model", "--data", str(ROOT / "sam_peft" / "demo_data"), "--tasks", "mrpc",
            "--methods", "full", "--seeds", "1", "--out", "out"]
    assert parity.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "RobertaForSequenceClassification" in err and "--reference-head stock" in err
    assert not (tmp_path / "out").exists()


def test_report_only_leaves_the_sweep_file_alone(parity, tmp_path, monkeypatch, capsys):
    """A report over a subset of the cells writes the table but not sweep.yaml, which stays the
    plan the runs came from."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "sweep.yaml").write_text("# the study's own plan\n")
    data = ROOT / "sam_peft" / "demo_data"
    argv = ["--model", "model", "--data", str(data), "--tasks", "mrpc", "--methods", "bitfit", "--seeds", "2",
            "--out", "out", "--report-only"]
    assert parity.main(argv) == 0
    assert (out / "sweep.yaml").read_text() == "# the study's own plan\n"
    table = (out / "table.md").read_text()
    assert "| mrpc | BitFit | - | - |" in table and "mrpc/bitfit sam-peft: 0 of 2 runs" in table
