"""WordPiece tokenizers as Hugging Face folders (BertTokenizerFast layout, lower-case), loadable
offline with `transformers.AutoTokenizer.from_pretrained(folder)`.

Two ways to get one:
- `write_vocab_tokenizer(words, folder)`: a fixed vocabulary (the synthetic grammar's words, plus
  single characters so that any other word still splits into known pieces). Deterministic: the
  same words give the same files, so a synthetic dataset always carries the same tokenizer.
- `train_tokenizer(captions, vocab_size, folder)`: the `tokenizers` WordPiece trainer over a
  dataset's captions, for users without a pretrained vocabulary.

Special tokens and their ids are fixed: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4 (the model's
embeddings and the MLM objective rely on [PAD] being 0).
"""

from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Iterable, Iterator

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
FALLBACK_CHARACTERS = string.ascii_lowercase + string.digits + string.punctuation
"""Single characters (and their ## continuations) in every fixed vocabulary: nothing becomes [UNK]
that is written in lower-case ASCII."""


def grammar_vocabulary(words: Iterable[str]) -> list[str]:
    """Specials, then the words sorted, then fallback characters and ## pieces (no duplicates)."""
    vocab: list[str] = list(SPECIAL_TOKENS)
    seen = set(vocab)
    for token in [*sorted({w.lower() for w in words}), *FALLBACK_CHARACTERS, *(f"##{c}" for c in FALLBACK_CHARACTERS)]:
        if token not in seen:
            seen.add(token)
            vocab.append(token)
    return vocab


def _save(backend, folder: str | os.PathLike) -> Path:
    """Wrap a `tokenizers` WordPiece backend as BertTokenizerFast and save the folder."""
    from transformers import BertTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizerFast(
        tokenizer_object=backend,
        do_lower_case=True,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
        model_max_length=512,
    )
    tokenizer.save_pretrained(str(folder))
    # vocab.txt as well (one token per line, line number = id): tools that read BERT vocabularies
    # directly expect it beside tokenizer.json.
    vocab = sorted(backend.get_vocab().items(), key=lambda item: item[1])
    (folder / "vocab.txt").write_text("".join(f"{token}\n" for token, _ in vocab), encoding="utf-8")
    return folder


def _backend(vocab: dict[str, int] | None):
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    backend = Tokenizer(WordPiece(vocab or {"[UNK]": 0}, unk_token="[UNK]", max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    return backend, processors


def _post_processor(backend, processors) -> None:
    cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )


def write_vocab_tokenizer(words: Iterable[str], folder: str | os.PathLike) -> Path:
    """A deterministic tokenizer folder whose vocabulary is `grammar_vocabulary(words)`."""
    vocab = grammar_vocabulary(words)
    backend, processors = _backend({token: i for i, token in enumerate(vocab)})
    _post_processor(backend, processors)
    return _save(backend, folder)


def train_tokenizer(captions: Iterable[str] | Iterator[str], vocab_size: int, folder: str | os.PathLike) -> Path:
    """Train a WordPiece vocabulary of at most `vocab_size` tokens over captions and save the folder."""
    from tokenizers import trainers

    backend, processors = _backend(None)
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), continuing_subword_prefix="##", show_progress=False
    )
    backend.train_from_iterator(captions, trainer=trainer)
    _post_processor(backend, processors)
    return _save(backend, folder)


def train_dataset_tokenizer(dataset: str | os.PathLike, vocab_size: int, folder: str | os.PathLike, trust=None) -> int:
    """`python -m data_tools tokenizer DIR --vocab-size V --out T`: train over every caption of a dataset."""
    import sys

    from data_tools.errors import UserError
    from data_tools.stats import iter_metadata

    minimum = len(SPECIAL_TOKENS) + 1
    if vocab_size < minimum:
        raise UserError(f"--vocab-size={vocab_size}: must be at least {minimum}")
    metadata = iter_metadata(dataset, trust)  # `trust` (data_tools.trust): the user's opt-ins for pipe:/URL shards
    captions = (str(c) for _, meta in metadata for c in meta["captions"])
    out = train_tokenizer(captions, vocab_size, folder)
    from transformers import AutoTokenizer

    size = len(AutoTokenizer.from_pretrained(str(out), local_files_only=True, trust_remote_code=False))
    print(f"{out}: WordPiece tokenizer with {size} tokens trained on {dataset}", file=sys.stderr)
    return 0
