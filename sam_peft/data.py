"""Task data: jiant-layout reader, tokenizer encoding, padding, batch order.

The data layout is jiant's (the paper's code is built on jiant 2.2.0):

    <data_dir>/configs/<task>_config.json    {"task", "name", "paths": {"train", "val", "test"}}
    <data_dir>/data/<task>/<split>.jsonl      one JSON object per line

Reading validates every record up front and reports the first problem as a UserError
with file:line, so a bad file fails before any model is loaded, not hours into training.
"""

import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sam_peft.errors import UserError
from sam_peft.tasks import WSC_TARGET_KEYS, TaskSpec, get_task

SPLITS = ("train", "val", "test")
PREPARE_HINT = "get the data with `sam-peft data prepare --out DIR`"

# Tokenizer calls are batched (the Rust tokenizer parallelises a batch) but bounded, so
# a large split does not build one enormous intermediate encoding.
_ENCODE_CHUNK = 1024


@dataclass
class Example:
    guid: str  # f"{split}-{idx}": idx from the record if present, else its line number
    inputs: dict  # the task's fields (WSC: "text" and a normalised nested "target")
    label: int | float  # class id (index into TaskSpec.labels) or a float for regression


def demo_data_dir() -> Path:
    """The tiny built-in data set (all seven tasks, jiant layout) shipped with the package."""
    return Path(__file__).resolve().parent / "demo_data"


def resolve_data_dir(data_dir: str) -> Path:
    """A config's `data_dir`: a folder, or "demo" for the built-in data."""
    return demo_data_dir() if data_dir == "demo" else Path(data_dir).expanduser()


def split_fingerprint(data_dir: str, task: str) -> str:
    """Identity of a task's data by content: sha256 over its split files' sha256s (each file is
    read once per process). The same files under another path, or the path spelled another way,
    give the same fingerprint, so runs on them share their ids."""
    from sam_peft.io import file_sha256

    paths = task_paths(resolve_data_dir(data_dir), task)
    digest = hashlib.sha256()
    for split in SPLITS:
        if not paths[split].is_file():
            raise UserError(f"{paths[split]}: no such file ({PREPARE_HINT})")
        digest.update(f"{split}:{file_sha256(paths[split])}\n".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------
# Reading


def task_paths(data_dir: str, task: str, splits=SPLITS) -> dict[str, Path]:
    """Split name -> jsonl path, from <data_dir>/configs/<task>_config.json.

    Paths in the config are relative to the configs/ folder, as jiant writes them.
    """
    spec = get_task(task)
    root = Path(data_dir)
    if not root.is_dir():
        raise UserError(f"{root}: no such directory ({PREPARE_HINT})")
    config_path = root / "configs" / f"{spec.name}_config.json"
    if not config_path.is_file():
        raise UserError(f"{config_path}: no such file ({PREPARE_HINT})")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{config_path}: malformed JSON ({_one_line(err)})") from None
    paths = config.get("paths") if isinstance(config, dict) else None
    if not isinstance(paths, dict):
        raise UserError(f'{config_path}: expected a JSON object with a "paths" object')
    result = {}
    for split in splits:
        relative = paths.get(split)
        if not isinstance(relative, str) or not relative:
            raise UserError(f'{config_path}: no path for split {split!r} in "paths"')
        # normpath folds the "../data/..." that jiant writes, for readable error messages.
        result[split] = Path(os.path.normpath(config_path.parent / relative))
    return result


def drop_examples(train: list[Example], fraction: float, seed: int) -> list[Example]:
    """Table 2's perturbation: remove a seeded random `fraction` of the train split."""
    if not fraction:
        return train
    n_drop = int(round(fraction * len(train)))
    rng = np.random.default_rng(seed)
    drop = set(rng.choice(len(train), size=n_drop, replace=False).tolist())
    return [ex for i, ex in enumerate(train) if i not in drop]


def texts_of(examples: list[Example], spec: TaskSpec) -> list[str]:
    """Every string in the inputs (for training the `tiny` model's tokenizer)."""
    out = []

    def walk(x):
        if isinstance(x, str):
            out.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)

    for ex in examples:
        walk(ex.inputs)
    if spec.prompts:
        out.extend(spec.prompts.values())
    return out


