"""Tests for sam_peft.prepare (`sam-peft data prepare`). No network: downloads come from local
mirrors (plain folders or file:// URLs) and the hub is replaced by tiny in-memory datasets."""

from __future__ import annotations

import hashlib
import json
import sys
import time
import types
from pathlib import Path

import pytest

from sam_peft import prepare
from sam_peft.errors import UserError
from sam_peft.prepare import prepare_data

from util import PAPER_SPLITS, SPLITS_MISSING
needs_paper_splits = pytest.mark.skipif(
    not (PAPER_SPLITS / "data").is_dir(), reason=SPLITS_MISSING
)


@pytest.fixture(autouse=True)
def fast_network(monkeypatch):
    # Keep failure paths quick: short timeout, retries without waiting.
    monkeypatch.setattr(prepare, "TIMEOUT_S", 2.0)
    monkeypatch.setattr(prepare, "RETRY_WAIT_S", 0.0)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def file_state(root: Path) -> dict:
    """(mtime_ns, inode) of every file under root: shows whether anything was rewritten."""
    return {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in sorted(root.rglob("*")) if p.is_file()}


def count_downloads(monkeypatch) -> list:
    calls = []
    real = prepare._download_once

    def spy(url, tmp, progress, label):
        calls.append(url)
        return real(url, tmp, progress, label)

    monkeypatch.setattr(prepare, "_download_once", spy)
    return calls


# ---------------------------------------------------------------- source "paper"


@needs_paper_splits
def test_pins_match_the_paper_files():
    # The pin table is the contract with the authors' repository; it must describe these files.
    for task in prepare.TASK_NAMES:
        for split in prepare.SPLITS:
            assert sha256(PAPER_SPLITS / "data" / task / f"{split}.jsonl") == prepare.PAPER_SHA256[task][split]


@needs_paper_splits
def test_paper_source_from_local_mirror(tmp_path, monkeypatch):
    out = tmp_path / "out"
    # paper_splits has the layout of the repository's data/tasks/ folder, which is what base_url names.
    result = prepare_data(out, base_url=str(PAPER_SPLITS), progress=False)
    assert result == out

    for task in prepare.TASK_NAMES:
        for split in prepare.SPLITS:
            written = out / "data" / task / f"{split}.jsonl"
            original = PAPER_SPLITS / "data" / task / f"{split}.jsonl"
            assert written.read_bytes() == original.read_bytes()
        config = json.loads((out / "configs" / f"{task}_config.json").read_text())
        expected = json.loads((PAPER_SPLITS / "configs" / f"{task}_config.json").read_text())
        assert config == expected
        # The relative paths must resolve from configs/ to the written files.
        for split, rel in config["paths"].items():
            assert (out / "configs" / rel).resolve() == (out / "data" / task / f"{split}.jsonl").resolve()

    record = json.loads((out / "PREPARED.json").read_text())
    assert sorted(record["tasks"]) == sorted(prepare.TASK_NAMES)
    for task, entry in record["tasks"].items():
        assert entry["source"] == "paper"
        assert entry["commit"] == prepare.PAPER_COMMIT
        assert entry["sha256"] == prepare.PAPER_SHA256[task]

    # Rerun: every file already verified, so nothing is downloaded and nothing is rewritten.
    before = file_state(out)
    downloads = count_downloads(monkeypatch)
    prepare_data(out, base_url=str(PAPER_SPLITS), progress=False)
    assert downloads == []
    assert file_state(out) == before

    # force: every data file is fetched again and replaced (new inode), with the same bytes.
    prepare_data(out, base_url=str(PAPER_SPLITS), force=True, progress=False)
    assert len(downloads) == len(prepare.TASK_NAMES) * len(prepare.SPLITS)
    after = file_state(out)
    for task in prepare.TASK_NAMES:
        for split in prepare.SPLITS:
            path = out / "data" / task / f"{split}.jsonl"
            assert after[path][1] != before[path][1]
            assert sha256(path) == prepare.PAPER_SHA256[task][split]


