"""Encoder + task head.

The backbone is any Hugging Face encoder, by hub name or local path, or `tiny`: a small
RoBERTa built from a config with random weights and a byte-level BPE tokenizer trained on the
task's own texts, so everything runs offline. Pretrained weights load in float32 from a local
folder, the Hugging Face cache or the hub; a model that cannot be had is a one-line UserError
before anything runs (check_model). Heads follow jiant 2.2.0's: a
RoBERTa-style classification head on the pooled output for classification, regression and
multiple choice (one score per choice), and self-attentive span pooling for WSC, with
nn.Linear's default initialisation as jiant keeps it (`train.head_init`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sam_peft.errors import UserError
from sam_peft.tasks import TaskSpec

# Sizes of the offline `tiny` model: small enough for CPU tests, large enough to learn a little.
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
TINY_VOCAB = 1000
TINY_SEED = 0  # the "pretrained" weights are the same for every run seed, as a real checkpoint is


def _quiet_transformers():
    """transformers' warnings and its own progress bars ("Loading weights" in 5.x) off: a run's
    output is sam-peft's, and a failure is reported by sam-peft in one line."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


_TINY_CACHE: dict[str, tuple] = {}  # in-process: a sweep builds each task's tiny base once


def build_tiny(texts: list[str], max_seq_len: int = 256):
    """A random-weight RoBERTa and a BPE tokenizer trained on `texts`; deterministic.

    The same texts always give the same base, so it is built once per process and copied.
    """
    key = hashlib.sha256(json.dumps([sorted(set(texts)), max_seq_len]).encode()).hexdigest()
    if key not in _TINY_CACHE:
        if len(_TINY_CACHE) >= 8:  # one per task is plenty; tiny bases are small
            _TINY_CACHE.pop(next(iter(_TINY_CACHE)))
        _TINY_CACHE[key] = _build_tiny(texts, max_seq_len)
    encoder, tokenizer = _TINY_CACHE[key]
    return copy.deepcopy(encoder), copy.deepcopy(tokenizer)


TINY_SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's, at its ids 0..4


def tiny_tokenizer(texts: list[str], vocab_size: int = TINY_VOCAB):
    """A RoBERTa-style byte-level BPE tokenizer trained on `texts`.

    Built as a `tokenizers` pipeline and handed over whole (`tokenizer_object=`): transformers 5
    ignores the `vocab_file=`/`merges_file=` arguments that 4.x took, and would build a tokenizer
    with an empty vocabulary from them. The pipeline is the one transformers 4.x made from those
    files (byte-level pre-tokenizer without a prefix space, RoBERTa's post-processor with trimmed
    offsets), so the `tiny` model is the same in 4.x and 5.x.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import RobertaTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(sorted(set(texts)), trainer)  # sorted: independent of record order
    # Positional (sep, cls): tokenizers 0.23 renamed the `cls` keyword.
    backend.post_processor = processors.RobertaProcessing(
        ("</s>", backend.token_to_id("</s>")), ("<s>", backend.token_to_id("<s>")),
        trim_offsets=True, add_prefix_space=False,
    )
    return RobertaTokenizerFast(tokenizer_object=backend)


def _build_tiny(texts: list[str], max_seq_len: int):
    from transformers import RobertaConfig, RobertaModel

    _quiet_transformers()
    tokenizer = tiny_tokenizer(texts)
    config = RobertaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=max(max_seq_len, 256) + 2,  # RoBERTa offsets positions by pad id + 1
        type_vocab_size=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **TINY,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        encoder = RobertaModel(config)
    tokenizer.model_max_length = max_seq_len
    return encoder, tokenizer


# ----------------------------------------------------------------------------- pretrained models

# Hub requests made to decide where a model comes from wait this long at most.
HUB_TIMEOUT_S = 10


def _looks_like_path(name: str) -> bool:
    """`./x`, `/x`, `~/x`, `a/b/c`, or `models/x` where `models/` is a folder here: a local path,
    never a hub id (hub ids are `name` or `owner/name`)."""
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        return True
    return "/" in name and Path(name.split("/")[0]).expanduser().is_dir()


def _local_model_dir(name: str) -> Path | None:
    """The local folder `name` names, checked; None when `name` is a hub id. UserError when it
    names a local path that is missing or is not a saved model."""
    local = Path(name).expanduser()
    if not local.exists():
        if _looks_like_path(name):
            raise UserError(f"model '{name}': no such local folder ({local.absolute()})")
        return None
    if not local.is_dir():
        raise UserError(f"model '{name}': {local} is a file; expected a model folder (save_pretrained's output)")
    config = local / "config.json"
    if not config.is_file():
        what = "is empty" if not any(local.iterdir()) else "has no config.json"
        raise UserError(f"model '{name}': the folder {local} {what}; expected a saved Hugging Face model "
                        "(config.json, weights, tokenizer files)")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"model '{name}': {config} is not valid JSON ({e})") from None
    return local


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE (or transformers' TRANSFORMERS_OFFLINE), as the Hugging Face libraries read it."""
    from huggingface_hub import constants

    set_now = any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
                  for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or set_now