def read_split(path: Path, spec: TaskSpec, split: str) -> list[Example]:
    """Every record of one jsonl split, validated against the task."""
    spec = get_task(spec)
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file ({PREPARE_HINT})")
    examples = []
    # Binary lines: split on "\n" only, so the line numbers we report are the ones an
    # editor shows even if a record holds a stray "\r", "\x85" or "\u2028".
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{where}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(record, dict):
                raise UserError(f"{where}: expected a JSON object, got {_json_type(record)}")
            inputs = _read_inputs(record, spec, where)
            label = _read_label(record, spec, where)
            idx = record.get("idx", line_no)
            examples.append(Example(guid=f"{split}-{idx}", inputs=inputs, label=label))
    if not examples:
        raise UserError(f"{path}: no records (empty file)")
    return examples


def load_splits(data_dir, task: str | TaskSpec, splits=SPLITS) -> dict[str, list[Example]]:
    """Split name -> examples, for the requested splits of one task."""
    spec = get_task(task)
    if isinstance(splits, str):  # load_splits(d, "rte", "val") means one split, not three letters
        splits = (splits,)
    paths = task_paths(data_dir, spec.name, splits)
    return {split: read_split(paths[split], spec, split) for split in splits}


def _read_inputs(record: dict, spec: TaskSpec, where: str) -> dict:
    return KIND_IO[spec.kind].read(record, spec, where)


def _read_fields(record: dict, spec: TaskSpec, where: str) -> dict:
    inputs = {field: _text_field(record, field, where) for field in spec.fields}
    if spec.prompts is not None:
        question = inputs["question"]
        if question not in spec.prompts:
            allowed = ", ".join(repr(name) for name in spec.prompts)
            raise UserError(f"{where}: question {question!r} is not one of {allowed}")
    return inputs


def _read_wsc_inputs(record: dict, spec: TaskSpec, where: str) -> dict:
    text = _text_field(record, "text", where)
    # jiant's files nest the span keys under "target"; other exports put them at the top
    # level. Accept both and always hand on the nested form.
    nested = "target" in record
    target = record["target"] if nested else record
    if not isinstance(target, dict):
        raise UserError(f"{where}: field 'target' must be an object, got {_json_type(target)}")
    prefix = "target." if nested else ""
    for key in WSC_TARGET_KEYS:
        if key not in target:
            raise UserError(f"{where}: missing field '{prefix}{key}'")
    words = text.split()
    for n in (1, 2):
        index = target[f"span{n}_index"]
        span_text = target[f"span{n}_text"]
        if isinstance(index, bool) or not isinstance(index, int):
            raise UserError(f"{where}: {prefix}span{n}_index must be an integer, got {_show(index)}")
        if not isinstance(span_text, str) or not span_text.split():
            raise UserError(f"{where}: {prefix}span{n}_text must be a non-empty string")
        # Span indices count words of text.split(); the span covers as many words as
        # span_text has (jiant's convention).
        end = index + len(span_text.split())
        if index < 0 or end > len(words):
            raise UserError(
                f"{where}: {prefix}span{n}_index {index} with {len(span_text.split())} word(s) "
                f"is out of range of text ({len(words)} words)"
            )
    return {"text": text, "target": {key: target[key] for key in WSC_TARGET_KEYS}}


def _text_field(record: dict, field: str, where: str) -> str:
    if field not in record:
        raise UserError(f"{where}: missing field '{field}'")
    value = record[field]
    if not isinstance(value, str):
        raise UserError(f"{where}: field '{field}' must be a string, got {_json_type(value)}")
    return value


def _read_label(record: dict, spec: TaskSpec, where: str) -> int | float:
    if "label" not in record:
        raise UserError(f"{where}: label missing")
    value = record["label"]
    if spec.labels is None:
        low, high = spec.label_range
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"{where}: label {_show(value)} is not a number")
        if not low <= value <= high:
            raise UserError(f"{where}: label {value} is outside the range {low}..{high}")
        return float(value)
    for class_id, allowed in enumerate(spec.labels):
        if _same_label(value, allowed):
            return class_id
    allowed = ", ".join(_show(label) for label in spec.labels)
    raise UserError(f"{where}: label {_show(value)} is not one of {allowed}")


