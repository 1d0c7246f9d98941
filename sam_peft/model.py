"""Encoder + task head.

The backbone is any Hugging Face encoder, by hub name or local path, or `tiny`: a small
RoBERTa built from a config with random weights and a byte-level BPE tokenizer trained on the
task's own texts, so everything runs offline. Heads follow jiant 2.2.0's: a
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
import tempfile
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
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
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


def _build_tiny(texts: list[str], max_seq_len: int):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizerFast

    _quiet_transformers()
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        sorted(set(texts)),  # sorted: the trainer's result must not depend on record order
        vocab_size=TINY_VOCAB,
        min_frequency=1,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        show_progress=False,
    )
    with tempfile.TemporaryDirectory() as tmp:
        bpe.save_model(tmp)
        tokenizer = RobertaTokenizerFast(
            vocab_file=os.path.join(tmp, "vocab.json"), merges_file=os.path.join(tmp, "merges.txt")
        )
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


def load_pretrained(name: str):
    """Encoder and fast tokenizer from the hub or a local folder."""
    from transformers import AutoModel, AutoTokenizer

    _quiet_transformers()
    local = Path(name).expanduser()
    if not local.exists() and (name.startswith(("/", ".", "~")) or name.count("/") > 1):
        raise UserError(f"model '{name}': no such local folder (and not a hub name)")
    kwargs = {"local_files_only": True} if local.exists() else {}
    src = str(local) if local.exists() else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, use_fast=True, **kwargs)
        encoder = AutoModel.from_pretrained(src, **kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"model '{name}': cannot load it ({reason[:200]})") from None
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"model '{name}': needs a fast tokenizer (tokenizers-backed) for span alignment")
    return encoder, tokenizer


def load_backbone(name: str, texts: list[str] | None = None, max_seq_len: int = 256):
    if name == "tiny":
        if not texts:
            raise UserError("model 'tiny': needs the task's training texts to train its tokenizer")
        return build_tiny(texts, max_seq_len)
    return load_pretrained(name)


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


class TaskModel(nn.Module):
    """`encoder` (the backbone, whose parameters are the eligible ones) + `head`."""

    def __init__(self, encoder: nn.Module, spec: TaskSpec, dropout: float | None = None,
                 head_init: str = "torch_default"):
        super().__init__()
        self.encoder = encoder
        self.kind = spec.kind
        cfg = encoder.config
        hidden = cfg.hidden_size
        if dropout is None:
            dropout = getattr(cfg, "hidden_dropout_prob", getattr(cfg, "dropout", 0.1))
        if spec.kind == "span_comparison":
            self.head = SpanComparisonHead(hidden, 2, len(spec.labels), dropout)
        else:
            n_out = len(spec.labels) if spec.kind == "classification" else 1
            self.head = ClassificationHead(hidden, n_out, dropout)
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
        ids, mask, types = batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")
        if self.kind == "multiple_choice":
            B, C, L = ids.shape
            flat = lambda t: None if t is None else t.reshape(B * C, L)  # noqa: E731
            _, pooled = self.encode(flat(ids), flat(mask), flat(types))
            return self.head(pooled).view(B, C)
        states, pooled = self.encode(ids, mask, types)
        if self.kind == "span_comparison":
            return self.head(states, batch["spans"])
        logits = self.head(pooled)
        return logits.squeeze(-1) if self.kind == "regression" else logits

    def loss(self, logits, labels):
        if self.kind == "regression":
            return nn.functional.mse_loss(logits.float(), labels.float())
        return nn.functional.cross_entropy(logits.float(), labels)

    @staticmethod
    def predictions(kind: str, logits: torch.Tensor) -> torch.Tensor:
        return logits.float() if kind == "regression" else logits.argmax(-1)
