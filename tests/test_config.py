"""Config loading: defaults, overrides, run ids."""

import pytest

from sam_peft.config import config_dict, parse_overrides
from sam_peft.errors import UserError
from sam_peft.identity import run_id
from sam_peft.loader import build_config, load_config
from util import tiny_run

BASE = tiny_run("cb", "sam")


def test_defaults_are_the_paper_protocol():
    cfg = build_config({"task": "cb"})
    t = cfg.train
    assert (t.batch_size, t.lr, t.max_seq_len, t.eval_every, t.patience, t.min_steps) == (16, 1e-4, 256, 500, 40, 20000)
    assert (t.weight_decay, t.grad_clip, t.warmup) == (0.01, 1.0, 0.1)
    assert cfg.model == "roberta-base"
    assert cfg.method == {"name": "sam", "embeddings": True, "layernorm": True, "density": 0.005,
                          "topk": "global", "burnin_steps": 500, "score": "squared_sum", "clip_burnin_grads": False}


def test_overrides_are_yaml_typed_and_dotted():
    assert parse_overrides(["a.b=0.01", "c=true", "d=[1, 2]", "e=text", "f="]) == [
        ("a.b", 0.01), ("c", True), ("d", [1, 2]), ("e", "text"), ("f", "")]
    cfg = build_config(BASE, ["method.density=0.01", "train.lr=2e-5", "method.topk=per_tensor", "seed=4"])
    assert cfg.method["density"] == 0.01 and cfg.train.lr == 2e-5 and cfg.method["topk"] == "per_tensor"
    assert cfg.seed == 4
    cfg = build_config(BASE, ["method={name: bitfit}"])
    assert cfg.method["name"] == "bitfit" and "density" not in cfg.method


def test_run_id_depends_on_what_is_computed_only():
    a = build_config(BASE)
    assert run_id(a) == run_id(build_config(BASE, ["output_dir=elsewhere", "train.tensorboard=true", "label=X"]))
    assert run_id(a) != run_id(build_config(BASE, ["train.lr=2e-5"]))
    assert run_id(a).startswith("cb-sam-s0-")


def test_resolved_config_round_trips(tmp_path):
    import yaml

    cfg = build_config(BASE, ["method.density=0.02"])
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config_dict(cfg)))
    again = load_config(path)
    assert config_dict(again) == config_dict(cfg) and run_id(again) == run_id(cfg)


@pytest.mark.parametrize("override,needle", [
    ("method.topk=local", "method.topk"),
    ("train.warmup=1.5", "train.warmup"),
    ("method.burnin_steps=0", "method.burnin_steps"),
    ("data.drop_fraction=1.0", "data.drop_fraction"),
    ("nokey", "expected key=value"),
])
def test_invalid_values(override, needle):
    with pytest.raises(UserError, match=needle.replace(".", r"\.")):
        build_config(BASE, [override])


def test_run_ids_identify_data_by_content_not_by_path(tmp_path, monkeypatch):
    """The same split files by a relative path, an absolute one, or "demo" are the same runs; other
    content is another run."""
    import shutil

    from sam_peft.data import demo_data_dir

    shutil.copytree(demo_data_dir(), tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    ids = {spelling: run_id(build_config({**BASE, "data_dir": spelling}))
           for spelling in ("data", "./data", str(tmp_path / "data"), "../" + tmp_path.name + "/data", "demo")}
    assert len(set(ids.values())) == 1, ids
    val = tmp_path / "data" / "data" / "cb" / "val.jsonl"
    val.write_text(val.read_text().replace("\n", "\n\n", 1))  # another file, the same records
    assert run_id(build_config({**BASE, "data_dir": "data"})) != ids["data"]
    # another task's files do not matter
    other = tmp_path / "data" / "data" / "rte" / "train.jsonl"
    other.write_text(other.read_text() + "\n")
    assert run_id(build_config({**BASE, "data_dir": "data"})) == run_id(build_config({**BASE, "data_dir": "./data"}))
    with pytest.raises(UserError, match="nowhere: no such directory"):
        run_id(build_config({**BASE, "data_dir": "nowhere"}))


def test_log_every_scales_with_the_run_by_default():
    assert build_config(BASE).train.log_every == 50  # the paper's 40,000 steps
    assert build_config(BASE, ["train.max_steps=60"]).train.log_every == 1
    assert build_config(BASE, ["train.max_steps=1000"]).train.log_every == 10
    assert build_config(BASE, ["train.max_steps=60", "train.log_every=5"]).train.log_every == 5
    assert build_config(BASE, ["train.log_every=0"]).train.log_every == 0  # off
