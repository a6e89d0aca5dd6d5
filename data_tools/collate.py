"""Transformed samples -> one batch dict with exactly the keys of `data_tools.batch`.

Why one module: tokenisation, MLM masking, phrase-span mapping and padding must agree on token
positions; doing them together over the batch keeps the tensor work vectorised ([B, Lt] ops) and
leaves per-sample Python only where a sample's own generator is drawn or its phrase list is read.

Padding slots (None entries, from a stream that ran short) are real rows of every tensor with
`sample_mask` False: their text is `[CLS] [SEP]` (so attention never sees an all-masked row), no
words, no MLM labels, zero pixels, empty boxes and phrases, key and image_id "".
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from data_tools.batch import IGNORE_INDEX, step_keys
from data_tools.errors import UserError
from data_tools.order import sample_seed
from data_tools.pixel_pool import PixelPool, release_pixels
from data_tools.transforms import normalise

MLM_REPLACE = (0.8, 0.1)
"""Of the masked words: 80% become [MASK], 10% a random token, the rest stay as they are (BERT)."""


def load_tokenizer(path: str | os.PathLike):
    """A Hugging Face fast tokenizer from a local folder (never the network); one clear line if absent.

    A tokenizer folder comes with data or a run folder, so it is untrusted: `trust_remote_code=False`
    says no to the Python code its `auto_map` may name (left unset, transformers would ask on the
    terminal), so only transformers' own tokenizer classes load it, never code from the folder."""
    from transformers import AutoTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise UserError(
            f"tokenizer: {folder} is not a folder (expected a Hugging Face tokenizer folder, e.g. <dataset>/tokenizer)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(folder), local_files_only=True, use_fast=True, trust_remote_code=False
        )
    except Exception as err:  # transformers raises OSError/ValueError/... for unusable folders
        raise UserError(
            f"tokenizer: {folder} could not be loaded: {type(err).__name__}: {err}".splitlines()[0]
        ) from None
    if not tokenizer.is_fast or tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
        raise UserError(f"tokenizer: {folder} needs a fast tokenizer with [MASK] and [PAD] tokens")
    return tokenizer


class TextEncoder:
    """Fixed-length batch tokenisation straight through the Rust `tokenizers` object of a Hugging
    Face fast tokenizer (a private copy set to truncate and pad to max_len).

    Why not `tokenizer(texts, ...)`: the transformers wrapper's per-encoding Python conversion cost
    twice the tokenisation itself; the ids, masks and offsets are identical (tested).
    """

    def __init__(self, tokenizer, max_len: int):
        from tokenizers import Tokenizer

        self.tokenizer, self.max_len = tokenizer, max_len
        self.mask_token_id, self.vocab_size = tokenizer.mask_token_id, len(tokenizer)
        self._backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._backend.enable_truncation(max_len)
        self._backend.enable_padding(length=max_len, pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token)
        self._other_lengths: dict[int, "TextEncoder"] = {}

    def with_length(self, max_len: int) -> "TextEncoder":
        """An encoder of the same tokenizer for another fixed length (built once, e.g. for object tags)."""
        if max_len == self.max_len:
            return self
        if max_len not in self._other_lengths:
            self._other_lengths[max_len] = TextEncoder(self.tokenizer, max_len)
        return self._other_lengths[max_len]

    def __call__(self, texts: list[str], offsets: bool = True) -> dict[str, torch.Tensor]:
        """ids, masks and (with `offsets`: phrase grounding needs them, hard negatives and tags do not;
        they are a fifth of the call) each token's character span."""
        encodings = self._backend.encode_batch(texts)
        text_mask = torch.from_numpy(np.array([e.attention_mask for e in encodings], dtype=np.bool_))  # [B, Lt]
        special = torch.from_numpy(np.array([e.special_tokens_mask for e in encodings], dtype=np.bool_))  # [B, Lt]
        out = {
            "input_ids": torch.from_numpy(np.array([e.ids for e in encodings], dtype=np.int64)),  # [B, Lt]
            "text_mask": text_mask,
            "word_mask": text_mask & ~special,  # [B, Lt]
        }
        if offsets:  # [B, Lt, 2]; flattened by fromiter: 0.6x the time of np.array on the nested tuples
            spans = itertools.chain.from_iterable(itertools.chain.from_iterable(e.offsets for e in encodings))
            out["offsets"] = torch.from_numpy(
                np.fromiter(spans, dtype=np.int64, count=len(texts) * self.max_len * 2)
            ).view(len(texts), self.max_len, 2)
        return out