def _same_label(value, allowed) -> bool:
    """Exact match, plus the obvious JSON-typing variants of the same label."""
    # Compare types first: in Python True == 1 and False == 0, and a WSC label must not
    # silently pass as a COPA one or the other way round.
    if type(value) is type(allowed):
        return value == allowed
    if isinstance(allowed, bool):  # WSC: "true" / "false" written as strings
        return isinstance(value, str) and value.strip().lower() == str(allowed).lower()
    if isinstance(allowed, str):  # CoLA / MRPC "0" / "1" written as bare numbers
        return type(value) is int and str(value) == allowed
    if isinstance(allowed, int):  # COPA 0 / 1 written as strings
        return isinstance(value, str) and value.strip() == str(allowed)
    return False


def _show(value) -> str:
    # JSON spelling for true/false/null (that is what the user wrote), Python's otherwise.
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return repr(value)


def _json_type(value) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


# ---------------------------------------------------------------------------------------
# Encoding


def encode(spec: TaskSpec, examples: list[Example], tokenizer, max_seq_len: int) -> list[dict]:
    """One feature dict (plain lists and ints) per example, ready for `collate`.

    Classification / regression: the tokenizer's own single-sentence or pair format.
    COPA: one pair (premise + " " + prompt, choice) per choice, as jiant does.
    WSC: the text alone plus "spans", the inclusive token positions of the two word spans.
    """
    spec = get_task(spec)
    _require_fast(tokenizer)
    _check_max_seq_len(tokenizer, spec, max_seq_len)
    features = []
    for start in range(0, len(examples), _ENCODE_CHUNK):
        features.extend(KIND_IO[spec.kind].encode(spec, examples[start:start + _ENCODE_CHUNK], tokenizer, max_seq_len))
    return features


# An encoded split in which fewer examples than this carry a single ordinary token (one that is
# neither special nor unknown) was not read by its tokenizer: training on it learns nothing.
MIN_TEXT_SHARE = 0.5


def share_with_text(features: list[dict], tokenizer) -> float:
    """The share of encoded examples holding at least one ordinary token (not special, not unknown)."""
    if not features:
        return 1.0
    not_text = set(tokenizer.all_special_ids)
    if tokenizer.unk_token_id is not None:
        not_text.add(tokenizer.unk_token_id)

    def has_text(ids) -> bool:
        rows = ids if ids and isinstance(ids[0], list) else [ids]  # multiple choice: one row per choice
        return any(token not in not_text for row in rows for token in row)

    return sum(has_text(feature["input_ids"]) for feature in features) / len(features)


def check_text(features: list[dict], tokenizer, model: str, what: str) -> None:
    """UserError naming the model and tokenizer when the encoded `what` carries (almost) no text:
    a tokenizer that turns every input into special or unknown tokens gives a run that trains
    and reports numbers, all of them meaningless."""
    share = share_with_text(features, tokenizer)
    if share < MIN_TEXT_SHARE:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise UserError(
            f"model '{model}': its tokenizer ({type(tokenizer).__name__} '{name}') reads {share:.0%} of the "
            f"{what} examples as anything but special or unknown tokens (at least {MIN_TEXT_SHARE:.0%} needed); "
            "broken or mismatched tokenizer files?"
        )


def _require_fast(tokenizer) -> None:
    # Word-to-token alignment for WSC needs offset mappings, which only the Rust-backed
    # ("fast") tokenizers provide; we require one everywhere so all tasks behave alike.
    if not getattr(tokenizer, "is_fast", False):
        model = getattr(tokenizer, "name_or_path", "") or "?"
        raise UserError(
            f"model {model!r}: needs a fast tokenizer (got {type(tokenizer).__name__}); "
            "use a model that ships tokenizer.json or install the 'tokenizers' package"
        )