def _require_hub(name: str) -> None:
    """Return if the hub can serve `name`; otherwise a one-line UserError, without waiting on
    transformers' retries (a sweep would wait on them once per run)."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, HFValidationError, RepositoryNotFoundError

    where = f"model '{name}': not a local folder and not in the Hugging Face cache"
    if _hub_offline():
        raise UserError(f"{where}, and the hub is off (HF_HUB_OFFLINE is set)")
    try:
        huggingface_hub.model_info(name, timeout=HUB_TIMEOUT_S)
    except HFValidationError:
        raise UserError(f"model '{name}': neither a local folder nor a valid hub id") from None
    except GatedRepoError:
        return  # it exists; the download says whether this user may read it
    except RepositoryNotFoundError:
        raise UserError(f"{where}, and the hub ({constants.ENDPOINT}) has no such model "
                        "(or it is private: log in with `hf auth login`)") from None
    except HfHubHTTPError as e:
        raise UserError(f"{where}, and the hub ({constants.ENDPOINT}) answered: {_first_line(e)}") from None
    except Exception as e:  # connection refused, DNS failure, timeout, proxy error: no hub
        raise UserError(f"{where}, and the hub ({constants.ENDPOINT}) is unreachable ({_short_reason(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _short_reason(e: BaseException) -> str:
    """The exception's type, and its message when that is short (requests nests whole reprs)."""
    line = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {line}" if line and len(line) <= 100 else type(e).__name__


def _in_hub_cache(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # not a valid repo id: not in the cache
        return False


def check_model(name: str) -> None:
    """What a run's `model` needs before anything starts: `tiny`, a saved model folder, a model in
    the Hugging Face cache, or a hub id with the hub reachable. One-line UserError otherwise;
    downloads nothing and loads no weights."""
    if name == "tiny" or _local_model_dir(name) is not None or _in_hub_cache(name):
        return
    _require_hub(name)


def _from_pretrained(name: str, source: str, local_files_only: bool):
    from transformers import AutoModel, AutoTokenizer

    where = f"model '{name}'"
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, use_fast=True, local_files_only=local_files_only)
    except Exception as e:  # each version fails its own way on missing or broken tokenizer files
        raise UserError(f"{where}: cannot load its tokenizer ({type(e).__name__}: {_first_line(e)})") from None
    try:
        # float32 whatever the checkpoint holds: transformers 5 keeps a checkpoint's own dtype
        # (a bf16 copy would meet fp32 heads), and train.precision decides autocast.
        # (`dtype=`: transformers >= 4.56 takes it; `torch_dtype=` is its deprecated name.)
        encoder = AutoModel.from_pretrained(source, local_files_only=local_files_only, dtype=torch.float32)
    except Exception as e:  # missing, truncated or foreign weights, an unknown model_type, ...
        raise UserError(f"{where}: cannot load its weights ({type(e).__name__}: {_first_line(e)})") from None
    return encoder, tokenizer


def load_pretrained(name: str):
    """Encoder (float32) and fast tokenizer from a local folder, the Hugging Face cache, or the hub.

    A hub id is looked up in the cache first, and the hub is asked only when it is not there,
    so a cached model loads without network; everything that can go wrong is a one-line
    UserError naming the model.
    """
    _quiet_transformers()
    local = _local_model_dir(name)
    loaded = None
    if local is not None:
        loaded = _from_pretrained(name, str(local), local_files_only=True)
    elif _in_hub_cache(name):
        try:
            loaded = _from_pretrained(name, name, local_files_only=True)
        except UserError:  # only partly in the cache: the hub has the rest
            pass
    if loaded is None:
        _require_hub(name)
        loaded = _from_pretrained(name, name, local_files_only=False)
    encoder, tokenizer = loaded
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"model '{name}': needs a fast tokenizer (tokenizers-backed) for span alignment")
    if len(tokenizer.get_vocab()) <= len(set(tokenizer.all_special_tokens)):
        raise UserError(f"model '{name}': its tokenizer has no vocabulary besides special tokens "
                        "(tokenizer files missing from the model folder?)")
    return encoder, tokenizer