def mlm_mask(
    input_ids: torch.Tensor,
    word_mask: torch.Tensor,
    seeds: Sequence[int | None],
    probability: float,
    mask_id: int,
    vocab_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking with per-sample generators: (mlm_input_ids, mlm_labels), both [B, Lt]."""
    batch, length = input_ids.shape
    draws = torch.zeros(batch, 2, length)  # [B, 2, Lt]: select, replace kind
    random_ids = torch.zeros(batch, length, dtype=torch.long)  # [B, Lt]
    for i, seed in enumerate(seeds):  # only the generator draws are per sample
        if seed is not None:
            g = torch.Generator().manual_seed(seed)
            draws[i] = torch.rand(2, length, generator=g)
            random_ids[i] = torch.randint(vocab_size, (length,), generator=g)
    masked = word_mask & (draws[:, 0] < probability)
    to_mask = masked & (draws[:, 1] < MLM_REPLACE[0])
    to_random = masked & (draws[:, 1] >= MLM_REPLACE[0]) & (draws[:, 1] < MLM_REPLACE[0] + MLM_REPLACE[1])
    mlm_input_ids = torch.where(
        to_mask, torch.full_like(input_ids, mask_id), torch.where(to_random, random_ids, input_ids)
    )
    mlm_labels = torch.where(masked, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return mlm_input_ids, mlm_labels


def phrase_positions(
    offsets, word_mask, phrases: list[dict[str, Any]] | None
) -> tuple[list[list[int]], list[list[int]]]:
    """Per phrase of one sample: token positions whose characters overlap its span, and its box links.

    offsets [Lt, 2], word_mask [Lt] (torch or numpy). A phrase cut off by truncation (no token left)
    is dropped. All phrases of the sample in one [phrases, Lt] comparison (numpy: a few
    microseconds, where torch ops per phrase cost ~10 us each).
    """
    if not phrases:
        return [], []
    offsets, word_mask = np.asarray(offsets), np.asarray(word_mask)
    spans = np.array([p["span"] for p in phrases], dtype=np.int64)  # [Q, 2]
    hits = word_mask & (offsets[None, :, 0] < spans[:, 1:]) & (offsets[None, :, 1] > spans[:, :1])  # [Q, Lt]
    tokens, boxes = [], []
    for p, row in zip(phrases, hits):
        hit = np.flatnonzero(row).tolist()
        if hit:
            tokens.append(hit)
            boxes.append(list(p["boxes"]))
    return tokens, boxes


def collate(
    samples: Sequence[dict[str, Any] | None],
    *,
    tokenizer,
    max_text_len: int,
    mlm_probability: float,
    seed: int,
    epoch: int,
    visual: str = "pixels",
    image_size: int = 64,
    defer_normalise: bool = False,
    pixel_pool: PixelPool | None = None,
    categories: dict[str, int] | None = None,
    max_tag_len: int = 0,
) -> dict[str, Any]:
    """Samples (None = padding slot) -> batch dict (data_tools.batch); B = len(samples).

    tokenizer: a Hugging Face fast tokenizer, or a TextEncoder built from one for max_text_len
    (the loader builds it once).

    defer_normalise: return uint8 `pixel_uint8` [B, S, S, 3] instead of `pixel_values` (what the
    loader does: a quarter of the bytes between processes and to the device, normalised there by
    `pretrain.engine.to_engine`, or by `transforms.normalise_batch`).

    categories: box label -> class index (the datasets' `box_labels` vocabulary): `box_categories`
    holds each kept box's index (-1 for a label outside it, or for boxes without labels).

    max_tag_len > 0: the object tags of each sample (its kept boxes' labels, first occurrences in box
    order, as one space-separated text) tokenised as `[CLS] tags [SEP] pad` into `tag_ids`, with
    `tag_mask` and BERT masking (`tag_mlm_ids`, `tag_mlm_labels`) from the sample's own generator.

    pixel_pool: build the uint8 pixel batch in shared memory, as a DataLoader worker process sends
    it, in a buffer of the worker's pool (data_tools.pixel_pool: reused once the training loop released
    it; `pixel_lease` in the batch): torch would otherwise copy it into a fresh shared segment when
    pickling, and the page faults of writing 4.8 MB (a 32 x 224 px batch) cost about 0.12 ms per sample.
    """
    encode = (
        tokenizer
        if isinstance(tokenizer, TextEncoder) and tokenizer.max_len == max_text_len
        else TextEncoder(tokenizer, max_text_len)
    )
    real = [s is not None for s in samples]
    captions = [s["caption"] if s is not None else "" for s in samples]
    text = encode(captions)
    seeds = [sample_seed(seed, epoch, s["key"], "mlm", s["repeat"]) if s is not None else None for s in samples]
    mlm_input_ids, mlm_labels = mlm_mask(
        text["input_ids"], text["word_mask"], seeds, mlm_probability, encode.mask_token_id, encode.vocab_size
    )
    batch: dict[str, Any] = {
        "input_ids": text["input_ids"],
        "text_mask": text["text_mask"],
        "word_mask": text["word_mask"],
        "mlm_input_ids": mlm_input_ids,
        "mlm_labels": mlm_labels,
        "sample_mask": torch.tensor(real, dtype=torch.bool),  # [B]
        "image_id": [s["image_id"] if s is not None else "" for s in samples],
        "key": [s["key"] if s is not None else "" for s in samples],
        "caption_index": torch.tensor([s["caption_index"] if s is not None else 0 for s in samples], dtype=torch.long),
    }
    batch.update(step_keys(batch))  # what the step would otherwise read back from the device or build mid-step
    if visual == "features":
        batch.update(_collate_features(samples))
        sizes = [s.get("image_hw") for s in samples if s is not None]
        if sizes and all(hw is not None for hw in sizes):  # else absent: ISDa says which key it needs
            batch["image_hw"] = torch.tensor(
                [s["image_hw"] if s is not None else (0, 0) for s in samples], dtype=torch.long
            )  # [B, 2] stored height, width; padding 0, 0
    else:
        batch["image_hw"] = (
            torch.tensor([[image_size, image_size]], dtype=torch.long).expand(len(samples), 2).clone()
        )  # [B, 2]
        shape = (len(samples), image_size, image_size, 3)
        pixels, lease = (
            pixel_pool.take(shape) if pixel_pool is not None else (torch.empty(shape, dtype=torch.uint8), None)
        )
        if lease is not None:
            batch["pixel_lease"] = lease  # [1] uint8, shared: release_pixels() lets the worker reuse the buffer
        rows = pixels.numpy()
        for i, s in enumerate(samples):
            if s is not None:
                rows[i] = s["pixels"]
            else:
                rows[i] = 0
        if defer_normalise:
            batch["pixel_uint8"] = pixels
        else:
            batch["pixel_values"] = normalise(pixels)  # [B, 3, S, S]
            release_pixels(batch)  # normalised into new memory: the buffer is free again

    batch["boxes"] = [
        torch.from_numpy(s["boxes"]) if s is not None and s["boxes"] is not None else torch.zeros(0, 4) for s in samples
    ]
    batch["phrase_tokens"], batch["phrase_boxes"] = [], []
    offsets, word_mask = text["offsets"].numpy(), text["word_mask"].numpy()  # [B, Lt, 2], [B, Lt]
    for i, s in enumerate(samples):
        tokens, links = phrase_positions(offsets[i], word_mask[i], s["phrases"] if s is not None else None)
        batch["phrase_tokens"].append(tokens)
        batch["phrase_boxes"].append(links)

    batch["box_categories"] = [box_categories(s, categories) for s in samples]
    if max_tag_len > 0:
        batch.update(_collate_tags(samples, encode.with_length(max_tag_len), seed, epoch, mlm_probability))

    negatives = [s["negative"] if s is not None and s["negative"] else "" for s in samples]
    if any(negatives):
        neg = encode(negatives, offsets=False)
    else:  # no hard negatives in this batch: every row is the empty caption, [CLS] [SEP]
        neg = encode([""], offsets=False)
        neg = {k: v.expand(len(samples), *v.shape[1:]).clone() for k, v in neg.items()}
    batch["neg_input_ids"], batch["neg_text_mask"], batch["neg_word_mask"] = (
        neg["input_ids"],
        neg["text_mask"],
        neg["word_mask"],
    )
    batch["has_negative"] = torch.tensor([bool(n) for n in negatives], dtype=torch.bool)  # [B]
    batch["negative_kind"] = [
        (s.get("negative_kind") or "") if s is not None and s["negative"] else "" for s in samples
    ]
    return batch


def box_categories(sample: dict[str, Any] | None, categories: dict[str, int] | None) -> torch.Tensor:
    """Class indices [k] of a sample's kept boxes (-1: no label, or a label outside `categories`)."""
    if sample is None or sample["boxes"] is None:
        return torch.zeros(0, dtype=torch.long)
    labels = sample.get("box_labels")
    if labels is None or categories is None:
        return torch.full((len(sample["boxes"]),), -1, dtype=torch.long)
    return torch.tensor([categories.get(label, -1) for label in labels], dtype=torch.long)


def tag_text(sample: dict[str, Any] | None) -> str:
    """A sample's object tags: its kept boxes' labels, each once, in box order ("" without labels)."""
    labels = (sample or {}).get("box_labels") or []
    return " ".join(dict.fromkeys(labels))


def _collate_tags(
    samples: Sequence[dict[str, Any] | None], encode: TextEncoder, seed: int, epoch: int, mlm_probability: float
) -> dict[str, torch.Tensor]:
    """`tag_ids`, `tag_mask` [B, Lg] (`[CLS] tags [SEP] pad`) and their BERT masking."""
    tags = encode([tag_text(s) for s in samples], offsets=False)
    seeds = [sample_seed(seed, epoch, s["key"], "tag_mlm", s["repeat"]) if s is not None else None for s in samples]
    tag_mlm_ids, tag_mlm_labels = mlm_mask(
        tags["input_ids"], tags["word_mask"], seeds, mlm_probability, encode.mask_token_id, encode.vocab_size
    )
    return {
        "tag_ids": tags["input_ids"],
        "tag_mask": tags["text_mask"],
        "tag_mlm_ids": tag_mlm_ids,
        "tag_mlm_labels": tag_mlm_labels,
    }


def _collate_features(samples: Sequence[dict[str, Any] | None]) -> dict[str, torch.Tensor]:
    """Precomputed region features padded to the batch's largest region count M."""
    present = [s for s in samples if s is not None]
    m = max((s["feats"].shape[0] for s in present), default=1)
    dim = present[0]["feats"].shape[1] if present else 1
    feats = torch.zeros(len(samples), m, dim)  # [B, M, D]
    pos = torch.zeros(len(samples), m, 7)  # [B, M, 7]
    mask = torch.zeros(len(samples), m, dtype=torch.bool)  # [B, M]
    for i, s in enumerate(samples):
        if s is not None:
            n = s["feats"].shape[0]
            if s["feats"].shape[1] != dim:
                raise UserError(f"data: sample {s['key']} has feature width {s['feats'].shape[1]}, others {dim}")
            feats[i, :n], pos[i, :n], mask[i, :n] = torch.from_numpy(s["feats"]), torch.from_numpy(s["pos"]), True
    return {"visual_feats": feats, "visual_pos": pos, "visual_mask": mask}