# Hand-made mirror: a few tiny files with the repository's data/tasks layout, so these tests do
# not depend on paper_splits. The pin table is patched to pin exactly these bytes.
TINY_CB = {
    "train": b'{"idx": 0, "label": "neutral", "premise": "A cat sat.", "hypothesis": "A cat is sitting."}\n',
    "val": b'{"idx": 1, "label": "entailment", "premise": "It rained.", "hypothesis": "It was dry."}\n',
    # no trailing newline, like some of the real files
    "test": b'{"idx": 2, "label": "contradiction", "premise": "He ran.", "hypothesis": "He moved."}',
}


@pytest.fixture
def tiny_mirror(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "mirror"
    (root / "data" / "cb").mkdir(parents=True)
    for split, data in TINY_CB.items():
        (root / "data" / "cb" / f"{split}.jsonl").write_bytes(data)
    monkeypatch.setitem(
        prepare.PAPER_SHA256, "cb", {split: hashlib.sha256(data).hexdigest() for split, data in TINY_CB.items()}
    )
    return root


def test_file_url_mirror_downloads_and_verifies(tiny_mirror, tmp_path):
    out = tmp_path / "out"
    prepare_data(out, tasks=["cb"], base_url=tiny_mirror.as_uri(), progress=False)
    for split, data in TINY_CB.items():
        assert (out / "data" / "cb" / f"{split}.jsonl").read_bytes() == data
    assert json.loads((out / "configs" / "cb_config.json").read_text())["paths"]["val"] == "../data/cb/val.jsonl"
    # Only the task asked for is prepared.
    assert sorted(p.name for p in (out / "configs").iterdir()) == ["cb_config.json"]
    # No temporary files left next to the data.
    assert sorted(p.name for p in (out / "data" / "cb").iterdir()) == ["test.jsonl", "train.jsonl", "val.jsonl"]


def test_corrupted_mirror_raises_and_leaves_nothing(tiny_mirror, tmp_path):
    bad = tiny_mirror / "data" / "cb" / "val.jsonl"
    data = bytearray(bad.read_bytes())
    data[10] ^= 0x01  # one byte changed
    bad.write_bytes(bytes(data))

    out = tmp_path / "out"
    with pytest.raises(UserError) as info:
        prepare_data(out, tasks=["cb"], base_url=tiny_mirror.as_uri(), progress=False)
    message = str(info.value)
    assert "sha256 mismatch" in message
    assert message.startswith(f"{tiny_mirror.as_uri()}/data/cb/val.jsonl: ")
    assert prepare.PAPER_SHA256["cb"]["val"] in message
    assert hashlib.sha256(bytes(data)).hexdigest() in message
    assert "\n" not in message
    # The bad file is not at its destination, under its name or a temporary one.
    assert not (out / "data" / "cb" / "val.jsonl").exists()
    assert [p.name for p in (out / "data" / "cb").iterdir()] == ["train.jsonl"]
    assert not (out / "configs" / "cb_config.json").exists()


def test_wrong_existing_file_is_downloaded_again(tiny_mirror, tmp_path, monkeypatch):
    out = tmp_path / "out"
    prepare_data(out, tasks=["cb"], base_url=str(tiny_mirror), progress=False)
    damaged = out / "data" / "cb" / "train.jsonl"
    damaged.write_bytes(b"not the pinned file\n")

    downloads = count_downloads(monkeypatch)
    prepare_data(out, tasks=["cb"], base_url=str(tiny_mirror), progress=False)
    assert downloads == [f"{tiny_mirror.as_uri()}/data/cb/train.jsonl"]
    assert damaged.read_bytes() == TINY_CB["train"]


def test_missing_file_in_mirror_names_the_url(tiny_mirror, tmp_path):
    (tiny_mirror / "data" / "cb" / "test.jsonl").unlink()
    with pytest.raises(UserError, match=r"/data/cb/test\.jsonl: download failed \(") as info:
        prepare_data(tmp_path / "out", tasks=["cb"], base_url=tiny_mirror.as_uri(), progress=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out" / "data" / "cb" / "test.jsonl").exists()


def test_unreachable_url_names_the_url(tmp_path):
    out = tmp_path / "out"
    start = time.monotonic()
    with pytest.raises(UserError) as info:
        prepare_data(out, tasks=["cola"], base_url="http://127.0.0.1:9/", progress=False)
    assert time.monotonic() - start < 15
    message = str(info.value)
    assert message.startswith("http://127.0.0.1:9/data/cola/train.jsonl: download failed (")
    assert "\n" not in message
    assert not any(p.is_file() for p in out.rglob("*"))


def test_base_url_that_is_neither_url_nor_folder(tmp_path):
    with pytest.raises(UserError, match="base_url is neither a URL nor an existing directory"):
        prepare_data(tmp_path / "out", base_url=str(tmp_path / "nowhere"), progress=False)


# ---------------------------------------------------------------- source "hub"

# Tiny hub-format datasets: GLUE/SuperGLUE column names, integer class ids. Each row's label is
# a function of its idx so the tests can check the mapping for every record written.
N_TRAIN, N_VALIDATION = 20, 5


def hub_rows(task: str, n: int, offset: int) -> list[dict]:
    rows = []
    for i in range(n):
        idx = offset + i
        if task == "cola":
            rows.append({"sentence": f"Sentence {idx}.", "label": idx % 2, "idx": idx})
        elif task == "stsb":
            rows.append({"sentence1": f"A {idx}.", "sentence2": f"B {idx}.", "label": (idx % 11) / 2, "idx": idx})
        elif task in ("mrpc", "rte"):
            rows.append({"sentence1": f"A {idx}.", "sentence2": f"B {idx}.", "label": idx % 2, "idx": idx})
        elif task == "cb":
            rows.append({"premise": f"P {idx}.", "hypothesis": f"H {idx}.", "label": idx % 3, "idx": idx})
        elif task == "copa":
            rows.append({
                "premise": f"P {idx}.", "choice1": f"C1 {idx}.", "choice2": f"C2 {idx}.",
                "question": ("cause", "effect")[idx % 2], "label": (idx // 2) % 2, "idx": idx,
            })
        elif task == "wsc":
            rows.append({
                "text": f"The dog {idx} barked because it was hungry .", "span1_index": 0,
                "span2_index": 5, "span1_text": "The dog", "span2_text": "it", "label": idx % 2, "idx": idx,
            })
    return rows


def fake_hub(task_rows=hub_rows) -> tuple[types.ModuleType, list]:
    calls = []
    by_id = {ids: task for task, ids in prepare.HUB_DATASETS.items()}

    def load_dataset(path, name=None, **kwargs):
        calls.append((path, name))
        task = by_id[(path, name)]
        return {"train": task_rows(task, N_TRAIN, 0), "validation": task_rows(task, N_VALIDATION, 1000)}

    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    module.__version__ = "fake"
    return module, calls


@pytest.fixture
def hub(monkeypatch):
    module, calls = fake_hub()
    monkeypatch.setitem(sys.modules, "datasets", module)
    return calls


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def shape(value):
    """A record's structure: key -> type name, recursing into nested objects."""
    if isinstance(value, dict):
        return tuple(sorted((k, shape(v)) for k, v in value.items()))
    return type(value).__name__


# Expected label per hub class id (index); stsb is a float score and is checked separately.
EXPECTED_LABELS = {
    "cola": ("0", "1"),
    "mrpc": ("0", "1"),
    "rte": ("entailment", "not_entailment"),
    "cb": ("entailment", "contradiction", "neutral"),
    "copa": (0, 1),
    "wsc": (False, True),
}


def test_hub_records_match_paper_formats_and_labels(hub, tmp_path):
    out = tmp_path / "out"
    prepare_data(out, source="hub", progress=False)
    assert hub == [prepare.HUB_DATASETS[t] for t in prepare.TASK_NAMES]
    assert ("aps/super_glue", "wsc.fixed") in hub

    for task in prepare.TASK_NAMES:
        source = {row["idx"]: row for row in hub_rows(task, N_TRAIN, 0) + hub_rows(task, N_VALIDATION, 1000)}
        written = [r for split in prepare.SPLITS for r in read_jsonl(out / "data" / task / f"{split}.jsonl")]
        assert sorted(r["idx"] for r in written) == sorted(source)
        for record in written:
            hub_label = source[record["idx"]]["label"]
            if task == "stsb":
                assert record["label"] == hub_label and isinstance(record["label"], float)
            else:
                # type() too: True == 1 and "0" != 0 must not pass by accident
                expected = EXPECTED_LABELS[task][hub_label]
                assert record["label"] == expected and type(record["label"]) is type(expected)

        config = json.loads((out / "configs" / f"{task}_config.json").read_text())
        assert config == {
            "task": task,
            "name": task,
            "paths": {s: f"../data/{task}/{s}.jsonl" for s in prepare.SPLITS},
        }

    # Spot checks of field renaming, against the hub rows above.
    rte = {r["idx"]: r for r in read_jsonl(out / "data" / "rte" / "test.jsonl")}
    assert rte[1001] == {"idx": 1001, "label": "not_entailment", "premise": "A 1001.", "hypothesis": "B 1001."}
    wsc = {r["idx"]: r for r in read_jsonl(out / "data" / "wsc" / "test.jsonl")}
    assert wsc[1000]["target"] == {"span1_index": 0, "span1_text": "The dog", "span2_index": 5, "span2_text": "it"}
    assert wsc[1000]["label"] is False
    copa = {r["idx"]: r for r in read_jsonl(out / "data" / "copa" / "test.jsonl")}
    assert copa[1003] == {
        "idx": 1003, "label": 1, "premise": "P 1003.", "question": "effect",
        "choice1": "C1 1003.", "choice2": "C2 1003.",
    }

    record = json.loads((out / "PREPARED.json").read_text())
    for task in prepare.TASK_NAMES:
        entry = record["tasks"][task]
        assert entry["source"] == "hub" and entry["seed"] == 0
        assert (entry["hub_id"], entry["hub_config"]) == prepare.HUB_DATASETS[task]
        assert entry["counts"] == {"train": 18, "val": 2, "test": N_VALIDATION}


@needs_paper_splits
def test_hub_record_shapes_equal_the_paper_files(hub, tmp_path):
    # Same keys, same nesting, same JSON types as the authors' files, task by task.
    out = tmp_path / "out"
    prepare_data(out, source="hub", progress=False)
    for task in prepare.TASK_NAMES:
        ours = {shape(r) for r in read_jsonl(out / "data" / task / "train.jsonl")}
        theirs = {shape(r) for r in read_jsonl(PAPER_SPLITS / "data" / task / "train.jsonl")}
        assert ours <= theirs, task


def test_hub_split_is_seeded_90_10_and_deterministic(hub, tmp_path):
    def prepared(name, seed):
        out = tmp_path / name
        prepare_data(out, source="hub", tasks=["rte"], seed=seed, progress=False)
        return {s: (out / "data" / "rte" / f"{s}.jsonl").read_bytes() for s in prepare.SPLITS}

    first, again, other = prepared("a", 0), prepared("b", 0), prepared("c", 1)
    assert first == again  # same seed, byte-identical files

    def idxs(data: bytes) -> list[int]:
        return [json.loads(line)["idx"] for line in data.decode().splitlines()]

    train, val = idxs(first["train"]), idxs(first["val"])
    assert len(val) == 2 and len(train) == 18
    assert sorted(train + val) == list(range(N_TRAIN))  # a partition of the hub train split
    assert idxs(first["test"]) == list(range(1000, 1000 + N_VALIDATION))  # hub validation, in order
    assert set(idxs(other["val"])) != set(val)  # the seed matters
    assert first["test"] == other["test"]  # ... but not for test


def test_hub_rerun_is_a_no_op(hub, tmp_path):
    out = tmp_path / "out"
    prepare_data(out, source="hub", tasks=["cb", "wsc"], progress=False)
    before = file_state(out)
    prepare_data(out, source="hub", tasks=["cb", "wsc"], progress=False)
    assert file_state(out) == before


def test_hub_with_real_datasets_objects(monkeypatch, tmp_path):
    # The fake above returns lists; the real library returns DatasetDict/Dataset objects.
    datasets = pytest.importorskip("datasets")

    def load_dataset(path, name=None, **kwargs):
        task = {ids: t for t, ids in prepare.HUB_DATASETS.items()}[(path, name)]
        return datasets.DatasetDict({
            "train": datasets.Dataset.from_list(hub_rows(task, N_TRAIN, 0)),
            "validation": datasets.Dataset.from_list(hub_rows(task, N_VALIDATION, 1000)),
        })

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    out = tmp_path / "out"
    prepare_data(out, source="hub", tasks=["wsc", "stsb"], progress=False)
    wsc = read_jsonl(out / "data" / "wsc" / "test.jsonl")
    assert [r["label"] for r in wsc] == [False, True, False, True, False]
    stsb = read_jsonl(out / "data" / "stsb" / "test.jsonl")
    assert [r["label"] for r in stsb] == [(i % 11) / 2 for i in range(1000, 1000 + N_VALIDATION)]


def test_hub_hidden_test_label_is_rejected(monkeypatch, tmp_path):
    # -1 is how GLUE marks a hidden label; it must never become a class silently.
    def rows(task, n, offset):
        out = hub_rows(task, n, offset)
        out[3]["label"] = -1
        return out

    module, _ = fake_hub(rows)
    monkeypatch.setitem(sys.modules, "datasets", module)
    with pytest.raises(UserError, match=r"^nyu-mll/glue \(rte\) train row 3: label -1 is not a class id 0\.\.1$"):
        prepare_data(tmp_path / "out", source="hub", tasks=["rte"], progress=False)


def test_hub_load_failure_is_one_line(monkeypatch, tmp_path):
    def load_dataset(path, name=None, **kwargs):
        raise ConnectionError("Couldn't reach 'aps/super_glue' on the Hub\n(offline)")

    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)
    with pytest.raises(UserError) as info:
        prepare_data(tmp_path / "out", source="hub", tasks=["copa"], progress=False)
    assert str(info.value).startswith("aps/super_glue (copa): cannot load (")
    assert "\n" not in str(info.value)


def test_hub_without_datasets_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(UserError) as info:
        prepare_data(tmp_path / "out", source="hub", progress=False)
    assert str(info.value) == "--source hub needs the 'datasets' package: pip install 'sam-peft[hub]'"


# ---------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tasks": ["cb", "boolq"]}, r"^tasks: unknown task 'boolq'; known: cola, stsb"),
        ({"tasks": []}, r"^tasks: empty list"),
        ({"source": "kaggle"}, r"^source: unknown source 'kaggle'"),
        ({"source": "hub", "base_url": "http://example.org/"}, r"^base_url: only used with source 'paper'"),
        ({"source": "hub", "seed": -1}, r"^seed: -1 is not a whole number in \[0, 2\^32\)"),
        ({"source": "hub", "seed": 2**32}, r"^seed: 4294967296 is not a whole number"),
    ],
)
def test_bad_arguments(kwargs, match, tmp_path):
    with pytest.raises(UserError, match=match):
        prepare_data(tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_out_is_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(UserError, match="exists and is not a directory"):
        prepare_data(target, progress=False)


def test_a_failed_prepare_leaves_no_empty_folders(tiny_mirror, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "RETRY_WAIT_S", 0.0)
    (tiny_mirror / "data" / "cb" / "train.jsonl").unlink()  # the first download fails
    out = tmp_path / "out"
    with pytest.raises(UserError, match="download failed"):
        prepare_data(out, tasks=["cb"], base_url=str(tiny_mirror), progress=False)
    assert not out.exists()
    # a folder that was there before stays, and so do files already verified
    out.mkdir()
    (tiny_mirror / "data" / "cb" / "train.jsonl").write_bytes(TINY_CB["train"])
    (tiny_mirror / "data" / "cb" / "test.jsonl").unlink()
    with pytest.raises(UserError, match="download failed"):
        prepare_data(out, tasks=["cb"], base_url=str(tiny_mirror), progress=False)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["data", "data/cb", "data/cb/train.jsonl",
                                                                       "data/cb/val.jsonl"]


def test_hub_rows_convert_by_the_task_tables_fields():
    # The task table (tasks.TASKS[...].source) says which hub column becomes which record key.
    wsc = prepare._convert("wsc", {"idx": 9, "label": 1, "text": "t u v", "span1_index": 0, "span1_text": "t",
                                   "span2_index": 2, "span2_text": "v"}, "row")
    assert wsc == {"idx": 9, "label": True, "text": "t u v",
                   "target": {"span1_index": 0, "span1_text": "t", "span2_index": 2, "span2_text": "v"}}
    stsb = prepare._convert("stsb", {"idx": 4, "label": 3.2, "sentence1": "x", "sentence2": "y"}, "row")
    assert stsb == {"idx": 4, "label": 3.2, "text_a": "x", "text_b": "y"}
    with pytest.raises(UserError, match="row: missing field 'sentence2'"):
        prepare._convert("rte", {"idx": 1, "label": 0, "sentence1": "p"}, "row")