def load_backbone(name: str, texts: list[str] | None = None, max_seq_len: int = 256):
    if name == "tiny":
        if not texts:
            raise UserError("model 'tiny': needs the task's training texts to train its tokenizer")
        return build_tiny(texts, max_seq_len)
    return load_pretrained(name)


# ----------------------------------------------------------------------------- position table


# Encoders whose position table starts at padding_idx + 1 (RoBERTa's scheme, from fairseq): that
# many rows are never used for a token position.
PADDING_OFFSET_TYPES = ("roberta", "xlm-roberta", "camembert", "roberta-prelayernorm", "data2vec-text", "xmod",
                        "longformer")


def position_limit(encoder) -> tuple[int, int, int] | None:
    """(usable positions, rows in the position table, offset) of an encoder with absolute
    positions, from its config; None when it declares no position table."""
    config = getattr(encoder, "config", None)
    rows = getattr(config, "max_position_embeddings", None)
    if isinstance(rows, bool) or not isinstance(rows, int) or rows <= 0:
        return None
    table = getattr(getattr(encoder, "embeddings", None), "position_embeddings", None)
    if isinstance(table, nn.Embedding):
        offset = table.padding_idx + 1 if table.padding_idx is not None else 0
    elif getattr(config, "model_type", None) in PADDING_OFFSET_TYPES:
        offset = (getattr(config, "pad_token_id", None) or 0) + 1
    else:
        offset = 0
    return rows - offset, rows, offset


def check_max_seq_len(encoder, name: str, max_seq_len: int) -> None:
    """A train.max_seq_len beyond the encoder's position table would crash at the first long batch."""
    limit = position_limit(encoder)
    if limit is not None and max_seq_len > limit[0]:
        usable, rows, offset = limit
        table = f"{rows} position embeddings" + (f" less RoBERTa's offset of {offset}" if offset else "")
        raise UserError(f"train.max_seq_len {max_seq_len}: the encoder '{name}' takes at most "
                        f"{usable} tokens ({table}); set train.max_seq_len to {usable} or less")


# ----------------------------------------------------------------------------- heads


class ClassificationHead(nn.Module):
    """RoBERTa's classification head, as jiant uses it: dropout, dense, tanh, dropout, linear."""

    def __init__(self, hidden: int, n_out: int, dropout: float):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, n_out)

    def forward(self, pooled):
        x = self.dropout(pooled)
        x = torch.tanh(self.dense(x))
        return self.out_proj(self.dropout(x))


class SpanComparisonHead(nn.Module):
    """jiant's span comparison: self-attentive pooling of each span, concatenated, linear.

    Self-attentive pooling (Lee et al. 2017, allennlp's SelfAttentiveSpanExtractor): one
    global attention logit per token, softmax over the tokens inside the span (inclusive
    [start, end]), weighted sum of their states.
    """

    def __init__(self, hidden: int, n_spans: int, n_labels: int, dropout: float):
        super().__init__()
        self.attention = nn.Linear(hidden, 1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden * n_spans, n_labels)

    def forward(self, states, spans):
        # states [B, L, H]; spans [B, S, 2] inclusive token positions
        B, L, H = states.shape
        logits = self.attention(states).squeeze(-1)  # [B, L]
        pos = torch.arange(L, device=states.device)
        inside = (pos[None, None, :] >= spans[..., :1]) & (pos[None, None, :] <= spans[..., 1:])  # [B,S,L]
        scores = logits[:, None, :].masked_fill(~inside, torch.finfo(logits.dtype).min)
        weights = torch.softmax(scores.float(), dim=-1).to(states.dtype)  # [B, S, L]
        pooled = torch.einsum("bsl,blh->bsh", weights, states).reshape(B, -1)
        return self.classifier(self.dropout(pooled))


# ----------------------------------------------------------------------------- kinds