def _check_max_seq_len(tokenizer, spec: TaskSpec, max_seq_len: int) -> None:
    pair = KIND_IO[spec.kind].pair(spec)
    needed = tokenizer.num_special_tokens_to_add(pair=pair) + (2 if pair else 1)
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < needed:
        raise UserError(
            f"max_seq_len {max_seq_len!r} is too small for {spec.name}: the tokenizer adds "
            f"{needed - (2 if pair else 1)} special tokens, so at least {needed} are needed"
        )


def _pick(encoding, i: int) -> dict:
    # token_type_ids only when the tokenizer produces them (BERT does, RoBERTa does not).
    feature = {"input_ids": list(encoding["input_ids"][i])}
    if "token_type_ids" in encoding:
        feature["token_type_ids"] = list(encoding["token_type_ids"][i])
    return feature


def _encode_plain(spec: TaskSpec, examples: list[Example], tokenizer, max_seq_len: int) -> list[dict]:
    first = [example.inputs[spec.fields[0]] for example in examples]
    second = [example.inputs[spec.fields[1]] for example in examples] if len(spec.fields) > 1 else None
    encoding = tokenizer(first, second, truncation="longest_first", max_length=max_seq_len)
    features = []
    for i, example in enumerate(examples):
        feature = _pick(encoding, i)
        feature["label"] = example.label
        features.append(feature)
    return features


def _encode_choices(spec: TaskSpec, examples: list[Example], tokenizer, max_seq_len: int) -> list[dict]:
    # COPA fields: premise, question, then the choices.
    premise_field, question_field, *choice_fields = spec.fields
    first, second = [], []
    for example in examples:
        prompt = spec.prompts[example.inputs[question_field]]
        for field in choice_fields:
            first.append(example.inputs[premise_field] + " " + prompt)
            second.append(example.inputs[field])
    encoding = tokenizer(first, second, truncation="longest_first", max_length=max_seq_len)
    features = []
    n = len(choice_fields)
    for i, example in enumerate(examples):
        per_choice = [_pick(encoding, i * n + c) for c in range(n)]
        feature = {key: [choice[key] for choice in per_choice] for key in per_choice[0]}
        feature["label"] = example.label
        features.append(feature)
    return features


def _encode_spans(spec: TaskSpec, examples: list[Example], tokenizer, max_seq_len: int) -> list[dict]:
    texts = [example.inputs["text"] for example in examples]
    encoding = tokenizer(texts, truncation=True, max_length=max_seq_len, return_offsets_mapping=True)
    features = []
    for i, example in enumerate(examples):
        text = example.inputs["text"]
        target = example.inputs["target"]
        offsets = encoding["offset_mapping"][i]
        # Positions of real text tokens: special tokens have no sequence id.
        content = [t for t, seq in enumerate(encoding.sequence_ids(i)) if seq is not None]
        word_chars = _word_char_spans(text)
        spans = []
        for n in (1, 2):
            first_word = target[f"span{n}_index"]
            last_word = first_word + len(target[f"span{n}_text"].split()) - 1
            char_start = word_chars[first_word][0]
            char_end = word_chars[last_word][1]
            spans.append(_token_span(offsets, content, char_start, char_end))
        feature = _pick(encoding, i)
        feature["spans"] = spans
        feature["label"] = example.label
        features.append(feature)
    return features


