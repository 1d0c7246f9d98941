"""Bad input: one line naming the file, line or key; exit status 2; no traceback; no run dir."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

from sam_peft.cli import main
from sam_peft.data import demo_data_dir
from util import tiny_run

BASE = tiny_run("rte", "bitfit", train={"max_steps": 4, "eval_every": 2, "min_steps": 0})


def write_cfg(tmp_path, tree=None, text=None) -> Path:
    path = tmp_path / "cfg.yaml"
    tree = dict(tree or BASE)
    tree.setdefault("output_dir", str(tmp_path / "out"))
    path.write_text(text if text is not None else yaml.safe_dump(tree, sort_keys=False))
    return path


def run_cli(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip()
    return code, err


def data_copy(tmp_path) -> Path:
    dst = tmp_path / "data"
    shutil.copytree(demo_data_dir(), dst)
    return dst


def assert_clean_failure(code, err, tmp_path, *needles):
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir())


def test_unknown_nested_key_names_line_and_suggests(tmp_path, capsys):
    text = yaml.safe_dump({**BASE, "output_dir": str(tmp_path / "out")}, sort_keys=False)
    text = text.replace("max_steps", "max_stepz")
    path = write_cfg(tmp_path, text=text)
    line = next(i for i, x in enumerate(text.splitlines(), 1) if "max_stepz" in x)
    code, err = run_cli(["run", str(path)], capsys)
    assert_clean_failure(code, err, tmp_path, f"cfg.yaml:{line}", "train.max_stepz", "did you mean 'train.max_steps'")


def test_unknown_top_level_key(tmp_path, capsys):
    path = write_cfg(tmp_path, {**BASE, "sed": 3})
    code, err = run_cli(["run", str(path)], capsys)
    assert_clean_failure(code, err, tmp_path, "unknown key 'sed'", "did you mean 'seed'")


def test_unknown_task(tmp_path, capsys):
    path = write_cfg(tmp_path, {**BASE, "task": "cbb"})
    code, err = run_cli(["run", str(path)], capsys)
    assert_clean_failure(code, err, tmp_path, "cfg.yaml:", "unknown task 'cbb'", "did you mean 'cb'")


def test_unknown_method(tmp_path, capsys):
    path = write_cfg(tmp_path, {**BASE, "method": {"name": "samm"}})
    code, err = run_cli(["run", str(path)], capsys)
    assert_clean_failure(code, err, tmp_path, "unknown method 'samm'", "did you mean 'sam'")


def test_unknown_method_option_suggests(tmp_path, capsys):
    path = write_cfg(tmp_path, {**BASE, "method": {"name": "sam", "densty": 0.1}})
    code, err = run_cli(["run", str(path)], capsys)
    assert_clean_failure(code, err, tmp_path, "method.densty", "did you mean 'method.density'")


@pytest.mark.parametrize("value", ["1.5", "0", "-0.1", "1"])
def test_density_outside_open_interval(tmp_path, capsys, value):
    path = write_cfg(tmp_path, {**BASE, "method": {"name": "sam"}})
    code, err = run_cli(["run", str(path), f"method.density={value}"], capsys)
    assert_clean_failure(code, err, tmp_path, f"override 'method.density={value}'", "method.density")


def test_bad_override_syntax_and_types(tmp_path, capsys):
    path = write_cfg(tmp_path)
    code, err = run_cli(["run", str(path), "train.lr=fast"], capsys)
    assert_clean_failure(code, err, tmp_path, "override 'train.lr=fast'", "train.lr")
    code, err = run_cli(["run", str(path), "train.max_steps=-3"], capsys)
    assert_clean_failure(code, err, tmp_path, "train.max_steps")


def test_missing_config_and_invalid_yaml(tmp_path, capsys):
    code, err = run_cli(["run", str(tmp_path / "nope.yaml")], capsys)
    assert_clean_failure(code, err, tmp_path, "nope.yaml", "no such config file")
    path = write_cfg(tmp_path, text="task: rte\nmethod: {name: sam\n")
    code, err = run_cli(["run", str(path)], capsys)
    assert_clean_failure(code, err, tmp_path, "cfg.yaml:", "invalid YAML")


def test_missing_data_dir_and_file(tmp_path, capsys):
    path = write_cfg(tmp_path, {**BASE, "data_dir": str(tmp_path / "nodata")})
    code, err = run_cli(["run", str(path)], capsys)
    assert_clean_failure(code, err, tmp_path, "nodata")
    data = data_copy(tmp_path)
    (data / "data" / "rte" / "val.jsonl").unlink()
    path = write_cfg(tmp_path, {**BASE, "data_dir": str(data)})
    code, err = run_cli(["run", str(path)], capsys)
    assert_clean_failure(code, err, tmp_path, "val.jsonl")


def test_malformed_jsonl_names_file_and_line(tmp_path, capsys):
    data = data_copy(tmp_path)
    f = data / "data" / "rte" / "train.jsonl"
    lines = f.read_text().splitlines()
    lines[6] = lines[6][:-5]  # truncate the 7th record
    f.write_text("\n".join(lines) + "\n")
    path = write_cfg(tmp_path, {**BASE, "data_dir": str(data)})
    code, err = run_cli(["run", str(path)], capsys)
    assert_clean_failure(code, err, tmp_path, "train.jsonl:7")


def test_label_outside_label_set(tmp_path, capsys):
    data = data_copy(tmp_path)
    f = data / "data" / "rte" / "test.jsonl"
    lines = f.read_text().splitlines()
    lines[2] = lines[2].replace('"not_entailment"', '"maybe"').replace('"entailment"', '"maybe"')
    f.write_text("\n".join(lines) + "\n")
    path = write_cfg(tmp_path, {**BASE, "data_dir": str(data)})
    code, err = run_cli(["run", str(path)], capsys)
    assert_clean_failure(code, err, tmp_path, "test.jsonl:3", "maybe")


def test_model_that_cannot_load(tmp_path, capsys):
    path = write_cfg(tmp_path, {**BASE, "model": str(tmp_path / "no-such-model")})
    code, err = run_cli(["run", str(path)], capsys)
    assert_clean_failure(code, err, tmp_path, "no-such-model")


def test_eval_of_missing_run_dir(tmp_path, capsys):
    code, err = run_cli(["eval", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "no such run directory" in err and len(err.splitlines()) == 1


def test_real_process_prints_no_traceback(tmp_path):
    path = write_cfg(tmp_path, {**BASE, "task": "cbb"})
    proc = subprocess.run([sys.executable, "-m", "sam_peft.cli", "run", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr and "unknown task" in proc.stderr


# ---------------------------------------------------------------- config files: bytes, keys, types


def line_of(path: Path, needle: str) -> int:
    return next(i for i, x in enumerate(path.read_text(errors="replace").splitlines(), 1) if needle in x)


def test_config_that_is_not_utf8_names_the_line(tmp_path, capsys):
    text = yaml.safe_dump({**BASE, "output_dir": str(tmp_path / "out")}, sort_keys=False)
    path = tmp_path / "cfg.yaml"
    path.write_bytes(text.replace("bitfit", "bitf\xefit").encode("latin-1"))  # a Latin-1 byte, not UTF-8
    code, err = run_cli(["run", str(path)], capsys)
    assert_clean_failure(code, err, tmp_path, f"cfg.yaml:{line_of(path, 'bitf')}: not UTF-8 text (byte 0xef)")


def test_a_key_given_twice_is_rejected_with_its_line(tmp_path, capsys):
    text = yaml.safe_dump({**BASE, "output_dir": str(tmp_path / "out")}, sort_keys=False)
    text = text.replace("  max_steps: 4\n", "  max_steps: 4\n  eval_every: 1\n")  # eval_every twice under train
    path = write_cfg(tmp_path, text=text)
    lines = [i for i, x in enumerate(text.splitlines(), 1) if "eval_every" in x]
    code, err = run_cli(["run", str(path)], capsys)
    assert_clean_failure(code, err, tmp_path, f"cfg.yaml:{lines[1]}: key 'eval_every' is given twice in one mapping "
                                              f"(first at line {lines[0]})")
    # the same in an override's mapping
    code, err = run_cli(["run", str(write_cfg(tmp_path)), "method={name: sam, name: bitfit}"], capsys)
    assert_clean_failure(code, err, tmp_path, "override 'method={name: sam, name: bitfit}': key 'name' is given twice")


@pytest.mark.parametrize("override, message", [
    ("train.lr=true", "key 'train.lr': expected a number, got the boolean true"),
    ("train.max_steps=true", "key 'train.max_steps': expected a whole number, got the boolean true"),
    ("train.max_steps=2.5", "key 'train.max_steps': expected a whole number, got 2.5"),
    ("train.group_by_length=1", "key 'train.group_by_length': expected true or false, got 1"),
    ("seed=false", "key 'seed': expected a whole number, got the boolean false"),
    ("method.density=true", "key 'method.density': expected a number, got the boolean true"),
    ("method.burnin_steps=true", "key 'method.burnin_steps': expected a number, got the boolean true"),
    ("train.lr='1e-3'", "key 'train.lr': expected a number, got the string '1e-3'"),
])
def test_strict_types_a_boolean_is_not_a_number(tmp_path, capsys, override, message):
    path = write_cfg(tmp_path, {**BASE, "method": {"name": "sam", "density": 0.01, "burnin_steps": 2}})
    code, err = run_cli(["run", str(path), override], capsys)
    assert_clean_failure(code, err, tmp_path, f"override '{override}'", message)


@pytest.mark.parametrize("override, key", [
    ("train.lr=.inf", "train.lr"),
    ("train.grad_clip=.nan", "train.grad_clip"),
    ("train.adam_betas=[0.9, .nan]", "train.adam_betas.1"),
    ("data.drop_fraction=.nan", "data.drop_fraction"),
    ("method.alpha_init=-.inf", "method.alpha_init"),
    ("method.stretch=[-.inf, 1.5]", "method.stretch.0"),
])
def test_non_finite_numbers_are_rejected_in_any_float(tmp_path, capsys, override, key):
    path = write_cfg(tmp_path, {**BASE, "method": {"name": "diffprune", "burnin_steps": 2}})
    code, err = run_cli(["run", str(path), override], capsys)
    assert_clean_failure(code, err, tmp_path, f"override '{override}'", f"key '{key}': expected a finite number")


@pytest.mark.parametrize("override, message", [
    ("train.adam_betas=[0.9, 1.0]", "each beta must be in [0, 1), got [0.9, 1.0]"),
    ("train.adam_betas=[-0.1, 0.999]", "each beta must be in [0, 1)"),
    ("train.adam_eps=0", "train.adam_eps"),
    ("seed=-1", "key 'seed': expected a number greater than or equal to 0, got -1"),
    ("seed=4294967296", "key 'seed': expected a number less than 4294967296, got 4294967296"),
    ("data.drop_seed=-3", "key 'data.drop_seed'"),
])
def test_values_torch_or_the_generators_would_reject(tmp_path, capsys, override, message):
    code, err = run_cli(["run", str(write_cfg(tmp_path)), override], capsys)
    assert_clean_failure(code, err, tmp_path, f"override '{override}'", message)


def test_exponents_without_a_decimal_point_are_numbers(tmp_path):
    from sam_peft.loader import load_config

    path = write_cfg(tmp_path, text="task: rte\ntrain:\n  lr: 2e-5\n  adam_eps: 1E-6\n")
    cfg = load_config(path, ["train.weight_decay=1e-3"])
    assert (cfg.train.lr, cfg.train.adam_eps, cfg.train.weight_decay) == (2e-5, 1e-6, 1e-3)


def test_the_same_checks_in_sweep_files_and_their_overrides(tmp_path, capsys):
    sweep = {k: v for k, v in BASE.items() if k not in ("task", "method")}
    sweep.update(tasks=["rte"], methods=["bitfit"], output_dir=str(tmp_path / "out"))
    text = yaml.safe_dump(sweep, sort_keys=False)
    path = tmp_path / "sweep.yaml"
    path.write_text(text + "seeds: 2\nseeds: 3\n")
    code, err = run_cli(["sweep", str(path)], capsys)
    assert_clean_failure(code, err, tmp_path, f"sweep.yaml:{len(text.splitlines()) + 2}: key 'seeds' is given twice")
    path.write_text(text + "seeds: [0, -1]\n")
    code, err = run_cli(["sweep", str(path)], capsys)
    assert_clean_failure(code, err, tmp_path, f"sweep.yaml:{len(text.splitlines()) + 1}", "key 'seed'",
                         "greater than or equal to 0")
    path.write_text(text)
    for override, message in (("train.lr=true", "expected a number, got the boolean true"),
                              ("grid.train.lr=[1.0e-3, .inf]", "expected a finite number, got inf"),
                              ("methods.bitfit.train.max_steps=true", "expected a whole number")):
        code, err = run_cli(["sweep", str(path), override], capsys)
        assert_clean_failure(code, err, tmp_path, f"override '{override}'", message)
    path.write_bytes(text.encode() + b"label: caf\xe9\n")
    code, err = run_cli(["sweep", str(path), "--dry-run"], capsys)
    assert_clean_failure(code, err, tmp_path, f"sweep.yaml:{len(text.splitlines()) + 1}: not UTF-8 text")


def test_a_density_that_trains_nothing_fails_before_the_run_directory(tmp_path, capsys):
    """floor(p*m) = 0 is only known once the model is built: still one line, naming the key."""
    path = write_cfg(tmp_path, {**BASE, "method": {"name": "sam", "density": 1e-9, "burnin_steps": 2}})
    code, err = run_cli(["run", str(path)], capsys)
    assert_clean_failure(code, err, tmp_path, "method.density 1e-09: floor(p*m) is 0 for the m = ",
                         "eligible entries of 'tiny', so no entry would train")


def test_a_drop_fraction_that_leaves_nothing_names_the_key(tmp_path, capsys):
    path = write_cfg(tmp_path, {**BASE, "data": {"drop_fraction": 0.999}})
    code, err = run_cli(["run", str(path)], capsys)
    assert_clean_failure(code, err, tmp_path, "data.drop_fraction 0.999: no training examples left")
    assert "demo_data" not in err


# ---------------------------------------------------------------- the wrong kind of config, overrides


def test_a_sweep_config_given_to_run_and_a_run_config_given_to_sweep(tmp_path, capsys):
    configs = Path(__file__).resolve().parents[1] / "configs"
    code, err = run_cli(["run", str(configs / "demo.yaml")], capsys)
    assert code == 2 and err.endswith(
        f"demo.yaml:{line_of(configs / 'demo.yaml', 'tasks:')}: this is a sweep config (it has 'tasks'); "
        f"run it with `sam-peft sweep {configs / 'demo.yaml'}`")
    code, err = run_cli(["sweep", str(configs / "demo_run.yaml"), "--dry-run"], capsys)
    assert code == 2 and "this is a run config (it has 'task', no 'tasks' or 'methods'); run it with `sam-peft run" in err


@pytest.mark.parametrize("override, message", [
    ("tasks=[rte", "override 'tasks=[rte': malformed list ("),
    ("method={name: sam", "override 'method={name: sam': malformed mapping ("),
    ("label=\"SAM", "malformed quoted string"),
])
def test_a_malformed_list_override_says_so(tmp_path, capsys, override, message):
    sweep = {k: v for k, v in BASE.items() if k not in ("task", "method")}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({**sweep, "tasks": ["rte"], "methods": ["bitfit"],
                                    "output_dir": str(tmp_path / "out")}))
    command = "sweep" if override.startswith("tasks") else "run"
    code, err = run_cli([command, str(path if command == "sweep" else write_cfg(tmp_path)), override], capsys)
    assert_clean_failure(code, err, tmp_path, message)


# ---------------------------------------------------------------- output folders


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_an_output_dir_that_is_a_file(tmp_path, capsys, command):
    blocker = tmp_path / "out"
    blocker.write_text("not a folder\n")
    if command == "run":
        path = write_cfg(tmp_path, {**BASE, "output_dir": str(blocker)})
    else:
        path = tmp_path / "sweep.yaml"
        tree = {k: v for k, v in BASE.items() if k not in ("task", "method")}
        path.write_text(yaml.safe_dump({**tree, "output_dir": str(blocker), "tasks": ["rte"], "methods": ["bitfit"]}))
    code, err = run_cli([command, str(path)], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"output_dir '{blocker}': {blocker} is a file, not a folder" in err
    assert blocker.read_text() == "not a folder\n"
    # below a file
    code, err = run_cli([command, str(path), f"output_dir={blocker / 'runs'}"], capsys)
    assert code == 2 and f"{blocker} is a file, not a folder, so {blocker / 'runs'} cannot be created" in err


def run_cli_as_nobody(args) -> tuple[int, str]:
    """`sam-peft ARGS` in a forked child that runs as the user nobody (root ignores permission
    bits); returns its exit status and stderr. Modules are imported here, before the fork: nobody
    may not be allowed to read the Python installation."""
    import encodings.utf_8_sig  # noqa: F401 - what the commands import lazily
    import sam_peft.executors  # noqa: F401
    import sam_peft.run  # noqa: F401
    import sam_peft.sweep  # noqa: F401

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 70
        try:
            os.close(read)
            os.dup2(write, 2)
            sys.stderr = os.fdopen(2, "w", buffering=1)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            code = main(args)
        except BaseException:  # noqa: BLE001 - shown to the test, which then fails on it
            import traceback

            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as f:
        err = f.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err


@pytest.mark.skipif(not hasattr(os, "fork") or not hasattr(os, "setuid"), reason="POSIX users and fork")
@pytest.mark.parametrize("command", ["run", "sweep"])
def test_an_output_dir_that_cannot_be_written(command):
    """Permission bits, as a user they apply to: as root, the CLI runs in a child as nobody."""
    if os.getuid() != 0:
        pytest.skip("needs root to act as another user")  # (a non-root user could chmod; root ignores it)
    root = Path(tempfile.mkdtemp())  # tmp_path's parents are private to root: nobody could not reach it
    try:
        root.chmod(0o755)
        locked = root / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        tree = {k: v for k, v in BASE.items() if k not in ("task", "method")}
        tree["output_dir"] = str(locked / "runs")
        tree.update({"task": "rte", "method": {"name": "bitfit"}} if command == "run" else
                    {"tasks": ["rte"], "methods": ["bitfit"]})
        path = root / "cfg.yaml"
        path.write_text(yaml.safe_dump(tree))
        path.chmod(0o644)
        code, err = run_cli_as_nobody([command, str(path), "--no-progress"])
        assert code == 2, err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert f"output_dir '{locked / 'runs'}': {locked} is not writable by this user" in err
        assert not list(locked.iterdir())
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- models and deltas


def test_max_seq_len_beyond_the_position_table_is_rejected_up_front(tmp_path, capsys):
    """A longer train.max_seq_len than the encoder has positions used to crash at the first long batch."""
    from sam_peft.model import build_tiny

    encoder, tokenizer = build_tiny(["A few words of text.", "Another short sentence here."], max_seq_len=64)
    encoder.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")  # a RoBERTa with 256 + 2 positions
    path = write_cfg(tmp_path, {**BASE, "model": str(tmp_path / "model"),
                                "train": {**BASE["train"], "max_seq_len": 300}})
    code, err = run_cli(["run", str(path)], capsys)
    assert_clean_failure(code, err, tmp_path, f"train.max_seq_len 300: the encoder '{tmp_path / 'model'}' takes at "
                                              "most 256 tokens (258 position embeddings less RoBERTa's offset of 2); "
                                              "set train.max_seq_len to 256 or less")


def test_position_limit_of_encoders_without_an_offset():
    from transformers import BertConfig, BertModel

    from sam_peft.model import position_limit

    bert = BertModel(BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=16, max_position_embeddings=40))
    assert position_limit(bert) == (40, 40, 0)
    assert position_limit(torch.nn.Linear(2, 2)) is None  # no config: nothing to check


def test_eval_with_another_runs_delta_fails_in_one_line(tmp_path, capsys):
    path = write_cfg(tmp_path)
    for seed in (0, 1):
        assert main(["run", str(path), f"seed={seed}", "--no-progress"]) == 0
    out = tmp_path / "out"
    mine, other = (next(out.glob(f"rte-bitfit-s{seed}-*")) for seed in (0, 1))
    shutil.copy(other / "delta.safetensors", mine / "delta.safetensors")
    capsys.readouterr()
    code, err = run_cli(["eval", str(mine)], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.endswith(f"{mine / 'delta.safetensors'}: the delta of another run ({other.name}): its seed is 1, "
                        "this folder's config.yaml has 0")
    # the run ids disagree (folders mixed up by hand): caught even where the configs agree
    result = json.loads((other / "result.json").read_text())
    (other / "result.json").write_text(json.dumps({**result, "run_id": mine.name}))
    code, err = run_cli(["eval", str(other)], capsys)
    assert code == 2 and f"the delta of run {other.name}, but this folder holds run {mine.name}" in err
