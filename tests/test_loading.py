"""Loading pretrained encoders: float32 whatever the checkpoint's dtype, quiet, and every way a
model cannot be had (missing or empty folder, no cache and no hub) a one-line error before
anything runs, for `run` and for every model of a sweep; and the guard against a tokenizer that
reads no text."""

import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml

from sam_peft.cli import main
from sam_peft.data import share_with_text
from sam_peft.errors import UserError
from sam_peft.model import TaskModel, build_tiny, check_model, load_pretrained
from sam_peft.tasks import get_task

TEXTS = ["The cat sat on the mat.", "A dog barked at the mailman.", "Birds sing in the morning."] * 3
RUN = {"data_dir": "demo", "task": "rte", "method": {"name": "bitfit"},
       "train": {"max_steps": 2, "eval_every": 2, "min_steps": 0, "max_seq_len": 64}}
NOT_CACHED = "sam-peft-tests/no-such-model"  # a hub id no cache holds


def saved_tiny(folder, dtype=torch.float32):
    encoder, tokenizer = build_tiny(TEXTS)
    encoder.to(dtype).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return encoder


def write_yaml(path, tree):
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def one_line_failure(args, capsys) -> str:
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_a_bf16_checkpoint_loads_in_float32_and_runs(tmp_path):
    reference = saved_tiny(tmp_path / "m", dtype=torch.bfloat16)
    encoder, tokenizer = load_pretrained(str(tmp_path / "m"))
    assert {p.dtype for p in encoder.parameters()} == {torch.float32}
    loaded = dict(encoder.named_parameters())
    for name, p in reference.named_parameters():  # the bf16 values, widened exactly
        assert torch.equal(loaded[name], p.float()), name
    batch = tokenizer(["The cat sat.", "A dog."], padding=True, return_tensors="pt")
    logits = TaskModel(encoder, get_task("rte"))(dict(batch))  # an fp32 head on the encoder: no dtype clash
    assert logits.shape == (2, 2) and logits.dtype == torch.float32


def test_loading_prints_nothing(tmp_path, capfd):
    saved_tiny(tmp_path / "m")
    capfd.readouterr()
    load_pretrained(str(tmp_path / "m"))
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # no "Loading weights" bar, no warnings


@pytest.mark.parametrize("name", ["models/x", "./x", "/nonexistent-sam-peft/x", "a/b/c"])
def test_a_missing_local_path_is_a_one_line_error(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()  # `models/x` is a path when `models/` is a folder here
    with pytest.raises(UserError, match=rf"^model '{name}': no such local folder"):
        check_model(name)
    cfg = write_yaml(tmp_path / "cfg.yaml", {**RUN, "model": name, "output_dir": str(tmp_path / "out")})
    assert f"model '{name}': no such local folder" in one_line_failure(["run", str(cfg)], capsys)
    assert not (tmp_path / "out").exists()


def test_an_empty_or_broken_model_folder_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"^model '.*empty': the folder .* is empty"):
        load_pretrained(str(tmp_path / "empty"))
    saved_tiny(tmp_path / "no-weights")
    (tmp_path / "no-weights" / "model.safetensors").unlink()
    with pytest.raises(UserError, match=r"no-weights': cannot load its weights \(OSError"):
        load_pretrained(str(tmp_path / "no-weights"))
    saved_tiny(tmp_path / "bad-config")
    (tmp_path / "bad-config" / "config.json").write_text("{not json")
    with pytest.raises(UserError, match=r"config.json is not valid JSON"):
        check_model(str(tmp_path / "bad-config"))


def test_a_hub_name_with_the_hub_off_fails_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    for attempt in (check_model, load_pretrained):
        with pytest.raises(UserError, match=rf"^model '{NOT_CACHED}': not a local folder and not in the "
                                            r"Hugging Face cache, and the hub is off \(HF_HUB_OFFLINE is set\)$"):
            attempt(NOT_CACHED)
    assert time.monotonic() - started < 30  # no network wait (a real wait is ~50 s)


def test_a_sweep_checks_every_model_before_any_run_with_the_hub_unreachable(tmp_path):
    """A real process, as a user starts it: an empty cache and a hub endpoint nobody listens on."""
    port = closed_port()
    sweep = write_yaml(tmp_path / "sweep.yaml", {
        **{k: v for k, v in RUN.items() if k not in ("task", "method")}, "model": NOT_CACHED,
        "output_dir": str(tmp_path / "runs"), "tasks": ["rte", "cb"], "seeds": 2,
        "methods": ["bitfit", {"name": "sam", "model": "./missing-model"}, {"name": "full", "model": "tiny"}]})
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_ENDPOINT=f"http://127.0.0.1:{port}")
    proc = subprocess.run([sys.executable, "-m", "sam_peft.cli", "sweep", str(sweep), "--no-progress"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"model '{NOT_CACHED}': not a local folder and not in the Hugging Face cache" in proc.stderr
    assert f"hub (http://127.0.0.1:{port}) is unreachable" in proc.stderr
    assert "model './missing-model': no such local folder" in proc.stderr
    assert not (tmp_path / "runs").exists()


def closed_port() -> int:
    """A localhost port that was free a moment ago: connections to it are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_model_in_the_hub_cache_loads_without_the_hub(tmp_path):
    """The cache is tried first: a cached model needs no network (a real process with its own HF_HOME)."""
    snapshot = tmp_path / "hf-home" / "hub" / "models--sam-peft-tests--cached" / "snapshots" / "0123abcd"
    saved_tiny(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}")
    code = ("from sam_peft.model import check_model, load_pretrained\n"
            "check_model('sam-peft-tests/cached')\n"
            "encoder, tokenizer = load_pretrained('sam-peft-tests/cached')\n"
            "print(type(encoder).__name__, len(tokenizer))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "RobertaModel"


def test_a_local_model_and_tiny_pass_the_check(tmp_path):
    saved_tiny(tmp_path / "m")
    check_model(str(tmp_path / "m"))
    check_model("tiny")


# ----------------------------------------------------------------------------- the text guard


def unknown_only_model(folder):
    """A tiny BERT whose WordPiece vocabulary holds no piece of English: every word is [UNK]."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "zzqx", "qqzx"])}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    BertTokenizerFast(tokenizer_object=backend).save_pretrained(folder)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(folder)


def test_a_tokenizer_that_reads_no_text_stops_the_run(tmp_path, capsys):
    unknown_only_model(tmp_path / "unk")
    cfg = write_yaml(tmp_path / "cfg.yaml", {**RUN, "model": str(tmp_path / "unk"), "output_dir": str(tmp_path / "out")})
    err = one_line_failure(["run", str(cfg)], capsys)
    assert f"model '{tmp_path / 'unk'}': its tokenizer (BertTokenizer" in err
    assert "reads 0% of the rte train examples as anything but special or unknown tokens" in err
    assert not (tmp_path / "out").exists()


def test_share_with_text_counts_examples_holding_an_ordinary_token():
    _, tokenizer = build_tiny(TEXTS)
    special, ordinary = tokenizer.bos_token_id, tokenizer("cat", add_special_tokens=False)["input_ids"][0]
    features = [{"input_ids": [special, ordinary, special]}, {"input_ids": [special, tokenizer.unk_token_id]},
                {"input_ids": [[special, special], [special, ordinary]]}, {"input_ids": [[special], [special]]}]
    assert share_with_text(features, tokenizer) == 0.5  # multiple choice: any choice with text counts