def _word_char_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) character offsets of each word of text.split()."""
    spans = []
    position = 0
    for word in text.split():
        # Only whitespace lies between `position` and the word, so the first match is it.
        start = text.index(word, position)
        position = start + len(word)
        spans.append((start, position))
    return spans


def _token_span(offsets, content: list[int], char_start: int, char_end: int) -> list[int]:
    """Inclusive [first, last] token positions covering characters [char_start, char_end).

    Overlap, not containment: byte-level BPE offsets leave out the leading space and
    WordPiece splits off punctuation, and either way a token touching the word belongs
    to it.
    """
    hits = [t for t in content if offsets[t][0] < char_end and offsets[t][1] > char_start]
    if hits:
        return [hits[0], hits[-1]]  # a span cut short by truncation keeps what is left
    # Nothing left of the span (truncated away): clamp to a real token so a span pooler
    # never indexes past the sequence.
    later = [t for t in content if offsets[t][0] >= char_start]
    if later:
        return [later[0], later[0]]
    position = content[-1] if content else 0
    return [position, position]


# ---------------------------------------------------------------------------------------
# Task kinds: how the examples of each kind are read and encoded (one entry per kind in
# tasks.KINDS; the model's side of a kind, its head, loss and predictions, is model.HEAD_KINDS)


@dataclass(frozen=True)
class KindIO:
    read: Callable  # (record, spec, where) -> the example's inputs, validated
    encode: Callable  # (spec, examples, tokenizer, max_seq_len) -> features
    pair: Callable  # (spec) -> whether the tokenizer encodes a pair of segments


def _two_fields(spec: TaskSpec) -> bool:
    return len(spec.fields) > 1


KIND_IO: dict[str, KindIO] = {
    "classification": KindIO(_read_fields, _encode_plain, _two_fields),
    "regression": KindIO(_read_fields, _encode_plain, _two_fields),
    "multiple_choice": KindIO(_read_fields, _encode_choices, _two_fields),
    "span_comparison": KindIO(_read_wsc_inputs, _encode_spans, lambda spec: False),
}


# ---------------------------------------------------------------------------------------
# Batching


def feature_length(feature: dict) -> int:
    """Token count of an encoded example (the longest choice for multiple choice)."""
    ids = feature["input_ids"]
    if ids and isinstance(ids[0], list):
        return max(len(choice) for choice in ids)
    return len(ids)


def collate(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch to its own longest sequence (dynamic padding) and stack it.

    input_ids / attention_mask / token_type_ids: [B, L], or [B, C, L] for multiple choice;
    labels: [B] (long, float32 for regression); spans: [B, 2, 2] when present.
    """
    if not features:
        raise ValueError("collate: empty batch")
    longest = max(feature_length(feature) for feature in features)
    multiple_choice = isinstance(features[0]["input_ids"][0], list)

    def padded(rows_of, value: int) -> torch.Tensor:
        def pad(row: list[int]) -> list[int]:
            return row + [value] * (longest - len(row))

        if multiple_choice:
            rows = [[pad(choice) for choice in rows_of(feature)] for feature in features]
        else:
            rows = [pad(rows_of(feature)) for feature in features]
        return torch.tensor(rows, dtype=torch.long)

    def ones(feature: dict):
        # The mask comes from the true lengths rather than from ids == pad_id, which would
        # be wrong for a tokenizer whose pad id is also a real token.
        ids = feature["input_ids"]
        return [[1] * len(choice) for choice in ids] if multiple_choice else [1] * len(ids)

    batch = {
        "input_ids": padded(lambda feature: feature["input_ids"], pad_id),
        "attention_mask": padded(ones, 0),
    }
    if "token_type_ids" in features[0]:
        batch["token_type_ids"] = padded(lambda feature: feature["token_type_ids"], 0)
    labels = [feature["label"] for feature in features]
    regression = any(isinstance(label, float) for label in labels)
    batch["labels"] = torch.tensor(labels, dtype=torch.float32 if regression else torch.long)
    if "spans" in features[0]:
        batch["spans"] = torch.tensor([feature["spans"] for feature in features], dtype=torch.long)
    return batch


