"""Tiny random-weight encoders of every supported family, saved to a folder as a local checkpoint
(config, safetensors weights, a fast tokenizer trained on the spot), so that `model: <folder>`
loads them through sam_peft.model.load_pretrained like a downloaded model, offline.

The tokenizer is a `PreTrainedTokenizerFast` around a `tokenizers` model, in the family's style
(BERT's lower-cased WordPiece with [CLS] A [SEP] B [SEP], or RoBERTa's byte-level BPE with
<s> A </s></s> B </s>), which both transformers 4.x and 5.x save and load with AutoTokenizer.
The families' own tokenizer classes are not what these tests are about.
"""

from __future__ import annotations

from pathlib import Path

import torch

# model_type -> (tokenizer style, config keys beyond the common sizes)
FAMILIES = {
    "bert": ("wordpiece", {"type_vocab_size": 2}),
    "roberta": ("bpe", {"type_vocab_size": 1}),
    "xlm-roberta": ("bpe", {"type_vocab_size": 1}),
    "electra": ("wordpiece", {"type_vocab_size": 2, "embedding_size": 16}),
    "mpnet": ("bpe", {}),
    # DeBERTa-v3's layout: relative attention sharing the key/query projections, no absolute positions.
    "deberta-v2": ("wordpiece", {"type_vocab_size": 0, "relative_attention": True, "pos_att_type": ["p2c", "c2p"],
                                 "share_att_key": True, "position_biased_input": False, "position_buckets": 16,
                                 "norm_rel_ebd": "layer_norm", "max_relative_positions": -1}),
    "distilbert": ("wordpiece", {}),
    "modernbert": ("wordpiece", {"reference_compile": False, "global_attn_every_n_layers": 2,
                                 "local_attention": 16}),
}
SIZES = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
MAX_LEN = 64
SPECIALS = {
    "wordpiece": {"unk_token": "[UNK]", "pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                  "mask_token": "[MASK]"},
    "bpe": {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>", "mask_token": "<mask>",
            "cls_token": "<s>", "sep_token": "</s>"},
}


def train_tokenizer(style: str, texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = SPECIALS[style]
    order = list(dict.fromkeys(specials[k] for k in ("bos_token", "cls_token", "pad_token", "sep_token", "eos_token",
                                                     "unk_token", "mask_token") if k in specials))
    if style == "wordpiece":
        backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        backend.normalizer = normalizers.BertNormalizer(lowercase=True)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=order, show_progress=False)
    else:
        backend = Tokenizer(models.BPE(unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=order, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(sorted(set(texts)), trainer)
    cls, sep = specials["cls_token"], specials["sep_token"]
    ids = [(t, backend.token_to_id(t)) for t in (cls, sep)]
    pair = f"{cls} $A {sep} $B:1 {sep}:1" if style == "wordpiece" else f"{cls} $A {sep} {sep} $B {sep}"
    backend.post_processor = processors.TemplateProcessing(single=f"{cls} $A {sep}", pair=pair, special_tokens=ids)
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=MAX_LEN, **specials)


def tiny_config(model_type: str, tokenizer):
    from transformers import AutoConfig

    _, extra = FAMILIES[model_type]
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.cls_token_id,
           "eos_token_id": tokenizer.sep_token_id}
    if model_type == "modernbert":
        ids.update(cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id)
    sizes = dict(SIZES)
    if model_type == "distilbert":  # its own names for the sizes
        sizes = {"dim": SIZES["hidden_size"], "n_layers": SIZES["num_hidden_layers"],
                 "n_heads": SIZES["num_attention_heads"], "hidden_dim": SIZES["intermediate_size"]}
    # + 2: RoBERTa-style position ids start after the padding id.
    return AutoConfig.for_model(model_type, vocab_size=len(tokenizer), max_position_embeddings=MAX_LEN + 2,
                                **sizes, **ids, **extra)


def save_tiny_encoder(model_type: str, folder: Path, texts: list[str], seed: int = 0) -> Path:
    """A random-weight encoder of that family and its tokenizer, saved in `folder` (returned)."""
    from transformers import AutoModel

    tokenizer = train_tokenizer(FAMILIES[model_type][0], texts)
    config = tiny_config(model_type, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModel.from_config(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