@dataclass(frozen=True)
class HeadKind:
    """The model's side of a task kind (tasks.KINDS); data.KIND_IO is the data's side.

    head(hidden, n_labels, dropout) -> the head module; logits(model, batch) -> the head's output
    for a batch; loss(logits, labels) and predict(logits) -> what the metrics read.
    """

    head: Callable[[int, int, float], nn.Module]
    logits: Callable[["TaskModel", dict], torch.Tensor]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    predict: Callable[[torch.Tensor], torch.Tensor]


def _pooled_logits(model: "TaskModel", batch: dict) -> torch.Tensor:
    _, pooled = model.encode(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
    return model.head(pooled)


def _choice_logits(model: "TaskModel", batch: dict) -> torch.Tensor:
    # [B, C, L]: every (premise, choice) pair through the encoder, one score each, softmax over C.
    ids, mask, types = batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")
    B, C, L = ids.shape
    flat = lambda t: None if t is None else t.reshape(B * C, L)  # noqa: E731
    _, pooled = model.encode(flat(ids), flat(mask), flat(types))
    return model.head(pooled).view(B, C)


def _span_logits(model: "TaskModel", batch: dict) -> torch.Tensor:
    states, _ = model.encode(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
    return model.head(states, batch["spans"])


def _cross_entropy(logits, labels):
    return nn.functional.cross_entropy(logits.float(), labels)


def _argmax(logits):
    return logits.argmax(-1)


HEAD_KINDS: dict[str, HeadKind] = {
    "classification": HeadKind(
        head=lambda hidden, n_labels, dropout: ClassificationHead(hidden, n_labels, dropout),
        logits=_pooled_logits, loss=_cross_entropy, predict=_argmax),
    "regression": HeadKind(
        head=lambda hidden, n_labels, dropout: ClassificationHead(hidden, 1, dropout),
        logits=lambda model, batch: _pooled_logits(model, batch).squeeze(-1),
        loss=lambda logits, labels: nn.functional.mse_loss(logits.float(), labels.float()),
        predict=lambda logits: logits.float()),
    "multiple_choice": HeadKind(  # one score per choice
        head=lambda hidden, n_labels, dropout: ClassificationHead(hidden, 1, dropout),
        logits=_choice_logits, loss=_cross_entropy, predict=_argmax),
    "span_comparison": HeadKind(  # two spans pooled, then compared
        head=lambda hidden, n_labels, dropout: SpanComparisonHead(hidden, 2, n_labels, dropout),
        logits=_span_logits, loss=_cross_entropy, predict=_argmax),
}


class TaskModel(nn.Module):
    """`encoder` (the backbone, whose parameters are the eligible ones) + `head`, for the task's
    kind (HEAD_KINDS)."""

    def __init__(self, encoder: nn.Module, spec: TaskSpec, dropout: float | None = None,
                 head_init: str = "torch_default"):
        super().__init__()
        self.encoder = encoder
        self.kind = spec.kind
        self.head_kind = HEAD_KINDS[spec.kind]
        cfg = encoder.config
        if dropout is None:
            dropout = getattr(cfg, "hidden_dropout_prob", getattr(cfg, "dropout", 0.1))
        self.head = self.head_kind.head(cfg.hidden_size, len(spec.labels or ()), dropout)
        # torch_default: nn.Linear's own initialisation, which jiant's heads keep; hf_normal: HF's.
        if head_init == "hf_normal":
            self._init_head(getattr(cfg, "initializer_range", 0.02))
        elif head_init != "torch_default":
            raise ValueError(f"unknown head_init {head_init!r}")
        # Whether the encoder takes token_type_ids (RoBERTa has one type; BERT uses two).
        self.uses_token_types = getattr(cfg, "type_vocab_size", 0) > 1

    def _init_head(self, std: float):
        for m in self.head.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)

    def encode(self, input_ids, attention_mask, token_type_ids=None):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and self.uses_token_types:
            kwargs["token_type_ids"] = token_type_ids
        out = self.encoder(**kwargs)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:  # encoders without a pooler: the first token's state
            pooled = out.last_hidden_state[:, 0]
        return out.last_hidden_state, pooled

    def forward(self, batch: dict) -> torch.Tensor:
        return self.head_kind.logits(self, batch)

    def loss(self, logits, labels):
        return self.head_kind.loss(logits, labels)

    @staticmethod
    def predictions(kind: str, logits: torch.Tensor) -> torch.Tensor:
        return HEAD_KINDS[kind].predict(logits)