def epoch_seed(seed: int, epoch: int) -> int:
    """The generator seed of one epoch's order: a 64-bit hash of (seed, epoch) by numpy's
    SeedSequence. `seed + epoch` made seed k's stream seed 0's without its first k epochs, so
    the seeds of a table saw nearly the same batches."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0])


class LengthGroupedSampler:
    """An endless, resumable stream of training batches (lists of example indices).

    Epoch e is a random permutation from a torch.Generator seeded with `epoch_seed(seed, e)`,
    a hash of the pair, so the stream depends only on (lengths, batch_size, seed), any point
    in it can be rebuilt from (epoch, position), and no two seeds share an epoch's order. With group_by_length, each run of
    mega_batch * batch_size examples of the permutation is sorted by length and cut into
    batches, and the batch order is then shuffled: batches hold examples of similar
    length (little padding) while the order stays random. Every example appears exactly
    once per epoch; the last, partial batch is kept.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int,
                 group_by_length: bool = False, mega_batch: int = 50):
        if not lengths:
            raise ValueError("LengthGroupedSampler: no examples")
        if batch_size < 1 or mega_batch < 1:
            raise ValueError("LengthGroupedSampler: batch_size and mega_batch must be >= 1")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.mega_batch = mega_batch
        self.epoch = 0
        self.position = 0  # index of the next batch within the epoch
        self._batches = None  # the current epoch's batches, built lazily

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All batches of one epoch, in order."""
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        if not self.group_by_length:
            return _chunks(order, self.batch_size)
        batches = []
        group = self.mega_batch * self.batch_size
        for start in range(0, len(order), group):
            # sorted() is stable: ties keep their random order.
            by_length = sorted(order[start:start + group], key=lambda i: -self.lengths[i])
            batches.extend(_chunks(by_length, self.batch_size))
        shuffle = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in shuffle]

    def next_batch(self) -> list[int]:
        if self._batches is None:
            self._batches = self.epoch_batches(self.epoch)
        batch = self._batches[self.position]
        self.position += 1
        if self.position == len(self._batches):
            # Roll over now, so a saved state always names the next batch to yield.
            self.epoch += 1
            self.position = 0
            self._batches = None
        return batch

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        epoch, position = state["epoch"], state["position"]
        if epoch < 0 or not 0 <= position < self.batches_per_epoch:
            raise ValueError(
                f"LengthGroupedSampler: state {state} does not fit "
                f"{self.batches_per_epoch} batches per epoch"
            )
        self.epoch = int(epoch)
        self.position = int(position)
        self._batches = None


def eval_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Evaluation batches: longest examples first (least padding; any out-of-memory
    shows up in the first batch), every index exactly once."""
    if batch_size < 1:
        raise ValueError("eval_batches: batch_size must be >= 1")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return _chunks(order, batch_size)


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[start:start + size] for start in range(0, len(items), size)]


# ---------------------------------------------------------------------------------------
# A run's data on its device


@dataclass
class TaskData:
    spec: TaskSpec
    features: dict[str, list[dict]]  # split -> encoded examples (see encode)
    pad_id: int

    def lengths(self, split: str) -> list[int]:
        return [feature_length(f) for f in self.features[split]]

    def labels(self, split: str) -> list:
        return [f["label"] for f in self.features[split]]


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class TrainStream:
    """A run's training batches, collated on its device, in the order of a LengthGroupedSampler
    over the train split: endless and resumable (state_dict / load_state_dict). The sampler is
    built on first use, since `sam-peft eval` has no train split.

    `use_batches(index_batches)` replaces the order by a given list of index batches (benchmarks
    feed every method the same batches).
    """

    def __init__(self, data: TaskData, batch_size: int, seed: int, group_by_length: bool, device):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.group_by_length, self.device = group_by_length, device
        self.sampler: LengthGroupedSampler | None = None
        self._order = None

    def _ensure(self) -> LengthGroupedSampler:
        if self.sampler is None:
            self.sampler = LengthGroupedSampler(self.data.lengths("train"), self.batch_size, seed=self.seed,
                                                group_by_length=self.group_by_length)
            self._order = iter(self.sampler)
        return self.sampler

    def use_batches(self, index_batches) -> None:
        self._ensure()
        self._order = iter(index_batches)

    def next(self) -> dict:
        self._ensure()
        idx = next(self._order)
        return to_device(collate([self.data.features["train"][i] for i in idx], self.data.pad_id), self.device)

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.data.features["train"]) / self.batch_size)

    def state_dict(self) -> dict | None:
        return self.sampler.state_dict() if self.sampler else None

    def load_state_dict(self, state: dict | None) -> None:
        if state is not None:
            self._ensure().load_state_dict(state)
