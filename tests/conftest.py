"""Shared test fixtures: tiny tokenizers built offline with the `tokenizers` library.

Tests must never download a model, so we train throwaway tokenizers of the two families
the project meets in practice: byte-level BPE (RoBERTa) and lower-casing WordPiece
(BERT). Both fixtures are factories: call them with an optional corpus to get a
tokenizer that has seen that text. Results are cached per corpus for the session.
"""

import string

import pytest
import torch

BASE_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A small cat slept on the warm windowsill all afternoon.",
    "She asked whether the train would leave before noon.",
    "They could not open the door because it was locked.",
    "What was the cause of this? What happened as a result?",
    "Numbers like 1,500 and 3.5 percent appear in the news.",
]


def _corpus_key(corpus) -> tuple:
    return tuple(BASE_CORPUS) + tuple(corpus or ())


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """make(corpus=None, vocab_size=400, trim_offsets=True) -> RobertaTokenizerFast.

    Byte-level BPE like RoBERTa's: <s>=0, <pad>=1, </s>=2, <unk>=3, <mask>; a pair is
    encoded as <s> A </s></s> B </s>; no token_type_ids. Byte-level means every string
    encodes without unknown tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import RobertaTokenizerFast

    cache = {}

    def make(corpus=None, vocab_size: int = 400, trim_offsets: bool = True):
        key = (_corpus_key(corpus), vocab_size, trim_offsets)
        if key not in cache:
            backend = Tokenizer(models.BPE())
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            backend.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(
                vocab_size=vocab_size,
                special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                show_progress=False,
            )
            backend.train_from_iterator(list(key[0]), trainer)
            # (sep, cls) positionally: tokenizers 0.23 renamed the `cls` keyword.
            backend.post_processor = processors.RobertaProcessing(
                ("</s>", backend.token_to_id("</s>")),
                ("<s>", backend.token_to_id("<s>")),
                add_prefix_space=False,
                trim_offsets=trim_offsets,
            )
            cache[key] = RobertaTokenizerFast(
                tokenizer_object=backend, trim_offsets=trim_offsets, name_or_path="tiny-bpe"
            )
        return cache[key]

    return make


@pytest.fixture(scope="session")
def wordpiece_tokenizer():
    """make(corpus=None, vocab_size=300) -> BertTokenizerFast (lower-casing WordPiece).

    [CLS] A [SEP] B [SEP] with token_type_ids. The vocabulary is trained on the corpus
    and then given every character of it (plain and "##"-continued, plus printable
    ASCII), so no word of the corpus turns into [UNK].
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    cache = {}

    def make(corpus=None, vocab_size: int = 300):
        key = (_corpus_key(corpus), vocab_size)
        if key not in cache:
            trained = Tokenizer(models.WordPiece(unk_token="[UNK]"))
            trained.normalizer = normalizers.BertNormalizer(lowercase=True)
            trained.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
            trainer = trainers.WordPieceTrainer(
                vocab_size=vocab_size,
                special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
                show_progress=False,
            )
            trained.train_from_iterator(list(key[0]), trainer)
            vocab = sorted(trained.get_vocab().items(), key=lambda item: item[1])
            tokens = [token for token, _ in vocab]
            chars = set(string.printable.lower()) - set(string.whitespace)
            for text in key[0]:
                chars |= set(trained.normalizer.normalize_str(text)) - set(string.whitespace)
            known = set(tokens)
            for char in sorted(chars):
                for piece in (char, "##" + char):
                    if piece not in known and not char.isspace():
                        tokens.append(piece)
                        known.add(piece)
            # BERT's pipeline on the extended vocabulary, handed over whole: transformers 5
            # ignores BertTokenizerFast(vocab_file=...).
            ids = {token: i for i, token in enumerate(tokens)}
            backend = Tokenizer(models.WordPiece(ids, unk_token="[UNK]"))
            backend.normalizer = normalizers.BertNormalizer(lowercase=True)
            backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
            backend.decoder = decoders.WordPiece(prefix="##")
            backend.post_processor = processors.TemplateProcessing(
                single="[CLS]:0 $A:0 [SEP]:0",
                pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
                special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
            )
            cache[key] = BertTokenizerFast(
                tokenizer_object=backend, do_lower_case=True, name_or_path="tiny-wordpiece"
            )
        return cache[key]

    return make


@pytest.fixture
def keep_torch_threads():
    """In-process runs set torch's thread count from the config; give the other tests theirs back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def one_torch_thread():
    """Tiny models run faster on one intra-op thread than on several, and tens of times faster
    when other processes share the cores (tests/test_hf*.py, test_export.py use it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
