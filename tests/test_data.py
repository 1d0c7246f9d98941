"""Task table, jiant-layout reader, collate and batch order."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sam_peft.data import (
    Example,
    LengthGroupedSampler,
    collate,
    demo_data_dir,
    eval_batches,
    load_splits,
    read_split,
    task_paths,
)
from sam_peft.errors import UserError
from sam_peft.tasks import TASKS, get_task

from util import PAPER_SPLITS, SPLITS_MISSING

# Record counts from the README of the shared data folder (shared/data/README.md).
PAPER_COUNTS = {
    "cola": (7695, 856, 1043),
    "stsb": (5166, 583, 1500),
    "mrpc": (3294, 374, 408),
    "rte": (2241, 249, 277),
    "cb": (225, 25, 56),
    "copa": (360, 40, 100),
    "wsc": (495, 59, 104),
}


def write_lines(path: Path, lines: list[str], trailing_newline: bool = True) -> Path:
    path.write_text("\n".join(lines) + ("\n" if trailing_newline else ""), encoding="utf-8")
    return path


def rec(**fields) -> str:
    return json.dumps(fields)


# --- task table -----------------------------------------------------------------------


def test_task_table():
    assert sorted(TASKS) == ["cb", "cola", "copa", "mrpc", "rte", "stsb", "wsc"]
    assert get_task("cb").labels == ("neutral", "entailment", "contradiction")
    assert get_task("copa").prompts["effect"] == "What happened as a result?"
    assert get_task("stsb").label_range == (0.0, 5.0)


def test_unknown_task_suggests_the_closest_name():
    with pytest.raises(UserError) as err:
        get_task("cbb")
    assert str(err.value) == (
        "unknown task 'cbb' (did you mean 'cb'?); known: cb, cola, copa, mrpc, rte, stsb, wsc"
    )
    with pytest.raises(UserError, match=r"^unknown task 'squad'; known: cb,"):
        get_task("squad")


# --- task_paths -----------------------------------------------------------------------


def test_task_paths_resolve_relative_to_configs():
    paths = task_paths(demo_data_dir(), "rte")
    assert paths == {split: demo_data_dir() / "data" / "rte" / f"{split}.jsonl"
                     for split in ("train", "val", "test")}


def test_task_paths_errors(tmp_path):
    with pytest.raises(UserError, match=r"nope: no such directory"):
        task_paths(tmp_path / "nope", "rte")
    with pytest.raises(UserError) as err:
        task_paths(tmp_path, "rte")
    assert str(err.value) == (
        f"{tmp_path}/configs/rte_config.json: no such file "
        "(get the data with `sam-peft data prepare --out DIR`)"
    )
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "rte_config.json").write_text('{"task": "rte", "paths": {')
    with pytest.raises(UserError, match=r"rte_config.json: malformed JSON"):
        task_paths(tmp_path, "rte")
    (configs / "rte_config.json").write_text(json.dumps({"task": "rte", "paths": {"train": "a.jsonl"}}))
    with pytest.raises(UserError, match=r"rte_config.json: no path for split 'val'"):
        task_paths(tmp_path, "rte")
    assert task_paths(tmp_path, "rte", splits=("train",)) == {"train": configs / "a.jsonl"}


# --- read_split: accepted input -------------------------------------------------------


def test_counts_records_not_newlines(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", [
        rec(idx=7, label="1", text="Fine."),
        "",
        "   ",
        rec(label=0, text="Bad fine."),  # no idx: the guid uses the line number
    ], trailing_newline=False)
    examples = read_split(path, get_task("cola"), "val")
    assert examples == [
        Example(guid="val-7", inputs={"text": "Fine."}, label=1),
        Example(guid="val-4", inputs={"text": "Bad fine."}, label=0),
    ]


def test_label_variants(tmp_path):
    wsc = {"text": "Ann met Bo and she smiled.", "span1_index": 0, "span1_text": "Ann",
           "span2_index": 4, "span2_text": "she"}
    path = write_lines(tmp_path / "wsc.jsonl", [
        json.dumps({**wsc, "label": "true"}),  # flat span keys, label as a string
        json.dumps({"text": wsc["text"], "target": {k: v for k, v in wsc.items() if k != "text"},
                    "label": False}),
    ])
    examples = read_split(path, get_task("wsc"), "train")
    assert [example.label for example in examples] == [1, 0]
    assert examples[0].inputs == examples[1].inputs  # both formats end up nested
    assert examples[0].inputs["target"]["span2_text"] == "she"

    copa = dict(premise="It rained.", question="effect", choice1="Wet.", choice2="Dry.")
    path = write_lines(tmp_path / "copa.jsonl", [rec(**copa, label="1"), rec(**copa, label=0)])
    assert [example.label for example in read_split(path, get_task("copa"), "train")] == [1, 0]

    path = write_lines(tmp_path / "stsb.jsonl", [rec(text_a="a", text_b="b", label=3)])
    (example,) = read_split(path, get_task("stsb"), "train")
    assert example.label == 3.0 and isinstance(example.label, float)


# --- read_split: errors with file:line ------------------------------------------------

GOOD_RTE = rec(premise="P.", hypothesis="H.", label="entailment")
WSC_TEXT = "The cat chased the mouse because it was hungry ."


def wsc_line(**target) -> str:
    base = {"span1_index": 0, "span1_text": "The cat", "span2_index": 6, "span2_text": "it"}
    return json.dumps({"text": WSC_TEXT, "target": {**base, **target}, "label": True})


@pytest.mark.parametrize("task, bad_line, message", [
    ("rte", '{"premise": "P.", "hypothesis": ', "malformed JSON"),
    ("rte", "[1, 2]", "expected a JSON object, got an array"),
    ("rte", rec(premise="P.", label="entailment"), "missing field 'hypothesis'"),
    ("rte", rec(premise="P.", hypothesis=3, label="entailment"), "field 'hypothesis' must be a string"),
    ("rte", rec(premise="P.", hypothesis="H."), "label missing"),
    ("rte", rec(premise="P.", hypothesis="H.", label="maybe"),
     "label 'maybe' is not one of 'entailment', 'not_entailment'"),
    ("cb", rec(premise="P.", hypothesis="H.", label="Entailment"),
     "label 'Entailment' is not one of 'neutral', 'entailment', 'contradiction'"),
    ("cola", rec(text="T.", label=2), "label 2 is not one of '0', '1'"),
    ("copa", rec(premise="P.", question="effect", choice1="a", choice2="b", label=True),
     "label true is not one of 0, 1"),
    ("wsc", json.dumps({"text": WSC_TEXT, "span1_index": 0, "span1_text": "The cat",
                        "span2_index": 6, "span2_text": "it", "label": 1}),
     "label 1 is not one of false, true"),
    ("stsb", rec(text_a="a", text_b="b", label="4.0"), "label '4.0' is not a number"),
    ("stsb", rec(text_a="a", text_b="b", label=5.5), "label 5.5 is outside the range 0.0..5.0"),
    ("copa", rec(premise="P.", question="why", choice1="a", choice2="b", label=0),
     "question 'why' is not one of 'cause', 'effect'"),
    ("wsc", wsc_line(span2_index=10), "target.span2_index 10 with 1 word(s) is out of range of text (10 words)"),
    ("wsc", wsc_line(span1_index=9, span1_text="hungry now"), "target.span1_index 9 with 2 word(s) is out of range"),
    ("wsc", wsc_line(span1_index=-1), "target.span1_index -1 with 2 word(s) is out of range"),
    ("wsc", json.dumps({"text": WSC_TEXT, "target": {"span1_index": 0}, "label": True}),
     "missing field 'target.span1_text'"),
])
def test_reader_errors_name_file_and_line(tmp_path, task, bad_line, message):
    good = {
        "rte": GOOD_RTE,
        "cb": rec(premise="P.", hypothesis="H.", label="neutral"),
        "cola": rec(text="T.", label="0"),
        "copa": rec(premise="P.", question="cause", choice1="a", choice2="b", label=1),
        "wsc": wsc_line(),
        "stsb": rec(text_a="a", text_b="b", label=1.5),
    }[task]
    # The bad record sits on line 3, after a good record and a blank line.
    path = write_lines(tmp_path / "split.jsonl", [good, "", bad_line, good])
    with pytest.raises(UserError) as err:
        read_split(path, get_task(task), "train")
    text = str(err.value)
    assert text.startswith(f"{path}:3: ")
    assert message in text
    assert "\n" not in text


def test_empty_and_missing_files(tmp_path):
    path = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(UserError, match=r"empty.jsonl: no records \(empty file\)"):
        read_split(path, get_task("rte"), "train")
    with pytest.raises(UserError, match=r"absent.jsonl: no such file"):
        read_split(tmp_path / "absent.jsonl", get_task("rte"), "train")


# --- whole data sets ------------------------------------------------------------------


@pytest.mark.parametrize("task", sorted(TASKS))
def test_demo_data_loads_and_is_balanced(task):
    splits = load_splits(demo_data_dir(), task)
    assert {split: len(examples) for split, examples in splits.items()} == {"train": 40, "val": 12, "test": 12}
    spec = get_task(task)
    for examples in splits.values():
        assert len({example.guid for example in examples}) == len(examples)
        if spec.labels is None:
            scores = [example.label for example in examples]
            assert min(scores) < 1.5 and max(scores) > 3.5
        else:
            counts = [sum(example.label == c for example in examples) for c in range(len(spec.labels))]
            assert min(counts) >= len(examples) // len(spec.labels) - 1


@pytest.mark.parametrize("task", sorted(PAPER_COUNTS))
def test_paper_splits_record_counts(task):
    if not PAPER_SPLITS.is_dir():
        pytest.skip(SPLITS_MISSING)
    splits = load_splits(PAPER_SPLITS, task)
    counts = tuple(len(splits[split]) for split in ("train", "val", "test"))
    assert counts == PAPER_COUNTS[task]


# --- collate --------------------------------------------------------------------------


def test_collate_pads_pairs_and_keeps_type_ids():
    features = [
        {"input_ids": [5, 6, 7], "token_type_ids": [0, 0, 1], "label": 1},
        {"input_ids": [5, 6, 7, 8, 9], "token_type_ids": [0, 0, 1, 1, 1], "label": 0},
    ]
    batch = collate(features, pad_id=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 1, 1], [5, 6, 7, 8, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 1, 0, 0], [0, 0, 1, 1, 1]]
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [1, 0]
    assert "spans" not in batch


def test_collate_regression_labels_are_float():
    batch = collate([{"input_ids": [0, 4, 2], "label": 3.5}, {"input_ids": [0, 2], "label": 1.0}], pad_id=1)
    assert batch["labels"].dtype == torch.float32
    assert "token_type_ids" not in batch
    assert batch["input_ids"].shape == (2, 3)


def test_collate_multiple_choice_pads_every_choice_to_the_batch_width():
    features = [
        {"input_ids": [[0, 4, 2], [0, 4, 5, 2]], "label": 0},
        {"input_ids": [[0, 2], [0, 6, 7, 8, 9, 2]], "label": 1},
    ]
    batch = collate(features, pad_id=1)
    assert batch["input_ids"].shape == (2, 2, 6)
    assert batch["attention_mask"].shape == (2, 2, 6)
    assert batch["input_ids"][0, 0].tolist() == [0, 4, 2, 1, 1, 1]
    assert batch["attention_mask"][1, 0].tolist() == [1, 1, 0, 0, 0, 0]
    assert batch["attention_mask"].sum().item() == 3 + 4 + 2 + 6


def test_collate_spans():
    features = [
        {"input_ids": [0, 4, 5, 6, 2], "spans": [[1, 2], [3, 3]], "label": 1},
        {"input_ids": [0, 4, 2], "spans": [[1, 1], [1, 1]], "label": 0},
    ]
    batch = collate(features, pad_id=1)
    assert batch["spans"].shape == (2, 2, 2) and batch["spans"].dtype == torch.long
    assert batch["spans"][0].tolist() == [[1, 2], [3, 3]]


# --- batch order ----------------------------------------------------------------------

LENGTHS = [(i * 37) % 23 + 3 for i in range(103)]


def take(sampler, n):
    return [sampler.next_batch() for _ in range(n)]


def test_sampler_covers_every_example_once_per_epoch():
    sampler = LengthGroupedSampler(LENGTHS, batch_size=8, seed=3, mega_batch=4)
    per_epoch = sampler.batches_per_epoch
    assert per_epoch == 13  # 103 = 12 * 8 + 7: the partial batch is kept
    for _ in range(3):
        batches = take(sampler, per_epoch)
        assert sorted(i for batch in batches for i in batch) == list(range(103))
        assert sorted(len(batch) for batch in batches)[0] == 7


def test_sampler_groups_similar_lengths():
    # One mega-batch holds everything, so every batch is a slice of the length-sorted
    # order: the batches' length ranges must not overlap.
    sampler = LengthGroupedSampler(LENGTHS, batch_size=8, seed=0, group_by_length=True, mega_batch=100)
    batches = take(sampler, sampler.batches_per_epoch)
    ranges = sorted((min(LENGTHS[i] for i in b), max(LENGTHS[i] for i in b)) for b in batches)
    for (_, high), (low, _) in zip(ranges, ranges[1:]):
        assert high <= low
    # ...while the batch order itself is shuffled, not longest-first.
    firsts = [max(LENGTHS[i] for i in batch) for batch in batches]
    assert firsts != sorted(firsts, reverse=True)


def test_sampler_is_deterministic_and_seed_dependent():
    a = take(LengthGroupedSampler(LENGTHS, 8, seed=1), 30)
    b = take(LengthGroupedSampler(LENGTHS, 8, seed=1), 30)
    c = take(LengthGroupedSampler(LENGTHS, 8, seed=2), 30)
    assert a == b
    assert a != c
    # Epochs differ from one another.
    assert a[:13] != a[13:26]


def test_no_two_seeds_share_an_epoch_order():
    # seed + epoch seeded epoch e, so seed k's epoch 0 was seed 0's epoch k: the ten seeds of a
    # table saw nearly one batch stream. Every (seed, epoch) order must be its own.
    n = 1000
    orders = {}
    for seed in range(10):
        sampler = LengthGroupedSampler([5] * n, batch_size=16, seed=seed)
        for epoch in range(5):
            order = tuple(i for batch in sampler.epoch_batches(epoch) for i in batch)
            assert sorted(order) == list(range(n))
            orders[(seed, epoch)] = order
    assert len(set(orders.values())) == len(orders) == 50


def _pairs_meeting(batches) -> set[tuple[int, int]]:
    return {(a, b) for batch in batches for a in batch for b in batch if a < b}


@pytest.mark.parametrize("group_by_length", [False, True])
def test_example_pairs_meet_again_across_seeds_at_chance(group_by_length):
    # Of the pairs of examples that share a batch under one seed, the share that share one again
    # under another seed (any epoch of each) must be what independent shuffles give: about
    # (b - 1) / (n - 1) without length grouping. Length grouping puts similar lengths together
    # by design, so there the chance level comes from shuffles under unrelated seeds.
    n, b = 1000, 16
    lengths = [(i * 37) % 23 + 3 for i in range(n)]

    def meetings(seed, epoch):
        return _pairs_meeting(LengthGroupedSampler(lengths, b, seed, group_by_length).epoch_batches(epoch))

    shares = []
    for seed_a, seed_b in [(0, k) for k in range(1, 10)] + [(3, 7), (8, 9)]:
        for epoch_a, epoch_b in [(0, 0), (seed_b - seed_a, 0), (0, 1)]:
            a, other = meetings(seed_a, epoch_a), meetings(seed_b, epoch_b)
            shares.append(len(a & other) / len(a))
    if group_by_length:
        chance = np.mean([len(meetings(1000 + k, 0) & meetings(2000 + k, 0)) / len(meetings(1000 + k, 0))
                          for k in range(5)])
    else:
        chance = (b - 1) / (n - 1)
    # The old stream gave a share of 1.0 for (seed 0, epoch k) against (seed k, epoch 0).
    assert max(shares) < 2 * chance
    assert abs(np.mean(shares) - chance) < 0.2 * chance


@pytest.mark.parametrize("group_by_length", [True, False])
@pytest.mark.parametrize("stop_after", [0, 5, 13, 20])
def test_sampler_resumes_the_same_stream(group_by_length, stop_after):
    reference = take(LengthGroupedSampler(LENGTHS, 8, seed=5, group_by_length=group_by_length), 40)
    first = LengthGroupedSampler(LENGTHS, 8, seed=5, group_by_length=group_by_length)
    head = take(first, stop_after)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint file
    second = LengthGroupedSampler(LENGTHS, 8, seed=5, group_by_length=group_by_length)
    second.load_state_dict(state)
    assert head + take(second, 40 - stop_after) == reference
    assert set(state) == {"epoch", "position"}


def test_sampler_iterates_forever():
    sampler = LengthGroupedSampler([3, 1, 2], batch_size=2, seed=0)
    stream = iter(sampler)
    batches = [next(stream) for _ in range(10)]
    assert sampler.state_dict() == {"epoch": 5, "position": 0}
    assert all(sorted(batches[k] + batches[k + 1]) == [0, 1, 2] for k in range(0, 10, 2))


def test_eval_batches_longest_first_cover_all():
    lengths = [5, 9, 1, 9, 3]
    batches = eval_batches(lengths, batch_size=2)
    assert batches == [[1, 3], [0, 4], [2]]


def test_every_task_kind_has_its_reading_and_encoding():
    from sam_peft.data import KIND_IO
    from sam_peft.tasks import KINDS, TASKS

    assert set(KIND_IO) == set(KINDS) and {spec.kind for spec in TASKS.values()} <= set(KINDS)


def test_every_task_kind_has_its_head_loss_and_predictions():
    from sam_peft.model import HEAD_KINDS, TaskModel, build_tiny
    from sam_peft.tasks import KINDS, TASKS

    assert set(HEAD_KINDS) == set(KINDS)
    # One task of each kind through the real head: the loss is a finite scalar, the
    # predictions have one entry per example.
    encoder, tokenizer = build_tiny(["a small corpus of words for the tokenizer"] * 4, 32)
    for kind in KINDS:
        spec = next(s for s in TASKS.values() if s.kind == kind)
        model = TaskModel(encoder, spec, dropout=0.0)
        B, L = 3, 8
        ids = torch.randint(5, 20, (B, 2, L) if kind == "multiple_choice" else (B, L))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if kind == "span_comparison":
            batch["spans"] = torch.tensor([[[1, 2], [4, 5]]] * B)
        labels = torch.tensor([0.5, 1.0, 2.0]) if kind == "regression" else torch.tensor([0, 1, 0])
        logits = model(batch)
        loss = model.loss(logits, labels)
        assert loss.dim() == 0 and torch.isfinite(loss), kind
        assert TaskModel.predictions(kind, logits).shape == (B,), kind
